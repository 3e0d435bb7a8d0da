"""store: schema migrations, read API, embeddings round trip, the write lock."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from ruclip_search.errors import IndexLockedError, IndexNotFoundError, StorageError
from ruclip_search.store import MIGRATIONS, SCHEMA_VERSION, ImageWrite, IndexLock, Store


def first_schema_index(folder: Path) -> None:
    """An index as the first release wrote it (MIGRATIONS[:1]), with one image."""
    db = sqlite3.connect(folder / "index.db")
    for stmt in MIGRATIONS[0][1]:
        db.execute(stmt)
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute("INSERT INTO roots VALUES (1, ?)", (b"/photos",))
    db.execute("INSERT INTO images (root_id, relpath, size, mtime_ns) VALUES (1, ?, 3, 4)", (b"a.jpg",))
    db.commit()
    db.close()


def test_upgrade_from_first_schema(tmp_path: Path) -> None:
    first_schema_index(tmp_path)
    store = Store.open(tmp_path, readonly=False)
    assert store.schema_version() == SCHEMA_VERSION
    rec = store.find_path("/photos/a.jpg")
    assert rec is not None and rec.size == 3 and rec.camera_make is None and rec.taken_at is None


def test_read_api_round_trip(tmp_path: Path, db: str | None) -> None:
    store = Store.create(tmp_path / "idx", db=db)
    store.set_meta(model="m", dim="4")
    rid = store.root_id("/r")
    vec = np.array([0.5, 0.5, 0.5, 0.5], np.float32)
    with store.transaction() as conn:
        good = store.upsert_image(conn, ImageWrite(rid, b"x\xff.jpg", 1, 2, embedding=vec.astype(np.float16).tobytes()))
        bad = store.upsert_image(conn, ImageWrite(rid, b"bad.jpg", 1, 2, error="boom"))
    reader = Store.open(tmp_path / "idx", db=db)
    assert reader.data_version() == 1
    assert reader.model_name == "m" and reader.dim == 4
    assert reader.counts() == {"images": 1, "errors": 1, "videos": 0, "raw_pairs": 0, "live_photos": 0}
    images = reader.get_images([good, bad, 999])
    assert set(images) == {good, bad} and images[good].path == "/r/x\udcff.jpg"
    np.testing.assert_allclose(reader.get_embeddings([good]), vec[None])
    ids, vecs = reader.all_embeddings()
    assert ids.tolist() == [good] and vecs.shape == (1, 4)
    assert [r.error for r in reader.iter_images(errors=True)] == ["boom"]
    assert reader.find_path("/r/x\udcff.jpg").id == good
    with pytest.raises(KeyError):
        reader.get_embeddings([bad])
    reader.close()
    store.close()


def test_open_missing(tmp_path: Path, db: str | None) -> None:
    with pytest.raises(IndexNotFoundError, match="build one"):
        Store.open(tmp_path, db=db)  # an empty folder; an empty database
    with pytest.raises(IndexNotFoundError):
        Store.open(tmp_path / "nothing", db=db)


def test_lock_is_exclusive(tmp_path: Path) -> None:
    with IndexLock(tmp_path, create=True):
        with pytest.raises(IndexLockedError, match="another process"):
            IndexLock(tmp_path, create=True).acquire()
    IndexLock(tmp_path, create=True).acquire().release()


def _schema(db: sqlite3.Connection, table: str) -> tuple[list[tuple], set[tuple]]:
    """(columns as (name, type, notnull, pk), indexes as (columns, unique)) of a table, as SQLite sees it."""
    cols = [
        (r[1], r[2].upper(), bool(r[3]) and not r[5], bool(r[5])) for r in db.execute(f"PRAGMA table_info({table})")
    ]
    indexes = set()
    for _, name, unique, origin, _ in db.execute(f"PRAGMA index_list({table})"):
        if origin != "pk":
            columns = tuple(r[2] for r in db.execute(f"PRAGMA index_info({name!r})"))
            indexes.add((columns, bool(unique)))
    return cols, indexes


def test_migrations_match_the_table_definitions(tmp_path: Path) -> None:
    """A database made by the numbered migrations has exactly the columns and indexes the SQLAlchemy tables declare."""
    import sqlalchemy as sa

    from ruclip_search.store import metadata

    Store.create(tmp_path).close()
    db = sqlite3.connect(tmp_path / "index.db")
    dialect = sa.create_engine("sqlite://").dialect
    assert {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")} - {"sqlite_sequence"} == set(
        metadata.tables
    )
    for table in metadata.tables.values():
        declared_cols = [
            (c.name, c.type.compile(dialect=dialect), not c.nullable and not c.primary_key, c.primary_key)
            for c in table.columns
        ]
        declared_idx = {(tuple(c.name for c in ix.columns), bool(ix.unique)) for ix in table.indexes}
        declared_idx |= {
            (tuple(c.name for c in u.columns), True) for u in table.constraints if isinstance(u, sa.UniqueConstraint)
        }
        declared_idx |= {((c.name,), True) for c in table.columns if c.unique}
        cols, indexes = _schema(db, table.name)
        assert sorted(cols) == sorted(declared_cols), table.name
        assert indexes == declared_idx, table.name
    # ids are FAISS ids: the migrations and the table both say AUTOINCREMENT (a deleted row's id is never reused)
    assert "AUTOINCREMENT" in db.execute("SELECT sql FROM sqlite_master WHERE name='images'").fetchone()[0]
    assert metadata.tables["images"].dialect_options["sqlite"]["autoincrement"]


def test_file_meta_fields_are_image_columns() -> None:
    import dataclasses

    from ruclip_search.loader import FileMeta
    from ruclip_search.store import IMAGE_COLUMNS, META_COLUMNS, ImageMeta, images_table

    assert tuple(f.name for f in dataclasses.fields(FileMeta)) == META_COLUMNS == ImageMeta._fields
    assert set(META_COLUMNS) < set(IMAGE_COLUMNS) and "embedding" not in IMAGE_COLUMNS
    assert IMAGE_COLUMNS == tuple(c for c in images_table.c.keys() if c != "embedding")


def test_reader_upgrades_an_older_schema_when_it_safely_can(tmp_path: Path) -> None:
    """A read-only open of an older index crashed later with a raw OperationalError (no such column)."""
    first_schema_index(tmp_path)
    with Store.open(tmp_path) as store:
        assert store.readonly
        rec = store.find_path("/photos/a.jpg")
        assert rec is not None and rec.size == 3 and rec.taken_at is None
        assert [r.relpath for r in store.iter_images()] == ["a.jpg"]
        assert store.schema_version() == SCHEMA_VERSION


def test_reader_of_an_older_schema_during_a_build_gets_a_hint(tmp_path: Path) -> None:
    first_schema_index(tmp_path)
    with IndexLock(tmp_path):  # a build holds the index: no upgrade behind its back
        with pytest.raises(StorageError, match="ruclip-index build"):
            with Store.open(tmp_path) as store:
                list(store.iter_images())
    with Store.open(tmp_path) as store:  # and once it is free, the reader upgrades it
        assert len(list(store.iter_images())) == 1


@pytest.mark.parametrize(
    "name", ["Photos #2", "what?", "100%", "50%20off", "my photos", "Фото из отпуска", "a#b?c=d&mode=rw"]
)
def test_index_folder_names_are_not_urls(tmp_path: Path, photos: Path, name: str) -> None:
    """The read-only URL was not percent-encoded: at '#' the path was cut, mode=ro dropped and an empty
    database created at the cut path."""
    from conftest import StandInModel

    from ruclip_search.indexer import build

    parent = tmp_path / "indexes"
    index = parent / name
    build(photos, index=index, model=StandInModel(), workers=0)
    files = sorted(os.listdir(parent)), sorted(f for f in os.listdir(index) if not f.endswith(("-wal", "-shm")))
    with Store.open(index) as store:
        assert store.counts()["images"] == 12 and len(list(store.iter_images())) == 12
        assert store.faiss_path() is not None and store.faiss_path().is_file()
        with pytest.raises(Exception, match="readonly"):
            store.set_meta(probe="1")
    assert (
        sorted(os.listdir(parent)),
        sorted(f for f in os.listdir(index) if not f.endswith(("-wal", "-shm"))),
    ) == files
