"""`SearchFilters`: which images a search may return, as one value.

Parsed once from what a person typed (CLI options, HTTP query parameters, Python keywords), then handed to
`Index.search` and on to the store, which owns the SQL behind it. Dates are parsed here and nowhere else.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, time
from typing import Any

from .errors import QueryError

DateLike = date | datetime | str

_FORMAT_ALIASES = {"JPG": "JPEG", "TIF": "TIFF", "HEIC": "HEIF"}


@dataclass(frozen=True, slots=True)
class SearchFilters:
    """Restrictions on a search's results; the empty value (all None) restricts nothing.

    Build it with `SearchFilters.parse(...)`, which validates and normalises what a person typed; the fields
    then hold only normalised values, so the store can turn them into SQL without checking them again.
    """

    under: str | None = None  # absolute folder, no trailing separator (except "/")
    taken_from: datetime | None = None  # EXIF capture time >= this (naive wall-clock time, as EXIF stores it)
    taken_to: datetime | None = None  # EXIF capture time <= this (a bare date was made its last microsecond)
    formats: frozenset[str] | None = None  # PIL format names, upper case: {"JPEG", "PNG", "HEIF"}
    min_score: float | None = None  # drop hits whose cosine similarity is below this
    collections: frozenset[str] | None = None  # images in any of these collections (validated names)
    labels: frozenset[str] | None = None  # images with any of these labels (validated names)
    media: str | None = None  # "photo" (photos, RAW pairs and Live Photos) or "video"

    @classmethod
    def parse(
        cls,
        *,
        under: str | os.PathLike[str] | None = None,
        date_from: DateLike | None = None,
        date_to: DateLike | None = None,
        formats: Iterable[str] | str | None = None,
        min_score: float | None = None,
        collections: Iterable[str] | str | None = None,
        labels: Iterable[str] | str | None = None,
        media: str | None = None,
    ) -> SearchFilters:
        """Validate and normalise; raises QueryError with what to type instead.

        `under` is a folder (absolute, or relative to the current directory); `date_from`/`date_to` are
        dates or date-times (ISO strings accepted; a bare date as `date_to` includes that whole day; aware
        times are converted to local wall-clock time); `formats` e.g. {"JPEG", "png", "jpg"}; `collections`
        and `labels` are names (any of them matches; see `validate_name`); `media` is "photo" or "video".
        """
        return cls(
            under=_folder(under) if under is not None else None,
            taken_from=_when(date_from, end=False) if date_from is not None else None,
            taken_to=_when(date_to, end=True) if date_to is not None else None,
            formats=_formats(formats) if formats is not None else None,
            min_score=_score(min_score) if min_score is not None else None,
            collections=_names(collections, "collection") if collections is not None else None,
            labels=_names(labels, "label") if labels is not None else None,
            media=_media(media) if media is not None else None,
        )

    @property
    def restricts_ids(self) -> bool:
        """True when the filters select a subset of images (min_score alone only trims the ranked list)."""
        return (
            self.under is not None
            or self.taken_from is not None
            or self.taken_to is not None
            or self.formats is not None
            or self.collections is not None
            or self.labels is not None
            or self.media is not None
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the set fields (dates as ISO strings)."""
        out: dict[str, Any] = {}
        if self.under is not None:
            out["under"] = self.under
        if self.taken_from is not None:
            out["from"] = self.taken_from.isoformat()
        if self.taken_to is not None:
            out["to"] = self.taken_to.isoformat()
        if self.formats is not None:
            out["formats"] = sorted(self.formats)
        if self.min_score is not None:
            out["min_score"] = self.min_score
        if self.collections is not None:
            out["collections"] = sorted(self.collections)
        if self.labels is not None:
            out["labels"] = sorted(self.labels)
        if self.media is not None:
            out["media"] = self.media
        return out


NO_FILTERS = SearchFilters()


def parse_when(value: DateLike, *, end: bool = False) -> datetime:
    """A date or date-time (or its ISO text) as a naive datetime; a bare date as an `end` bound is its last
    microsecond, so `to=2021-06-01` includes that day. Raises QueryError for text that is neither."""
    return _when(value, end=end)


