"""Write connections handed to the writer process (server/handoff.py): a real uvicorn server on a port, raw HTTP/1.1
clients. The writer answers what it takes exactly as the server would, only after the server's searches see the
write, and gives every other request back to the server with the bytes it read."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest

pytestmark = pytest.mark.subprocess

READ, WRITE = "read-t0ken", "wr1te-t0ken"


def _unit(dim: int, seed: int) -> list[float]:
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return [float(x) for x in v / np.linalg.norm(v)]


class _Conn:
    """One keep-alive HTTP/1.1 connection, by hand: requests are bytes as a client sends them."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buf = b""

    def send(self, *requests: bytes) -> None:
        self.sock.sendall(b"".join(requests))

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, f"connection closed; had {self.buf!r}"
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        size = int(headers.get("content-length", "0"))
        while len(self.buf) < size:
            chunk = self.sock.recv(65536)
            assert chunk, "connection closed mid-body"
            self.buf += chunk
        body, self.buf = self.buf[:size], self.buf[size:]
        return int(lines[0].split()[1]), headers, body

    def closed(self) -> bool:
        """The server closed the connection (after anything it sent)."""
        return not self.buf and self.sock.recv(1) == b""


def _put(key: str, body: dict, token: str = WRITE, extra: bytes = b"", ctype: bytes = b"application/json") -> bytes:
    data = json.dumps(body).encode()
    return (b"PUT /photos/%s HTTP/1.1\r\nhost: t\r\nauthorization: Bearer %s\r\ncontent-type: %s\r\n"
            b"content-length: %d\r\n%s\r\n" % (key.encode(), token.encode(), ctype, len(data), extra)) + data  # fmt: skip


def _delete(key: str, extra: bytes = b"") -> bytes:
    return b"DELETE /photos/%s HTTP/1.1\r\nhost: t\r\nauthorization: Bearer %s\r\n%s\r\n" % (
        key.encode(), WRITE.encode(), extra)  # fmt: skip


def _get(path: str) -> bytes:
    return b"GET %s HTTP/1.1\r\nhost: t\r\nauthorization: Bearer %s\r\n\r\n" % (path.encode(), READ.encode())


@pytest.fixture
def served(tmp_path, tiny_model_path, monkeypatch):
    """An empty index served by uvicorn on a free port with the handoff protocol, writes in a writer process.
    The server's Index never reads the store's change log by itself here: it sees only what the writer's commits
    bring, so a test sees what the handoff does."""
    import uvicorn

    from ruclip_search import defaults
    from ruclip_search.search import Index
    from ruclip_search.server import _default_writer, create_app
    from ruclip_search.server.handoff import handoff_protocol

    monkeypatch.setattr(defaults, "REFRESH_INTERVAL", 3600.0)
    Index.create(tmp_path / "index", model=str(tiny_model_path), device="cpu").close()
    app = create_app([tmp_path / "index"], token=READ, write_token=WRITE, device="cpu", writer_process=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                            http=handoff_protocol(partial(_default_writer, app)))  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    s = app.state.server.served["index"]
    try:
        yield SimpleNamespace(port=port, served=s, writer=s.writer, dim=s.index.info()["dim"], app=app)
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_write_connection_is_answered_by_the_writer_and_searchable_when_answered(served):
    """PUTs on a handed connection are answered by the writer process; each answer comes after the server's
    own Index (which never reads the change log here) finds the photo, by vector and by key on another
    connection."""
    c, other = _Conn(served.port), _Conn(served.port)
    for i in range(5):
        vec = _unit(served.dim, 10 + i)
        c.send(_put(f"p{i}", {"embedding": vec, "collection": "mine", "labels": ["x"]}))
        status, _, body = c.response()
        assert status == 200 and json.loads(body)["key"] == f"p{i}", body
        hits = served.served.index.search(np.asarray(vec, dtype=np.float32), k=1)
        assert [h.key for h in hits] == [f"p{i}"]
        other.send(_get(f"/photos/p{i}"))
        status, _, body = other.response()
        assert status == 200 and json.loads(body)["labels"] == ["x"]
    assert served.writer.handed == 1  # one connection, handed once; the server parsed none of its PUTs
    c.send(_delete("p0"))
    assert c.response()[0] == 200
    assert served.served.index.search(np.asarray(_unit(served.dim, 10), dtype=np.float32), k=1)[0].key != "p0"
    assert served.writer.handed == 1


