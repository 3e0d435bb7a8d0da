"""store: a write transaction's reads are part of it (SQLite took its write lock only at the first INSERT, so
two writers could both read the same `data_version` or both see a new key absent), and a failed one writes
nothing.

The races are made deterministic in one thread: a hook on writer A's engine runs writer B's whole write just
before A's first INSERT, when A has read but not yet written. B gives up at once on a lock A holds
(`_impatient`): then it is retried after A committed, as a waiting writer would go on. Before the fix B
committed in the middle of A, and A then lost B's `data_version` bump or collided with B's new key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from ruclip_search import store as store_module
from ruclip_search.errors import StorageError
from ruclip_search.store import SCHEMA_VERSION, PhotoWrite, Store, encode_embedding

DIM = 4


def _photo(key: str, seed: int) -> PhotoWrite:
    vec = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return PhotoWrite(key, encode_embedding(vec / np.linalg.norm(vec)))


def _impatient(store: Store) -> Store:
    """`store` with connections that fail at once on a lock another connection holds, instead of waiting for it
    (SQLite's busy_timeout 0, PostgreSQL's lock_timeout): the test runs both writers in one thread."""

    def connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        if store.dialect == "sqlite":
            cur.execute("PRAGMA busy_timeout=0")
        else:
            cur.execute("SET lock_timeout = '100ms'")
            dbapi_conn.commit()
        cur.close()

    sa.event.listen(store.engine, "connect", connect)  # after the store's own: its busy_timeout is replaced
    store.engine.dispose()  # pooled connections opened before the listener
    return store


def _two_writers(tmp_path: Path, db: str | None) -> tuple[Store, Store]:
    index = tmp_path / "idx"
    a = Store.create(index, db=db)
    a.set_meta(model="m", dim=str(DIM))
    return a, _impatient(Store.create(index, db=db))


def _before(a: Store, match: Callable[[str], bool], other: Callable[[], Any]) -> list[Any]:
    """Run `other` (another writer's whole write) once, just before `a` runs the first statement that `match`es.
    Returns [] (not run yet), [its result], or [the lock error] if it had to wait for `a`."""
    out: list[Any] = []

    def hook(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if out or not match(statement.lstrip()):
            return
        try:
            out.append(other())
        except (StorageError, sa.exc.OperationalError) as e:  # locked: it would have waited for `a`
            out.append(e)

    sa.event.listen(a.engine, "before_cursor_execute", hook)
    return out


def _before_first_insert(a: Store, table: str, other: Callable[[], Any]) -> list[Any]:
    """`_before` `a`'s first INSERT INTO `table`, when `a`'s transaction has done its reads."""
    return _before(a, lambda statement: statement.upper().startswith(f"INSERT INTO {table.upper()}"), other)


def _waited(outcome: list[Any], retry: Callable[[], Any]) -> Any:
    """The other writer's result: retried now if it was refused by the first writer's lock."""
    assert len(outcome) == 1, "the hook did not run"
    return retry() if isinstance(outcome[0], Exception) else outcome[0]


def test_concurrent_writes_both_bump_data_version(tmp_path: Path, db: str | None) -> None:
    a, b = _two_writers(tmp_path, db)
    start = a.data_version()
    outcome = _before_first_insert(a, "images", lambda: b.write_photos([_photo("from-b", 2)]))
    a.write_photos([_photo("from-a", 1)])
    _waited(outcome, lambda: b.write_photos([_photo("from-b", 2)]))
    # before the fix: b committed start+1 between a's read and a's write of start+1 (one bump lost, and the
    # FAISS file written after b's photo would look current without it)
    assert a.data_version() == start + 2
    assert a.get_by_key("from-a") is not None and a.get_by_key("from-b") is not None
    a.close()
    b.close()


def test_concurrent_puts_of_one_new_key_replace(tmp_path: Path, db: str | None) -> None:
    a, b = _two_writers(tmp_path, db)
    outcome = _before_first_insert(a, "images", lambda: b.put_photos([_photo("same", 2)]))
    # before the fix: a saw "same" absent, b inserted it, a's INSERT hit the UNIQUE key (QueryError: "two of
    # them name the same file", a 400 over HTTP)
    (a_id,) = a.put_photos([_photo("same", 1)])
    (b_id,) = _waited(outcome, lambda: b.put_photos([_photo("same", 2)]))
    assert a_id == b_id  # b replaced a's photo, keeping its id
    assert a.counts()["images"] == 1
    np.testing.assert_array_equal(
        a.get_embeddings([a_id]), np.frombuffer(_photo("same", 2).embedding, np.float16).astype(np.float32)[None]
    )
    a.close()
    b.close()


def test_concurrent_new_root_is_one_row(tmp_path: Path, db: str | None) -> None:
    a, b = _two_writers(tmp_path, db)
    outcome = _before_first_insert(a, "roots", lambda: b.root_id("/photos"))
    a_id = a.root_id("/photos")  # before the fix: an IntegrityError (b inserted the root after a looked)
    assert _waited(outcome, lambda: b.root_id("/photos")) == a_id
    assert a.roots() == {a_id: "/photos"}
    a.close()
    b.close()


def test_exception_in_transaction_writes_nothing(tmp_path: Path, db: str | None) -> None:
    a, b = _two_writers(tmp_path, db)
    a.put_photos([_photo("kept", 1)])
    start, counts = a.data_version(), a.counts()
    with pytest.raises(RuntimeError, match="boom"):
        with a.transaction() as conn:
            a._put(conn, [_photo("new", 2), _photo("kept", 3)], [_photo("new", 2).values(), _photo("kept", 3).values()])
            raise RuntimeError("boom")
    assert a.data_version() == start and a.counts() == counts and a.get_by_key("new") is None
    np.testing.assert_array_equal(
        a.get_embeddings([a.get_by_key("kept").id]),
        np.frombuffer(_photo("kept", 1).embedding, np.float16).astype(np.float32)[None],
    )
    assert a.max_seq() == 1  # only "kept"'s first put was logged
    b.put_photos([_photo("after", 4)])  # the write lock was released: an impatient writer gets it at once
    assert a.data_version() == start + 1
    a.close()
    b.close()


def test_a_failed_migration_changes_nothing(tmp_path: Path, db: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A migration is one transaction: on SQLite its DDL ran in autocommit before (a failure part-way left the
    first tables created at schema 0, and every later open failed on "table meta already exists")."""
    real = store_module.migration_sql

    def failing(index: int, dialect: str) -> list[str]:
        return [*real(index, dialect), "INSERT INTO no_such_table VALUES (1)"] if index == 0 else real(index, dialect)

    monkeypatch.setattr(store_module, "migration_sql", failing)
    with pytest.raises(StorageError, match="no_such_table"):
        Store.create(tmp_path / "idx", db=db)
    monkeypatch.setattr(store_module, "migration_sql", real)
    with Store.create(tmp_path / "idx", db=db) as store:
        assert store.schema_version() == SCHEMA_VERSION


def test_a_migration_rereads_the_version_under_the_lock(tmp_path: Path, db: str | None) -> None:
    """A writer that read an older schema version, then waited while another process migrated, finds the
    migration done (before, on SQLite: it ran it again, and its CREATE TABLE failed: "table meta already
    exists")."""
    index = tmp_path / "idx"
    index.mkdir()
    a, b = Store(index, readonly=False, db=db), Store(index, readonly=False, db=db)

    def first_migration_statement(statement: str) -> bool:  # after b read the version 0 outside the lock
        return statement.startswith(("BEGIN IMMEDIATE", "CREATE TABLE")) or "pg_advisory_xact_lock" in statement

    outcome = _before(b, first_migration_statement, lambda: a.migrate())
    assert b.migrate() == SCHEMA_VERSION
    assert outcome == [SCHEMA_VERSION]
    assert b.schema_version() == SCHEMA_VERSION and b.get_meta(f"migration_{SCHEMA_VERSION:03d}") is not None
    a.close()
    b.close()


# -- real processes ------------------------------------------------------------------------------------------
_WRITER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from ruclip_search.errors import QueryError
    from ruclip_search.store import PhotoWrite, Store, encode_embedding
    index, db, name, rounds = sys.argv[1], sys.argv[2] or None, sys.argv[3], int(sys.argv[4])
    store = Store.open(index, readonly=False, db=db)
    emb = encode_embedding(np.ones(4, np.float32) / 2)
    errors = 0
    print("ready", flush=True)
    sys.stdin.readline()  # both processes start writing at once
    for i in range(rounds):
        try:  # the same new key in both processes, round after round
            store.put_photos([PhotoWrite(f"k{i}", emb, collection=name)])
        except QueryError as e:
            errors += 1
    print(json.dumps({"errors": errors}), flush=True)
    """
)


@pytest.mark.subprocess
def test_two_processes_writing_one_index(tmp_path: Path, db: str | None) -> None:
    index = tmp_path / "idx"
    with Store.create(index, db=db) as store:
        store.set_meta(model="m", dim="4")
    rounds = 300
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(index), db or "", name, str(rounds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for name in ("p", "q")
    ]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    with Store.open(index, db=db) as store:
        # before the fix on SQLite: both processes read the same data_version (bumps lost), and both saw a new
        # key absent (a QueryError for the second INSERT)
        seen = (store.data_version(), [r["errors"] for r in results], store.counts()["images"])
        assert seen == (2 * rounds, [0, 0], rounds)
