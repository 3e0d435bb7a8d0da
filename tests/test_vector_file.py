"""The IVF-PQ index's vector file (issue 10): rows by id, read back exactly, missing or damaged rows left to the
store; written by builds and folds, read by searches instead of the store, removed when no longer re-ranked on.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from test_scale import DIM, K, new_store, put, stored, text_queries, vectors

from ruclip_search import faiss_index, vector_file
from ruclip_search.indexer import write_faiss
from ruclip_search.store import Store
from ruclip_search.vector_file import VectorFile


@pytest.fixture
def store(tmp_path: Path):
    with new_store(tmp_path / "idx") as s:
        yield s


def unit(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def test_rows_come_back_by_id_and_unwritten_ones_are_missing(tmp_path: Path) -> None:
    """Rows written under scattered ids read back (float16-exact) in any order, in one call or in parallel parts;
    ids never written, past the end or negative are NaN rows, for the caller to read from the store."""
    f = VectorFile.for_writing(tmp_path, DIM)
    ids = np.array([9, 3, 4, 5, 200, 7], dtype=np.int64)  # a run (3, 4, 5) and gaps, unsorted
    vecs = unit(len(ids))
    f.write(ids, vecs)
    f.sync()
    reader = VectorFile.open(tmp_path, DIM)
    assert reader is not None
    want = np.array([200, 3, 6, 5, 10_000, -1, 9], dtype=np.int64)
    got = reader.read(want)
    by_id = dict(zip(ids.tolist(), vecs.astype(np.float16).astype(np.float32), strict=True))
    for row, i in zip(got, want.tolist(), strict=True):
        if i in by_id:
            np.testing.assert_array_equal(row, by_id[i])
        else:
            assert np.isnan(row).all()
    many = np.tile(ids, 10)  # enough rows for the parallel parts: the same answer
    np.testing.assert_array_equal(reader.read(many), np.vstack([by_id[i] for i in many.tolist()]))
    assert VectorFile.open(tmp_path, DIM + 1) is None  # another dimension's file is another file
    with pytest.raises(ValueError, match="non-negative"):
        f.write(np.array([-2]), unit(1))


def test_a_damaged_row_counts_as_missing(tmp_path: Path) -> None:
    """Bytes that are not a unit vector (a torn write, zeros, garbage) never reach the re-ranking."""
    f = VectorFile.for_writing(tmp_path, DIM)
    f.write(np.arange(1, 5), unit(4))
    f.sync()
    with open(vector_file.path_for(tmp_path, DIM), "r+b") as raw:
        raw.seek(2 * DIM * 2 + 10)
        raw.write(b"\x7b\x5b" * 8)  # row 2: part overwritten (large float16 values)
        raw.seek(3 * DIM * 2)
        raw.write(b"\0" * DIM * 2)  # row 3: zeros
    got = VectorFile(vector_file.path_for(tmp_path, DIM), DIM).read(np.arange(1, 5))
    assert not np.isnan(got[0]).any() and not np.isnan(got[3]).any()
    assert np.isnan(got[1]).all() and np.isnan(got[2]).all()


def _ivfpq(store: Store, monkeypatch: pytest.MonkeyPatch, n: int = 3000, seed: int = 2) -> tuple[dict, np.ndarray]:
    vecs, centres = vectors(n, seed=seed)
    put(store, vecs)
    monkeypatch.setattr(faiss_index, "FLAT_BELOW", 1000)
    info = write_faiss(store, "auto", memory_budget=n * DIM * 4 // 2)  # the float32 vectors would not fit
    assert info["type"] == "ivfpq"
    return info, centres


def test_an_ivfpq_build_writes_every_vector_and_searches_read_them_there(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The build keeps every stored vector in the file; a search re-ranks on the file's rows without asking the
    store, with the same hits and scores as re-ranking on the store's rows; rows the file lacks come from the
    store (the same hits again)."""
    from conftest import StandInModel

    from ruclip_search.search import Index

    _, centres = _ivfpq(store, monkeypatch)
    ids, vecs = stored(store)
    f = VectorFile.open(store.dir, DIM)
    assert f is not None
    np.testing.assert_array_equal(f.read(ids), vecs)  # the store's float16 rows, every one
    queries = text_queries(centres, seed=11)
    asked: list[int] = []
    real = Store.embeddings_or_nan

    def counting(self: Store, want):  # noqa: ANN001
        asked.extend(np.asarray(want).tolist())
        return real(self, want)

    monkeypatch.setattr(Store, "embeddings_or_nan", counting)
    with Index.open(store.dir, model=StandInModel(dim=DIM), device="cpu") as idx:
        assert idx._state.vectors is not None
        from_file = [[(h.id, h.score) for h in idx.search(q, k=K)] for q in queries]
        assert asked == []  # every candidate's row came from the file
        idx._state = dataclasses.replace(idx._state, vectors=None)
        from_store = [[(h.id, h.score) for h in idx.search(q, k=K)] for q in queries]
        assert asked  # ... and here from the store
        assert from_file == from_store
        lost = vector_file.path_for(store.dir, DIM)
        lost.write_bytes(lost.read_bytes()[: len(lost.read_bytes()) // 2])  # the file's second half is gone
        idx._state = dataclasses.replace(idx._state, vectors=VectorFile.open(store.dir, DIM))
        asked.clear()
        assert [[(h.id, h.score) for h in idx.search(q, k=K)] for q in queries] == from_file
        assert asked and min(asked) > ids.max() // 3  # only the missing rows were read from the store


def test_a_fold_writes_changed_vectors_and_a_flat_index_removes_the_file(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Photos replaced or added after the build are written to the file by the fold that takes them into the
    FAISS file; an index that no longer re-ranks on stored vectors (flat, here) leaves no file behind."""
    _ivfpq(store, monkeypatch)
    changed = unit(5, seed=7)
    put(store, changed, start=0)  # p0..p4 replaced: same ids, new vectors
    added = unit(20, seed=8)
    put(store, added, start=10_000)
    info = write_faiss(store)
    assert info["type"] == "ivfpq" and not info["retrained"]
    ids, vecs = stored(store)
    np.testing.assert_array_equal(VectorFile.open(store.dir, DIM).read(ids), vecs)
    monkeypatch.setattr(faiss_index, "FLAT_BELOW", 10**6)
    assert write_faiss(store, "auto")["type"] == "flat"
    assert not list(store.dir.glob("vectors-*.f16"))


def test_remove_keeps_only_the_named_dimension(tmp_path: Path) -> None:
    for dim in (32, 64):
        VectorFile.for_writing(tmp_path, dim).close()
    vector_file.remove(tmp_path, but=64)
    assert [p.name for p in tmp_path.glob("vectors-*.f16")] == ["vectors-64.f16"]
    vector_file.remove(tmp_path)
    assert not list(tmp_path.glob("vectors-*.f16"))


def test_a_vector_file_that_cannot_be_written_is_a_clear_error_and_loses_nothing(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk while the vector file is written (by a build, or by a fold) stops the write with a
    StorageError naming the file's folder; no FAISS file is published, the stored photos are all there, and the
    next write, with room again, goes through."""
    import errno

    from ruclip_search.errors import StorageError

    def full(*_a: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    vecs, _ = vectors(3000, seed=2)
    put(store, vecs)
    monkeypatch.setattr(faiss_index, "FLAT_BELOW", 1000)
    budget = 3000 * DIM * 4 // 2  # IVF-PQ
    with monkeypatch.context() as m:
        m.setattr(vector_file.os, "pwrite", full)
        with pytest.raises(StorageError, match="vector file.*No space left"):
            write_faiss(store, "auto", memory_budget=budget)
    assert store.get_meta("faiss_file") is None and len(stored(store)[0]) == 3000
    assert write_faiss(store, "auto", memory_budget=budget)["type"] == "ivfpq"
    first = store.get_meta("faiss_file")
    put(store, unit(5, seed=9), start=0)  # replaced photos: the fold writes their rows
    with monkeypatch.context() as m:
        m.setattr(vector_file.os, "pwrite", full)
        with pytest.raises(StorageError, match="vector file"):
            write_faiss(store)
    assert store.get_meta("faiss_file") == first and (store.dir / first).exists()
    assert not write_faiss(store)["retrained"]
    ids, got = stored(store)
    np.testing.assert_array_equal(VectorFile.open(store.dir, DIM).read(ids), got)
