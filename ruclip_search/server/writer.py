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

Under `serve`, a client connection whose first request is such a write is handed to the child whole
(server/handoff.py): the child then reads, commits and answers that connection's writes itself, so the server
does no HTTP work for them. It sends each commit to the server as above and answers those clients only after the
server's acknowledgement that its Index applied it (read-your-writes holds the same). The first request it does
not take goes back to the server with the connection.

Lifetime: the child exits when its stdin closes, that is when the server exits or is killed (even `kill -9`:
the kernel closes the pipe); on Linux it also gets the parent-death signal when started from the main thread.
A write the child committed before the server died may stand without an answer, as with any crash after a
commit; an answered write was committed first. If the child dies, the writes it had not answered get 503
`writer_failed` and the connections it held are closed (either way the write may or may not have been committed:
PUT and DELETE are safe to retry), and the next write starts a new child.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import pickle
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
from http import HTTPStatus
from typing import Any
from urllib.parse import quote, unquote

from .. import defaults
from ..defaults import WRITE_BATCH, WRITER_NICE
from ..errors import RuclipSearchError
from . import priority
from .errors import ApiError
from .fastpath import _Declined, _photo, not_found, write_failed
from .handoff import HANDOFF_MAX
from .results import record_json
from .writes import checked_key

log = logging.getLogger("ruclip_search.server")
_access = logging.getLogger("ruclip_search.server.writer.access")  # on with the server's access log

_DB_ENV = "RUCLIP_SEARCH_WRITER_DB"
_TOKEN_ENV = "RUCLIP_SEARCH_WRITER_TOKEN"  # pragma: allowlist secret - the name of a variable
NICE_ENV = "RUCLIP_SEARCH_WRITER_NICE"
_HEADER = struct.Struct("!I")  # every frame: its length, then a pickle
_ACK = struct.Struct("!Q")  # the server applied the commit frame with this number


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


def writer_priority() -> int | str:
    """The writer's CPU priority: RUCLIP_SEARCH_WRITER_NICE (a niceness, or `idle`), else defaults.WRITER_PRIORITY;
    `idle` (SCHED_IDLE, see server/priority.py) becomes niceness defaults.WRITER_NICE where it could starve."""
    raw = os.environ.get(NICE_ENV, str(defaults.WRITER_PRIORITY))
    if raw.strip() == priority.IDLE:
        return priority.IDLE if priority.idle_possible(WRITER_NICE) else WRITER_NICE
    try:
        return int(raw)
    except ValueError:
        raise RuclipSearchError(
            f"{NICE_ENV} must be a whole number (a CPU niceness, 0-19) or `idle`, got {raw!r}: fix or unset it."
        ) from None


class WriterFailed(Exception):
    """The writer process died before answering: the write may or may not have been committed."""


