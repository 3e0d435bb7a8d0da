"""Parquet export/import: a lossless round trip, the online store's checks on every imported row (a bad shard
writes nothing), and clip-retrieval's layout as numpy and pyarrow read it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import TINY_MODEL

from ruclip_search.cli import main
from ruclip_search.errors import ModelMismatchError, QueryError
from ruclip_search.parquet import export_index, import_shards
from ruclip_search.search import Index
from ruclip_search.store import Store

N = 10


def photos(dim: int, n: int = N, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    vecs = rng.normal(size=(n, dim)).astype(np.float32)
    return [
        {"key": f"p{i:03d}", "embedding": vecs[i], "collection": f"c{i % 3}" if i % 4 else None,
         "labels": [f"l{i % 2}", "all"] if i % 5 else [], "taken_at": f"2024-01-{i + 1:02d}T10:00:00" if i % 2 else None}
        for i in range(n)
    ]  # fmt: skip


def state(index: Path, db: str | None = None) -> dict[str, tuple]:
    """key -> (collection, labels, taken_at, float16 embedding bytes) of every photo."""
    with Store.open(index, db=db) as store:
        ids, _ = store.all_embeddings()
        records = store.get_images(ids.tolist())
        out = {}
        for i in ids.tolist():
            r = records[i]
            emb = store.get_embeddings([i])[0].astype(np.float16).tobytes()
            out[r.key] = (r.collection, r.labels, r.taken_at, r.width, r.format, emb)
        return out


@pytest.fixture
def source(tmp_path: Path) -> Path:
    index = tmp_path / "src"
    with Index.create(index, model=str(TINY_MODEL), device="cpu") as idx:
        idx.add_many(photos(idx.info()["dim"]))
    return index


def test_export_import_round_trip(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "pq"
    result = export_index(source, out, shard_rows=4)
    assert (result["rows"], result["shards"]) == (N, 3)
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    table = pq.read_table(out)
    assert table.column_names == ["key", "path", "collection", "labels", "metadata", "embedding"]
    assert pq.read_schema(out / "part-00000.parquet").metadata[b"ruclip_search.model"] == str(TINY_MODEL).encode()

    target = tmp_path / "dst"  # a new index: bound to the model the shards name
    got = import_shards(target, out)
    assert (got["rows"], got["shards"]) == (N, 3)
    assert state(target) == state(source)  # keys, collections, labels, metadata, embeddings bit for bit
    with Index.open(target) as idx:  # searchable, FAISS file written
        assert idx.info()["images"] == N
    assert import_shards(target, out)["rows"] == N  # again: idempotent by key
    assert state(target) == state(source)


def shard(path: Path, keys: list, vecs: np.ndarray, **extra: list) -> None:
    cols = {"key": pa.array(keys, pa.string()), "embedding": pa.array([list(map(float, v)) for v in vecs])}
    cols.update({k: pa.array(v) for k, v in extra.items()})
    pq.write_table(pa.table(cols), path)


def test_import_checks_every_row_and_writes_nothing_of_a_bad_shard(source: Path, tmp_path: Path) -> None:
    with Store.open(source) as store:
        dim = store.dim
    rng = np.random.default_rng(1)
    good, bad = tmp_path / "in" / "a.parquet", tmp_path / "in" / "b.parquet"
    good.parent.mkdir()
    shard(good, ["g1", "g2"], rng.normal(size=(2, dim)))
    cases = [
        (["b1", "b/2", "b3"], rng.normal(size=(3, dim)), {}, "row 1: Bad photo key"),
        (["b1", "b2", "b3"], np.vstack([rng.normal(size=(2, dim)), np.full((1, dim), np.nan)]), {}, "row 2: .*NaN"),
        (["b1", "b2", "b3"], np.vstack([rng.normal(size=(1, dim)), np.zeros((2, dim))]), {}, "row 1: .*all zeros"),
        (["b1", "b2", "b3"], rng.normal(size=(3, dim)), {"collection": ["ok", "bad;name", None]}, "row 1: Bad collection"),
        (["b1", None, "b3"], rng.normal(size=(3, dim)), {}, "row 1: Bad photo key"),
        (["b1", "b2", "b3"], rng.normal(size=(3, dim + 1)), {}, f"has {dim + 1} numbers but this index holds {dim}-d"),
    ]  # fmt: skip
    for keys, vecs, extra, message in cases:
        shard(bad, keys, vecs, **extra)
        before = state(source)
        with pytest.raises(QueryError, match=message) as e:
            import_shards(source, good.parent, write_index=False, batch=1)  # a batch per row: pass 1 matters
        assert "b.parquet" in str(e.value)
        after = state(source)
        assert not any(k.startswith("b") for k in after), keys  # nothing of the bad shard
        assert set(after) - set(before) <= {"g1", "g2"}  # the good shard before it is written
    # a shard of another model is refused whole
    pq.write_table(pa.table({"key": ["m1"], "embedding": [[0.5] * dim]}).replace_schema_metadata(
        {b"ruclip_search.model": b"ruclip-vit-base-patch32-224"}), bad)  # fmt: skip
    with pytest.raises(ModelMismatchError, match="ruclip-vit-base-patch32-224"):
        import_shards(source, bad)
    # no keys: a clear error before anything is read
    pq.write_table(pa.table({"embedding": [[0.5] * dim]}), bad)
    with pytest.raises(QueryError, match="no 'key' column"):
        import_shards(source, bad)


def test_clip_retrieval_layout(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "cr"
    result = export_index(source, None, out, shard_rows=4)
    assert result["shards"] == 3
    embs = sorted((out / "img_emb").iterdir())
    metas = sorted((out / "metadata").iterdir())
    assert [p.name for p in embs] == ["img_emb_0.npy", "img_emb_1.npy", "img_emb_2.npy"]
    assert [p.name for p in metas] == ["metadata_0.parquet", "metadata_1.parquet", "metadata_2.parquet"]
    with Store.open(source) as store:
        ids, vecs = store.all_embeddings()
        records = store.get_images(ids.tolist())
    loaded = [np.load(p) for p in embs]
    assert all(a.dtype == np.float16 and a.shape[1] == vecs.shape[1] for a in loaded)
    np.testing.assert_array_equal(np.concatenate(loaded).astype(np.float32), vecs)
    tables = [pq.read_table(p) for p in metas]
    assert [t.num_rows for t in tables] == [len(a) for a in loaded]  # rows aligned shard by shard
    meta = pa.concat_tables(tables)
    assert meta.column_names[0] == "image_path"
    assert meta.column("key").to_pylist() == [records[i].key for i in ids.tolist()]


def test_cli_export_import(source: Path, tmp_path: Path, db: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Export and import take --db (and RUCLIP_SEARCH_DB) as every command that opens an index does."""
    runner = CliRunner()
    r = runner.invoke(main, ["export", "--index", str(source), "--parquet", str(tmp_path / "pq"), "--json"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["export", "--index", str(source), "--parquet", str(tmp_path / "pq")])
    assert r.exit_code == 1 and "not empty" in r.output
    dst = tmp_path / "dst"
    r = runner.invoke(main, ["import", str(tmp_path / "pq"), "--index", str(dst)] + (["--db", db] if db else []))
    assert r.exit_code == 0, r.output
    assert f"{N} photos from 1 shards" in r.output
    assert state(dst, db) == state(source)
    if db:  # out of that database again, named by the environment this time
        monkeypatch.setenv("RUCLIP_SEARCH_DB", db)
        assert not (dst / "index.db").exists()  # the rows went to PostgreSQL, not into the folder
    r = runner.invoke(main, ["export", "--index", str(dst), "--parquet", str(tmp_path / "pq2")])
    assert r.exit_code == 0, r.output
    again, first = pq.read_table(tmp_path / "pq2").sort_by("key"), pq.read_table(tmp_path / "pq").sort_by("key")
    assert again.drop(["path"]).equals(first.drop(["path"]))
