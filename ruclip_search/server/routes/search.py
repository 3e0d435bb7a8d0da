"""/search, /search/image and /similar/{id}: ranked pages of images."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, File, Query, UploadFile

from ...defaults import K as DEFAULT_K
from ...errors import QueryError
from ..deps import AUTH, Filters, ImageId, K, Offset, ServedIndex, State
from ..errors import ApiError
from ..results import known_image, search_page
from ..schemas import SearchOut, error_responses
from ..uploads import decode_upload, read_upload

router = APIRouter(tags=["search"])


@router.get("/search", response_model=SearchOut, dependencies=AUTH, responses=error_responses(400, 401, 404, 503))
def search(
    state: State,
    s: ServedIndex,
    f: Filters,
    q: Annotated[str, Query(min_length=1, max_length=1000, description="Russian text, e.g. «рыжий кот на диване».")],
    k: K = DEFAULT_K,
    offset: Offset = 0,
) -> SearchOut:
    """Images matching a Russian sentence, best first."""
    if not q.strip() or "\x00" in q:
        raise ApiError(400, "bad_query", "The query is empty: type what the photo shows.")
    t0 = time.perf_counter()
    with state.busy:
        hits = s.index.search(q, k=k, offset=offset, filters=f)
    return search_page(s, hits, k, offset, t0)


@router.post("/search/image", response_model=SearchOut, dependencies=AUTH,
             responses=error_responses(400, 401, 404, 413, 415, 503))  # fmt: skip
def search_image(
    state: State,
    s: ServedIndex,
    f: Filters,
    file: Annotated[UploadFile, File(description="An image (JPEG, PNG, WebP, HEIC, ...).")],
    k: K = DEFAULT_K,
    offset: Offset = 0,
) -> SearchOut:
    """Indexed images most like an uploaded picture."""
    data = read_upload(file, state.max_upload_bytes)
    with state.decoding:  # bounded like thumbnails: an upload may decode to max_pixels x 3 bytes
        image = decode_upload(data, state.max_pixels)
    t0 = time.perf_counter()
    with state.busy:
        hits = s.index.search_image(image, k=k, offset=offset, filters=f)
    return search_page(s, hits, k, offset, t0)


@router.get("/similar/{image_id}", response_model=SearchOut, dependencies=AUTH,
            responses=error_responses(400, 401, 404, 503))  # fmt: skip
def similar(
    state: State, s: ServedIndex, f: Filters, image_id: ImageId, k: K = DEFAULT_K, offset: Offset = 0
) -> SearchOut:
    """Indexed images most like an indexed one (itself excluded)."""
    if not 0 <= image_id < 2**63:  # (an unknown id in range: Index.similar's QueryError, below)
        known_image(s, image_id)
    t0 = time.perf_counter()
    try:
        with state.busy:
            hits = s.index.similar(image_id, k=k, offset=offset, filters=f)
    except QueryError as e:
        raise ApiError(404, "image_not_found", str(e)) from None
    return search_page(s, hits, k, offset, t0)
