"""Response models of the HTTP API: the JSON shapes photo apps depend on (see README.md, "HTTP API")."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


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


_ERROR_TEXT = {
    400: "Bad query or image",
    401: "Missing or wrong bearer token",
    404: "Unknown index, image or file",
    413: "Upload or image too large",
    415: "Upload is not an image",
    503: "Index unavailable",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting these error statuses with the ErrorOut body."""
    return {c: {"model": ErrorOut, "description": _ERROR_TEXT[c]} for c in codes}


__all__ = ["ErrorOut", "HealthOut", "HitOut", "IndexInfoOut", "InfoOut", "SearchOut", "error_responses"]
