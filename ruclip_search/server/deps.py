"""FastAPI dependencies and shared parameter types: the token check, the index choice, the search filters."""

from __future__ import annotations

import hmac
from typing import Annotated, Literal
from urllib.parse import unquote

from fastapi import Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..defaults import MAX_K, MAX_LABELS, MAX_OFFSET
from ..filters import SearchFilters
from .errors import ApiError
from .state import Served, ServerState, get_state

TOKEN_COOKIE = "ruclip_token"

State = Annotated[ServerState, Depends(get_state)]

_bearer = HTTPBearer(
    auto_error=False,
    description="The --token for reads (needed only when the server runs "
    "with one); the --write-token for writes (it reads too).",
)


def _given(request: Request | None, credentials: HTTPAuthorizationCredentials | None) -> bytes:
    """The token a request carries: the bearer header's raw bytes, else (if `request`) the web page's cookie."""
    if credentials:  # header values arrive decoded as latin-1: compare the raw bytes
        return credentials.credentials.encode("latin-1", "replace")
    if request is None:
        return b""
    return unquote(request.cookies.get(TOKEN_COOKIE, "")).encode("utf-8", "replace")  # percent-encoded UTF-8


def _matches(given: bytes, token: str | None) -> bool:
    return token is not None and hmac.compare_digest(given, token.encode("utf-8"))


# The dependencies are `async def` where they do no I/O: FastAPI runs a plain `def` dependency in its thread
# pool, one thread hop per dependency per request, which cost more CPU than a whole write under load.
async def require_token(
    request: Request, state: State, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """401 unless the server has no token or the request carries it, or the write token (bearer or cookie)."""
    if state.token is None:
        return
    given = _given(request, credentials)
    if not (_matches(given, state.token) or _matches(given, state.write_token)):
        raise ApiError(401, "unauthorized", "Missing or wrong token: send `Authorization: Bearer TOKEN`.",
                       {"WWW-Authenticate": "Bearer"})  # fmt: skip


async def require_write_token(
    state: State, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """403 `writes_disabled` without a server write token; 401 unless the bearer header carries it (no cookie)."""
    if state.write_token is None:
        raise ApiError(403, "writes_disabled", "This server takes no writes: start it with --write-token TOKEN "
                       "(or RUCLIP_SEARCH_WRITE_TOKEN) to add and delete photos.")  # fmt: skip
    if not _matches(_given(None, credentials), state.write_token):
        raise ApiError(401, "unauthorized", "Missing or wrong write token: send `Authorization: Bearer "
                       "WRITE_TOKEN` (the server's --write-token).", {"WWW-Authenticate": "Bearer"})  # fmt: skip


#: `dependencies=` of every route that reveals photos.
AUTH = [Depends(require_token)]
#: `dependencies=` of every route that adds, replaces or deletes photos.
WRITE_AUTH = [Depends(require_write_token)]


async def pick_index(
    state: State,
    index: Annotated[
        str | None, Query(max_length=200, description="Index name (see /info); default the first.")
    ] = None,
) -> Served:
    """The index named by `?index=` (default the first), refreshed if a build finished; 404 `unknown_index`."""
    s = state.served.get(index if index is not None else state.default_name)
    if s is None:
        raise ApiError(404, "unknown_index", f"No index named {index!r}; served: {', '.join(state.served)}.")
    if s.refresh_due():  # the check can load a new FAISS file: off the event loop
        await run_in_threadpool(s.maybe_refresh)
    return s


ServedIndex = Annotated[Served, Depends(pick_index)]

# Shared query and path parameters.
K = Annotated[int, Query(ge=1, le=MAX_K, description="Results per page.")]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Results to skip (paging).")]
ImageId = Annotated[int, PathParam(description="Image id from a search result.")]
MinScore = Annotated[float | None, Query(ge=-1.0, le=1.0, description="Drop hits scoring below this.")]
Under = Annotated[
    str | None, Query(max_length=4096, pattern=r"^[^\x00]+$", description="Only images under this absolute folder.")
]
# ISO text, parsed by SearchFilters: pydantic would turn a bare date into midnight (or 00:00 into a date), and
# `to=2021-06-01` must include that whole day while `to=2021-06-01T00:00:00` must not.
_ISO = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:?\d{2})?)?$"
From = Annotated[str | None, Query(alias="from", pattern=_ISO, description="Taken at or after (ISO date/time).")]
To = Annotated[
    str | None, Query(alias="to", pattern=_ISO, description="Taken at or before (ISO; a bare date: that whole day).")
]
Formats = Annotated[
    list[str] | None,
    Query(alias="format", max_length=20, description="Only these formats (repeatable), e.g. JPEG, PNG, HEIF."),
]
Collections = Annotated[
    list[str] | None,
    Query(alias="collection", max_length=MAX_LABELS, description="Only photos in this collection (repeatable: any)."),
]
Labels = Annotated[
    list[str] | None,
    Query(alias="label", max_length=MAX_LABELS, description="Only photos with this label (repeatable: any)."),
]


Media = Annotated[
    Literal["photo", "video"] | None, Query(description="Only photos (RAW pairs, Live Photos too) or only videos.")
]


async def search_filters(
    min_score: MinScore = None, under: Under = None, date_from: From = None, date_to: To = None,
    formats: Formats = None, collections: Collections = None, labels: Labels = None, media: Media = None,
) -> SearchFilters:  # fmt: skip
    """The filter parameters as one SearchFilters (a bad value raises QueryError: 400 `bad_query`)."""
    return SearchFilters.parse(
        under=under, date_from=date_from, date_to=date_to, formats=formats or None, min_score=min_score,
        collections=collections or None, labels=labels or None, media=media,
    )  # fmt: skip


Filters = Annotated[SearchFilters, Depends(search_filters)]

__all__ = [
    "AUTH", "Collections", "Filters", "Formats", "From", "ImageId", "K", "Labels", "MinScore", "Offset",
    "ServedIndex", "State", "To", "TOKEN_COOKIE", "Under", "WRITE_AUTH", "pick_index", "require_token",
    "require_write_token", "search_filters",
]  # fmt: skip
