"""HTTP JSON API and web page over one or more indexes: the backing store for a photo app.

`create_app` builds the FastAPI app (tests drive it with TestClient); `serve` runs it with uvicorn.
Files are only ever read by image id through the index, never from a path given in a request. Each index
is refreshed (at most every `refresh_interval` seconds, on the request path) so a finished `ruclip-index
build` is served without a restart; `Index.refresh` swaps versions atomically.
"""

import hashlib
import hmac
import io
import logging
import math
import mimetypes
import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import date, datetime
from importlib import resources
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import unquote

from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .errors import (
    ImageError,
    IndexNotFoundError,
    ModelMismatchError,
    QueryError,
    RuclipSearchError,
    StorageError,
)

log = logging.getLogger("ruclip_search.server")

DEFAULT_MAX_UPLOAD_BYTES = 25 * 1024 * 1024  # a 50 MP phone JPEG is ~20 MB
DEFAULT_MAX_PIXELS = 60_000_000
MAX_K = 200
MAX_OFFSET = 10_000
THUMB_MIN, THUMB_MAX, THUMB_DEFAULT = 16, 1024, 256
TOKEN_COOKIE = "ruclip_token"
_MULTIPART_SLACK = 64 * 1024  # multipart boundaries and headers on top of the file itself
_STATIC = ("index.html", "app.js", "style.css")


# -- errors ------------------------------------------------------------------------------------------
class ApiError(Exception):
    """An error answer: HTTP status, a stable machine-readable code and a human message."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


def _error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail, "code": code}, status_code=status, headers=headers)


# -- response models ---------------------------------------------------------------------------------
class ErrorOut(BaseModel):
    """Every non-validation error: `code` is stable (for programs), `detail` is for people."""

    detail: str
    code: str


class HitOut(BaseModel):
    """One image: its id (use it with /images/{id}/...), absolute path, score and metadata."""

    id: int
    path: str = Field(description="Absolute path on the server (undecodable bytes shown as U+FFFD).")
    score: float | None = Field(None, description="Cosine similarity to the query; null for plain metadata.")
    width: int | None = None
    height: int | None = None
    taken_at: str | None = Field(
        None,
        description="EXIF DateTimeOriginal as ISO 8601, e.g. 2021-06-01T18:30:00: camera local time, with an "
        "offset only when the EXIF records one.",
    )
    format: str | None = Field(None, description="PIL format name, e.g. JPEG, PNG, HEIF.")
    thumbnail_url: str = Field(description="Relative URL of a 256 px JPEG thumbnail.")
    file_url: str = Field(description="Relative URL of the original file.")


class SearchOut(BaseModel):
    """A page of results, best first; ask for the next page with offset += k."""

    index: str
    version: int = Field(description="Index version the results come from (changes after a rebuild).")
    k: int
    offset: int
    took_ms: float
    hits: list[HitOut]


class IndexInfoOut(BaseModel):
    """One served index: its name (the `index` parameter), version and the store's summary."""

    name: str
    version: int
    default: bool
    info: dict[str, Any]


class InfoOut(BaseModel):
    version: str = Field(description="ruclip-search version.")
    indexes: list[IndexInfoOut]


class HealthOut(BaseModel):
    status: str
    indexes: int


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "Bad query or image",
        401: "Missing or wrong bearer token",
        404: "Unknown index, image or file",
        413: "Upload or image too large",
        415: "Upload is not an image",
        503: "Index unavailable",
    }
    return {c: {"model": ErrorOut, "description": text[c]} for c in codes}


# -- served indexes ----------------------------------------------------------------------------------
class _Served:
    """One index plus its refresh throttle; only one request at a time pays for a refresh check."""

    def __init__(self, name: str, index: Any, interval: float, owned: bool) -> None:
        self.name, self.index, self.interval, self.owned = name, index, interval, owned
        self._next = 0.0
        self._lock = threading.Lock()

    def maybe_refresh(self) -> None:
        now = time.monotonic()
        if now < self._next or not self._lock.acquire(blocking=False):
            return
        try:
            self._next = now + self.interval
            if self.index.refresh():
                log.info("index %s: now serving version %s", self.name, self.index.version)
        except Exception:  # a build may be mid-way: keep serving the version we have
            log.warning("index %s: refresh failed, still serving version %s", self.name, self.index.version,
                        exc_info=True)  # fmt: skip
        finally:
            self._lock.release()


