"""IVF-PQ's in-memory refine code (pq_refine): 8-bit PQ of what the 4-bit FastScan code leaves out, by image id,
so that only a few dozen candidates' stored rows are read per query; kept beside the FAISS file, updated with it,
and optional (older files without one still load and re-rank as before).

Data: 96-d clustered unit vectors with ids that are not row numbers, and text-like queries (far from every
vector), as in test_ann.py.
"""

from __future__ import annotations

import io
from pathlib import Path

import faiss
import numpy as np
import pytest

from ruclip_search import faiss_index
from ruclip_search.pq_refine import Refiner, sidecar

N, DIM, K = 6000, 96, 10


def data(n: int = N, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(60, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    c = rng.integers(len(centres), size=n)
    v = centres[c] + rng.normal(size=(n, DIM)) * rng.uniform(0.06, 0.12, len(centres))[c, None]
    v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    q = centres[rng.integers(len(centres), size=80)] * 0.35 + rng.normal(scale=DIM**-0.5, size=(80, DIM))
    ids = (11 + 3 * np.arange(n)).astype(np.int64)
    return v, ids, (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


class CountingFetch:
    """The stored vectors by id (NaN rows for unknown ids), counting the rows asked for."""

    def __init__(self, vecs: np.ndarray, ids: np.ndarray) -> None:
        self.source = faiss_index.ArraySource(vecs, ids)
        self.rows = 0

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        self.rows += len(ids)
        return self.source.fetch(ids)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth, strict=True)]))


@pytest.fixture(scope="module")
def built():
    vecs, ids, queries = data()
    index, info = faiss_index.build_faiss(vecs, ids, "ivfpq", min_ann=100)
    return index, info, vecs, ids, queries


def test_build_makes_a_refine_code_and_tunes_a_short_rerank(built) -> None:
    index, info, vecs, ids, _ = built
    refiner = faiss_index.refiner_of(index)
    assert refiner is not None and refiner.m == faiss_index.plan(N, DIM, "ivfpq").refine > 0
    assert info["params"]["refine"] == faiss_index.REFINE_DEPTH and faiss_index._REFINE_DEPTH[index] == 1000
    # every vector is encoded under its id (rows of ids never added stay zero, and are never candidates)
    residual = vecs[:50] - refiner.scan_pq.decode(refiner.scan_pq.compute_codes(vecs[:50]))
    np.testing.assert_array_equal(refiner.codes[ids[:50]], refiner.pq.compute_codes(residual))
    assert info["recall_at_10"] >= faiss_index.MIN_RECALL + faiss_index.TUNE_MARGIN
    assert info["params"]["rerank"] < 200  # a few dozen rows read, not hundreds


def test_refined_search_reads_only_the_reranked_rows(built) -> None:
    """A query reads `rerank` stored rows, not the refine depth's thousand; without the refine code, re-ranking
    the same number of PQ candidates finds fewer of the true top 10 (the refine code is what makes it short)."""
    index, info, vecs, ids, queries = built
    truth = ids[faiss_index.exact_knn(vecs, queries, K)]
    fetch = CountingFetch(vecs, ids)
    rerank = info["params"]["rerank"]
    for q in queries[:10]:  # one query at a time: the rows of each
        fetch.rows = 0
        faiss_index.search(index, q[None], K, fetch=fetch)
        assert 0 < fetch.rows <= rerank < info["params"]["refine"]
    scores, found = faiss_index.search(index, queries, K, fetch=fetch)
    refined = recall(found, truth)
    assert refined >= faiss_index.MIN_RECALL
    exact = {int(i): v for i, v in zip(ids, vecs, strict=True)}
    for q, s, f in zip(queries[:5], scores[:5], found[:5], strict=True):  # true cosines, best first
        np.testing.assert_allclose(s, [exact[int(i)] @ q for i in f], atol=1e-5)
    faiss_index._RERANK[index] = 15  # few rows: with the refine code, and without it
    try:
        short = recall(faiss_index.search(index, queries, K, fetch=fetch)[1], truth)
        refiner = faiss_index._REFINER.pop(index)
        try:
            plain = recall(faiss_index.search(index, queries, K, fetch=fetch)[1], truth)
        finally:
            faiss_index._REFINER[index] = refiner
    finally:
        faiss_index._RERANK[index] = rerank
    assert plain < short - 0.03, (plain, short)


