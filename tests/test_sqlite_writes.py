"""store: the lean SQLite path of `write_photos` (keyed photos without a file, run on the sqlite3 connection)
keeps the SQLAlchemy path's semantics: same rows, labels, change log and data_version; a key written twice keeps
its last write; a failing group writes nothing; lock and constraint errors are worded alike.

(The race tests in test_write_transactions.py run through this path too: the engine's `before_cursor_execute`
listeners see its statements.)
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from ruclip_search.errors import QueryError, StorageError
from ruclip_search.store import PhotosWritten, PhotoWrite, Store, encode_embedding

DIM = 4


def _photo(key: str, seed: int, labels: tuple[str, ...] = (), collection: str | None = None) -> PhotoWrite:
    vec = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return PhotoWrite(key, encode_embedding(vec / np.linalg.norm(vec)), collection=collection, labels=labels)


def _store(path: Path, db: str | None = None) -> Store:
    store = Store.create(path, db=db)
    store.set_meta(model="m", dim=str(DIM))
    return store


def _statements(store: Store) -> tuple[list[str], list[str]]:
    """Start recording (SQLAlchemy executions, cursor statements) on `store`'s engine."""
    executed: list[str] = []
    cursor: list[str] = []
    sa.event.listen(store.engine, "before_execute", lambda _c, clause, *_: executed.append(str(clause)))
    sa.event.listen(store.engine, "before_cursor_execute", lambda _c, _cur, sql, *_: cursor.append(sql))
    return executed, cursor


def _dump(store: Store) -> dict[str, Any]:
    """Everything a write changes, but the time it was written (`indexed_at`)."""
    with store.engine.connect() as conn:
        images = conn.exec_driver_sql("SELECT * FROM images ORDER BY id").mappings().all()
        return {
            "images": [{k: v for k, v in row.items() if k != "indexed_at"} for row in images],
            "labels": conn.exec_driver_sql("SELECT image_id, label FROM labels ORDER BY 1, 2").all(),
            "changes": conn.exec_driver_sql("SELECT seq, image_id FROM changes ORDER BY seq").all(),
            "data_version": store.data_version(),
        }


def _result(done: PhotosWritten) -> tuple[Any, ...]:
    records = [(r.id, r.key, r.collection, r.labels, r.size, r.path) for r in done.records]
    return records, done.deleted, done.first_seq, done.last_seq, done.index_version


def test_keyed_photos_on_sqlite_take_the_lean_path(tmp_path: Path) -> None:
    store = _store(tmp_path / "idx")
    store.write_photos([_photo("first", 0)])
    executed, cursor = _statements(store)
    store.write_photos([_photo("a", 1, ("x",))], ["gone"])
    assert executed == []  # no SQLAlchemy execution: the statements ran on the sqlite3 connection
    assert cursor[0] == "BEGIN IMMEDIATE" and cursor[-1].startswith("UPDATE meta SET value=")  # data_version
    assert store.get_by_key("a").labels == ("x",)
    root = store.root_id("/photos")
    executed.clear()
    store.write_photos([PhotoWrite("f", _photo("f", 2).embedding, root_id=root, relpath=b"f.jpg")])
    assert executed  # a photo with a file (a folder build's row may be adopted) keeps the SQLAlchemy path
    store.close()


def test_the_lean_path_writes_what_the_sqlalchemy_path_writes(tmp_path: Path) -> None:
    lean, full = _store(tmp_path / "lean"), _store(tmp_path / "full")
    full.lean_writes = False
    executed, _ = _statements(full)
    groups: list[tuple[list[PhotoWrite], list[str]]] = [
        ([_photo("a", 1, ("x", "y"), "c1"), _photo("b", 2), _photo("c", 3, ("z",))], []),
        ([_photo("b", 4, ("new",), "c2"), _photo("d", 5), _photo("b", 6, ("last", "x"))], ["a", "nobody"]),
        ([_photo("e", 7), _photo("c", 8)], ["e", "d"]),  # put then deleted in one group; labels of c dropped
        ([], ["b", "b"]),
        ([_photo("a", 9, ("back",))], []),  # a deleted key comes back with a new id
    ]
    for writes, keys in groups:
        assert _result(lean.write_photos(writes, keys)) == _result(full.write_photos(writes, keys))
    assert executed  # the reference really took the SQLAlchemy path
    assert _dump(lean) == _dump(full)
    assert lean.data_version() == len(groups)
    lean.close()
    full.close()