class _ThumbCache:
    """LRU of encoded thumbnails bounded by total bytes; keys include the file's mtime and size."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            self.bytes += len(data) - (len(old) if old else 0)
            self._items[key] = data
            while self.bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.bytes -= len(dropped)


def _display(path: str | os.PathLike[str]) -> str:
    """A path as valid UTF-8 text (non-UTF-8 bytes from surrogateescape become U+FFFD)."""
    return os.fsencode(path).decode("utf-8", "replace")


def _naive(value: date | datetime | None) -> date | datetime | None:
    """Dates as given; aware datetimes to naive local time (EXIF times are naive wall-clock times)."""
    if isinstance(value, datetime) and value.tzinfo is not None:
        try:
            return value.astimezone().replace(tzinfo=None)
        except (OverflowError, ValueError, OSError):
            return value.replace(tzinfo=None)
    return value


def _unique_names(indexes: Sequence[Any]) -> list[str]:
    names: list[str] = []
    for idx in indexes:
        base = str(getattr(idx, "name", "") or "index")
        name, n = base, 2
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.append(name)
    return names


def _iso(value: Any) -> str | None:
    return value.isoformat() if isinstance(value, (date, datetime)) else (str(value) if value else None)


def _finite(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# -- upload size guard (before multipart parsing) ----------------------------------------------------
class _BodyTooLarge(Exception):
    pass


class _UploadLimit:
    """ASGI middleware: answer 413 for POST bodies above the cap, by Content-Length or while streaming."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    await _send_json(send, 413, "upload_too_large", self._message())
                    return
        state = {"seen": 0, "over": False, "started": False}

        async def limited_receive() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                state["seen"] += len(message.get("body", b""))
                if state["seen"] > self.limit:
                    state["over"] = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: dict) -> None:
            if state["over"]:
                return  # the app's own answer to the aborted body is replaced by our 413
            state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if state["over"] and not state["started"]:
            await _send_json(send, 413, "upload_too_large", self._message())

    def _message(self) -> str:
        return f"Upload larger than {self.limit - _MULTIPART_SLACK} bytes: send a smaller image."


