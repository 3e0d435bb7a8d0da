"""Response models of the HTTP API: the JSON shapes photo apps depend on (see README.md, "HTTP API")."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..defaults import MAX_LABELS


class ErrorOut(BaseModel):
    """Every non-validation error: `code` is stable (for programs), `detail` is for people."""

    detail: str
    code: str


class HitOut(BaseModel):
    """One image: its id (use it with /images/{id}/...), its key if an app wrote it, path, score and metadata."""

    id: int
    key: str | None = Field(None, description="The app's key (PUT /photos/{key}); null for photos of a build.")
    collection: str | None = Field(None, description="Collection given when the photo was written, if any.")
    labels: list[str] = Field(default_factory=list, description="Labels given when the photo was written (sorted).")
    path: str | None = Field(
        None, description="Absolute path on the server (undecodable bytes shown as U+FFFD); null for a photo "
        "written as an upload or an embedding, which has no file on the server."
    )  # fmt: skip
    score: float | None = Field(None, description="Cosine similarity to the query; null for plain metadata.")
    width: int | None = None
    height: int | None = None
    taken_at: str | None = Field(
        None,
        description="EXIF DateTimeOriginal as ISO 8601, e.g. 2021-06-01T18:30:00: camera local time, with an "
        "offset only when the EXIF records one.",
    )
    format: str | None = Field(None, description="PIL format name, e.g. JPEG, PNG, HEIF.")
    thumbnail_url: str | None = Field(None, description="Relative URL of a 256 px JPEG thumbnail; null without a file.")
    file_url: str | None = Field(None, description="Relative URL of the original file; null without a file.")
    media: str = Field("photo", description="photo (RAW+JPEG pairs and Live Photos too) or video.")
    t: float | None = Field(
        None, description="A video: the time in seconds of the frame that matched best (open the video there); "
        "its thumbnail_url shows that frame."
    )  # fmt: skip
    duration: float | None = Field(None, description="A video's length in seconds.")
    raw_path: str | None = Field(None, description="The RAW file of a RAW+JPEG pair (the JPEG is what is indexed).")
    live_path: str | None = Field(None, description="The video of a Live Photo (the still is what is indexed).")


class PhotoIn(BaseModel):
    """PUT /photos/{key} as JSON: exactly one of `path` (a file under an --allow-root) and `embedding`."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(None, max_length=4096, description="Absolute path of an image file on the server, "
                             "under a folder the server allows (--allow-root).")  # fmt: skip
    embedding: list[float] | None = Field(
        None, description="The photo's image embedding from the index's model (its dimension, see /info); "
        "normalised to unit length by the server."
    )  # fmt: skip
    collection: str | None = Field(None, description="A collection name to scope searches by (?collection=).")
    labels: list[str] = Field(default_factory=list, max_length=MAX_LABELS,
                              description="Label names to filter searches by (?label=).")  # fmt: skip
    taken_at: datetime | date | None = Field(None, description="Capture time (ISO 8601); default: the file's EXIF.")


class DeletedOut(BaseModel):
    """DELETE /photos/{key} answer."""

    deleted: bool


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


_ERROR_TEXT = {
    400: "Bad query or image",
    401: "Missing or wrong bearer token",
    403: "Writes disabled on this server, or a path outside its allowed folders",
    404: "Unknown index, image, photo key or file",
    413: "Upload or image too large",
    415: "Upload is not an image, or an unsupported request body type",
    503: "Index unavailable",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting these error statuses with the ErrorOut body."""
    return {c: {"model": ErrorOut, "description": _ERROR_TEXT[c]} for c in codes}


__all__ = [
    "DeletedOut", "ErrorOut", "HealthOut", "HitOut", "IndexInfoOut", "InfoOut", "PhotoIn", "SearchOut",
    "error_responses",
]  # fmt: skip
