"""The hot writes of a photo app, `PUT /photos/{key}` with a JSON embedding and `DELETE /photos/{key}`, answered
by a small ASGI handler in front of FastAPI and all its middleware.

Why by hand: under a photo app's write load, FastAPI's routing, dependency solving, pydantic validation and
response-model serialisation cost about as much CPU as the write itself (py-spy, 4 writers at 1M photos), and on
a small machine that CPU comes out of the searches running beside them. The handler does the same checks with
the same functions (`checked_key`, `_names`, `_when`, the write token's constant-time comparison) and commits
through the same batcher; it answers only requests it is sure of. Anything else (another body type, a query
string, a bad token, any field it does not take, any value a check refuses) goes to FastAPI unchanged, with the
body it read replayed, so every error answer, the OpenAPI schema and the limits stay FastAPI's own.

It sits outside the whole middleware stack (server/app.py's `RuclipApp` calls it first): inside it, seven layers
of middleware (errors, telemetry, body limits, upload limit) and their send wrappers cost a fifth of the server's
CPU per write (py-spy, 200 writes/s). So it keeps their rules itself: a request from a browser (an `Origin`
header: CORS must answer it), one without a Content-Length or over the upload limit, goes to FastAPI.
"""

from __future__ import annotations

import hmac
from typing import Any

from ..errors import ImageError, QueryError, RuclipSearchError
from .errors import ApiError, error_response, library_response
from .writes import _names, checked_key

try:  # parses a 768-float body in ~1/5 of json's time
    import orjson

    _loads: Any = orjson.loads
except ImportError:  # pragma: no cover - orjson is a dependency; json gives the same values
    import json

    _loads = json.loads

_PREFIX = "/photos/"
_FIELDS = frozenset({"embedding", "collection", "labels", "taken_at"})
_NUMBERS = frozenset({float, int})


class _Declined(Exception):
    """This request is FastAPI's to answer."""


class WriteFastPath:
    """ASGI middleware: the happy path of PUT (JSON embedding) and DELETE /photos/{key} on the default index."""

    def __init__(self, app: Any, server: Any, limit: int) -> None:
        # `server`: the FastAPI app (its state holds the ServerState); `limit`: UploadLimit's, in bytes
        self.app, self.server, self.limit = app, server, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        method = scope.get("method")
        path = scope.get("path", "")
        if (scope["type"] != "http" or method not in ("PUT", "DELETE") or not path.startswith(_PREFIX)
                or scope.get("query_string")):  # fmt: skip
            await self.app(scope, receive, send)
            return
        body: list[bytes] = []
        try:
            if not self._plain(scope):
                raise _Declined
            response = await self._answer(scope, receive, method, path[len(_PREFIX) :], body)
        except _Declined:
            await self.app(scope, _replay(body, receive) if body else receive, send)
            return
        await response(scope, receive, send)

    def _plain(self, scope: dict) -> bool:
        """No Origin header (CORS answers those), and a Content-Length within the upload limit (or no body: a
        DELETE)."""
        length: int | None = None
        for name, value in scope.get("headers", ()):
            if name == b"origin" or name == b"transfer-encoding":
                return False
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    return False
        return length is None and scope["method"] == "DELETE" or length is not None and length <= self.limit

    async def _answer(self, scope: dict, receive: Any, method: str, key: str, body: list[bytes]) -> Any:
        state = self.server.state.server
        if not key or "/" in key or not _authorised(scope, state.write_token):
            raise _Declined
        s = state.served.get(state.default_name)
        if s is None:
            raise _Declined
        try:
            key = checked_key(key)
        except ApiError:
            raise _Declined from None
        if s.refresh_due():  # as pick_index: the check can load a new FAISS file, off the event loop
            from starlette.concurrency import run_in_threadpool

            await run_in_threadpool(s.maybe_refresh)
        if s.writer is not None:
            return await self._in_writer(scope, receive, s, method, key, body)
        if method == "DELETE":
            if await s.writes.remove(key):
                return _json(b'{"deleted":true}')
            return not_found(key, s.name)
        if _content_type(scope) != "application/json":
            raise _Declined
        args = _photo(await _read(receive, body, self.limit))
        try:
            hit = await s.writes.put({"key": key, "image": None, **args})
        except RuclipSearchError as e:  # nothing was written: the route's, or the app's own handler's, answer
            return write_failed(e)
        from .results import record_json

        return _json(record_json(hit, s.url_suffix))

    async def _in_writer(self, scope: dict, receive: Any, s: Any, method: str, key: str, body: list[bytes]) -> Any:
        """The write committed by the index's writer process (server/writer.py): it parses the body as `_photo`
        does here, and declines what FastAPI must answer."""
        from .writer import WriterFailed

        try:
            if method == "DELETE":
                kind, value = await s.writer.remove(key)
            elif _content_type(scope) != "application/json":
                raise _Declined
            else:
                kind, value = await s.writer.put(key, await _read(receive, body, self.limit))
        except WriterFailed as e:
            return error_response(503, "writer_failed", f"{e} The write may or may not have been committed: send "
                                  "it again (PUT and DELETE can be repeated safely).")  # fmt: skip
        if kind == "declined":
            raise _Declined
        if kind == "deleted":
            if value:
                return _json(b'{"deleted":true}')
            return not_found(key, s.name)
        if kind == "error":
            return write_failed(value)
        return _json(value)  # the record's JSON, made by the writer process