class WriterProcess:
    """The server side: `await put(key, body)` / `await remove(key)` answer once the child committed the write and
    `index` (the server's own) has applied it. Results: ("ok", the 200 body: JSON bytes of the record), ("deleted",
    bool), ("declined", None), ("error", exception)."""

    def __init__(self, index: Any, nice: int | str | None = None, token: str | None = None, limit: int = 0,
                 name: str = "") -> None:  # fmt: skip
        # `token`, `limit`, `name`: the write token, the upload limit (bytes) and the index's name in the server,
        # for the connections handed to the child
        self._index = index
        self._name = name
        self._nice = writer_priority() if nice is None else nice  # a niceness, or priority.IDLE
        self._guard: priority.Guard | None = None
        self._token, self._limit = token, limit
        self._proc: subprocess.Popen[bytes] | None = None
        self._ctl: socket.socket | None = None  # connections to the child and back (server/handoff.py)
        self._take_back: Any = None
        self._stdin: asyncio.WriteTransport | None = None
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self._next = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._starting: asyncio.Task[None] | None = None
        self.started = 0  # children started (statistics and tests)
        self.handed = 0  # connections handed to the children (statistics and tests)
        self.access_log = False  # the children log each request they answer, as uvicorn's access log
        self.commits = 0  # groups the children committed (statistics and tests: writes / commits = group size)

    def hand_over(self, transport: Any, data: bytes, take_back: Any) -> bool:
        """Send a client's connection, and the bytes read from it, to the child (server/handoff.py); False: it
        cannot take it now (not running, or its queue is full), serve it here. `take_back(loop, sock, data)`
        serves a connection the child gives back."""
        ctl = self._ctl
        sock = transport.get_extra_info("socket")
        if ctl is None or sock is None or self._token is None:
            return False
        self._take_back = take_back
        try:
            socket.send_fds(ctl, [b"C" + data], [sock.fileno()])
        except OSError:
            return False
        self.handed += 1
        return True

    def _given_back(self, ctl: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        """The child gave connections back: serve them here."""
        while True:
            try:
                msg, fds, _, _ = socket.recv_fds(ctl, HANDOFF_MAX + 64, 8)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                msg, fds = b"", []
            if not msg and not fds:  # the child is gone
                loop.remove_reader(ctl.fileno())
                return
            for fd in fds:
                conn = socket.socket(fileno=fd)
                conn.setblocking(False)
                if self._take_back is None:  # pragma: no cover - nothing was handed over
                    conn.close()
                else:
                    self._take_back(loop, conn, msg[1:])

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
        ctl, child_ctl = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ack_r, ack_w = os.pipe()
        cmd += [str(child_ctl.fileno()), str(ack_r), str(self._limit), self._name, str(int(self.access_log))]
        env = dict(os.environ)
        if self._token is not None:
            env[_TOKEN_ENV] = self._token
        if store.url is not None:  # in the environment, not the command line (ps shows that to every user)
            env[_DB_ENV] = store.url
        if threading.current_thread() is threading.main_thread():
            env["RUCLIP_SEARCH_WRITER_PARENT"] = str(os.getpid())  # arm the parent-death signal (see _procs)
        # stdout carries the answers; the child's own logging goes to stderr (the server's)
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,  # noqa: S603
                                    pass_fds=(child_ctl.fileno(), ack_r))  # fmt: skip
        except BaseException:
            ctl.close()
            os.close(ack_w)
            raise
        finally:
            child_ctl.close()
            os.close(ack_r)
        assert proc.stdin is not None and proc.stdout is not None
        transport, _ = await loop.connect_write_pipe(asyncio.Protocol, proc.stdin)
        ready: asyncio.Future[None] = loop.create_future()
        threading.Thread(target=self._replies, args=(proc, loop, ready, ack_w), name="ruclip-writer-replies",
                         daemon=True).start()  # fmt: skip
        try:
            await ready  # the child has opened the index: writes sent now are committed at once
        except BaseException:
            transport.close()
            ctl.close()
            raise
        ctl.setblocking(False)
        loop.add_reader(ctl.fileno(), self._given_back, ctl, loop)
        self._proc, self._stdin, self._loop, self._ctl = proc, transport, loop, ctl  # type: ignore[assignment]
        self.started += 1
        if self._nice == priority.IDLE:
            self._stop_guard()
            try:
                self._guard = priority.Guard(proc.pid)
            except ProcessLookupError:  # it died already: the next write starts another
                pass

    def _replies(self, proc: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop,
                 ready: asyncio.Future[None], ack: int) -> None:  # fmt: skip
        """Read the child's answers: apply each commit to the server's Index, then wake the requests (and tell
        the child, which answers the connections it holds only then: their clients read their writes here)."""
        stream = proc.stdout
        try:
            if _recv(stream) == "ready":
                loop.call_soon_threadsafe(_settle_ready, ready, None)
            while (frame := _recv(stream)) is not None:
                commits, answers, applied = frame
                for embeddings, done in commits:
                    self._index.follow_commit(embeddings, done)
                self.commits += len(commits)
                if applied is not None:
                    try:
                        os.write(ack, _ACK.pack(applied))
                    except OSError:  # the child is gone: its connections went with it
                        pass
                if answers:
                    with self._lock:
                        settled = [(self._futures.pop(rid, None), answer) for rid, answer in answers]
                    loop.call_soon_threadsafe(_settle, settled)
        except Exception:  # a torn frame: the child is dying; its pending writes hear it below
            log.warning("writer process %s: bad answer", proc.pid, exc_info=True)
        finally:
            os.close(ack)
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
            self._close_ctl()
            self._stop_guard()
        for future in lost:
            if not future.done():
                future.set_exception(WriterFailed("The writer process died before answering."))

    def _stop_guard(self) -> None:
        guard, self._guard = self._guard, None
        if guard is not None:
            guard.stop()

    def _close_ctl(self) -> None:
        ctl, self._ctl = self._ctl, None
        if ctl is not None:
            try:
                if self._loop is not None and not self._loop.is_closed():
                    self._loop.remove_reader(ctl.fileno())
            except (RuntimeError, ValueError):  # not on the loop's thread, or the loop is gone
                pass
            ctl.close()

    def close(self) -> None:
        """Close the child's stdin (it finishes what it has and exits) and wait for it."""
        proc, transport, loop = self._proc, self._stdin, self._loop
        self._stdin = None
        if proc is None:
            return
        self._close_ctl()
        self._stop_guard()
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
    answers: dict[int, tuple[str, Any]] = {}
    requests: list[tuple[int, str, tuple[list[dict[str, Any]], list[str]]]] = []
    for rid, op, key, body in batch:
        if op == "del":
            requests.append((rid, op, ([], [key])))
            continue
        if op == "add":  # a handed connection's write, parsed already
            requests.append((rid, op, ([{"key": key, "image": None, **body}], [])))
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


