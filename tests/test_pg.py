"""PostgreSQL as the metadata store: the change log is commit-ordered, the migrations give the declared
schema, `migrate` copies an index both ways, bad URLs are clear errors, the CLI takes --db / RUCLIP_SEARCH_DB,
and several processes (two servers and a build) on one database see each other's writes."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from conftest import StandInModel, make_photos
from test_indexer import snapshot

from ruclip_search import faiss_index
from ruclip_search.cli import main
from ruclip_search.errors import IndexNotFoundError, StorageError
from ruclip_search.filters import SearchFilters
from ruclip_search.indexer import build, migrate, reindex
from ruclip_search.store import ImageWrite, PhotoWrite, Store, metadata


def emb(seed: int, dim: int = 4) -> bytes:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return (v / np.linalg.norm(v)).astype(np.float16).tobytes()


def _store(folder: Path, db: str | None) -> Store:
    store = Store.create(folder, db=db)
    store.set_meta(model="m", dim="4")
    return store


# -- the change log: a reader following seq > last never skips a write ----------------------------------
def test_a_later_seq_is_never_visible_before_an_earlier_one(tmp_path: Path, db: str | None) -> None:
    """A writer draws a seq and stays uncommitted while a second writer commits: without the change log's
    lock the second (a higher seq) became visible first, and a reader that moved past it never saw the first."""
    index = tmp_path / "idx"
    writer, other, follower = _store(index, db), Store.open(index, readonly=False, db=db), Store.open(index, db=db)
    rid = writer.root_id("/r")
    logged, release = threading.Event(), threading.Event()
    ids: dict[str, int] = {}

    def slow() -> None:
        with writer.transaction() as conn:
            ids["slow"] = writer.upsert_image(conn, ImageWrite(rid, b"slow.jpg", 1, 1, embedding=emb(1)))
            logged.set()
            release.wait(10)

    def fast() -> None:
        ids["fast"] = other.put_photos([PhotoWrite("fast", emb(2))])[0]

    threads = [threading.Thread(target=slow), threading.Thread(target=fast)]
    threads[0].start()
    assert logged.wait(10)
    threads[1].start()
    time.sleep(0.5)  # the fast writer has committed by now, unless it waits for the slow one
    seen: set[int] = set()
    live, _, last = follower.changes_since(0)
    seen |= set(live.tolist())
    release.set()
    for t in threads:
        t.join(30)
    live, _, last = follower.changes_since(last)
    seen |= set(live.tolist())
    assert seen == {ids["slow"], ids["fast"]}
    for s in (writer, other, follower):
        s.close()


def test_followers_see_every_write_of_concurrent_writers(tmp_path: Path, db: str | None) -> None:
    """Four writers put photos while a reader follows the change log: it ends having seen every id."""
    index = tmp_path / "idx"
    _store(index, db).close()
    written: list[int] = []
    done = threading.Event()
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            with Store.open(index, readonly=False, db=db) as s:
                for i in range(25):
                    written.extend(s.put_photos([PhotoWrite(f"w{n}-{i}", emb(n * 100 + i))]))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    seen: set[int] = set()

    def follow() -> None:
        last = 0
        with Store.open(index, db=db) as s:
            while True:
                finished = done.is_set()
                live, _, last = s.changes_since(last)
                seen.update(live.tolist())
                if finished:
                    return

    follower = threading.Thread(target=follow)
    follower.start()
    writers = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in writers:
        t.start()
    for t in writers:
        t.join(60)
    done.set()
    follower.join(30)
    assert not errors and len(written) == 100
    assert seen == set(written)


# -- schema ---------------------------------------------------------------------------------------------------
def test_postgresql_migrations_match_the_table_definitions(tmp_path: Path, pg_db: str) -> None:
    """The PostgreSQL variants of the migrations give exactly the columns, types and indexes store.py declares
    (a new migration without a working PostgreSQL text fails here)."""
    from sqlalchemy.dialects import postgresql

    with Store.create(tmp_path, db=pg_db) as store, store.engine.connect() as conn:
        insp = sa.inspect(conn)
        assert set(insp.get_table_names()) == set(metadata.tables)
        dialect = postgresql.dialect()
        for table in metadata.tables.values():
            got = {c["name"]: (c["type"].compile(dialect=dialect), c["nullable"]) for c in insp.get_columns(table.name)}
            declared = {
                c.name: (c.type.compile(dialect=dialect), c.nullable and not c.primary_key) for c in table.columns
            }
            assert got == declared, table.name
            pk = insp.get_pk_constraint(table.name)["constrained_columns"]
            assert pk == [c.name for c in table.primary_key.columns], table.name
            indexes = {(tuple(ix["column_names"]), bool(ix["unique"])) for ix in insp.get_indexes(table.name)}
            indexes |= {(tuple(u["column_names"]), True) for u in insp.get_unique_constraints(table.name)}
            expected = {(tuple(c.name for c in ix.columns), bool(ix.unique)) for ix in table.indexes}
            expected |= {
                (tuple(c.name for c in u.columns), True)
                for u in table.constraints
                if isinstance(u, sa.UniqueConstraint)
            }
            expected |= {((c.name,), True) for c in table.columns if c.unique}
            assert indexes == expected, table.name
        # ids are FAISS's int64 ids, from identity sequences (a deleted id never comes back)
        assert conn.execute(sa.text("SELECT pg_get_serial_sequence('images', 'id')")).scalar()


def test_big_ids_and_nanosecond_mtimes_round_trip(tmp_path: Path, pg_db: str) -> None:
    with _store(tmp_path, pg_db) as store:
        rid = store.root_id("/r")
        with store.transaction() as conn:
            i = store.upsert_image(
                conn, ImageWrite(rid, b"a.jpg", 5 * 2**31, 1_790_000_000_123_456_789, embedding=emb(1))
            )
        with store.engine.begin() as conn:
            conn.execute(sa.text("UPDATE images SET id = :big WHERE id = :i"), {"big": 2**40 + 7, "i": i})
        rec = store.get_image(2**40 + 7)
        assert (rec.size, rec.mtime_ns) == (5 * 2**31, 1_790_000_000_123_456_789)
        assert store.filter_ids(SearchFilters.parse(under="/r")).tolist() == [2**40 + 7]
        assert abs(rec.indexed_at - time.time()) < 60  # double precision, not float4


# -- errors ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url, message",
    [
        ("sqlite:///tmp/x.db", "PostgreSQL URL"),
        ("not a url", "PostgreSQL URL"),
        ("mysql://u@h/db", "PostgreSQL URL"),
        ("postgresql+psycopg://nobody@127.0.0.1:1/nothing?connect_timeout=3", "Cannot reach the index database"),
    ],
)
def test_bad_database_urls_are_clear_errors(tmp_path: Path, url: str, message: str) -> None:
    with pytest.raises(StorageError, match=message):
        Store.open(tmp_path, db=url)
    with pytest.raises(StorageError, match=message):
        build(tmp_path, index=tmp_path / "idx", model=StandInModel(), workers=0, db=url)
    r = CliRunner().invoke(main, ["info", "--index", str(tmp_path), "--db", url])
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output


def test_an_index_folder_without_its_database_says_how_to_name_it(tmp_path: Path, pg_db: str) -> None:
    with pytest.raises(IndexNotFoundError, match="--db"):
        Store.open(tmp_path)  # a PostgreSQL index's folder holds no index.db
    with pytest.raises(IndexNotFoundError, match="No index in database"):
        Store.open(tmp_path, db=pg_db)


# -- migrate --------------------------------------------------------------------------------------------------
def _rows(store: Store) -> tuple:
    recs = sorted(
        (r.id, r.path, r.size, r.mtime_ns, r.key, r.collection, r.labels, r.format) for r in store.iter_images()
    )
    live, gone, seq = store.changes_since(0)
    meta = {k: v for k, v in store.meta().items() if k != "schema_version" and not k.startswith("migration")}
    return recs, live.tolist(), gone.tolist(), seq, meta


def test_migrate_sqlite_to_postgresql_and_back(tmp_path: Path, photos: Path, pg_db: str, monkeypatch) -> None:
    import ruclip_search.store as store_module

    index = tmp_path / "idx"
    build(photos, index=index, model=StandInModel(), workers=0)
    with Store.open(index, readonly=False) as s:
        s.put_photos([PhotoWrite("a", emb(1, 32), collection="c", labels=("x", "y")), PhotoWrite("b", emb(2, 32))])
        s.delete_keys(["b"])  # the highest id is deleted: it must never be handed out again
        high = max(r.id for r in s.iter_images()) + 1
    reindex(index, "flat")  # the FAISS file covers the photos put by key too
    with Store.open(index) as s:
        before = _rows(s)
    expected = snapshot(index)
    monkeypatch.setattr(store_module, "COPY_CHUNK", 5)  # many chunks
    steps: list[tuple[str, int]] = []
    r = CliRunner().invoke(main, ["migrate", "--from", str(index), "--db", pg_db, "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output.strip().splitlines()[-1])
    assert result["copied"]["images"] == 13 and result["faiss_written"] is False
    with Store.open(index, db=pg_db) as pg:
        assert _rows(pg) == before
        assert snapshot(index, pg_db).keys() == expected.keys()  # the FAISS file in the folder fits the copy
    with Store.open(index, readonly=False, db=pg_db) as pg:
        assert pg.put_photos([PhotoWrite("new", emb(3, 32))]) == [high + 1]  # past the deleted id
        after_put = _rows(pg)
    # into a database that holds an index: refused, nothing changed
    r = CliRunner().invoke(main, ["migrate", "--from", str(index), "--db", pg_db])
    assert r.exit_code == 1 and "already holds an index" in r.output
    # and back, into a new folder: its FAISS file is written from the copied embeddings, in chunks
    back = tmp_path / "back"
    result = migrate(pg_db, index=back, progress=lambda t, n: steps.append((t, n)))
    assert result["faiss_written"] is True
    assert [n for t, n in steps if t == "images"] == [5, 10, 14]
    with Store.open(back) as s:
        assert _rows(s)[:4] == after_put[:4]
    with Store.open(back) as s:
        ids, vecs = s.all_embeddings()
        fx = faiss_index.load(s.faiss_path())
        assert sorted(faiss.vector_to_array(fx.id_map).tolist()) == sorted(ids.tolist()) and len(ids) == 14
        np.testing.assert_allclose(np.stack([fx.reconstruct(int(i)) for i in ids]), vecs)
    with Store.open(back, readonly=False) as s:
        assert s.put_photos([PhotoWrite("newer", emb(4, 32))]) == [high + 2]


def test_migrate_into_another_folder_takes_the_ivfpq_files_along(
    tmp_path: Path, pg_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An IVF-PQ index copied into PostgreSQL with another folder for its FAISS files: the refine code and the
    vector file go with the FAISS file (without them it would re-rank every refined candidate, from the db)."""
    from test_scale import new_store, put, vectors

    from ruclip_search import vector_file
    from ruclip_search.indexer import write_faiss
    from ruclip_search.pq_refine import sidecar

    index = tmp_path / "idx"
    with new_store(index) as s:
        put(s, vectors(3000, seed=2)[0])
        monkeypatch.setattr(faiss_index, "FLAT_BELOW", 1000)
        assert write_faiss(s, "auto", memory_budget=3000 * 32 * 4 // 2)["type"] == "ivfpq"
    other = tmp_path / "other"
    result = migrate(index, index=other, db=pg_db)
    assert result["faiss_written"] is False
    with Store.open(other, db=pg_db) as pg:
        copied = pg.faiss_path()
        assert copied is not None and copied.parent == other and sidecar(copied).exists()
        assert vector_file.path_for(other, 32).read_bytes() == vector_file.path_for(index, 32).read_bytes()


def test_migrate_refuses_what_it_cannot_do(tmp_path: Path, pg_db: str) -> None:
    from ruclip_search.errors import RuclipSearchError

    build(make_photos(tmp_path / "p", 2)[0].parent, index=tmp_path / "idx", model=StandInModel(), workers=0)
    with pytest.raises(RuclipSearchError, match="--db"):
        migrate(tmp_path / "idx")
    with pytest.raises(RuclipSearchError, match="--index"):
        migrate(pg_db)
    with pytest.raises(RuclipSearchError, match="already holds an SQLite index"):
        migrate(pg_db, index=tmp_path / "idx")
    with pytest.raises(IndexNotFoundError):
        migrate(tmp_path / "nothing", db=pg_db)


# -- the CLI -------------------------------------------------------------------------------------------------
def test_cli_build_info_search_with_the_database_from_the_environment(
    tmp_path: Path, photos: Path, pg_db: str, tiny_model_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("RUCLIP_SEARCH_DB", pg_db)
    index = tmp_path / "idx"
    runner = CliRunner()
    r = runner.invoke(main, ["build", str(photos), "--index", str(index), "--model", str(tiny_model_path),
                             "--workers", "0", "--device", "cpu", "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in index.iterdir() if not p.name.startswith("faiss-")) == [".lock"]
    info = json.loads(runner.invoke(main, ["info", "--index", str(index), "--json"]).output)
    assert info["images"] == 12 and info["db"].startswith("postgresql+psycopg://")
    hits = json.loads(
        runner.invoke(main, ["search", "красный круг", "--index", str(index), "--json", "-k", "3"]).output
    )
    assert len(hits) == 3 and all(h["path"].startswith(str(photos)) for h in hits)
    monkeypatch.delenv("RUCLIP_SEARCH_DB")
    r = runner.invoke(main, ["info", "--index", str(index)])  # without the database: a clear error
    assert r.exit_code == 1 and "--db" in r.output
    r = runner.invoke(main, ["info", "--index", str(index), "--db", pg_db])
    assert r.exit_code == 0 and "images:     12" in r.output and "database:" in r.output


# -- several processes on one database ------------------------------------------------------------------------
@pytest.mark.subprocess
def test_two_servers_and_a_build_on_one_database_see_each_others_writes(
    tmp_path: Path, pg_db: str, tiny_model_path: Path
) -> None:
    import httpx
    from test_photos_api import W, _Server, _unit

    from ruclip_search.search import Index

    index = tmp_path / "idx"
    with Index.create(index, model=str(tiny_model_path), device="cpu", db=pg_db) as idx:
        dim = idx.info()["dim"]
    a, b = _Server(index, tmp_path / "a.log", db=pg_db), _Server(index, tmp_path / "b.log", db=pg_db)
    a.start()
    b.start()
    try:

        def keys(server: _Server, **params) -> set[str]:
            r = httpx.get(f"{server.base}/search", params={"q": "кот", "k": 100, **params}, timeout=10)
            assert r.status_code == 200, r.text
            return {h["key"] or h["path"] for h in r.json()["hits"]}

        def soon(check, what: str, timeout: float = 10.0) -> None:
            deadline = time.monotonic() + timeout
            while not check():
                assert time.monotonic() < deadline, what
                time.sleep(0.1)

        r = httpx.put(f"{a.base}/photos/from-a", json={"embedding": _unit(dim, 1), "labels": ["x"]}, headers=W)
        assert r.status_code == 200, r.text
        r = httpx.put(f"{b.base}/photos/from-b", json={"embedding": _unit(dim, 2), "labels": ["x"]}, headers=W)
        assert r.status_code == 200, r.text
        soon(lambda: keys(a, label="x") == keys(b, label="x") == {"from-a", "from-b"}, "servers see both writes")
        assert httpx.delete(f"{b.base}/photos/from-a", headers=W).status_code == 200
        soon(lambda: keys(a, label="x") == {"from-b"}, "server a sees b's delete")
        # a folder build (a third process: this one) into the same database and folder
        photos = tmp_path / "photos"
        make_photos(photos, 6)
        report = build(photos, index=index, workers=0, device="cpu", db=pg_db)
        assert report.added == 6
        files = {str(p) for p in photos.iterdir()}
        soon(lambda: files <= keys(a) and files <= keys(b), "servers see the build's photos")
        for server in (a, b):
            info = httpx.get(f"{server.base}/info", timeout=10).json()["indexes"][0]["info"]
            assert info["images"] == 7
    finally:
        a.kill()
        b.kill()