def test_pipelined_writes_are_answered_in_order(served):
    c = _Conn(served.port)
    vecs = [_unit(served.dim, 30 + i) for i in range(4)]
    c.send(*[_put(f"q{i}", {"embedding": v}) for i, v in enumerate(vecs)], _delete("q1"), _delete("q1"))
    answers = [c.response() for _ in range(6)]
    assert [a[0] for a in answers] == [200, 200, 200, 200, 200, 404]
    assert [json.loads(a[2])["key"] for a in answers[:4]] == ["q0", "q1", "q2", "q3"]
    assert json.loads(answers[4][2]) == {"deleted": True}
    assert json.loads(answers[5][2]) == {"detail": "No photo with key 'q1' in index 'index'.",
                                         "code": "photo_not_found"}  # fmt: skip


def test_other_requests_on_a_handed_connection_are_served_by_the_server(served):
    """A GET, a body the writer declines and a wrong token, each after writes on the same connection: the writer
    gives the connection back and the server answers them (its own answers, FastAPI's codes)."""
    c = _Conn(served.port)
    c.send(_put("r1", {"embedding": _unit(served.dim, 1)}))
    assert c.response()[0] == 200
    c.send(_get("/photos/r1"))  # given back here; the connection then stays with the server
    status, headers, body = c.response()
    assert status == 200 and json.loads(body)["key"] == "r1" and headers.get("server") == "uvicorn"
    c2 = _Conn(served.port)
    c2.send(_put("r2", {"embedding": _unit(served.dim, 2)}), _put("r3", {"path": "/etc/passwd"}))
    assert c2.response()[0] == 200
    status, _, body = c2.response()  # FastAPI's answer: this server allows no paths
    assert status == 403 and json.loads(body)["code"] == "path_not_allowed"
    c3 = _Conn(served.port)
    c3.send(_put("r4", {"embedding": _unit(served.dim, 4)}, token="wrong"))
    status, _, body = c3.response()
    assert status in (401, 403) and json.loads(body)["code"] != "photo_not_found"
    assert served.writer.handed == 3
    c4 = _Conn(served.port)
    c4.send(_put("r5", {"embedding": [1.0, 2.0]}))  # the writer's own answer: the index's error, as the server's
    status, _, body = c4.response()
    assert status == 400 and json.loads(body)["code"] == "bad_photo" and "32-d" in json.loads(body)["detail"]
    other = _Conn(served.port)
    for key, expected in (("r1", 200), ("r2", 200), ("r3", 404), ("r4", 404), ("r5", 404)):
        other.send(_get(f"/photos/{key}"))
        assert other.response()[0] == expected, key


def test_the_writer_answers_as_the_server_would(served):
    """The same requests, once handed to the writer and once served by the server (an Origin header keeps a
    request there): the same status and the same JSON body."""
    dim = served.dim
    cases = [
        _put("s1", {"embedding": _unit(dim, 5), "collection": "c", "labels": ["b", "a", "a"]}),
        _put("s1", {"embedding": _unit(dim, 6)}),  # a replacement
        _put("s%2Fx", {"embedding": _unit(dim, 6)}),  # a key the server refuses
        _put("s2", {"embedding": [0.5] * (dim + 1)}),
        _delete("s1"),
        _delete("s1"),
    ]
    answers = {}
    for how, extra in (("writer", b""), ("server", b"origin: http://elsewhere\r\n")):
        answers[how] = []
        for raw in cases:
            head, _, body = raw.partition(b"\r\n\r\n")
            c = _Conn(served.port)
            c.send(head + b"\r\n" + extra + b"\r\n" + body)
            status, _, data = c.response()
            record = json.loads(data)
            if isinstance(record, dict):
                record.pop("id", None)  # a replaced, then deleted and re-added photo gets a new id
            answers[how].append((status, record))
    assert answers["writer"] == answers["server"]
    assert [a[0] for a in answers["writer"]] == [200, 200, 404, 400, 200, 404]
    assert served.writer.handed >= 6


def test_connection_close_and_a_client_that_goes_away(served):
    c = _Conn(served.port)
    c.send(_put("t1", {"embedding": _unit(served.dim, 7)}, extra=b"connection: close\r\n"))
    status, headers, _ = c.response()
    assert status == 200 and headers["connection"] == "close" and c.closed()
    gone = _Conn(served.port)
    gone.send(_put("t2", {"embedding": _unit(served.dim, 8)}))
    gone.sock.close()  # before its answer: the write is still committed
    deadline = time.monotonic() + 10
    other = _Conn(served.port)
    while True:
        other.send(_get("/photos/t2"))
        if other.response()[0] == 200:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_killed_writer_drops_its_connections_and_the_next_write_starts_another(served):
    c = _Conn(served.port)
    c.send(_put("u1", {"embedding": _unit(served.dim, 9)}))
    assert c.response()[0] == 200
    pid = served.writer.pid
    os.kill(pid, signal.SIGKILL)
    try:  # the connection died with the process that held it
        assert c.sock.recv(1) == b""
    except ConnectionResetError:
        pass
    deadline = time.monotonic() + 30
    while served.writer.pid == pid or served.writer.pid is not None and served.writer.started < 2:
        c2 = _Conn(served.port)
        c2.send(_put("u2", {"embedding": _unit(served.dim, 10)}))
        if c2.response()[0] == 200:
            break
        assert time.monotonic() < deadline, "no new writer process"
        time.sleep(0.1)
    c3 = _Conn(served.port)
    c3.send(_put("u3", {"embedding": _unit(served.dim, 11)}))
    assert c3.response()[0] == 200
    assert served.writer.pid not in (None, pid)


