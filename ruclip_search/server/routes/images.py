"""/images/{id}, /images/{id}/thumbnail and /images/{id}/file: one indexed image, only ever by its id."""

from __future__ import annotations

import hashlib
import mimetypes
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, Response

from ...defaults import THUMB_MAX, THUMB_MIN, THUMB_SIZE
from ...walk import display_path
from ..deps import AUTH, ImageId, ServedIndex, State
from ..results import hit_out, indexed_file, known_image
from ..schemas import HitOut, error_responses
from ..thumbnails import make_thumbnail

router = APIRouter(tags=["images"])


@router.get("/images/{image_id}", response_model=HitOut, response_model_exclude={"score"}, dependencies=AUTH,
            responses=error_responses(401, 404))  # fmt: skip
def image_meta(s: ServedIndex, image_id: ImageId) -> HitOut:
    """Metadata of one indexed image."""
    return hit_out(s, known_image(s, image_id), score=False)


@router.get("/images/{image_id}/thumbnail", dependencies=AUTH,
            responses={200: {"content": {"image/jpeg": {}}, "description": "JPEG thumbnail"}, **error_responses(401, 404)})  # fmt: skip
def thumbnail(
    request: Request,
    state: State,
    s: ServedIndex,
    image_id: ImageId,
    size: Annotated[int, Query(ge=THUMB_MIN, le=THUMB_MAX, description="Longest side in pixels.")] = THUMB_SIZE,
    t: Annotated[
        float | None,
        Query(
            ge=0,
            le=1e7,
            description="A video: the frame at this time (s), e.g. a hit's t; default: the video's own frame.",
        ),
    ] = None,  # fmt: skip
) -> Response:
    """A JPEG no larger than size x size (EXIF orientation applied; a video's frame at `t`), cached in memory."""
    hit = known_image(s, image_id)
    path, st = indexed_file(s, image_id)
    if hit.media == "video":
        t = t if t is not None else (hit.t or 0.0)
    else:
        t = None
    key = (s.name, image_id, size, str(path), st.st_mtime_ns, st.st_size, t)
    etag = '"' + hashlib.sha1(repr(key).encode("utf-8", "replace")).hexdigest()[:20] + '"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=3600"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    data = state.thumbs.get(key)
    if data is None:
        pixels = hit.width * hit.height if hit.width and hit.height else None
        with state.decoding:  # bounded: a decode may hold a whole full-size image
            data = make_thumbnail(path, size, state.thumb_max_pixels, pixels, t=t)
        state.thumbs.put(key, data)
    return Response(data, media_type="image/jpeg", headers=headers)


@router.get("/images/{image_id}/file", dependencies=AUTH,
            responses={200: {"content": {"image/*": {}}, "description": "The original file"}, **error_responses(401, 404)})  # fmt: skip
def original(s: ServedIndex, image_id: ImageId) -> FileResponse:
    """The original file of an indexed image, as stored."""
    path, st = indexed_file(s, image_id)
    media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(path, media_type=media, filename=display_path(path.name), stat_result=st,
                        content_disposition_type="inline", headers={"Cache-Control": "private, max-age=3600"})  # fmt: skip
