"""Thumbnails of indexed images: JPEG bytes made on demand and kept in a byte-bounded LRU cache."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

from ..errors import ImageError
from ..walk import display_path
from .errors import ApiError


class ThumbCache:
    """LRU of encoded thumbnails bounded by total bytes; keys include the file's mtime and size."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            self.bytes += len(data) - (len(old) if old else 0)
            self._items[key] = data
            while self.bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.bytes -= len(dropped)


def make_thumbnail(path: Path, size: int, max_pixels: int, pixels: int | None = None, t: float | None = None) -> bytes:
    """JPEG bytes of `path` fitted into size x size; undecodable files answer 404 `image_unreadable`.

    `t`: `path` is a video; the thumbnail is its frame at `t` seconds. A camera RAW file gives its preview.

    `pixels` (width x height as indexed) above `max_pixels` answers that 404 without opening the file; the
    decoder checks the cap again on the file's own header. Call it under `ServerState.decoding`.
    """
    from PIL import Image

    from .. import decode, media

    name = display_path(path.name)
    if pixels is not None and pixels > max_pixels:
        raise ApiError(404, "image_unreadable", f"{name!r} has {pixels:,} pixels, more than the {max_pixels:,} this "
                       "server decodes for a thumbnail: open the original file instead.")  # fmt: skip
    try:
        if t is not None:
            from .. import video

            im = video.frame_at(path, t, short_side=size)
        elif media.kind_of(path, sniff_unknown=False) == media.RAW:
            from ..raw import decode_raw

            im = decode_raw(path.read_bytes(), min_side=size, max_pixels=max_pixels)[0]
        else:
            im = decode.open_image(path, max_pixels=max_pixels, draft_size=size)
    except (ImageError, OSError):
        raise ApiError(404, "image_unreadable", f"{name!r} cannot be decoded any more.") from None
    im.thumbnail((size, size), Image.Resampling.LANCZOS if size <= 256 else Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85, optimize=False)
    return buf.getvalue()


__all__ = ["ThumbCache", "make_thumbnail"]
