"""A served index's writer process: PUT (JSON embedding) and DELETE /photos/{key} committed outside the server.

Why a process: committing a write costs milliseconds of Python (validation, SQL, the segment update), and in
the server's process that CPU competed for the GIL with the searches: at 1M photos on 2 cores, 200 writes/s
made the search p50 5x slower (`scripts/bench_online.py`, phase 5 vs 4). In its own process the commit holds no
lock the searches need, the server keeps only the HTTP work and its searches keep every core. (Its CPU priority
is defaults.WRITER_NICE.)

How: the server starts `python -m ruclip_search.server.writer` for the index (at its startup, and again on the
next write after a child died) and hands it each request's key and raw JSON body through the child's stdin. The child parses and checks the body
exactly as the server's fast path did, commits whatever requests are waiting in one transaction (the index's
group commit; while writes keep coming, a write waits up to defaults.WRITER_COMMIT_DELAY for others to join its
group) and answers each through its stdout. The server answers the client only after the child has
committed *and* the server's own Index has applied that commit (from the vectors the child sends back, or by
reading the store's change log), so a client reads its own writes. A body the child does not take
("declined") goes back to FastAPI, whose route answers it (its 4xx, or an in-process write).

Lifetime: the child exits when its stdin closes, that is when the server exits or is killed (even `kill -9`:
the kernel closes the pipe); on Linux it also gets the parent-death signal when started from the main thread.
A write the child committed before the server died may stand without an answer, as with any crash after a
commit; an answered write was committed first. If the child dies, the writes it had not answered get 503
`writer_failed` (they may or may not have been committed: PUT and DELETE are safe to retry) and the next write
starts a new child.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from typing import Any

from .. import defaults
from ..defaults import WRITE_BATCH, WRITER_NICE
from ..errors import RuclipSearchError
from .results import record_json

log = logging.getLogger("ruclip_search.server")

_DB_ENV = "RUCLIP_SEARCH_WRITER_DB"
NICE_ENV = "RUCLIP_SEARCH_WRITER_NICE"
_HEADER = struct.Struct("!I")  # every frame: its length, then a pickle


def _send(stream: Any, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _recv(stream: Any) -> Any:
    """The next frame, or None at end of file."""
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return None
    data = stream.read(_HEADER.unpack(head)[0])
    return pickle.loads(data)


def writer_nice() -> int:
    """The writer's CPU niceness: RUCLIP_SEARCH_WRITER_NICE, else defaults.WRITER_NICE."""
    raw = os.environ.get(NICE_ENV)
    if raw is None:
        return WRITER_NICE
    try:
        return int(raw)
    except ValueError:
        raise RuclipSearchError(
            f"{NICE_ENV} must be a whole number (a CPU niceness, 0-19), got {raw!r}: fix or unset it."
        ) from None


class WriterFailed(Exception):
    """The writer process died before answering: the write may or may not have been committed."""


