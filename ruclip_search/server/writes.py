"""What PUT /photos/{key} sends, parsed and checked before anything is written: the key, the image source
(an upload, a path under an allowed root, or an embedding) and the collection, labels and capture time."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import UploadFile

from ..defaults import MAX_LABELS
from ..errors import QueryError
from ..filters import validate_key, validate_name
from .errors import ApiError
from .schemas import PhotoIn
from .state import ServerState
from .uploads import probe_upload, read_upload

FORM_FIELDS = frozenset({"file", "collection", "labels", "taken_at"})
_WHEN = TypeAdapter(datetime | date)


@dataclass(frozen=True)
class PhotoInput:
    """One checked write: exactly one of `image` (uploaded bytes), `path` (resolved) and `embedding`."""

    image: bytes | None = None
    path: Path | None = None
    embedding: list[float] | None = None
    collection: str | None = None
    labels: tuple[str, ...] = ()
    taken_at: datetime | None = None

    def add_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `Index.add` (besides the key)."""
        image = self.image if self.image is not None else self.path
        embedding = None
        if self.embedding is not None:
            import numpy as np

            embedding = np.asarray(self.embedding, dtype=np.float32)
        return {"image": image, "embedding": embedding, "collection": self.collection, "labels": self.labels,
                "taken_at": self.taken_at}  # fmt: skip


def _bad(detail: str) -> ApiError:
    return ApiError(400, "bad_photo", detail)


def checked_key(key: str) -> str:
    """The path's photo key, or 400 `bad_key` saying what a key may hold."""
    try:
        return validate_key(key)
    except QueryError as e:
        raise ApiError(400, "bad_key", str(e)) from None


def _names(collection: Any, labels: Any) -> tuple[str | None, tuple[str, ...]]:
    """Validated collection and sorted, de-duplicated labels; 400 `bad_photo` otherwise."""
    if not isinstance(labels, (list, tuple)) or len(labels) > MAX_LABELS:
        raise _bad(f"`labels` must be a list of at most {MAX_LABELS} names.")
    try:
        return (validate_name(collection, "collection") if collection is not None else None,
                tuple(sorted({validate_name(label, "label") for label in labels})))  # fmt: skip
    except QueryError as e:
        raise _bad(str(e)) from None


def _when(value: Any) -> datetime | None:
    """`taken_at` as a datetime (a bare date: its midnight); 400 `bad_photo` for anything else."""
    if value is None:
        return None
    try:
        when = _WHEN.validate_python(value) if not isinstance(value, (date, datetime)) else value
    except ValidationError:
        raise _bad(
            f"Bad taken_at {str(value)[:60]!r}: give an ISO 8601 date or date-time, e.g. 2021-06-01T18:30:00."
        ) from None
    if not isinstance(when, datetime):
        when = datetime(when.year, when.month, when.day)
    return when


def allowed_path(raw: str, roots: tuple[Path, ...]) -> Path:
    """The file `raw` names, symlinks resolved, if it lies under an allowed root: else 403 `path_not_allowed`
    (checked before the file's existence, so a refused path reveals nothing), 404 `file_not_found`."""
    if "\x00" in raw or not os.path.isabs(raw):
        raise _bad(f"Bad path {raw[:80]!r}: give the absolute path of an image file on the server.")
    if not roots:
        raise ApiError(403, "path_not_allowed", "This server reads no files by path: upload the image instead, or "
                       "start the server with --allow-root DIR.")  # fmt: skip
    real = Path(os.path.realpath(raw))
    if not any(real == root or root in real.parents for root in roots):
        raise ApiError(403, "path_not_allowed", f"{raw[:200]!r} is not under a folder this server allows "
                       "(--allow-root): upload the image instead.")  # fmt: skip
    if not real.is_file():
        raise ApiError(404, "file_not_found", f"No file at {raw[:200]!r}: give the path of an existing image.")
    return real


def _embedding(values: list[float]) -> list[float]:
    if not values or not all(math.isfinite(v) for v in values) or not any(values):
        raise _bad("Bad embedding: give the image embedding as a non-empty list of finite numbers, not all zero.")
    return values


async def _from_form(request: Request, state: ServerState) -> PhotoInput:
    form = await request.form(max_files=1, max_fields=MAX_LABELS + 8)
    unknown = sorted(set(form.keys()) - FORM_FIELDS)
    if unknown:
        raise _bad(f"Unknown form field(s) {', '.join(unknown)}: send file, collection, labels, taken_at.")
    file, text = form.get("file"), {k: form.getlist(k) for k in ("collection", "taken_at")}
    if not isinstance(file, UploadFile):
        raise _bad("Attach the image as the multipart file field `file`.")
    if any(len(v) > 1 or any(not isinstance(x, str) for x in v) for v in text.values()):
        raise _bad("Send `collection` and `taken_at` once each, as text fields.")
    labels = form.getlist("labels")
    if any(not isinstance(x, str) for x in labels):
        raise _bad("`labels` are text fields, one per label.")
    collection, names = _names(text["collection"][0] if text["collection"] else None, labels)
    when = _when(text["taken_at"][0] if text["taken_at"] else None)
    data = read_upload(file, state.max_upload_bytes)  # type: ignore[arg-type]
    probe_upload(data, state.max_pixels)
    return PhotoInput(image=data, collection=collection, labels=names, taken_at=when)


async def _from_json(request: Request, state: ServerState) -> PhotoInput:
    try:
        body = PhotoIn.model_validate_json(await request.body())
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None
    if (body.path is None) == (body.embedding is None):
        raise _bad("Send exactly one of `path` (a file on the server) and `embedding` (a list of numbers); "
                   "or upload the image as multipart/form-data.")  # fmt: skip
    collection, names = _names(body.collection, body.labels)
    when = _when(body.taken_at)
    if body.path is not None:
        path = allowed_path(body.path, state.allow_roots)
        return PhotoInput(path=path, collection=collection, labels=names, taken_at=when)
    return PhotoInput(embedding=_embedding(body.embedding or []), collection=collection, labels=names, taken_at=when)


async def photo_input(request: Request) -> PhotoInput:
    """Dependency: the PUT body (multipart or JSON) checked; 415 `unsupported_media_type` for other bodies."""
    state: ServerState = request.app.state.server
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
        return await _from_form(request, state)
    if media == "application/json" or media.endswith("+json"):
        return await _from_json(request, state)
    raise ApiError(415, "unsupported_media_type", "Send the photo as multipart/form-data (field `file`) or as "
                   'JSON ({"path": ...} or {"embedding": [...]}).')  # fmt: skip


#: The PUT request body in the OpenAPI schema (both forms; the route parses the body itself).
PHOTO_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "The image file."},
                        "collection": {"type": "string", "description": "A collection name."},
                        "labels": {"type": "array", "items": {"type": "string"}, "description": "Label names."},
                        "taken_at": {"type": "string", "description": "Capture time (ISO 8601); default EXIF."},
                    },
                },
                "encoding": {"labels": {"style": "form", "explode": True}},
            },
            "application/json": {"schema": PhotoIn.model_json_schema()},
        },
    }
}

__all__ = ["PHOTO_BODY", "PhotoInput", "allowed_path", "checked_key", "photo_input"]
