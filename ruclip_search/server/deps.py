"""FastAPI dependencies and shared parameter types: the token check, the index choice, the search filters."""

from __future__ import annotations

import hmac
from datetime import date, datetime
from typing import Annotated
from urllib.parse import unquote

from fastapi import Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..defaults import MAX_K, MAX_OFFSET
from ..filters import SearchFilters
from .errors import ApiError
from .state import Served, ServerState, get_state

TOKEN_COOKIE = "ruclip_token"

State = Annotated[ServerState, Depends(get_state)]

_bearer = HTTPBearer(auto_error=False, description="Needed only when the server runs with --token.")


def require_token(
    request: Request, state: State, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """401 unless the server has no token or the request carries it (bearer header, or the web page's cookie)."""
    if state.token is None:
        return
    if credentials:  # header values arrive decoded as latin-1: compare the raw bytes
        given = credentials.credentials.encode("latin-1", "replace")
    else:  # the web page's cookie (for <img> requests), percent-encoded UTF-8
        given = unquote(request.cookies.get(TOKEN_COOKIE, "")).encode("utf-8", "replace")
    if not hmac.compare_digest(given, state.token.encode("utf-8")):
        raise ApiError(401, "unauthorized", "Missing or wrong token: send `Authorization: Bearer TOKEN`.",
                       {"WWW-Authenticate": "Bearer"})  # fmt: skip


#: `dependencies=` of every route that reveals photos.
AUTH = [Depends(require_token)]


def pick_index(
    state: State,
    index: Annotated[
        str | None, Query(max_length=200, description="Index name (see /info); default the first.")
    ] = None,
) -> Served:
    """The index named by `?index=` (default the first), refreshed if a build finished; 404 `unknown_index`."""
    s = state.served.get(index if index is not None else state.default_name)
    if s is None:
        raise ApiError(404, "unknown_index", f"No index named {index!r}; served: {', '.join(state.served)}.")
    s.maybe_refresh()
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
From = Annotated[datetime | date | None, Query(alias="from", description="Taken at or after (ISO date/time).")]
To = Annotated[datetime | date | None, Query(alias="to", description="Taken at or before (a date: that whole day).")]
Formats = Annotated[
    list[str] | None,
    Query(alias="format", max_length=20, description="Only these formats (repeatable), e.g. JPEG, PNG, HEIF."),
]


def search_filters(
    min_score: MinScore = None, under: Under = None, date_from: From = None, date_to: To = None,
    formats: Formats = None,
) -> SearchFilters:  # fmt: skip
    """The filter parameters as one SearchFilters (a bad value raises QueryError: 400 `bad_query`)."""
    return SearchFilters.parse(
        under=under, date_from=date_from, date_to=date_to, formats=formats or None, min_score=min_score
    )


Filters = Annotated[SearchFilters, Depends(search_filters)]

__all__ = [
    "AUTH", "Filters", "Formats", "From", "ImageId", "K", "MinScore", "Offset", "ServedIndex", "State", "To",
    "TOKEN_COOKIE", "Under", "pick_index", "require_token", "search_filters",
]  # fmt: skip
