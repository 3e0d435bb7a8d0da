"""Real-process helpers for the crash tests: a builder subprocess, its process tree, the index's row count."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, TESTS

BUILDER = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
from conftest import StandInModel
from ruclip_search.indexer import build
build({photos!r}, index={index!r}, model=StandInModel(), workers={workers}, batch_size={batch_size}, db={db!r})
"""

Proc = tuple[int, int]  # (pid, start time in clock ticks): a pid alone may be reused


def run_builder(
    photos: Path, index: Path, workers: int = 0, batch_size: int = 3, db: str | None = None
) -> subprocess.Popen:
    """`build()` with the stand-in model in a child process (stderr piped)."""
    code = BUILDER.format(
        root=str(ROOT), tests=str(TESTS), photos=str(photos), index=str(index), workers=workers,
        batch_size=batch_size, db=db,
    )  # fmt: skip
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a live process, from /proc/PID/stat; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ", which may hold spaces
    return fields[0], int(fields[1]), int(fields[19])


def descendants(pid: int) -> list[Proc]:
    """Every process below `pid` (children, grandchildren...), found by walking /proc/*/stat ppids."""
    children: dict[int, list[Proc]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None:
            children.setdefault(st[1], []).append((int(name), st[2]))
    out: list[Proc] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child[0])
    return out


def parent_of(proc: Proc) -> int | None:
    st = _stat(proc[0])
    return st[1] if st is not None and st[2] == proc[1] else None


def alive(procs: list[Proc]) -> list[Proc]:
    """The processes of `procs` still running (a zombie has exited: it only waits to be reaped)."""
    out = []
    for pid, start in procs:
        st = _stat(pid)
        if st is not None and st[2] == start and st[0] != "Z":
            out.append((pid, start))
    return out


def wait_gone(procs: list[Proc], timeout: float = 5.0) -> tuple[list[Proc], float]:
    """Wait until no process of `procs` runs; returns (those still running after `timeout`, seconds waited)."""
    t0 = time.monotonic()
    while (left := alive(procs)) and time.monotonic() - t0 < timeout:
        time.sleep(0.02)
    return left, time.monotonic() - t0


def describe(procs: list[Proc]) -> list[str]:
    out = []
    for pid, _ in procs:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            out.append(f"{pid}: {cmdline[:160]}")
        except OSError:
            out.append(f"{pid}: (gone)")
    return out


def kill_all(procs: list[Proc]) -> None:
    """Clean up after a failed check: SIGKILL what is left of a tree, by pid (never by name)."""
    import signal

    for pid, _ in alive(procs):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def rows(index: Path, db_url: str | None = None) -> int:
    """Rows in the index's images table, read-only; -1 while the database does not exist yet."""
    if db_url is not None:
        return _pg_rows(db_url)
    db = index / "index.db"
    if not db.exists():
        return -1
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
        try:
            return int(conn.execute("SELECT count(*) FROM images").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:  # schema not created yet
        return -1


def _pg_rows(url: str) -> int:
    """`rows` for an index in PostgreSQL (psycopg directly, as sqlite3 above: not through the Store)."""
    import psycopg
    import sqlalchemy as sa

    u = sa.make_url(url)
    try:
        with psycopg.connect(u.set(drivername="postgresql").render_as_string(hide_password=False)) as conn:
            return int(conn.execute("SELECT count(*) FROM images").fetchone()[0])
    except psycopg.errors.UndefinedTable:  # schema not created yet
        return -1
