"""/photos/{key}: a photo app writes, replaces, reads and deletes its photos by its own key (needs --write-token)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool

from ...errors import ImageError, QueryError
from ..deps import AUTH, WRITE_AUTH, ServedIndex, State
from ..errors import ApiError
from ..results import hit_out
from ..schemas import DeletedOut, HitOut, error_responses
from ..writes import PHOTO_BODY, PhotoInput, checked_key, photo_input

router = APIRouter(tags=["photos"])

Key = Annotated[str, PathParam(description="Your app's id for the photo: 1-512 characters, no '/' or control "
                               "characters (percent-encode it in the URL).")]  # fmt: skip


def _not_found(s: ServedIndex, key: str) -> ApiError:
    return ApiError(404, "photo_not_found", f"No photo with key {key[:200]!r} in index {s.name!r}.")


@router.put("/photos/{key}", response_model=HitOut, response_model_exclude={"score"}, dependencies=WRITE_AUTH,
            openapi_extra=PHOTO_BODY, responses=error_responses(400, 401, 403, 404, 413, 415, 503))  # fmt: skip
async def put_photo(
    state: State, s: ServedIndex, key: Key, photo: Annotated[PhotoInput, Depends(photo_input)]
) -> HitOut:
    """Add the photo `key`, or replace it (same id): an uploaded image (multipart field `file`), an image file on
    the server (JSON `path`, under an --allow-root folder) or its embedding (JSON `embedding`). Searchable at once.
    503 `writer_failed`: the server's writer process died before answering; the write may or may not have been
    committed, send it again."""
    key = checked_key(key)
    args = photo.add_kwargs()
    try:
        if args["embedding"] is not None:  # committed with the other requests writing meanwhile
            hit = await s.writes.put({"key": key, **args})
        else:
            hit = await run_in_threadpool(_add_image, state, s, key, args)
    except QueryError as e:  # an undecodable image, a wrong embedding size and the like: nothing was written
        raise ApiError(400, "bad_image" if isinstance(e.__cause__, ImageError) else "bad_photo", str(e)) from None
    return hit_out(s, hit, score=False)


def _add_image(state: Any, s: Any, key: str, args: dict[str, Any]) -> Any:
    with state.decoding, state.busy:  # decoding and encoding: bounded like uploaded queries
        return s.index.add(key, **args)


@router.get("/photos/{key}", response_model=HitOut, response_model_exclude={"score"}, dependencies=AUTH,
            responses=error_responses(400, 401, 404))  # fmt: skip
def get_photo(s: ServedIndex, key: Key) -> HitOut:
    """The photo written as `key`: id, collection, labels and metadata."""
    hit = s.index.get(checked_key(key))
    if hit is None:
        raise _not_found(s, key)
    return hit_out(s, hit, score=False)


@router.delete("/photos/{key}", response_model=DeletedOut, dependencies=WRITE_AUTH,
               responses=error_responses(400, 401, 403, 404, 503))  # fmt: skip
async def delete_photo(s: ServedIndex, key: Key) -> DeletedOut:
    """Delete the photo `key` from the index (its file, if any, stays); gone from searches at once. 503
    `writer_failed`: the server's writer process died before answering; send it again."""
    if not await s.writes.remove(checked_key(key)):
        raise _not_found(s, key)
    return DeletedOut(deleted=True)