class WriterProcess:
    """The server side: `await put(key, body)` / `await remove(key)` answer once the child committed the write and
    `index` (the server's own) has applied it. Results: ("ok", the 200 body: JSON bytes of the record), ("deleted",
    bool), ("declined", None), ("error", exception)."""

    def __init__(self, index: Any, nice: int | None = None) -> None:
        self._index = index
        self._nice = writer_nice() if nice is None else nice
        self._proc: subprocess.Popen[bytes] | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self._next = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._starting: asyncio.Task[None] | None = None
        self.started = 0  # children started (statistics and tests)
        self.commits = 0  # groups the children committed (statistics and tests: writes / commits = group size)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    async def put(self, key: str, body: bytes) -> tuple[str, Any]:
        return await self._call("put", key, body)

    async def remove(self, key: str) -> tuple[str, Any]:
        return await self._call("del", key, b"")

    async def start(self) -> None:
        """Start the child now (the server's startup does, so its first write does not wait for it)."""
        loop = asyncio.get_running_loop()
        if self._stdin is not None and not self._stdin.is_closing():
            return
        if self._starting is None:
            self._starting = loop.create_task(self._start(loop))
        try:
            await asyncio.shield(self._starting)
        finally:
            if self._starting is not None and self._starting.done():
                self._starting = None

    async def _call(self, op: str, key: str, body: bytes) -> tuple[str, Any]:
        if self._stdin is None or self._stdin.is_closing():
            await self.start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._next += 1
        rid = self._next
        with self._lock:
            self._futures[rid] = future
        data = pickle.dumps((rid, op, key, body), protocol=pickle.HIGHEST_PROTOCOL)
        assert self._stdin is not None
        self._stdin.write(_HEADER.pack(len(data)) + data)  # buffered by the transport: never blocks the loop
        return await future

    async def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        index = self._index
        store = index.store
        cmd = [sys.executable, "-m", "ruclip_search.server.writer", str(store.dir), str(index._towers().dim),
               index.model_name, str(self._nice), repr(float(defaults.WRITER_COMMIT_DELAY)),
               repr(float(defaults.WRITER_BUSY))]  # fmt: skip
        env = dict(os.environ)
        if store.url is not None:  # in the environment, not the command line (ps shows that to every user)
            env[_DB_ENV] = store.url
        if threading.current_thread() is threading.main_thread():
            env["RUCLIP_SEARCH_WRITER_PARENT"] = str(os.getpid())  # arm the parent-death signal (see _procs)
        # stdout carries the answers; the child's own logging goes to stderr (the server's)
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)  # noqa: S603
        assert proc.stdin is not None and proc.stdout is not None
        transport, _ = await loop.connect_write_pipe(asyncio.Protocol, proc.stdin)
        ready: asyncio.Future[None] = loop.create_future()
        threading.Thread(target=self._replies, args=(proc, loop, ready), name="ruclip-writer-replies",
                         daemon=True).start()  # fmt: skip
        try:
            await ready  # the child has opened the index: writes sent now are committed at once
        except BaseException:
            transport.close()
            raise
        self._proc, self._stdin, self._loop = proc, transport, loop  # type: ignore[assignment]
        self.started += 1

    def _replies(self, proc: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop,
                 ready: asyncio.Future[None]) -> None:  # fmt: skip
        """Read the child's answers: apply each commit to the server's Index, then wake the requests."""
        stream = proc.stdout
        try:
            if _recv(stream) == "ready":
                loop.call_soon_threadsafe(_settle_ready, ready, None)
            while (frame := _recv(stream)) is not None:
                commits, answers = frame
                for embeddings, done in commits:
                    self._index.follow_commit(embeddings, done)
                self.commits += len(commits)
                with self._lock:
                    settled = [(self._futures.pop(rid, None), answer) for rid, answer in answers]
                loop.call_soon_threadsafe(_settle, settled)
        except Exception:  # a torn frame: the child is dying; its pending writes hear it below
            log.warning("writer process %s: bad answer", proc.pid, exc_info=True)
        finally:
            proc.wait()
            with self._lock:
                lost, self._futures = list(self._futures.values()), {}
            if lost or proc.returncode not in (0, None):
                log.warning("writer process %s exited with %s; %d write(s) unanswered", proc.pid, proc.returncode,
                            len(lost))  # fmt: skip
            try:
                loop.call_soon_threadsafe(self._lost, proc, lost)
                loop.call_soon_threadsafe(_settle_ready, ready, WriterFailed(
                    f"The writer process could not open the index (exit status {proc.returncode}): see the "
                    "server's log."))  # fmt: skip
            except RuntimeError:  # the loop is closed: the server is shutting down
                pass

    def _lost(self, proc: subprocess.Popen[bytes], lost: list[asyncio.Future[Any]]) -> None:
        if self._proc is proc and self._stdin is not None:
            self._stdin.close()
            self._stdin = None  # the next write starts a new child
        for future in lost:
            if not future.done():
                future.set_exception(WriterFailed("The writer process died before answering."))

    def close(self) -> None:
        """Close the child's stdin (it finishes what it has and exits) and wait for it."""
        proc, transport, loop = self._proc, self._stdin, self._loop
        self._stdin = None
        if proc is None:
            return
        if transport is not None and loop is not None and loop.is_running():
            try:
                if asyncio.get_running_loop() is loop:
                    transport.close()
            except RuntimeError:  # not on the loop's thread
                pass
        try:
            assert proc.stdin is not None
            proc.stdin.close()  # the transport's own close of this file object is then a no-op
        except OSError:
            pass
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _settle_ready(ready: asyncio.Future[None], error: BaseException | None) -> None:
    if not ready.done():
        if error is None:
            ready.set_result(None)
        else:
            ready.set_exception(error)


def _settle(settled: list[tuple[asyncio.Future[Any] | None, tuple[str, Any]]]) -> None:
    for future, answer in settled:
        if future is not None and not future.done():
            future.set_result(answer)


# -- the child ---------------------------------------------------------------------------------------------


class _DimOnly:
    """A stand-in for the text model: the writer takes embeddings only, so it needs the dimension, no weights."""

    parts = ()

    def __init__(self, dim: int, name: str) -> None:
        self.dim, self.name = dim, name