def test_a_key_written_twice_in_one_group_keeps_its_last_write(tmp_path: Path, db: str | None) -> None:
    store = _store(tmp_path / "idx", db)
    first, other, last = _photo("k", 1, ("old",)), _photo("j", 2), _photo("k", 3, ("new",), "c")
    done = store.write_photos([first, other, last])
    assert done.records[0].id == done.records[2].id != done.records[1].id
    assert done.last_seq - done.first_seq == 1  # one change per photo written
    record = store.get_by_key("k")
    assert (record.labels, record.collection, store.counts()["images"]) == (("new",), "c", 2)
    np.testing.assert_array_equal(
        store.get_embeddings([record.id]), np.frombuffer(last.embedding, np.float16).astype(np.float32)[None]
    )
    store.close()


def test_every_group_bumps_data_version_or_sets_it(tmp_path: Path, db: str | None) -> None:
    store = _store(tmp_path / "idx", db)
    start = store.data_version()
    store.write_photos([_photo("a", 1)])
    store.write_photos([], ["a"])
    assert store.data_version() == start + 2
    store.set_meta(data_version=None)  # an index written before data_version existed
    store.write_photos([_photo("b", 2)])
    assert store.get_meta("data_version") == "1"
    store.close()


def test_the_index_version_is_the_one_written_against(tmp_path: Path, db: str | None) -> None:
    store = _store(tmp_path / "idx", db)
    assert store.write_photos([_photo("a", 1)]).index_version == 0
    store.set_meta(index_version="7")
    assert store.write_photos([_photo("b", 2)]).index_version == 7
    store.close()


def test_a_failing_group_writes_nothing(tmp_path: Path) -> None:
    """A constraint failure part-way (here a trigger's, on the labels insert: after the images were written)
    is the same QueryError as on the SQLAlchemy path, and rolls the whole group back."""
    store = _store(tmp_path / "idx")
    store.write_photos([_photo("kept", 1, ("a",))])
    with store.engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TRIGGER no_boom BEFORE INSERT ON labels WHEN NEW.label = 'boom' "
            "BEGIN SELECT RAISE(ABORT, 'no boom'); END"
        )
    before = _dump(store)
    for lean in (True, False):
        store.lean_writes = lean
        with pytest.raises(QueryError, match="no boom"):
            store.write_photos([_photo("new", 2), _photo("kept", 3, ("boom",))], ["kept"])
        assert _dump(store) == before
    store.lean_writes = True
    other = sqlite3.connect(tmp_path / "idx" / "index.db", timeout=0, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the write lock was released: another writer gets it at once
    other.execute("ROLLBACK")
    other.close()
    store.write_photos([_photo("after", 4)])
    assert store.get_by_key("after") is not None and store.data_version() == before["data_version"] + 1
    store.close()


def test_a_locked_index_is_a_storage_error_and_writes_nothing(tmp_path: Path) -> None:
    store = _store(tmp_path / "idx")
    before = _dump(store)
    holder = sqlite3.connect(tmp_path / "idx" / "index.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    # this store's connections give up at once (after the store's own connect hook: its busy_timeout replaced)
    sa.event.listen(store.engine, "connect", lambda dbapi_conn, _r: dbapi_conn.execute("PRAGMA busy_timeout=0"))
    store.engine.dispose()
    with pytest.raises(StorageError, match="Cannot write the index database.*locked"):
        store.write_photos([_photo("a", 1)])
    holder.execute("ROLLBACK")
    holder.close()
    assert _dump(store) == before
    store.write_photos([_photo("a", 1)])  # the pooled connections are usable again
    assert store.get_by_key("a") is not None
    store.close()


def test_a_read_only_store_refuses_alike(tmp_path: Path) -> None:
    _store(tmp_path / "idx").close()
    reader = Store.open(tmp_path / "idx")
    errors = []
    for lean in (True, False):
        reader.lean_writes = lean
        with pytest.raises(StorageError) as caught:
            reader.write_photos([_photo("a", 1)])
        errors.append(str(caught.value))
    assert errors[0] == errors[1] and "readonly" in errors[0]
    assert reader.get_by_key("a") is None
    reader.close()