async def _send_json(send: Any, status: int, code: str, detail: str) -> None:
    import json

    body = json.dumps({"detail": detail, "code": code}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# -- the app -----------------------------------------------------------------------------------------
def create_app(
    index_dirs: Sequence[str | os.PathLike[str] | Any],
    *,
    token: str | None = None,
    cors_origins: Iterable[str] = (),
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    model: Any = None,
    device: str = "auto",
    refresh_interval: float = 0.5,
    thumbnail_cache_bytes: int = 64 * 1024 * 1024,
) -> FastAPI:
    """The FastAPI app serving `index_dirs` (folders, or already opened `Index` objects); the first is default.

    Indexes are opened now, so a missing or unbuilt index fails here (IndexNotFoundError), not per request.
    """
    if not index_dirs:
        raise IndexNotFoundError("No index to serve: pass at least one --index DIR.")
    opened: list[tuple[Any, bool]] = []
    try:
        for item in index_dirs:
            if isinstance(item, (str, os.PathLike)):
                from .search import Index

                opened.append((Index.open(item, model=model, device=device), True))
            else:
                opened.append((item, False))
    except BaseException:
        for idx, owned in opened:
            if owned:
                idx.close()
        raise
    served = {
        name: _Served(name, idx, refresh_interval, owned)
        for name, (idx, owned) in zip(_unique_names([i for i, _ in opened]), opened, strict=True)
    }
    default_name = next(iter(served))
    thumbs = _ThumbCache(thumbnail_cache_bytes)
    # Model and FAISS work uses all cores by itself: more concurrent queries than cores only thrash.
    busy = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))
    static = {name: (resources.files("ruclip_search") / "static" / name).read_bytes() for name in _STATIC}

    @asynccontextmanager
    async def lifespan(_app: FastAPI):  # noqa: ANN202
        yield
        for s in served.values():
            if s.owned:
                s.index.close()

    app = FastAPI(
        title="ruclip-search",
        version=__version__,
        description="Find photos by a Russian sentence (RuCLIP + FAISS). Errors are JSON: "
        '`{"detail": ..., "code": ...}`; parameter errors are 422 with a list of problems.',
        lifespan=lifespan,
    )
    app.state.served = served

    # -- errors --------------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = jsonable_encoder(exc.errors(), custom_encoder={bytes: lambda b: b.decode("utf-8", "replace")})
        if any(e.get("loc", ("",))[0] == "path" for e in errors):  # /images/../etc: not an image id
            return _error(404, "not_found", "No such image: image ids are integers.")
        for e in errors:
            e.pop("ctx", None)
            e.pop("url", None)
        return JSONResponse({"detail": errors, "code": "invalid_request"}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
        return _error(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail), exc.headers)

    @app.exception_handler(RuclipSearchError)
    async def _library(_request: Request, exc: RuclipSearchError) -> JSONResponse:
        if isinstance(exc, QueryError):
            return _error(400, "bad_query", str(exc))
        if isinstance(exc, IndexNotFoundError):
            return _error(404, "index_not_found", str(exc))
        if isinstance(exc, ImageError):
            return _error(400, "bad_image", str(exc))
        if isinstance(exc, (StorageError, ModelMismatchError)):
            return _error(503, "index_unavailable", str(exc))
        log.error("unexpected library error", exc_info=exc)
        return _error(500, "internal_error", str(exc))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error", exc_info=exc)
        return _error(500, "internal_error", "Internal error; see the server log.")

    # -- auth, index choice --------------------------------------------------------------------------
    bearer = HTTPBearer(auto_error=False, description="Needed only when the server runs with --token.")

    def require_token(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> None:
        if token is None:
            return
        if credentials:  # header values arrive decoded as latin-1: compare the raw bytes
            given = credentials.credentials.encode("latin-1", "replace")
        else:  # the web page's cookie (for <img> requests), percent-encoded UTF-8
            given = unquote(request.cookies.get(TOKEN_COOKIE, "")).encode("utf-8", "replace")
        if not hmac.compare_digest(given, token.encode("utf-8")):
            raise ApiError(401, "unauthorized", "Missing or wrong token: send `Authorization: Bearer TOKEN`.",
                           {"WWW-Authenticate": "Bearer"})  # fmt: skip

    def pick_index(
        index: Annotated[
            str | None, Query(max_length=200, description="Index name (see /info); default the first.")
        ] = None,
    ) -> _Served:
        s = served.get(index if index is not None else default_name)
        if s is None:
            raise ApiError(404, "unknown_index", f"No index named {index!r}; served: {', '.join(served)}.")
        s.maybe_refresh()
        return s

    Served = Annotated[_Served, Depends(pick_index)]
    auth = [Depends(require_token)]

    def hit_out(s: _Served, hit: Any, score: bool = True) -> HitOut:
        suffix = "" if s.name == default_name else f"?index={s.name}"
        return HitOut(
            id=int(hit.id), path=_display(hit.path), score=_finite(hit.score) if score else None,
            width=hit.width, height=hit.height, taken_at=_iso(hit.taken_at), format=hit.format,
            thumbnail_url=f"/images/{int(hit.id)}/thumbnail{suffix}", file_url=f"/images/{int(hit.id)}/file{suffix}",
        )  # fmt: skip

    def page(s: _Served, hits: list[Any], k: int, offset: int, t0: float) -> SearchOut:
        return SearchOut(
            index=s.name, version=int(s.index.version), k=k, offset=offset,
            took_ms=round((time.perf_counter() - t0) * 1000, 2), hits=[hit_out(s, h) for h in hits],
        )  # fmt: skip

    def known(s: _Served, image_id: int) -> Any:
        hit = s.index.get(image_id) if 0 <= image_id < 2**63 else None
        if hit is None:
            raise ApiError(404, "image_not_found", f"No image with id {image_id} in index {s.name!r}.")
        return hit

    # Shared query parameters.
    K = Annotated[int, Query(ge=1, le=MAX_K, description="Results per page.")]
    Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Results to skip (paging).")]
    MinScore = Annotated[float | None, Query(ge=-1.0, le=1.0, description="Drop hits scoring below this.")]
    Under = Annotated[
        str | None,
        Query(max_length=4096, pattern=r"^[^\x00]+$", description="Only images under this absolute folder."),
    ]
    From = Annotated[datetime | date | None, Query(alias="from", description="Taken at or after (ISO date/time).")]
    To = Annotated[
        datetime | date | None, Query(alias="to", description="Taken at or before (a date: that whole day).")
    ]
    Formats = Annotated[
        list[str] | None,
        Query(alias="format", max_length=20, description="Only these formats (repeatable), e.g. JPEG, PNG, HEIF."),
    ]

    def filters(min_score: MinScore = None, under: Under = None, date_from: From = None, date_to: To = None,
                formats: Formats = None) -> dict[str, Any]:  # fmt: skip
        for f in formats or ():
            if not (0 < len(f) <= 10 and f.isascii() and f.replace(".", "").isalnum()):
                raise ApiError(400, "bad_query", f"Bad format {f!r}: use names like JPEG, PNG, HEIF.")
        return {
            "min_score": min_score, "under": under, "date_from": _naive(date_from), "date_to": _naive(date_to),
            "formats": formats or None,
        }  # fmt: skip

    Filters = Annotated[dict[str, Any], Depends(filters)]

    # -- API -----------------------------------------------------------------------------------------
    @app.get("/health", response_model=HealthOut, tags=["meta"])
    async def health() -> HealthOut:  # async: answers even while the worker threads are all busy
        """Liveness check; open even when a token is set."""
        return HealthOut(status="ok", indexes=len(served))

    @app.get("/info", response_model=InfoOut, dependencies=auth, responses=_responses(401), tags=["meta"])
    def info() -> InfoOut:
        """The served indexes: names, versions, image counts, model."""
        out = []
        for s in served.values():
            s.maybe_refresh()
            out.append(IndexInfoOut(name=s.name, version=int(s.index.version), default=s.name == default_name,
                                    info=jsonable_encoder(s.index.info())))  # fmt: skip
        return InfoOut(version=__version__, indexes=out)

    @app.get("/search", response_model=SearchOut, dependencies=auth, responses=_responses(400, 401, 404, 503),
             tags=["search"])  # fmt: skip
    def search(
        s: Served,
        f: Filters,
        q: Annotated[
            str, Query(min_length=1, max_length=1000, description="Russian text, e.g. «рыжий кот на диване».")
        ],
        k: K = 20,
        offset: Offset = 0,
    ) -> SearchOut:
        """Images matching a Russian sentence, best first."""
        if not q.strip() or "\x00" in q:
            raise ApiError(400, "bad_query", "The query is empty: type what the photo shows.")
        t0 = time.perf_counter()
        with busy:
            hits = s.index.search(q, k=k, offset=offset, **f)
        return page(s, hits, k, offset, t0)

    @app.post("/search/image", response_model=SearchOut, dependencies=auth,
              responses=_responses(400, 401, 404, 413, 415, 503), tags=["search"])  # fmt: skip
    def search_image(
        s: Served,
        f: Filters,
        file: Annotated[UploadFile, File(description="An image (JPEG, PNG, WebP, HEIC, ...).")],
        k: K = 20,
        offset: Offset = 0,
    ) -> SearchOut:
        """Indexed images most like an uploaded picture."""
        data = file.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise ApiError(413, "upload_too_large", f"Upload larger than {max_upload_bytes} bytes.")
        image = _open_upload(data, max_pixels)
        t0 = time.perf_counter()
        with busy:
            hits = s.index.search_image(image, k=k, offset=offset, **f)
        return page(s, hits, k, offset, t0)

    ImageId = Annotated[int, PathParam(description="Image id from a search result.")]

    @app.get("/similar/{image_id}", response_model=SearchOut, dependencies=auth,
             responses=_responses(400, 401, 404, 503), tags=["search"])  # fmt: skip
    def similar(s: Served, f: Filters, image_id: ImageId, k: K = 20, offset: Offset = 0) -> SearchOut:
        """Indexed images most like an indexed one (itself excluded)."""
        known(s, image_id)
        t0 = time.perf_counter()
        try:
            with busy:
                hits = s.index.similar(image_id, k=k, offset=offset, **f)
        except QueryError as e:
            raise ApiError(404, "image_not_found", str(e)) from None
        return page(s, hits, k, offset, t0)

    @app.get("/images/{image_id}", response_model=HitOut, response_model_exclude={"score"}, dependencies=auth,
             responses=_responses(401, 404), tags=["images"])  # fmt: skip
    def image_meta(s: Served, image_id: ImageId) -> HitOut:
        """Metadata of one indexed image."""
        return hit_out(s, known(s, image_id), score=False)

    def indexed_file(s: _Served, image_id: int) -> tuple[Path, os.stat_result]:
        known(s, image_id)
        try:
            path = Path(s.index.file_path(image_id))
            st = path.stat()
        except QueryError as e:
            raise ApiError(404, "image_not_found", str(e)) from None
        except (OSError, ValueError):
            raise ApiError(404, "file_missing", f"Image {image_id} is indexed but its file is gone.") from None
        if not path.is_file():
            raise ApiError(404, "file_missing", f"Image {image_id} is indexed but its file is gone.")
        return path, st

    @app.get("/images/{image_id}/thumbnail", dependencies=auth, tags=["images"],
             responses={200: {"content": {"image/jpeg": {}}, "description": "JPEG thumbnail"}, **_responses(401, 404)})  # fmt: skip
    def thumbnail(
        request: Request,
        s: Served,
        image_id: ImageId,
        size: Annotated[int, Query(ge=THUMB_MIN, le=THUMB_MAX, description="Longest side in pixels.")] = THUMB_DEFAULT,
    ) -> Response:
        """A JPEG no larger than size x size (EXIF orientation applied), cached in memory."""
        path, st = indexed_file(s, image_id)
        key = (s.name, image_id, size, str(path), st.st_mtime_ns, st.st_size)
        etag = '"' + hashlib.sha1(repr(key).encode("utf-8", "replace")).hexdigest()[:20] + '"'
        headers = {"ETag": etag, "Cache-Control": "private, max-age=3600"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        data = thumbs.get(key)
        if data is None:
            data = _make_thumbnail(path, size)
            thumbs.put(key, data)
        return Response(data, media_type="image/jpeg", headers=headers)

    @app.get("/images/{image_id}/file", dependencies=auth, tags=["images"],
             responses={200: {"content": {"image/*": {}}, "description": "The original file"}, **_responses(401, 404)})  # fmt: skip
    def original(s: Served, image_id: ImageId) -> FileResponse:
        """The original file of an indexed image, as stored."""
        path, st = indexed_file(s, image_id)
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media, filename=_display(path.name), stat_result=st,
                            content_disposition_type="inline", headers={"Cache-Control": "private, max-age=3600"})  # fmt: skip

    # -- web page ------------------------------------------------------------------------------------
    types = {
        "html": "text/html; charset=utf-8",
        "js": "text/javascript; charset=utf-8",
        "css": "text/css; charset=utf-8",
    }
    csp = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
           "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")  # fmt: skip

    @app.get("/", include_in_schema=False)
    def home() -> HTMLResponse:
        return HTMLResponse(static["index.html"], headers={"Content-Security-Policy": csp})

    def static_route(name: str) -> None:
        media = types[name.rsplit(".", 1)[1]]

        @app.get(f"/static/{name}", include_in_schema=False, name=f"static_{name}")
        def asset() -> Response:
            return Response(static[name], media_type=media, headers={"Cache-Control": "no-cache"})

    for name in _STATIC[1:]:
        static_route(name)

    if cors := list(cors_origins):
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])  # fmt: skip
    app.add_middleware(_UploadLimit, limit=max_upload_bytes + _MULTIPART_SLACK)
    return app