def not_found(key: str, index: str) -> Any:
    """The 404 of a DELETE whose key is absent (the route's answer)."""
    return error_response(404, "photo_not_found", f"No photo with key {key[:200]!r} in index {index!r}.")


def write_failed(e: BaseException) -> Any:
    """The answer to a write that was not made: the route's 400 for a bad photo, else the app's handler's."""
    if isinstance(e, QueryError):
        code = "bad_image" if isinstance(e.__cause__, ImageError) else "bad_photo"
        return error_response(400, code, str(e))
    return library_response(e if isinstance(e, RuclipSearchError) else RuclipSearchError(str(e)))


def _authorised(scope: dict, token: str | None) -> bool:
    """The bearer header carries the write token (what require_write_token accepts; anything else: FastAPI's)."""
    if token is None:
        return False
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, given = value.partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token.encode("utf-8"))
    return False


def _content_type(scope: dict) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower().decode("latin-1")
    return ""


async def _read(receive: Any, body: list[bytes], limit: int) -> bytes:
    """The whole request body (kept in `body` for a replay to FastAPI, which answers one over `limit`)."""
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _Declined  # the client went away: let FastAPI see it
        body.append(message.get("body", b""))
        size += len(body[-1])
        if size > limit:
            raise _Declined
        if not message.get("more_body", False):
            return b"".join(body)


def _replay(body: list[bytes], receive: Any) -> Any:
    """A receive that gives the body already read, then the connection's own messages."""
    pending = [{"type": "http.request", "body": b"".join(body), "more_body": False}]

    async def replayed() -> dict:
        return pending.pop() if pending else await receive()

    return replayed


def _photo(raw: bytes) -> dict[str, Any]:
    """`Index.add`'s arguments from a JSON body with an embedding; _Declined for anything unusual."""
    try:
        data = _loads(raw)
    except ValueError:
        raise _Declined from None
    if not isinstance(data, dict) or not data.keys() <= _FIELDS:
        raise _Declined
    embedding = data.get("embedding")
    if not isinstance(embedding, list) or not embedding or not set(map(type, embedding)) <= _NUMBERS:
        raise _Declined  # (bool is not int here: `true` is not a number)
    import numpy as np

    try:
        vec = np.asarray(embedding, dtype=np.float64)  # one C pass: a Python loop over 768 floats cost ~0.1 ms
    except OverflowError:  # an integer beyond float64
        raise _Declined from None
    if not np.isfinite(vec).all() or not vec.any():
        raise _Declined
    collection, labels = data.get("collection"), data.get("labels", [])
    if collection is not None and not isinstance(collection, str):
        raise _Declined
    if not isinstance(labels, list) or not all(isinstance(v, str) for v in labels):
        raise _Declined
    if data.get("taken_at") is not None:  # parsed by pydantic's JSON mode on FastAPI's path: keep it the one parser
        raise _Declined
    try:
        collection, names = _names(collection, labels)
    except ApiError:
        raise _Declined from None
    return {"embedding": vec.astype(np.float32), "collection": collection, "labels": names, "taken_at": None}


def _json(body: bytes) -> Any:
    """A 200 JSON answer, as Starlette's Response would send it, without building one per write."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]

    async def respond(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return respond


__all__ = ["WriteFastPath"]
