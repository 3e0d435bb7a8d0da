"""Error answers: `ApiError` for the routes, and handlers turning every failure into `{"detail", "code"}` JSON."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ImageError, IndexNotFoundError, ModelMismatchError, QueryError, RuclipSearchError, StorageError

log = logging.getLogger("ruclip_search.server")


class ApiError(Exception):
    """An error answer: HTTP status, a stable machine-readable code and a human message."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON body every error shares."""
    return JSONResponse({"detail": detail, "code": code}, status_code=status, headers=headers)


async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.detail, exc.headers)


async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = jsonable_encoder(exc.errors(), custom_encoder={bytes: lambda b: b.decode("utf-8", "replace")})
    if any(e.get("loc", ("",))[0] == "path" for e in errors):  # /images/../etc: not an image id
        return error_response(404, "not_found", "No such image: image ids are integers.")
    for e in errors:
        e.pop("ctx", None)
        e.pop("url", None)
        if "input" in e:
            e["input"] = _finite(e["input"])
    return JSONResponse({"detail": errors, "code": "invalid_request"}, status_code=422)


def _finite(value: object) -> object:
    """`value` with NaN and infinities as strings: JSON has no such numbers (a body `NaN` answered 500, not 422)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
    return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail), exc.headers)


async def _library(_request: Request, exc: RuclipSearchError) -> JSONResponse:
    return library_response(exc)


def library_response(exc: RuclipSearchError) -> JSONResponse:
    """The answer to a library error: its status by kind, its message as the detail."""
    if isinstance(exc, QueryError):
        return error_response(400, "bad_query", str(exc))
    if isinstance(exc, IndexNotFoundError):
        return error_response(404, "index_not_found", str(exc))
    if isinstance(exc, ImageError):
        return error_response(400, "bad_image", str(exc))
    if isinstance(exc, (StorageError, ModelMismatchError)):
        return error_response(503, "index_unavailable", str(exc))
    log.error("unexpected library error", exc_info=exc)
    return error_response(500, "internal_error", str(exc))


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected error", exc_info=exc)
    return error_response(500, "internal_error", "Internal error; see the server log.")


def install_error_handlers(app: FastAPI) -> None:
    """Every failure answers JSON with a stable `code`; parameter errors are 422 `invalid_request`."""
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http)  # type: ignore[arg-type]
    app.add_exception_handler(RuclipSearchError, _library)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)


__all__ = ["ApiError", "error_response", "install_error_handlers"]
