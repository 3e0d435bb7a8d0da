"""Online store (issue 9): photos put by key, labels, collections, the change log, and the m003 migration."""

from __future__ import annotations

import re
import shutil
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from conftest import StandInModel

from ruclip_search.errors import QueryError
from ruclip_search.filters import SearchFilters, validate_key, validate_name
from ruclip_search.indexer import build
from ruclip_search.store import MIGRATIONS, SCHEMA_VERSION, ImageMeta, ImageWrite, PhotoWrite, Store


def emb(seed: int, dim: int = 4) -> bytes:
    """A float16 embedding blob."""
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float16).tobytes()


def meta(taken_at: str | None = None, fmt: str | None = "JPEG") -> ImageMeta:
    return ImageMeta(10, 10, fmt, taken_at, None, None)


@pytest.fixture
def store(tmp_path: Path, db: str | None) -> Store:
    s = Store.create(tmp_path / "idx", db=db)
    s.set_meta(model="m", dim="4")
    yield s
    s.close()


def second_schema_index(folder: Path) -> None:
    """An index at schema 2 (MIGRATIONS[:2]) with three files; the highest id was deleted."""
    db = sqlite3.connect(folder / "index.db")
    for _, statements in MIGRATIONS[:2]:
        for stmt in statements:
            db.execute(stmt)
    db.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    db.execute("INSERT INTO roots VALUES (1, ?)", (b"/photos",))
    for i, name in enumerate([b"a.jpg", b"b.jpg", b"c.jpg"], start=1):
        db.execute(
            "INSERT INTO images (root_id, relpath, size, mtime_ns, content_hash, format, taken_at, embedding) "
            "VALUES (1, ?, ?, ?, ?, 'JPEG', '2021-06-01T12:00:00', ?)",
            (name, 100 + i, 1000 + i, bytes([i]) * 16, emb(i)),
        )
    db.execute("DELETE FROM images WHERE id = 3")  # AUTOINCREMENT high-water mark stays 3
    db.commit()
    db.close()