def _open_upload(data: bytes, max_pixels: int) -> Any:
    """Decode an uploaded image, with 415 for non-images, 413 above the pixel cap, 400 for broken ones."""
    from PIL import Image, UnidentifiedImageError

    from .decode import open_image

    if not data:
        raise ApiError(400, "bad_image", "The upload is empty: attach an image file.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(io.BytesIO(data)) as probe:
                w, h = probe.size
        except UnidentifiedImageError:
            raise ApiError(
                415, "not_an_image", "The upload is not an image PIL can read (JPEG, PNG, WebP, HEIC, ...)."
            ) from None
        except Image.DecompressionBombError:
            raise ApiError(413, "too_many_pixels", f"Image has more than {max_pixels} pixels.") from None
        except Exception as e:
            raise ApiError(400, "bad_image", f"The image cannot be read: {e}.") from None
    if w * h > max_pixels:
        raise ApiError(413, "too_many_pixels", f"Image is {w}x{h}, more than {max_pixels} pixels: send a smaller one.")
    try:
        return open_image(data, max_pixels=max_pixels)
    except ImageError as e:
        raise ApiError(400, "bad_image", f"The image cannot be decoded: {e}") from None


def _make_thumbnail(path: Path, size: int) -> bytes:
    """JPEG bytes of `path` fitted into size x size; 422-free: undecodable files answer 404."""
    from PIL import Image

    from .decode import open_image

    try:
        im = open_image(path, draft_size=size)
    except ImageError:
        raise ApiError(404, "image_unreadable", f"{_display(path.name)!r} cannot be decoded any more.") from None
    im.thumbnail((size, size), Image.Resampling.LANCZOS if size <= 256 else Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85, optimize=False)
    return buf.getvalue()


def serve(
    index_dirs: Sequence[str | os.PathLike[str]],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    cors_origins: Iterable[str] = (),
    model: Any = None,
    device: str = "auto",
    log_level: str = "info",
) -> None:
    """Open the indexes and serve them with uvicorn until interrupted (binds loopback unless told otherwise)."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        log.warning("serving on %s without a token: anyone who can reach this port can see your photos", host)
    app = create_app(index_dirs, token=token, cors_origins=cors_origins, model=model, device=device)
    uvicorn.run(app, host=host, port=port, log_level=log_level, workers=1)


__all__ = ["create_app", "serve", "HitOut", "SearchOut", "InfoOut", "ErrorOut"]
