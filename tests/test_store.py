"""store: schema migrations, read API, embeddings round trip, the write lock."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from ruclip_search.errors import IndexLockedError, IndexNotFoundError
from ruclip_search.store import MIGRATIONS, SCHEMA_VERSION, IndexLock, Store


def test_upgrade_from_first_schema(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "index.db")
    for stmt in MIGRATIONS[0][1]:
        db.execute(stmt)
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute("INSERT INTO roots VALUES (1, ?)", (b"/photos",))
    db.execute("INSERT INTO images (root_id, relpath, size, mtime_ns) VALUES (1, ?, 3, 4)", (b"a.jpg",))
    db.commit()
    db.close()
    store = Store.open(tmp_path, readonly=False)
    assert store.schema_version() == SCHEMA_VERSION
    rec = store.find_path("/photos/a.jpg")
    assert rec is not None and rec.size == 3 and rec.camera_make is None and rec.taken_at is None


def test_read_api_round_trip(tmp_path: Path) -> None:
    store = Store.create(tmp_path / "idx")
    store.set_meta(model="m", dim="4")
    rid = store.root_id("/r")
    vec = np.array([0.5, 0.5, 0.5, 0.5], np.float32)
    with store.transaction() as conn:
        good = store.upsert_image(
            conn,
            {
                "root_id": rid,
                "relpath": b"x\xff.jpg",
                "size": 1,
                "mtime_ns": 2,
                "embedding": vec.astype(np.float16).tobytes(),
            },
        )
        bad = store.upsert_image(
            conn, {"root_id": rid, "relpath": b"bad.jpg", "size": 1, "mtime_ns": 2, "error": "boom"}
        )
    reader = Store.open(tmp_path / "idx")
    assert reader.data_version() == 1
    assert reader.model_name == "m" and reader.dim == 4
    assert reader.counts() == {"images": 1, "errors": 1}
    images = reader.get_images([good, bad, 999])
    assert set(images) == {good, bad} and images[good].path == "/r/x\udcff.jpg"
    np.testing.assert_allclose(reader.get_embeddings([good]), vec[None])
    ids, vecs = reader.all_embeddings()
    assert ids.tolist() == [good] and vecs.shape == (1, 4)
    assert [r.error for r in reader.iter_images(errors=True)] == ["boom"]
    assert reader.find_path("/r/x\udcff.jpg").id == good
    with pytest.raises(KeyError):
        reader.get_embeddings([bad])


def test_open_missing(tmp_path: Path) -> None:
    with pytest.raises(IndexNotFoundError):
        Store.open(tmp_path)


def test_lock_is_exclusive(tmp_path: Path) -> None:
    with IndexLock(tmp_path):
        with pytest.raises(IndexLockedError, match="another process"):
            IndexLock(tmp_path).acquire()
    IndexLock(tmp_path).acquire().release()