def test_migration_from_schema_2_keeps_ids_and_data(tmp_path: Path) -> None:
    second_schema_index(tmp_path)
    with Store.open(tmp_path, readonly=False) as s:
        assert s.schema_version() == SCHEMA_VERSION and s.get_meta("migration_003") == "m003_online_store"
        recs = s.get_images([1, 2, 3])
        assert sorted(recs) == [1, 2]
        a = recs[1]
        assert (a.path, a.size, a.mtime_ns, a.format, a.taken_at) == ("/photos/a.jpg", 101, 1001, "JPEG",
                                                                      "2021-06-01T12:00:00")  # fmt: skip
        assert (a.key, a.collection, a.labels) == (None, None, ())
        assert s.embedding_by_hash(bytes([2]) * 16) == emb(2)
        s.set_meta(dim="4")
        # a deleted id never comes back, after the table rebuild too
        assert s.put_photos([PhotoWrite("k", emb(9))]) == [4]
        assert s.max_seq() == 1
    db = sqlite3.connect(tmp_path / "index.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    assert "images_new" not in {r[0] for r in db.execute("SELECT name FROM sqlite_sequence")}
    # the upgrade past m007 gave the planner statistics for the new filter indexes (Store.analyze)
    assert {"ix_images_taken_at", "ix_images_format"} <= {r[0] for r in db.execute("SELECT idx FROM sqlite_stat1")}


def test_put_replace_by_key_keeps_the_id_and_replaces_labels(store: Store) -> None:
    ids = store.put_photos([
        PhotoWrite("p1", emb(1), meta=meta("2020-01-01T00:00:00"), collection="trip", labels=("sea", "sun")),
        PhotoWrite("p2", emb(2), collection="trip"),
    ])  # fmt: skip
    assert len(set(ids)) == 2
    rec = store.get_by_key("p1")
    assert (rec.id, rec.key, rec.collection, rec.labels, rec.taken_at) == (ids[0], "p1", "trip", ("sea", "sun"),
                                                                           "2020-01-01T00:00:00")  # fmt: skip
    assert rec.path == "" and rec.relpath == ""
    again = store.put_photos([PhotoWrite("p1", emb(3), collection="home", labels=("cat",))])
    assert again == [ids[0]]
    rec = store.get_by_key("p1")
    assert (rec.collection, rec.labels, rec.taken_at) == ("home", ("cat",), None)
    assert store.get_images([ids[0]])[ids[0]].labels == ("cat",)
    assert store.get_embeddings([ids[0]]).tobytes() == np.frombuffer(emb(3), np.float16).astype(np.float32).tobytes()
    assert store.get_by_key("nope") is None
    assert store.counts()["images"] == 2


def test_delete_keys(store: Store) -> None:
    ids = store.put_photos([PhotoWrite(k, emb(i), labels=("x",)) for i, k in enumerate("abc")])
    assert store.delete_keys(["b", "zzz", "b"]) == [ids[1]]
    assert store.get_by_key("b") is None and store.get_by_key("a") is not None
    assert store.delete_keys(["b"]) == []
    with store.engine.connect() as conn:  # its labels went with it
        assert conn.execute(sa.text("SELECT count(*) FROM labels WHERE image_id = :i"), {"i": ids[1]}).scalar() == 0
    assert store.put_photos([PhotoWrite("b", emb(5))]) != [ids[1]]  # a new id, never the deleted one


def test_changes_since(store: Store, tmp_path: Path) -> None:
    assert store.max_seq() == 0
    live, gone, seq0 = store.changes_since(0)
    assert (live.tolist(), gone.tolist(), seq0) == ([], [], 0)
    a, b = store.put_photos([PhotoWrite("a", emb(1)), PhotoWrite("b", emb(2))])
    live, gone, seq1 = store.changes_since(0)
    assert (live.tolist(), gone.tolist()) == ([a, b], []) and seq1 == store.max_seq() == 2
    assert live.dtype == gone.dtype == np.int64
    store.put_photos([PhotoWrite("a", emb(3))])  # replace
    store.delete_keys(["b"])
    live, gone, seq2 = store.changes_since(seq1)
    assert (live.tolist(), gone.tolist(), seq2) == ([a], [b], 4)
    # a folder build's batch, a failure replacing an embedded file, a touch and a deletion log through the store
    rid = store.root_id("/r")
    with store.transaction() as conn:
        f1 = store.upsert_image(conn, ImageWrite(rid, b"f1.jpg", 1, 1, embedding=emb(4)))
        f2 = store.upsert_image(conn, ImageWrite(rid, b"f2.jpg", 1, 1, embedding=emb(5)))
        store.upsert_image(conn, ImageWrite(rid, b"bad.jpg", 1, 1, error="boom"))  # no embedding: no change
    live, gone, seq3 = store.changes_since(seq2)
    assert (live.tolist(), gone.tolist(), seq3) == ([f1, f2], [], seq2 + 2)
    with store.transaction() as conn:
        store.upsert_image(conn, ImageWrite(rid, b"f1.jpg", 2, 2, error="now broken"), f1)
        store.touch(conn, f2, 3, 3)
    with store.transaction() as conn:
        store.delete_images(conn, [f2])
    live, gone, _ = store.changes_since(seq3)
    assert (live.tolist(), gone.tolist()) == ([], [f1, f2])
    assert store.changes_since(store.max_seq())[:2][0].size == 0


def test_build_logs_changes_and_faiss_seq(tmp_path: Path, photos: Path, db: str | None) -> None:
    index = tmp_path / "idx"
    build(photos, index=index, model=StandInModel(), workers=0, batch_size=5, db=db)
    with Store.open(index, db=db) as s:
        live, gone, seq = s.changes_since(0)
        assert len(live) == 12 and len(gone) == 0 and s.get_meta("faiss_seq") == str(seq) == str(s.max_seq())
        removed = s.find_path(next(photos.iterdir())).id
    next(photos.iterdir()).unlink()
    build(photos, index=index, model=StandInModel(), workers=0, db=db)
    with Store.open(index, db=db) as s:
        live, gone, seq2 = s.changes_since(seq)
        assert (live.tolist(), gone.tolist()) == ([], [removed]) and s.get_meta("faiss_seq") == str(seq2)
    # a rebuild's swap: the new FAISS file covers everything this database logged
    with Store.open(index, readonly=False, db=db) as s:
        s.put_photos([PhotoWrite("api", emb(1, 32))])
        s.delete_keys(["api"])  # (a rebuild refuses an index that still holds photos written through the API)
    build(photos, index=index, model=StandInModel(), workers=0, rebuild=True, db=db)
    with Store.open(index, db=db) as s:
        assert s.get_meta("faiss_seq") == str(s.max_seq()) and s.max_seq() >= seq2 + 1


def test_filter_ids_with_collections_and_labels(store: Store) -> None:
    ids = store.put_photos([
        PhotoWrite("a", emb(1), meta=meta("2020-01-01T00:00:00"), collection="trip", labels=("sea", "sun")),
        PhotoWrite("b", emb(2), meta=meta("2022-01-01T00:00:00"), collection="trip", labels=("sun",)),
        PhotoWrite("c", emb(3), meta=meta("2022-01-01T00:00:00", "PNG"), collection="home", labels=("cat",)),
        PhotoWrite("d", emb(4), meta=meta("2022-01-01T00:00:00"), labels=("sea",)),
    ])  # fmt: skip
    a, b, c, d = ids
    rid = store.root_id("/r")
    with store.transaction() as conn:
        f = store.upsert_image(
            conn, ImageWrite(rid, b"sub/f.jpg", 1, 1, meta=meta("2022-01-01T00:00:00"), embedding=emb(5))
        )
    with store.engine.begin() as conn:  # a labelled folder file (labels are not only for photos put by key)
        conn.execute(sa.text("INSERT INTO labels VALUES (:f, 'sea')"), {"f": f})
        conn.execute(sa.text("UPDATE images SET collection = 'trip' WHERE id = :f"), {"f": f})

    def ids_for(**kw: object) -> list[int]:
        return store.filter_ids(SearchFilters.parse(**kw)).tolist()

    assert ids_for(collections=["trip"]) == [a, b, f]
    assert ids_for(collections=["trip", "home"]) == [a, b, c, f]
    assert ids_for(collections="nowhere") == []
    assert ids_for(labels=["sea"]) == [a, d, f]
    assert ids_for(labels=["sea", "cat"]) == [a, c, d, f]  # any of
    assert ids_for(collections=["trip"], labels=["sea"]) == [a, f]  # and
    assert ids_for(labels=["sea", "sun"], date_from="2021-01-01") == [b, d, f]
    assert ids_for(labels=["sea", "cat"], formats=["png"]) == [c]
    assert ids_for(collections=["trip"], labels=["sea"], under="/r/sub") == [f]
    assert ids_for(labels=["sea"], under="/elsewhere") == []
    store.delete_keys(["a"])
    assert ids_for(labels=["sea"]) == [d, f]
    assert SearchFilters.parse(labels=["x"]).restricts_ids and SearchFilters.parse(collections=["x"]).restricts_ids
    assert SearchFilters.parse(collections=["b", "a"]).to_dict() == {"collections": ["a", "b"]}


@pytest.mark.parametrize(
    "bad", ["", "a/b", "a\x00b", "tab\there", "a\x7f", "a\x85b", "\x9f", "x" * 513, "k" * 10_000, 42, None]
)
def test_bad_keys_are_query_errors(store: Store, bad: object) -> None:
    with pytest.raises(QueryError, match="Bad photo key"):
        validate_key(bad)
    with pytest.raises(QueryError):
        store.put_photos([PhotoWrite("fine", emb(1)), PhotoWrite(bad, emb(2))])  # type: ignore[arg-type]
    assert store.get_by_key("fine") is None and store.max_seq() == 0  # nothing written


@pytest.mark.parametrize(
    "bad", ["", "a/b", "a\x00b", "it's", 'say "hi"', "a;b", "100%", "new\nline", "\x7f", "a\x85", "x" * 201, 7]
)
def test_bad_names_are_query_errors(store: Store, bad: object) -> None:
    with pytest.raises(QueryError, match="Bad collection name"):
        validate_name(bad, "collection")
    with pytest.raises(QueryError, match="Bad label name"):
        SearchFilters.parse(labels=["ok", bad])  # type: ignore[list-item]
    with pytest.raises(QueryError, match="Bad collection name"):
        store.put_photos([PhotoWrite("k", emb(1), collection=bad)])  # type: ignore[arg-type]
    with pytest.raises(QueryError, match="Bad label name"):
        store.put_photos([PhotoWrite("k", emb(1), labels=("fine", bad))])  # type: ignore[arg-type]
    assert store.get_by_key("k") is None


def test_good_names_and_keys() -> None:
    for name in ["trip-2021_06.a:b@c", "Фото", "x" * 200, "with space", "no\xa0break"]:  # U+00A0: not a control
        assert validate_name(name, "label") == name
    for key in ["user42-IMG_0001.jpg", "k" * 512, "it's fine", "Фото 1", "a;b%c", "no\xa0break"]:
        assert validate_key(key) == key
    with pytest.raises(QueryError, match="empty"):
        SearchFilters.parse(collections=[])


def test_put_a_file_under_a_root_adopts_its_row(tmp_path: Path, photos: Path, db: str | None) -> None:
    index = tmp_path / "idx"
    build(photos, index=index, model=StandInModel(), workers=0, db=db)
    with Store.open(index, readonly=False, db=db) as s:
        first = sorted(photos.iterdir())[0]
        rec = s.find_path(first)
        rid = s.root_id(str(photos))
        w = PhotoWrite("mine", emb(1, 32), root_id=rid, relpath=first.name.encode(), labels=("x",))
        assert s.put_photos([w]) == [rec.id]
        assert s.get_by_key("mine").path == str(first)
        with pytest.raises(QueryError, match="already stored as photo 'mine'"):
            s.put_photos([PhotoWrite("other", emb(2, 32), root_id=rid, relpath=first.name.encode())])
    build(photos, index=index, model=StandInModel(), workers=0, db=db)  # the next build leaves it alone
    with Store.open(index, db=db) as s:
        assert s.get_by_key("mine").labels == ("x",) and s.counts()["images"] == 12


def test_folder_build_and_put_photos_interleaved(tmp_path: Path, photos: Path, db: str | None) -> None:
    """The API writes while a build commits its batches: SQLite's busy timeout (PostgreSQL: the change log's
    lock) serialises them, none fails."""
    index = tmp_path / "idx"
    shutil.copytree(photos, tmp_path / "more")
    build(tmp_path / "more", index=index, model=StandInModel(), workers=0, db=db)  # the index exists, dim 32
    errors: list[BaseException] = []
    started = threading.Event()
    put_ids: list[int] = []

    def writer() -> None:
        try:
            with Store.open(index, readonly=False, db=db) as s:
                started.set()
                for i in range(60):
                    put_ids.extend(s.put_photos([PhotoWrite(f"k{i}", emb(i, 32), labels=(f"l{i % 3}",))]))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            started.set()

    t = threading.Thread(target=writer)
    t.start()
    started.wait()
    report = build(photos, index=index, model=StandInModel(), workers=0, batch_size=1, db=db)
    t.join()
    assert not errors and report.added == 12 and len(put_ids) == 60
    with Store.open(index, db=db) as s:
        assert s.counts()["images"] == 12 + 12 + 60
        live, gone, _ = s.changes_since(0)
        assert set(put_ids) <= set(live.tolist()) and len(gone) == 0
        # everything after faiss_seq is what the FAISS file may not hold
        later, _, _ = s.changes_since(int(s.get_meta("faiss_seq")))
        ids, _, _ = s.snapshot_embeddings()
        assert set(ids.tolist()) == set(live.tolist())
        assert set(later.tolist()) <= set(put_ids)


def test_scoped_filter_reads_the_partial_index_only(store: Store) -> None:
    """A scoped search must not fetch each photo's row (and its 1.5 KB embedding) to check it has one: at 1M
    photos that cost 30 ms of a 20 ms budget. The collection index is partial, so it answers the query alone."""
    import sqlite3

    if store.dialect == "postgresql":  # the planner picks by table statistics: check the index definition
        with store.engine.connect() as conn:
            (sql,) = conn.execute(
                sa.text(
                    "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_images_collection' AND schemaname = current_schema()"
                )
            ).one()
        assert sql.endswith("WHERE (embedding IS NOT NULL)"), sql
        return

    (sql,) = (
        sqlite3.connect(store.db_path)
        .execute("SELECT sql FROM sqlite_master WHERE name = 'ix_images_collection'")
        .fetchone()
    )
    assert sql.endswith("WHERE embedding IS NOT NULL"), sql
    plan = (
        sqlite3.connect(store.db_path)
        .execute(
            "EXPLAIN QUERY PLAN SELECT images.id FROM images "
            "WHERE images.embedding IS NOT NULL AND images.collection IN ('a')"
        )
        .fetchall()
    )
    assert "ix_images_collection" in str(plan), plan


def _filter_plan(store: Store, filters: SearchFilters) -> list[str]:
    """The database's plan for filter_ids's query (PostgreSQL: with sequential scans priced out, so a usable index
    is used even on a tiny table)."""
    with store.engine.connect() as conn:
        query = store._filter_query(conn, filters)
        compiled = query.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
        if conn.dialect.name == "sqlite":
            params = tuple(compiled.params[k] for k in compiled.positiontup)
            return [r[-1] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + str(compiled), params)]
        conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
        return [r[0] for r in conn.exec_driver_sql("EXPLAIN " + str(compiled), compiled.params)]