def _commit(index: Any, batch: list[tuple[int, str, str, bytes]]) -> tuple[list[Any], list[tuple[int, Any]]]:
    """Parse and commit one batch of requests; (commits made, (rid, answer) per request)."""
    from .fastpath import _Declined, _photo

    answers: dict[int, tuple[str, Any]] = {}
    requests: list[tuple[int, str, tuple[list[dict[str, Any]], list[str]]]] = []
    for rid, op, key, body in batch:
        if op == "del":
            requests.append((rid, op, ([], [key])))
            continue
        try:
            requests.append((rid, op, ([{"key": key, "image": None, **_photo(body)}], [])))
        except _Declined:
            answers[rid] = ("declined", None)
    commits: list[Any] = []
    index.on_commit = lambda embeddings, done: commits.append((embeddings, done))
    try:
        results = index.write_many([r for _, _, r in requests]) if requests else []
    except RuclipSearchError as e:  # e.g. the database is gone: every request hears it
        results = [e] * len(requests)
    for (rid, op, _), result in zip(requests, results, strict=True):
        if isinstance(result, BaseException):
            answers[rid] = ("error", _picklable(result))
        elif op == "del":
            answers[rid] = ("deleted", result[1] > 0)
        else:
            answers[rid] = ("ok", record_json(result[0][0]))  # the 200 body: the server only forwards it (no record to
            # unpickle and serialise under its GIL per write)
    return commits, [(rid, answers[rid]) for rid, *_ in batch]


def _picklable(e: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuclipSearchError(str(e))


class _Requests:
    """The server's request frames, read from the pipe by the writer's only thread.

    Why not a reader thread handing frames to the committing thread through a condition (as before): each
    request then woke two threads and passed the GIL between them; the writer spent ~0.3 ms per write outside
    the commit itself, and one thread waiting on the pipe cut its CPU per write by ~10 % (4 writers, 200/s)."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buf, self.eof = fd, bytearray(), False

    def read(self, timeout: float | None) -> list[Any]:
        """The frames that arrive within `timeout` seconds (None: wait for at least one, or the end of the pipe)."""
        if select.select([self.fd], [], [], timeout)[0]:
            chunk = os.read(self.fd, 1 << 20)
            if chunk:
                self.buf += chunk
            else:
                self.eof = True  # a torn last frame (the server died mid-write) is dropped: it was never answered
        frames = []
        view, at = memoryview(self.buf), 0
        while len(view) - at >= _HEADER.size:
            size = _HEADER.unpack_from(view, at)[0]
            if len(view) - at - _HEADER.size < size:
                break
            frames.append(pickle.loads(view[at + _HEADER.size : at + _HEADER.size + size]))
            at += _HEADER.size + size
        view.release()
        del self.buf[:at]
        return frames


def main(argv: list[str]) -> None:
    """`python -m ruclip_search.server.writer DIR DIM MODEL NICE DELAY BUSY` (a PostgreSQL URL in
    RUCLIP_SEARCH_WRITER_DB): commit the writes read from stdin, answer on stdout. DELAY, BUSY: seconds, see
    defaults.WRITER_COMMIT_DELAY."""
    folder, dim, model, nice = argv[0], int(argv[1]), argv[2], int(argv[3])
    delay, busy = float(argv[4]), float(argv[5])
    db = os.environ.pop(_DB_ENV, None)
    parent = os.environ.pop("RUCLIP_SEARCH_WRITER_PARENT", None)
    if parent is not None:
        from .._procs import _die_with_parent

        _die_with_parent(int(parent))
    out = os.fdopen(os.dup(1), "wb")  # the replies; anything printed goes to stderr instead
    os.dup2(2, 1)
    requests = _Requests(sys.stdin.fileno())
    from ..search import Index
    from .fastpath import _photo  # noqa: F401 - imported before "ready": the first write does not wait for it

    index = Index.open(folder, writable=True, model=_DimOnly(dim, model), db=db)
    index.searchable = False  # the server's Index makes the writes searchable (and compacts)
    if nice:
        os.nice(nice)
    _send(out, "ready")
    pending: list[Any] = []
    last = float("-inf")  # when the last group was committed
    try:
        while True:
            if not pending:
                if requests.eof:
                    break
                pending += requests.read(None)
                continue
            if delay > 0 and time.monotonic() - last < busy:  # writes keep coming: let others join the group
                until = time.monotonic() + delay
                while len(pending) < WRITE_BATCH and not requests.eof and (left := until - time.monotonic()) > 0:
                    pending += requests.read(left)
            batch, pending = pending[:WRITE_BATCH], pending[WRITE_BATCH:]
            commits, answers = _commit(index, batch)
            last = time.monotonic()
            try:
                _send(out, (commits, answers))
            except (BrokenPipeError, OSError):
                break  # the server is gone
    finally:
        index.close()


if __name__ == "__main__":
    main(sys.argv[1:])