class _Conn:
    """A client connection the server handed to this process: its unread bytes, and the answer being sent."""

    __slots__ = ("buf", "busy", "close_after", "eof", "key", "method", "out", "seen", "sock")

    def __init__(self, sock: socket.socket, data: bytes) -> None:
        self.sock, self.buf, self.out, self.key, self.method = sock, bytearray(data), b"", "", ""
        self.seen = time.monotonic()  # its last bytes in or out: an idle connection is closed as uvicorn would
        self.busy = False  # a request of it is being committed (it is answered before the next is read)
        self.close_after = False  # the client asked for `Connection: close`
        self.eof = False


_MAX_HEAD = 16 * 1024
_IDLE = 5.0  # seconds an idle connection is kept open: uvicorn's default keep-alive timeout
_REASONS = {s.value: s.phrase for s in HTTPStatus}


class _Events:
    """Everything the writer's only thread waits on: the server's request frames (stdin), the connections handed
    to it and given back (`ctl`), the server's acknowledgements that it applied a commit (`ack`), and the
    connections themselves.

    Why one thread (select), not a reader thread per source: each request then woke two threads and passed the
    GIL between them; the writer spent ~0.3 ms per write outside the commit itself, and one thread waiting on the
    pipe cut its CPU per write by ~10 % (4 writers, 200/s).

    A connection's requests are parsed here only as far as the writes this process takes need: `PUT /photos/KEY`
    with a JSON embedding (what server/fastpath.py takes, checked by the same functions) and `DELETE
    /photos/KEY`, HTTP/1.1 with a Content-Length, the write token, no Origin, no query. At the first request that
    is anything else, the connection goes back to the server with every byte from that request on."""

    def __init__(self, fd: int, ctl: socket.socket | None, ack: int | None, token: str | None, limit: int,
                 name: str = "") -> None:  # fmt: skip
        self.fd, self.ctl, self.ack, self.token, self.limit = fd, ctl, ack, token, min(limit, HANDOFF_MAX)
        self.name = name  # the index's name in the server (its answers say it)
        self.buf, self.abuf, self.eof = bytearray(), bytearray(), False
        self.sel = selectors.DefaultSelector()
        self.sel.register(fd, selectors.EVENT_READ, None)
        if ctl is not None and ack is not None:
            self.sel.register(ctl, selectors.EVENT_READ, "ctl")
            self.sel.register(ack, selectors.EVENT_READ, "ack")
        self.waiting: dict[int, list[tuple[_Conn, Any]]] = {}  # commit frame number -> its connections' answers
        self.frames = 0
        self.conns: set[_Conn] = set()
        self.swept = time.monotonic()

    def read(self, timeout: float | None) -> list[Any]:
        """The requests that arrive within `timeout` seconds (None: until something happens): the server's
        frames, (rid, op, key, body), and the handed connections' writes, (conn, op, key, add's arguments)."""
        items: list[Any] = []
        if self.conns and (timeout is None or timeout > 1.0):
            timeout = 1.0  # to close idle connections
        for key, mask in self.sel.select(timeout):
            what = key.data
            if what is None:
                self._frames(items)
            elif what == "ctl":
                self._handed(items)
            elif what == "ack":
                self._acks(items)
            elif mask & selectors.EVENT_WRITE:
                self._flush(what, items)
            else:
                self._readable(what, items)
        if self.conns and (now := time.monotonic()) - self.swept >= 1.0:
            self.swept = now
            for conn in [c for c in self.conns if not c.busy and not c.out and now - c.seen > _IDLE]:
                self._drop(conn)
        return items

    def _frames(self, items: list[Any]) -> None:
        chunk = os.read(self.fd, 1 << 20)
        if chunk:
            self.buf += chunk
        else:
            self.eof = True  # a torn last frame (the server died mid-write) is dropped: it was never answered
            self.sel.unregister(self.fd)
        view, at = memoryview(self.buf), 0
        while len(view) - at >= _HEADER.size:
            size = _HEADER.unpack_from(view, at)[0]
            if len(view) - at - _HEADER.size < size:
                break
            items.append(pickle.loads(view[at + _HEADER.size : at + _HEADER.size + size]))
            at += _HEADER.size + size
        view.release()
        del self.buf[:at]

    def _handed(self, items: list[Any]) -> None:
        assert self.ctl is not None
        try:
            msg, fds, _, _ = socket.recv_fds(self.ctl, HANDOFF_MAX + 64, 8)
        except (BlockingIOError, InterruptedError):
            return
        if not msg and not fds:  # the server is gone (stdin's end of file says so too)
            self.sel.unregister(self.ctl)
            return
        for fd in fds:
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            conn = _Conn(sock, msg[1:])
            self.conns.add(conn)
            self._next(conn, items)

    def _acks(self, items: list[Any]) -> None:
        assert self.ack is not None
        chunk = os.read(self.ack, 4096)
        if not chunk:
            self.sel.unregister(self.ack)
            return
        self.abuf += chunk
        whole = len(self.abuf) - len(self.abuf) % _ACK.size
        for (frame,) in _ACK.iter_unpack(bytes(self.abuf[:whole])):
            for conn, answer in self.waiting.pop(frame, ()):
                self._answer(conn, answer, items)
        del self.abuf[:whole]

    def committed(self, answers: list[tuple[_Conn, Any]]) -> int | None:
        """The number of the commit frame about to be sent, whose connections' answers wait for the server's
        acknowledgement; None when it holds none."""
        if not answers:
            return None
        self.frames += 1
        self.waiting[self.frames] = answers
        return self.frames

    def close(self) -> None:
        for conn in self.conns:
            conn.sock.close()
        self.sel.close()

    # -- a connection --------------------------------------------------------------------------------------

    def _readable(self, conn: _Conn, items: list[Any]) -> None:
        try:
            chunk = conn.sock.recv(_MAX_HEAD)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(conn)
            return
        conn.buf += chunk
        conn.seen = time.monotonic()
        self._next(conn, items)

    def _next(self, conn: _Conn, items: list[Any]) -> None:
        """Take the connection's next request if it is whole (a write for `items`, or back to the server), else
        wait for more bytes."""
        try:
            item = self._request(conn)
        except _Back:
            self._give_back(conn)
            return
        self._watch(conn, selectors.EVENT_READ if item is None else 0)
        if item is not None:
            items.append(item)

    def _request(self, conn: _Conn) -> tuple[Any, ...] | None:
        buf = conn.buf
        end = buf.find(b"\r\n\r\n", 0, _MAX_HEAD)
        if end < 0:
            if len(buf) >= _MAX_HEAD or conn.eof:
                raise _Back
            return None
        lines = bytes(buf[:end]).split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[2] != b"HTTP/1.1" or parts[0] not in (b"PUT", b"DELETE"):
            raise _Back
        method, target = parts[0], parts[1]
        if not target.startswith(b"/photos/") or b"?" in target or b"#" in target:
            raise _Back
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            name = name.lower()
            if not sep or not name or name != name.strip() or name in headers:
                raise _Back
            headers[name] = value.strip(b" \t")
        if headers.keys() & {b"origin", b"transfer-encoding", b"expect", b"upgrade"}:
            raise _Back
        length = headers.get(b"content-length", b"0" if method == b"DELETE" else b"")
        if not length.isdigit() or int(length) > self.limit:
            raise _Back
        size = end + 4 + int(length)
        if len(buf) < size:
            if conn.eof:
                raise _Back
            return None
        token, given = self.token, headers.get(b"authorization", b"")
        scheme, _, given = given.partition(b" ")
        if (token is None or scheme.lower() != b"bearer"
                or not hmac.compare_digest(given.strip(), token.encode("utf-8"))):  # fmt: skip
            raise _Back
        try:  # the path as uvicorn gives it to the server's fast path
            key = target[len(b"/photos/") :].decode("ascii")
            key = unquote(key) if "%" in key else key
            if not key or "/" in key:
                raise _Back
            key = checked_key(key)
        except (UnicodeDecodeError, ApiError):
            raise _Back from None
        if method == b"PUT":
            if headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower() != b"application/json":
                raise _Back
            try:
                args = _photo(bytes(buf[end + 4 : size]))
            except _Declined:
                raise _Back from None
        conn.close_after = headers.get(b"connection", b"").lower() == b"close"
        conn.key, conn.method = key, method.decode("ascii")
        del buf[:size]
        conn.busy = True
        if method == b"DELETE":
            return (conn, "del", key, b"")
        return (conn, "add", key, args)

    def _answer(self, conn: _Conn, answer: tuple[str, Any], items: list[Any]) -> None:
        """Send a committed write's answer (the server's fast path's own), then read the connection's next."""
        kind, value = answer
        if kind == "ok":
            status, body = 200, value
        elif kind == "deleted" and value:
            status, body = 200, b'{"deleted":true}'
        else:
            status, body = _error(kind, value, conn.key, self.name)
        head = b"HTTP/1.1 %d %s\r\ndate: %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % (
            status, _REASONS.get(status, "").encode("ascii"), _date(), len(body))  # fmt: skip
        if _access.isEnabledFor(logging.INFO):
            _access.info('%s - "%s /photos/%s HTTP/1.1" %d %s', _peer(conn.sock), conn.method,
                         quote(conn.key, safe=""), status, _REASONS.get(status, ""))  # fmt: skip
        conn.out = head + (b"connection: close\r\n\r\n" if conn.close_after else b"\r\n") + body
        conn.busy = False
        self._flush(conn, items)

    def _flush(self, conn: _Conn, items: list[Any]) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._drop(conn)
            return
        conn.out = conn.out[sent:]
        conn.seen = time.monotonic()
        if conn.out:
            self._watch(conn, selectors.EVENT_WRITE)
        elif conn.close_after or conn.eof:
            self._drop(conn)
        elif conn.buf:
            self._next(conn, items)
        else:
            self._watch(conn, selectors.EVENT_READ)

    def _give_back(self, conn: _Conn) -> None:
        """The server serves the connection from here on, from the bytes not yet taken."""
        self._watch(conn, 0)
        try:
            if self.ctl is not None:
                self.ctl.setblocking(True)
                socket.send_fds(self.ctl, [b"B" + bytes(conn.buf)], [conn.sock.fileno()])
        except OSError:
            log.warning("writer: could not give a connection back to the server", exc_info=True)
        self.conns.discard(conn)
        conn.sock.close()

    def _drop(self, conn: _Conn) -> None:
        """The client closed (or must be closed): a write being committed still is, unanswered."""
        conn.eof = True
        self._watch(conn, 0)
        if not conn.busy:
            self.conns.discard(conn)
            conn.sock.close()

    def _watch(self, conn: _Conn, events: int) -> None:
        try:
            key = self.sel.get_key(conn.sock)
        except (KeyError, ValueError):
            key = None
        if events == 0:
            if key is not None:
                self.sel.unregister(conn.sock)
        elif key is None:
            if conn.sock.fileno() >= 0:
                self.sel.register(conn.sock, events, conn)
        elif key.events != events:
            self.sel.modify(conn.sock, events, conn)