def test_refine_scores_are_closer_than_the_scan_codes(built) -> None:
    index, _, vecs, ids, queries = built
    refiner = faiss_index.refiner_of(index)
    q, rows = queries[0], np.arange(0, N, 7)
    exact = vecs[rows] @ q
    scan = refiner.scan_pq.decode(refiner.scan_pq.compute_codes(vecs[rows])) @ q
    refined = refiner.scores(q, ids[rows], scan)
    assert np.abs(refined - exact).mean() < 0.8 * np.abs(scan - exact).mean()
    # ids never encoded, and -1, score -inf
    assert np.isneginf(refiner.scores(q, np.array([-1, 10**9]), np.zeros(2, np.float32))).all()


def test_refine_code_is_saved_beside_the_file_and_older_files_still_load(built, tmp_path: Path) -> None:
    index, info, vecs, ids, queries = built
    path = faiss_index.save_atomic(index, tmp_path / "faiss-3.index")
    assert sidecar(path).exists() and sorted(p.name for p in tmp_path.iterdir()) == [path.name, sidecar(path).name]
    before = faiss_index.search(index, queries, K, fetch=CountingFetch(vecs, ids))
    loaded = faiss_index.load(path, params=info["params"])
    assert faiss_index.refiner_of(loaded) is not None and faiss_index.rerank_depth(loaded) == info["params"]["rerank"]
    after = faiss_index.search(loaded, queries, K, fetch=CountingFetch(vecs, ids))
    np.testing.assert_array_equal(after[1], before[1])
    # a file without its refine code (older builds; or the code lost): plain re-ranking, as deep as the refine was
    sidecar(path).unlink()
    old = faiss_index.load(path, params=info["params"])
    assert faiss_index.refiner_of(old) is None and faiss_index.rerank_depth(old) == info["params"]["refine"]
    truth = ids[faiss_index.exact_knn(vecs, queries, K)]
    assert recall(faiss_index.search(old, queries, K, fetch=CountingFetch(vecs, ids))[1], truth) >= 0.95
    old_params = {k: v for k, v in info["params"].items() if k != "refine"} | {"rerank": 320}
    older = faiss_index.load(path, params=old_params)  # tuned before refine codes existed
    assert faiss_index.refiner_of(older) is None and faiss_index.rerank_depth(older) == 320


