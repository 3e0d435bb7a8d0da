"""Bounded-memory FAISS builds from the store (issue 10): streamed (train on a sample, add in chunks, never every
vector at once), `auto` by count and memory budget, IVF-PQ re-ranked on the stored vectors, and growth folded
into the trained index (retrained only past RETRAIN_GROWTH), through write_faiss, reindex, compact and the CLI.

Data: clustered 32-d unit vectors written through the store's API, text-like queries (a cluster direction
plus noise: far from every indexed vector).
"""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
from click.testing import CliRunner

from ruclip_search import faiss_index
from ruclip_search.indexer import reindex, write_faiss
from ruclip_search.store import EmbeddingSnapshot, PhotoWrite, Store, encode_embedding

DIM, K = 32, 10


def vectors(n: int, seed: int = 0, clusters: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """(unit vectors (n, DIM), cluster centres): clusters of varying spread."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    c = rng.integers(clusters, size=n)
    v = centres[c] + rng.normal(size=(n, DIM)) * rng.uniform(0.1, 0.3, clusters)[c, None]
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32), centres


def text_queries(centres: np.ndarray, n: int = 60, seed: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = centres[rng.integers(len(centres), size=n)] * 0.35 + rng.normal(scale=DIM**-0.5, size=(n, DIM))
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def put(store: Store, vecs: np.ndarray, start: int = 0, prefix: str = "p") -> list[int]:
    writes = [PhotoWrite(f"{prefix}{start + i}", encode_embedding(v)) for i, v in enumerate(vecs)]
    return store.put_photos(writes)


def new_store(folder: Path) -> Store:
    """A new index store for DIM-d embeddings (no FAISS file yet)."""
    s = Store.create(folder)
    with s.transaction() as conn:
        s.set_model(conn, "m", DIM)
    return s


@pytest.fixture
def store(tmp_path: Path):
    with new_store(tmp_path / "idx") as s:
        yield s


def stored(store: Store) -> tuple[np.ndarray, np.ndarray]:
    return store.all_embeddings()


def exact_ids(store: Store, queries: np.ndarray, k: int = K) -> np.ndarray:
    ids, vecs = stored(store)
    return ids[faiss_index.exact_knn(vecs, queries, k)]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth, strict=True)]))


def test_embedding_snapshot_samples_chunks_and_fetches(store: Store) -> None:
    vecs, _ = vectors(2000)
    ids = np.array(put(store, vecs), dtype=np.int64)
    store.delete_keys([f"p{i}" for i in range(0, 2000, 3)])  # holes in the id range
    live = np.array(sorted(set(ids.tolist()) - set(ids[::3].tolist())), dtype=np.int64)
    with store.embedding_snapshot(batch=500) as snap:
        assert snap.count == len(live) and snap.dim == DIM and snap.seq == store.max_seq()
        chunks = list(snap.chunks())
        assert max(len(c[0]) for c in chunks) == 500
        np.testing.assert_array_equal(np.concatenate([c[0] for c in chunks]), live)
        sample_ids, sample = snap.sample(300, seed=1)
        assert len(sample_ids) == 300 and np.isin(sample_ids, live).all() and len(set(sample_ids.tolist())) == 300
        np.testing.assert_array_equal(sample_ids, snap.sample(300, seed=1)[0])  # reproducible
        np.testing.assert_allclose(sample, store.get_embeddings(sample_ids.tolist()))
        got = snap.fetch(np.array([live[5], ids[0], live[7]]))
        assert np.isnan(got[1]).all() and not np.isnan(got[[0, 2]]).any()  # a deleted id: a NaN row
        # the snapshot holds still while a writer goes on
        put(store, vecs[:10], 5000)
        assert sum(len(c[0]) for c in snap.chunks()) == len(live)
    assert isinstance(snap, EmbeddingSnapshot)
    changed_ids, changed, gone, seq = store.changed_embeddings(snap.seq)
    assert len(changed_ids) == 10 and len(gone) == 0 and seq == store.max_seq()
    np.testing.assert_allclose(changed, store.get_embeddings(changed_ids.tolist()))


def test_write_faiss_streams_from_the_store(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rebuild never asks the store for every vector at once, and reads chunks of the snapshot's size."""
    vecs, centres = vectors(2000)
    put(store, vecs)

    def refuse(*_a, **_k):
        raise AssertionError("loaded every embedding at once")

    for name in ("all_embeddings", "snapshot_embeddings", "get_embeddings"):
        monkeypatch.setattr(Store, name, refuse)
    sizes: list[int] = []
    real_chunks = EmbeddingSnapshot.chunks

    def chunks(self):
        for ids, v in real_chunks(self):
            sizes.append(len(ids))
            yield ids, v

    monkeypatch.setattr(EmbeddingSnapshot, "chunks", chunks)
    real_snapshot = Store.embedding_snapshot
    monkeypatch.setattr(Store, "embedding_snapshot", lambda self, batch=0: real_snapshot(self, batch=500))
    monkeypatch.setattr(faiss_index, "TRAIN_PER_LIST", 10)  # a sample smaller than the collection
    info = write_faiss(store, "ivf", rebuild=True)
    # one pass in chunks of the snapshot's batch (the training sample was read by id)
    assert sizes == [500] * 4 and info["retrained"] and info["n"] == 2000 and info["trained_n"] == 2000
    monkeypatch.undo()
    assert store.get_meta("index_trained_n") == "2000" and store.get_meta("faiss_seq") == str(store.max_seq())
    index = faiss_index.load(store.faiss_path(), params=json.loads(store.get_meta("index_params")))
    queries = text_queries(centres)
    found = faiss_index.search(index, queries, K)[1]
    assert recall(found, exact_ids(store, queries)) >= faiss_index.MIN_RECALL


def test_ivfpq_reranks_on_the_stored_vectors(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a small memory budget `auto` builds IVF-PQ; tuned with re-ranking on the store's float16 vectors,
    an Index search returns true cosines at recall@10 >= 0.95 on held-out text-like queries, full pages."""
    from conftest import StandInModel

    from ruclip_search.search import Index

    vecs, centres = vectors(3000, seed=2)
    put(store, vecs)
    monkeypatch.setattr(faiss_index, "FLAT_BELOW", 1000)
    budget = 3000 * DIM * 4 // 2  # the float32 vectors would not fit
    info = write_faiss(store, "auto", memory_budget=budget)
    assert info["type"] == "ivfpq" and info["params"]["rerank"] > 0
    assert info["recall_at_10"] >= faiss_index.MIN_RECALL and store.get_meta("memory_budget") == str(budget)
    queries = text_queries(centres, seed=11)
    truth = exact_ids(store, queries)
    model = StandInModel(dim=DIM)
    with Index.open(store.dir, model=model, device="cpu") as idx:
        assert idx._state.index_type == "ivfpq"
        hits = [idx.search(q, k=K) for q in queries]
        assert all(len(h) == K for h in hits)
        assert recall(np.array([[h.id for h in hs] for hs in hits]), truth) >= faiss_index.MIN_RECALL
        by_id = dict(zip(*stored(store), strict=True))
        for q, hs in zip(queries[:5], hits[:5], strict=True):
            assert [h.score for h in hs] == pytest.approx([float(by_id[h.id] @ q) for h in hs], abs=1e-5)
        # without re-ranking the PQ codes alone rank worse: the re-ranking is what reaches the bar
        plain = faiss_index.search(idx._state.faiss, queries, K)[1]
        assert recall(plain, truth) < recall(np.array([[h.id for h in hs] for hs in hits]), truth)


def test_growth_is_added_to_the_trained_index(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A few percent more (and some replaced and deleted) photos fold into the trained IVF index: the same
    centroids, no retraining, every change reflected; past RETRAIN_GROWTH the index is trained anew."""
    vecs, centres = vectors(3000, seed=3)
    put(store, vecs)
    first = write_faiss(store, "ivf")
    assert first["retrained"]
    index = faiss_index.load(store.faiss_path(), mmap=False)
    centroids = faiss.extract_index_ivf(index).quantizer.reconstruct_n(0, first["params"]["nlist"])
    more, _ = vectors(150, seed=4)
    put(store, more, 3000)  # +5 %
    put(store, more[:20], 0)  # p0..p19 replaced
    store.delete_keys([f"p{i}" for i in range(20, 40)])
    old_file = store.faiss_path()
    info = write_faiss(store)
    assert not info["retrained"] and info["folded"] == 190 and info["trained_n"] == 3000 and info["n"] == 3130
    assert info["params"] == first["params"] and store.get_meta("index_trained_n") == "3000"
    assert store.faiss_path() != old_file and not old_file.exists()
    index = faiss_index.load(store.faiss_path(), mmap=False, params=info["params"])
    ivf = faiss.extract_index_ivf(index)
    np.testing.assert_array_equal(ivf.quantizer.reconstruct_n(0, ivf.nlist), centroids)
    ids, current = stored(store)
    assert index.ntotal == len(ids) == 3130
    found = faiss_index.search(index, current[:50], 1)[1][:, 0]  # each vector finds its own id (new ones too)
    np.testing.assert_array_equal(found, ids[:50])
    queries = text_queries(centres)
    assert recall(faiss_index.search(index, queries, K)[1], exact_ids(store, queries)) >= faiss_index.MIN_RECALL - 0.03
    assert store.get_meta("faiss_seq") == str(store.max_seq())
    # grown past RETRAIN_GROWTH x what it was trained on: trained anew on the whole collection
    monkeypatch.setattr(faiss_index, "RETRAIN_GROWTH", 1.1)
    put(store, vectors(200, seed=5)[0], 10_000)
    info = write_faiss(store)
    assert info["retrained"] and info["trained_n"] == info["n"] == 3330
    # an explicit reindex always retrains
    assert reindex(store.dir, "ivf")["retrained"]


def test_a_file_the_change_log_does_not_cover_is_rebuilt(store: Store) -> None:
    """Rows written around the change log (an old index, a bulk load) make the folded count disagree: rebuild."""
    vecs, _ = vectors(1200, seed=6)
    put(store, vecs)
    write_faiss(store, "ivf")
    with store.transaction() as conn:  # a row the log never saw
        conn.exec_driver_sql(
            "INSERT INTO images (size, mtime_ns, embedding) VALUES (0, 0, ?)", (encode_embedding(vecs[0]),)
        )
    info = write_faiss(store)
    assert info["retrained"] and info["n"] == 1201


def test_auto_crossing_a_threshold_rebuilds(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    vecs, _ = vectors(1500, seed=7)
    put(store, vecs[:1000])
    monkeypatch.setattr(faiss_index, "FLAT_BELOW", 1300)
    assert write_faiss(store, "auto")["type"] == "flat"
    put(store, vecs[1000:1200], 1000)
    info = write_faiss(store)
    assert info["type"] == "flat" and not info["retrained"] and info["n"] == 1200  # flat takes additions too
    put(store, vecs[1200:], 1200)
    info = write_faiss(store)
    assert info["type"] == "ivf" and info["retrained"]


def test_cli_memory_budget(tmp_path: Path, store: Store) -> None:
    from ruclip_search.cli import main

    vecs, _ = vectors(1200, seed=8)
    put(store, vecs)
    write_faiss(store, "flat")
    runner = CliRunner()
    result = runner.invoke(main, ["reindex", "--index", str(store.dir), "--type", "ivf", "--memory-budget", "1G",
                                  "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["type"] == "ivf" and store.get_meta("memory_budget") == str(1024**3)
    result = runner.invoke(main, ["reindex", "--index", str(store.dir), "--memory-budget", "lots"])
    assert result.exit_code == 2 and "4G" in result.output
    for command in ("build", "reindex", "compact"):
        assert "--memory-budget" in runner.invoke(main, [command, "--help"]).output


def test_a_fold_measures_recall_on_the_kept_queries_and_retrains_under_the_bar(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An IVF index keeps held-out text-like queries and their exact top-10; a fold brings that top-10 up to
    date (new vectors scored, queries whose top-10 lost an id left out), measures the recall on it, and
    retrains when it falls under the bar."""
    vecs, _ = vectors(3000, seed=11)
    put(store, vecs)
    first = write_faiss(store, "ivf")
    probe = json.loads(store.get_meta("recall_probe"))
    assert len(probe["ids"]) == faiss_index.PROBE_QUERIES and all(probe["valid"])
    assert first["probe_recall"] >= faiss_index.MIN_RECALL - 0.03
    more, _ = vectors(150, seed=12)
    put(store, more, 3000)  # +5 %
    store.delete_keys([f"p{i}" for i in range(0, 3000, 50)])
    info = write_faiss(store)
    assert not info["retrained"] and info["probe_recall"] is not None
    probe = json.loads(store.get_meta("recall_probe"))
    valid = np.array(probe["valid"])
    assert 0 < valid.sum() < faiss_index.PROBE_QUERIES  # queries that lost a top-10 id are left out
    queries = faiss_index._unpack(probe["queries"], DIM)  # kept with the index, as the fold used them
    assert queries.shape == (faiss_index.PROBE_QUERIES, DIM)
    np.testing.assert_array_equal(np.array(probe["ids"])[valid], exact_ids(store, queries[valid]))
    # measured under the bar: trained anew (growth alone would not)
    monkeypatch.setattr(faiss_index, "MIN_RECALL", 1.01)
    put(store, vectors(30, seed=13)[0], 5000)
    info = write_faiss(store)
    assert info["retrained"] and info["trained_n"] == info["n"]


def test_a_probe_kept_by_an_older_build_is_regenerated_from_its_centroids(store: Store) -> None:
    """Probes kept before their queries were (topics: the IVF centroids, seed 1) still serve folds: the queries
    come back from the centroids, their top-10 takes the added vectors in, and the recall is measured."""
    vecs, _ = vectors(3000, seed=11)
    put(store, vecs)
    first = write_faiss(store, "ivf")
    index = faiss_index.load(store.faiss_path(), mmap=False, params=first["params"])
    topics = faiss.extract_index_ivf(index).quantizer.reconstruct_n(0, first["params"]["nlist"])
    queries = faiss_index.text_like_queries(topics, faiss_index.PROBE_QUERIES, seed=1)
    ids, all_vecs = stored(store)
    scores, rows = faiss.knn(queries, all_vecs, K, metric=faiss.METRIC_INNER_PRODUCT)
    old = {"seed": 1, "ids": ids[rows].tolist(), "scores": scores.tolist(), "valid": [True] * len(queries)}
    store.set_meta(recall_probe=json.dumps(old))
    put(store, vectors(150, seed=12)[0], 3000)
    info = write_faiss(store)
    assert not info["retrained"] and info["probe_recall"] is not None and info["probe_recall"] > 0.5
    probe = json.loads(store.get_meta("recall_probe"))
    assert "queries" not in probe and all(probe["valid"])
    np.testing.assert_array_equal(np.array(probe["ids"]), exact_ids(store, queries))


def test_tuning_and_probe_queries_take_their_topics_from_stored_vectors(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Text-like queries aimed at IVF centroids find their neighbours in the aimed-at list and under-ask for lists
    (at 10M: 362 of 8,192 tuned where other queries needed 724); the build's topics are stored vectors."""
    vecs, _ = vectors(3000, seed=11)
    put(store, vecs)
    seen: list[np.ndarray] = []
    real = faiss_index.text_like_queries

    def spy(topics, n, seed=0):  # noqa: ANN001, ANN202
        seen.append(np.asarray(topics))
        return real(topics, n, seed)

    monkeypatch.setattr(faiss_index, "text_like_queries", spy)
    write_faiss(store, "ivf")
    assert len(seen) == 2  # the tuning's queries and the probe's
    _, all_vecs = stored(store)
    for topics in seen:
        assert len(topics) == min(len(vecs), faiss_index.TOPICS)
        assert np.abs(topics @ all_vecs.T).max(axis=1).min() > 0.999  # each one a stored vector


def test_reranking_reads_rows_by_id_on_both_databases(tmp_path: Path, db: str | None) -> None:
    """`embeddings_or_nan` (what IVF-PQ re-ranking reads per query): the vectors in the asked order, NaN rows for
    deleted and unknown ids, from a reader on SQLite (its kept connection) and on PostgreSQL, and it sees
    writes made after its first use."""
    with Store.create(tmp_path / "idx", db=db) as writer:
        with writer.transaction() as conn:
            writer.set_model(conn, "m", DIM)
        vecs, _ = vectors(50, seed=21)
        ids = put(writer, vecs)
        writer.delete_keys(["p3"])
        with Store.open(tmp_path / "idx", db=db) as reader:
            ask = [ids[7], ids[3], 10**9, ids[0], ids[7]]
            got = reader.embeddings_or_nan(ask)
            assert got.shape == (5, DIM) and got.dtype == np.float32
            assert np.isnan(got[[1, 2]]).all() and not np.isnan(got[[0, 3, 4]]).any()
            np.testing.assert_allclose(got[[0, 3, 4]], vecs[[7, 0, 7]], atol=1e-3)
            assert reader.embeddings_or_nan([]).shape == (0, DIM)
            writer.delete_keys(["p7"])
            assert np.isnan(reader.embeddings_or_nan([ids[7]])).all()


def test_many_reranked_rows_are_read_in_parallel_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SQLite reader asked for many rows reads parts of the sorted ids on several pooled connections at once
    (rows not in the page cache each cost a disk read), with the same answer as one statement: asked order,
    repeats, NaN rows for deleted and unknown ids."""
    import threading

    from ruclip_search import store as store_module

    with Store.create(tmp_path / "idx") as writer:
        with writer.transaction() as conn:
            writer.set_model(conn, "m", DIM)
        vecs, _ = vectors(300, seed=22)
        ids = put(writer, vecs)
        writer.delete_keys(["p5", "p6"])
    rng = np.random.default_rng(0)
    ask = [*rng.permutation(ids).tolist(), 10**9, ids[9], -4]
    with Store.open(tmp_path / "idx") as reader:
        one = reader.embeddings_or_nan(ask)  # below 2 x VECTOR_READ_PART: one statement
        monkeypatch.setattr(store_module, "VECTOR_READ_PART", 8)
        threads: set[int] = set()
        parts: list[list[int]] = []
        real = Store._vector_rows

        def spy(self, part):
            threads.add(threading.get_ident())
            parts.append(part)
            return real(self, part)

        monkeypatch.setattr(Store, "_vector_rows", spy)
        many = reader.embeddings_or_nan(ask)
    assert len(parts) == store_module.VECTOR_READ_THREADS and threading.get_ident() not in threads
    assert sorted(i for p in parts for i in p) == sorted(ask)
    np.testing.assert_array_equal(np.isnan(many), np.isnan(one))
    np.testing.assert_allclose(many[~np.isnan(many)], one[~np.isnan(one)])
    by_id = dict(zip(ids, vecs, strict=True))
    for j, i in enumerate(ask):
        if i in by_id and i not in (ids[5], ids[6]):
            np.testing.assert_allclose(many[j], by_id[i], atol=1e-3)
        else:
            assert np.isnan(many[j]).all()


def test_ivfpq_refine_code_lives_and_goes_with_its_faiss_file(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """An IVF-PQ file's refine code is written beside it, replaced with it by the next version (a fold), kept by the
    stale-file sweep while its file is current, and removed with it; a reader loads it with the file."""
    from ruclip_search.indexer import _clean_stale_files
    from ruclip_search.pq_refine import sidecar

    vecs, centres = vectors(3000, seed=4)
    put(store, vecs)
    monkeypatch.setattr(faiss_index, "FLAT_BELOW", 1000)
    info = write_faiss(store, "auto", memory_budget=3000 * DIM * 4 // 2)
    first = store.faiss_path()
    assert info["type"] == "ivfpq" and "refine" in info["params"] and sidecar(first).exists()
    put(store, vectors(30, seed=5)[0], 5000)
    assert not write_faiss(store)["retrained"]
    second = store.faiss_path()
    assert second != first and sidecar(second).exists()
    assert not first.exists() and not sidecar(first).exists()
    stray = store.dir / "faiss-99.index.refine.npz"
    stray.write_bytes(b"x")
    _clean_stale_files(store)
    assert sidecar(second).exists() and not stray.exists()
    index = faiss_index.load(second, params=json.loads(store.get_meta("index_params")))
    refiner = faiss_index.refiner_of(index)
    assert refiner is not None and len(refiner.codes) > max(stored(store)[0])  # the fold's vectors are in it


def test_cli_compact_says_what_it_folded_and_keeps_the_probe_internal(tmp_path: Path, tiny_model_path: Path) -> None:
    """`ruclip-index compact` prints one short line, and neither it nor `--json` (nor `reindex --json`) shows the
    held-out recall probe: thousands of ids and scores, kept in meta for the next fold."""
    from ruclip_search.cli import main
    from ruclip_search.search import Index

    index = tmp_path / "app"
    vecs, _ = vectors(1300, seed=21)
    with Index.create(index, model=str(tiny_model_path), device="cpu") as idx:
        idx.add_many({"key": f"p{i}", "embedding": v} for i, v in enumerate(vecs[:1200]))
    runner = CliRunner()
    result = runner.invoke(main, ["reindex", "--index", str(index), "--type", "ivf", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["type"] == "ivf" and "recall_probe" not in result.output

    def compact(*args: str, first: int) -> str:
        with Index.open(index, writable=True, device="cpu") as idx:
            idx.add_many({"key": f"p{i}", "embedding": vecs[i]} for i in range(first, first + 50))
        result = runner.invoke(main, ["compact", "--index", str(index), *args])
        assert result.exit_code == 0, result.output
        return result.output

    info = json.loads(compact("--json", first=1200))
    assert "recall_probe" not in info
    assert info["type"] == "ivf" and info["folded"] == 50 and not info["retrained"] and info["n"] == 1250
    line = compact(first=1250)
    assert "recall_probe" not in line and len(line.splitlines()) == 1 and len(line) < 200, line
    assert line.startswith("folded 50 writes into the ivf index (1300 vectors, not retrained), recall@10 0."), line
    assert line.rstrip().endswith(" s") and "held-out queries 0." in line
    with Store.open(index) as store:  # still kept where the next fold reads it
        assert len(json.loads(store.get_meta("recall_probe"))["ids"]) == faiss_index.PROBE_QUERIES