class _Back(Exception):
    """This connection's next request is the server's to serve."""


def _error(kind: str, value: Any, key: str, name: str) -> tuple[int, bytes]:
    """The status and JSON body the server's fast path answers for a write that was not made."""
    response = not_found(key, name) if kind == "deleted" else write_failed(value)
    return response.status_code, bytes(response.body)


_dated: list[Any] = [0, b""]


def _date() -> bytes:
    """The Date header's value (RFC 9110), made once a second."""
    now = int(time.time())
    if _dated[0] != now:
        from email.utils import formatdate

        _dated[:] = [now, formatdate(now, usegmt=True).encode("ascii")]
    return _dated[1]


def _peer(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except (OSError, ValueError):
        return "-"


def main(argv: list[str]) -> None:
    """`python -m ruclip_search.server.writer DIR DIM MODEL PRIORITY DELAY BUSY [CTL ACK LIMIT NAME LOG]` (a PostgreSQL URL in
    RUCLIP_SEARCH_WRITER_DB, the write token in RUCLIP_SEARCH_WRITER_TOKEN): commit the writes read from stdin
    and from the connections handed over CTL (a Unix socket's descriptor; ACK: the pipe of the server's
    acknowledgements; LIMIT: the upload limit in bytes; NAME: the index's name in the server; LOG: 1 to log each answer), answer on stdout. PRIORITY: a
    niceness or `idle` (server/priority.py). DELAY, BUSY: seconds, see defaults.WRITER_COMMIT_DELAY."""
    folder, dim, model, (nice, idle) = argv[0], int(argv[1]), argv[2], priority.spec(argv[3])
    delay, busy = float(argv[4]), float(argv[5])
    ctl = socket.socket(fileno=int(argv[6])) if len(argv) > 6 else None
    ack = int(argv[7]) if len(argv) > 7 else None
    limit = int(argv[8]) if len(argv) > 8 else 0
    name = argv[9] if len(argv) > 9 else ""
    if len(argv) > 10 and argv[10] == "1":
        logging.basicConfig(format="%(levelname)s:     %(message)s", level=logging.INFO)
        _access.setLevel(logging.INFO)
    db = os.environ.pop(_DB_ENV, None)
    token = os.environ.pop(_TOKEN_ENV, None)
    parent = os.environ.pop("RUCLIP_SEARCH_WRITER_PARENT", None)
    if parent is not None:
        from .._procs import _die_with_parent

        _die_with_parent(int(parent))
    out = os.fdopen(os.dup(1), "wb")  # the replies; anything printed goes to stderr instead
    os.dup2(2, 1)
    events = _Events(sys.stdin.fileno(), ctl, ack, token, limit, name)
    from ..search import Index

    index = Index.open(folder, writable=True, model=_DimOnly(dim, model), db=db)
    index.searchable = False  # the server's Index makes the writes searchable (and compacts)
    priority.enter(nice, idle)
    _send(out, "ready")
    pending: list[Any] = []
    last = float("-inf")  # when the last group was committed
    try:
        while True:
            if not pending:
                if events.eof:
                    break
                pending += events.read(None)
                continue
            if delay > 0 and time.monotonic() - last < busy:  # writes keep coming: let others join the group
                until = time.monotonic() + delay
                while len(pending) < WRITE_BATCH and not events.eof and (left := until - time.monotonic()) > 0:
                    pending += events.read(left)
            batch, pending = pending[:WRITE_BATCH], pending[WRITE_BATCH:]
            commits, answers = _commit(index, batch)
            mine = [(rid, answer) for rid, answer in answers if isinstance(rid, _Conn)]
            theirs = [(rid, answer) for rid, answer in answers if not isinstance(rid, _Conn)]
            try:
                _send(out, (commits, theirs, events.committed(mine)))
            except (BrokenPipeError, OSError):
                break  # the server is gone
            last = time.monotonic()
    finally:
        events.close()
        index.close()


if __name__ == "__main__":
    main(sys.argv[1:])