def _when(value: DateLike, *, end: bool) -> datetime:
    if isinstance(value, str):
        text = value.strip()
        try:
            value = datetime.fromisoformat(text) if ("T" in text or " " in text) else date.fromisoformat(text)
        except ValueError:
            raise QueryError(f"Bad date {text!r}: use YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS.") from None
    if isinstance(value, datetime):
        if value.tzinfo is not None:  # EXIF times are naive wall-clock times: compare in local time
            try:
                value = value.astimezone()
            except (OverflowError, ValueError, OSError):
                pass
            value = value.replace(tzinfo=None)
        return value
    if isinstance(value, date):
        return datetime.combine(value, time.max if end else time.min)
    raise QueryError(f"Bad date {value!r}: give a date, a datetime or an ISO string.")


MAX_NAME_LENGTH = 200  # collection and label names
MAX_KEY_LENGTH = 512  # photo keys (the application's own ids)
# Control characters (NUL, newline, DEL, C1 controls...), and for names also / ' " ; %. One regex scan in C:
# a Python loop over the characters cost ~20 us per photo written, on a photo app's write path.
_KEY_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f/]")
_NAME_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f/'\";%]")


def validate_name(value: Any, what: str = "collection") -> str:
    """A collection or label name as given, if valid (1-200 characters, no control characters, none of / ' " ; %);
    else QueryError saying what to use."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_LENGTH or _NAME_FORBIDDEN.search(value) is not None:
        shown = repr(value) if not isinstance(value, str) or len(value) <= 60 else repr(value[:60]) + "..."
        raise QueryError(
            f"Bad {what} name {shown}: use 1-{MAX_NAME_LENGTH} characters, letters, digits and - _ . : @ "
            "(no control characters, / ' \" ; or %)."
        )
    return value


def validate_key(key: Any) -> str:
    """A photo key as given, if valid (a str of 1-512 characters, no control characters, no /); else QueryError."""
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LENGTH or _KEY_FORBIDDEN.search(key) is not None:
        shown = repr(key) if not isinstance(key, str) or len(key) <= 60 else repr(key[:60]) + "..."
        raise QueryError(
            f"Bad photo key {shown}: use 1-{MAX_KEY_LENGTH} characters without '/' or control characters "
            "(e.g. your own id such as 'user42-IMG_0001')."
        )
    return key


def _names(values: Iterable[str] | str, what: str) -> frozenset[str]:
    if isinstance(values, str):
        values = [values]
    out = frozenset(validate_name(v, what) for v in values)
    if not out:
        raise QueryError(f"The {what} filter is empty: name at least one {what}.")
    return out


def _folder(value: str | os.PathLike[str]) -> str:
    path = os.fspath(value)
    if not path or "\x00" in path:
        raise QueryError("The folder filter is empty or holds a NUL character: give a folder path.")
    path = os.path.abspath(path)
    return path.rstrip(os.sep) or os.sep


def _formats(values: Iterable[str] | str) -> frozenset[str]:
    if isinstance(values, str):
        values = [values]
    out = set()
    for value in values:
        name = str(value).strip().lstrip(".").upper()
        if not (0 < len(name) <= 10 and name.isascii() and name.isalnum()):
            raise QueryError(f"Bad format {value!r}: use names like JPEG, PNG, HEIF.")
        out.add(_FORMAT_ALIASES.get(name, name))
    if not out:
        raise QueryError("The format filter is empty: name at least one format, e.g. JPEG.")
    return frozenset(out)


MEDIA = ("photo", "video")


def _media(value: str) -> str:
    name = str(value).strip().lower()
    if name not in MEDIA:
        raise QueryError(f"Bad media {value!r}: use photo or video.")
    return name


def _score(value: float) -> float:
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise QueryError(f"min_score must be a number between -1 and 1, got {value!r}.") from None
    if not -1.0 <= score <= 1.0:
        raise QueryError(f"min_score is a cosine similarity between -1 and 1, got {score}.")
    return score


__all__ = ["NO_FILTERS", "SearchFilters", "parse_when", "validate_key", "validate_name"]