def test_an_idle_handed_connection_is_closed_as_uvicorn_would(served):
    """The writer keeps an idle connection no longer than uvicorn's keep-alive timeout (5 s), so clients that
    leave connections open do not pile up in it."""
    c = _Conn(served.port)
    c.send(_put("v1", {"embedding": _unit(served.dim, 12)}))
    assert c.response()[0] == 200
    t0 = time.monotonic()
    assert c.closed()  # blocks until the writer closes it
    assert 4.0 < time.monotonic() - t0 < 15.0


@pytest.mark.parametrize(
    "raw",
    [
        # chunked body (the writer reads only Content-Length bodies)
        b"PUT /photos/w1 HTTP/1.1\r\nhost: t\r\nauthorization: Bearer %(t)s\r\ncontent-type: application/json\r\n"
        b"transfer-encoding: chunked\r\n\r\n%(n)x\r\n%(b)s\r\n0\r\n\r\n",
        # two Content-Lengths
        b"PUT /photos/w2 HTTP/1.1\r\nhost: t\r\nauthorization: Bearer %(t)s\r\ncontent-type: application/json\r\n"
        b"content-length: %(n)d\r\ncontent-length: %(n)d\r\n\r\n%(b)s",
        # HTTP/1.0
        b"PUT /photos/w3 HTTP/1.0\r\nhost: t\r\nauthorization: Bearer %(t)s\r\ncontent-type: application/json\r\n"
        b"content-length: %(n)d\r\n\r\n%(b)s",
        # a folded header line
        b"PUT /photos/w4 HTTP/1.1\r\nhost: t\r\nauthorization: Bearer %(t)s\r\ncontent-type: application/json\r\n"
        b" x\r\ncontent-length: %(n)d\r\n\r\n%(b)s",
        # a query string, a percent-encoded key, Expect: 100-continue
        b"PUT /photos/w5?x=1 HTTP/1.1\r\nhost: t\r\nauthorization: Bearer %(t)s\r\ncontent-type: application/json\r\n"
        b"content-length: %(n)d\r\n\r\n%(b)s",
        b"PUT /photos/w%%C3%%A9 HTTP/1.1\r\nhost: t\r\nauthorization: Bearer %(t)s\r\ncontent-type: application/json\r\n"
        b"content-length: %(n)d\r\n\r\n%(b)s",
        # a body of another type, and a body over the upload limit's share the writer reads
        b"PUT /photos/w6 HTTP/1.1\r\nhost: t\r\nauthorization: Bearer %(t)s\r\ncontent-type: text/plain\r\n"
        b"content-length: %(n)d\r\n\r\n%(b)s",
        b"DELETE /photos/w7 HTTP/1.1\r\nhost: t\r\nauthorization: bearer %(t)s\r\ncontent-length: 0\r\n\r\n",
    ],
    ids=["chunked", "two-lengths", "http10", "folded", "query", "utf8-key", "text-body", "lowercase-scheme"],
)
def test_unusual_requests_get_the_servers_own_answer(served, raw):
    """Requests the writer's parser does not take whole go back to the server, which answers them as it answers
    the same request sent with an Origin header (never handed over); what the writer does take, it answers the
    same way."""
    body = json.dumps({"embedding": _unit(served.dim, 13)}).encode()
    request = raw % {b"t": WRITE.encode(), b"n": len(body), b"b": body}
    answers = []
    for extra in (b"", b"origin: http://elsewhere\r\n"):
        if extra:
            c = _Conn(served.port)  # undo the first request's write, so the second meets the same index
            key = request.split(b" ", 2)[1][len(b"/photos/") :].split(b"?")[0]
            c.send(_delete(key.decode()))
            c.response()
        head, _, rest = request.partition(b"\r\n")
        c = _Conn(served.port)
        c.send(head + b"\r\n" + extra + rest)
        status, _, data = c.response()
        record = json.loads(data) if data.startswith(b"{") else data  # uvicorn's own 400 is plain text
        if isinstance(record, dict):
            record.pop("id", None)
        answers.append((status, record))
    assert answers[0] == answers[1]