def test_date_format_and_folder_filters_read_an_index(store: Store) -> None:
    """The filters a photo app sends with every search (a date range, formats, a folder) read an index instead of
    every row (at 1M photos a full scan took about 1 s), and the folder's relpath range keeps exactly the files at
    or below it."""
    rid = store.root_id("/r")
    names = [b"sub", b"sub/a.jpg", b"sub/b/c.jpg", b"sub/\xff.jpg", b"sub.jpg", b"sub0", b"sub0/x.jpg", b"subway/x.jpg"]
    with store.transaction() as conn:
        ids = {
            name: store.upsert_image(
                conn, ImageWrite(rid, name, 1, 1, meta=meta(f"2022-0{i % 3 + 1}-01T00:00:00", "PNG" if i % 2 else "JPEG"),
                                 embedding=emb(i)),
            )
            for i, name in enumerate(names)
        }  # fmt: skip
    got = store.filter_ids(SearchFilters.parse(under="/r/sub")).tolist()
    assert got == sorted(ids[n] for n in (b"sub", b"sub/a.jpg", b"sub/b/c.jpg", b"sub/\xff.jpg"))
    assert len(store.filter_ids(SearchFilters.parse(date_from="2022-02-01", date_to="2022-02-28"))) == 3
    assert len(store.filter_ids(SearchFilters.parse(formats=["png"]))) == 4
    cases = [
        ({"date_from": "2022-02-01", "date_to": "2022-02-28"}, r"ix_images_taken_at"),
        ({"formats": ["png"]}, r"ix_images_format"),
        ({"under": "/r/sub"}, r"relpath ?>"),  # a range of (root_id, relpath), not every row of the root
    ]
    for kw, reads in cases:
        plan = _filter_plan(store, SearchFilters.parse(**kw))
        assert re.search(reads, "\n".join(plan)), (kw, plan)
        assert not any(line.startswith("SCAN images") or "Seq Scan on images" in line for line in plan), (kw, plan)


def test_a_filter_starts_from_its_most_selective_index_after_a_faiss_write(store: Store) -> None:
    """Every FAISS write refreshes the planner statistics (Store.analyze): a user's collection (2 photos) with a
    format that a half of the photos have reads the collection's index, not the format's (at 1M photos on SQLite,
    without statistics: 439 ms instead of 5)."""
    from ruclip_search.indexer import write_faiss

    store.put_photos([
        PhotoWrite(f"k{i}", emb(i), meta=meta(None, "PNG" if i % 2 else "JPEG"), collection=f"c{i // 2}")
        for i in range(200)
    ])  # fmt: skip
    write_faiss(store)
    plan = _filter_plan(store, SearchFilters.parse(collections=["c3"], formats=["png"]))
    assert "ix_images_collection" in "\n".join(plan) and "ix_images_format" not in "\n".join(plan), plan
    assert store.filter_ids(SearchFilters.parse(collections=["c3"], formats=["png"])).tolist() == [8]
