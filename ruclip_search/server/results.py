"""Index results as API answers: hits to HitOut/SearchOut, image ids to indexed records and files."""

from __future__ import annotations

import math
import os
import time
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import QueryError
from ..walk import display_path
from .errors import ApiError
from .schemas import HitOut, SearchOut

if TYPE_CHECKING:
    from .state import Served


def _iso(value: Any) -> str | None:
    return value.isoformat() if isinstance(value, (date, datetime)) else (str(value) if value else None)


def _finite(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def hit_out(s: Served, hit: Any, score: bool = True) -> HitOut:
    """One hit as JSON; its URLs name the index unless it is the default one (none for a photo without a file)."""
    return record_out(hit, s.url_suffix, score)


def record_json(hit: Any, url_suffix: str = "") -> bytes:
    """A stored record as a PUT's 200 body (no score). The writer process makes it without a served index: a
    photo put by embedding has no file, so no URL in it names an index."""
    return record_out(hit, url_suffix, score=False).model_dump_json(exclude={"score"}, by_alias=True).encode()


def record_out(hit: Any, url_suffix: str = "", score: bool = True) -> HitOut:
    """`hit_out` for URLs that end in `url_suffix` (the served index's `?index=` part, or none)."""
    has_file = bool(hit.path)
    t = getattr(hit, "t", None)
    at = f"{'&' if url_suffix else '?'}t={t:g}" if t is not None else ""
    return HitOut(
        id=int(hit.id), key=hit.key, collection=hit.collection, labels=list(hit.labels),
        path=display_path(hit.path) if has_file else None, score=_finite(hit.score) if score else None,
        width=hit.width, height=hit.height, taken_at=_iso(hit.taken_at), format=hit.format,
        thumbnail_url=f"/images/{int(hit.id)}/thumbnail{url_suffix}{at}" if has_file else None,
        file_url=f"/images/{int(hit.id)}/file{url_suffix}" if has_file else None,
        media=getattr(hit, "media", "photo"), t=t, duration=getattr(hit, "duration", None),
        raw_path=display_path(hit.raw_path) if getattr(hit, "raw_path", None) else None,
        live_path=display_path(hit.live_path) if getattr(hit, "live_path", None) else None,
    )  # fmt: skip


def search_page(s: Served, hits: list[Any], k: int, offset: int, t0: float) -> SearchOut:
    """A page of hits with the version they come from and the time taken since `t0` (perf_counter)."""
    return SearchOut(
        index=s.name, version=int(s.index.version), k=k, offset=offset,
        took_ms=round((time.perf_counter() - t0) * 1000, 2), hits=[hit_out(s, h) for h in hits],
    )  # fmt: skip


def known_image(s: Served, image_id: int) -> Any:
    """The indexed record of `image_id`, or 404 `image_not_found`."""
    hit = s.index.get(image_id) if 0 <= image_id < 2**63 else None
    if hit is None:
        raise ApiError(404, "image_not_found", f"No image with id {image_id} in index {s.name!r}.")
    return hit


def indexed_file(s: Served, image_id: int) -> tuple[Path, os.stat_result]:
    """Path and stat of an indexed image's file: 404 `image_not_found` or `file_missing`."""
    if not known_image(s, image_id).path:
        raise ApiError(404, "file_missing", f"Image {image_id} was written as an upload or an embedding: the server "
                       "has no file of it (your app holds the original).")  # fmt: skip
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


__all__ = ["hit_out", "indexed_file", "known_image", "search_page"]