def test_a_damaged_refine_code_is_a_clear_error_and_touches_nothing(built, tmp_path: Path) -> None:
    """A torn or foreign refine file says which file and to reindex (a StorageError, not a zip or numpy error),
    and neither it nor the FAISS file is changed by the attempt."""
    from ruclip_search.errors import StorageError

    index, info, *_ = built
    path = faiss_index.save_atomic(index, tmp_path / "faiss-4.index")
    good = sidecar(path).read_bytes()
    faiss_bytes = path.read_bytes()
    sidecar(path).write_bytes(good[: len(good) // 2])  # torn
    with pytest.raises(StorageError, match=r"refine code .*faiss-4\.index\.refine\.npz.* damaged.*reindex"):
        faiss_index.load(path, params=info["params"])
    assert sidecar(path).read_bytes() == good[: len(good) // 2] and path.read_bytes() == faiss_bytes
    with np.load(io.BytesIO(good)) as z:  # whole, but its codes do not fit its sub-quantizers
        parts = {k: z[k] for k in z.files}
    parts["codes"] = parts["codes"][:, :-1]
    with open(sidecar(path), "wb") as f:
        np.savez(f, **parts)
    with pytest.raises(StorageError, match="sizes disagree.*reindex"):
        faiss_index.load(path, params=info["params"])


def test_update_encodes_added_and_changed_ids() -> None:
    vecs, ids, queries = data(4000, seed=3)
    head = 3000
    index, _ = faiss_index.build_faiss(vecs[:head], ids[:head], "ivfpq", min_ann=100)
    refiner = faiss_index.refiner_of(index)
    changed = ids[:5]
    faiss_index.update(index, np.concatenate([changed, ids[head:]]), np.vstack([vecs[head : head + 5], vecs[head:]]),
                       ids[5:10])  # fmt: skip
    assert len(refiner.codes) > ids[-1]
    for i, v in ((ids[-1], vecs[-1]), (changed[0], vecs[head])):
        residual = v[None] - refiner.scan_pq.decode(refiner.scan_pq.compute_codes(v[None]))
        np.testing.assert_array_equal(refiner.codes[i], refiner.pq.compute_codes(residual)[0])
    fetch = CountingFetch(vecs, ids)
    found = faiss_index.search(index, vecs[-3:], 1, fetch=fetch)[1][:, 0]
    np.testing.assert_array_equal(found, ids[-3:])  # added vectors find themselves through the refined path


def test_codes_added_after_a_removal_scan_right(tmp_path: Path) -> None:
    """A fold removes changed and deleted photos, then adds the new vectors. FastScan ORs added codes into blocks
    whose removed slots still held old codes; every vector folded in must score as itself in the scan alone
    (the scan's best hit for its own vector, all lists probed), in a loaded file too, as after `compact`."""
    vecs, ids, _ = data(4000, seed=4)
    built, _ = faiss_index.build_faiss(vecs[:3000], ids[:3000], "ivfpq", min_ann=100)
    path = faiss_index.save_atomic(built, tmp_path / "f.index")
    for index in (built, faiss_index.load(path, mmap=False)):
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = ivf.nlist
        changed, gone = ids[:300:3], ids[1:300:3]
        new = np.vstack([vecs[3000:3100], vecs[3100:3200]])  # changed photos' new vectors, then added photos
        faiss_index.update(index, np.concatenate([changed, ids[3100:3200]]), new, gone)
        scores, found = faiss_index._search_plain(index, new, 1)
        assert np.mean(found[:, 0] == np.concatenate([changed, ids[3100:3200]])) >= 0.98
        kept = ids[2:300:3]
        assert np.mean(faiss_index._search_plain(index, vecs[2:300:3], 1)[1][:, 0] == kept) >= 0.98
        assert not np.isin(gone, faiss_index._search_plain(index, vecs[:300], 5)[1]).any()


def test_plan_shrinks_the_refine_code_first_under_the_budget() -> None:
    p = faiss_index.plan(10_000_000, 768)
    assert (p.m, p.refine) == (384, 48) and p.memory(10_000_000, 768) <= 2.6e9  # 192 + 48 bytes a vector
    tight = faiss_index.plan(10_000_000, 768, memory_budget=int(2.2e9))
    assert tight.m == 384 and 0 < tight.refine < 48 and tight.memory(10_000_000, 768) <= 2.2e9
    tighter = faiss_index.plan(10_000_000, 768, memory_budget=int(1.5e9))
    assert tighter.refine == 0 and tighter.m < 384


def test_refiner_rejects_negative_ids() -> None:
    pq = faiss.ProductQuantizer(8, 2, 4)
    pq.train(np.random.default_rng(0).normal(size=(500, 8)).astype(np.float32))
    refiner = Refiner.train(pq, 2, np.random.default_rng(1).normal(size=(600, 8)).astype(np.float32))
    with pytest.raises(ValueError, match="non-negative"):
        refiner.add(np.array([-1]), np.zeros((1, 8), np.float32))


def test_tuning_steps_nprobe_by_sqrt2_from_a_64th_of_the_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan costs in proportion to nprobe: tuning tries nlist/64 and then steps of sqrt(2) (not doubling,
    which could scan up to twice the lists needed), stopping one step after the first sufficient setting, and
    keeps the cheapest sufficient one with the recall it measured there."""
    vecs, ids, _ = data(4000, seed=6)
    tried: list[int] = []
    real = faiss_index._search_plain

    def plain(index, queries, k):  # noqa: ANN001, ANN202
        tried.append(int(faiss.extract_index_ivf(index).nprobe))
        return real(index, queries, k)

    monkeypatch.setattr(faiss_index, "_search_plain", plain)
    _, info = faiss_index.build_faiss(vecs, ids, "ivfpq", min_ann=100)
    nlist = info["params"]["nlist"]
    assert tried[0] == max(1, nlist // 64) and len(tried) >= 3
    for a, b in zip(tried, tried[1:], strict=False):
        assert b == min(nlist, max(a + 1, round(a * 2**0.5)))
    assert info["params"]["nprobe"] in tried[-2:]  # the first sufficient step or the one after it
    assert info["recall_at_10"] >= faiss_index.MIN_RECALL + faiss_index.TUNE_MARGIN
