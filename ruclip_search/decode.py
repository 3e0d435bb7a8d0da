"""Open one image file robustly: any format PIL or pillow-heif reads, any mode, EXIF orientation applied.

Every failure becomes :class:`ImageError` with a short reason, so the indexer can record it and go on.
Truncated files are errors (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays False), never grey-padded images.

The pixel cap (``max_pixels``, default :data:`DEFAULT_MAX_PIXELS`) is checked right after reading the
header, before any pixel is decoded. PIL's own decompression-bomb limit is raised to the cap when it is
stricter, so PIL never refuses what the cap allows, and its warning never escapes.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from .errors import ImageError

try:  # HEIC/HEIF (iPhone photos); recent Pillow reads AVIF itself.
    import pillow_heif

    pillow_heif.register_heif_opener()
    if hasattr(pillow_heif, "register_avif_opener"):
        pillow_heif.register_avif_opener()
except ImportError:  # pragma: no cover - pillow-heif is a dependency, but decoding other formats still works
    pillow_heif = None

ImageFile.LOAD_TRUNCATED_IMAGES = False

#: PIL's hard decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS): ~179 MP, about 537 MB as RGB.
#: Large enough for 100+ MP medium-format cameras and stitched panoramas; raise it with --max-pixels.
from .defaults import MAX_PIXELS as DEFAULT_MAX_PIXELS  # noqa: E402  (one value, in defaults.py)

Source = str | os.PathLike | bytes | BinaryIO | Image.Image

_WHITE = (255, 255, 255)
_EXIF_IFD = 0x8769
_TAG_ORIENTATION = 0x0112
_TAG_MAKE = 0x010F
_TAG_MODEL = 0x0110
_TAG_DATETIME_ORIGINAL = 0x9003
_TAG_DATETIME_DIGITIZED = 0x9004
_TAG_OFFSET_TIME_ORIGINAL = 0x9011
_SWAPS_AXES = {5, 6, 7, 8}


@dataclass(frozen=True)
class Decoded:
    """An opened image and what the preprocessor needs to know about how it was decoded."""

    image: Image.Image  # RGB, loaded; oriented unless decode(..., orient=False)
    info: dict[str, Any]  # see image_info()
    scale: int  # JPEG draft reduction factor: pixel (x, y) of the image covers full-size (x*scale, y*scale)
    full_size: tuple[int, int]  # (width, height) before draft and before orientation


def open_image(
    source: Source, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, draft_size: int | None = None
) -> Image.Image:
    """Return ``source`` as a fully loaded RGB image with EXIF orientation applied.

    Transparency is composited onto white; animations give their first frame. ``draft_size`` lets JPEGs
    decode at a reduced DCT scale (1/2, 1/4, 1/8) while both sides stay >= ``draft_size`` (so the shorter
    side, which the centre crop keeps whole, does too). Raises ImageError for anything unreadable.
    """
    return decode(source, max_pixels=max_pixels, draft_size=draft_size).image


def image_info(source: Source) -> dict[str, Any]:
    """Header-only metadata: width, height (after EXIF orientation), format, taken_at (EXIF DateTimeOriginal,
    timezone-aware when OffsetTimeOriginal is set), camera_make, camera_model, orientation (EXIF 1..8)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns about corrupt EXIF and the like: nothing a caller can act on
        with _opened(source) as im:
            try:
                return _info(im, im.size)
            except Exception as exc:
                raise ImageError(_decode_reason(exc, im.format or "image")) from exc


def decode(
    source: Source,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
    orient: bool = True,
) -> Decoded:
    """Open once and return the image (as :func:`open_image`), its metadata and the draft scale.

    ``orient=False`` leaves the EXIF orientation for the caller to apply (``info["orientation"]``), so it can
    transpose a small result instead of the large decoded image.
    """
    with warnings.catch_warnings():
        # PIL warns about corrupt EXIF, bombs (the cap is checked on the header) and the like: not actionable.
        warnings.simplefilter("ignore")
        with _opened(source, max_pixels) as im:
            fmt = im.format or "image"
            full_size = im.size
            scale = 1
            try:
                if draft_size and not isinstance(source, Image.Image):
                    drafted = im.draft("RGB", (draft_size, draft_size))  # None unless a JPEG that can shrink
                    if drafted is not None:
                        scale = round(full_size[0] / drafted[1][2])
                # Load the pixels before reading EXIF: PNG's getexif() loads them itself when no eXIf chunk
                # came before the image data, _exif() would swallow that load's error, and a second load()
                # then returns at once with a part-decoded image. TIFF also applies its orientation while
                # loading (and drops the tag), so reading EXIF afterwards does not rotate it twice.
                im.load()
                info = _info(im, full_size)
                rgb = _to_rgb(im)
                if orient:
                    rgb = transpose(rgb, info["orientation"])
            except ImageError:
                raise
            except Image.DecompressionBombError as exc:
                raise ImageError(_bomb_reason(str(exc), max_pixels)) from exc
            except Exception as exc:
                raise ImageError(_decode_reason(exc, fmt)) from exc
    return Decoded(rgb, info, scale, full_size)


class _opened:
    """Context manager: an Image opened from any source, its file closed on exit, errors converted."""

    def __init__(self, source: Source, max_pixels: int | None = None) -> None:
        self.source = source
        self.max_pixels = max_pixels
        self.file: BinaryIO | None = None

    def __enter__(self) -> Image.Image:
        source = self.source
        if isinstance(source, Image.Image):
            im = source
        else:
            fp = self._file(source)
            _lift_pil_limit(self.max_pixels)
            try:
                im = Image.open(fp)
            except Image.DecompressionBombError as exc:
                self.close()
                raise ImageError(_bomb_reason(str(exc), self.max_pixels)) from exc
            except UnidentifiedImageError as exc:
                self.close()
                raise ImageError("not an image (unrecognised content)") from exc
            except Exception as exc:
                self.close()
                raise ImageError(_decode_reason(exc, "image")) from exc
        if self.max_pixels is not None and im.size[0] * im.size[1] > self.max_pixels:
            self.close()
            raise ImageError(
                f"{im.size[0]}×{im.size[1]} pixels is over the --max-pixels cap of {self.max_pixels:,}; "
                "raise --max-pixels to index it"
            )
        return im

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def _file(self, source: str | os.PathLike | bytes | BinaryIO) -> BinaryIO:
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise ImageError("empty file (0 bytes)")
            return io.BytesIO(source)
        if not isinstance(source, (str, os.PathLike)):
            return source  # a caller's open binary file: theirs to close
        try:
            self.file = open(source, "rb")  # noqa: SIM115 - closed in close()
            if os.fstat(self.file.fileno()).st_size == 0:
                self.close()
                raise ImageError("empty file (0 bytes)")
        except FileNotFoundError as exc:
            raise ImageError("file vanished (not found)") from exc
        except PermissionError as exc:
            raise ImageError("permission denied") from exc
        except IsADirectoryError as exc:
            raise ImageError("is a directory, not an image file") from exc
        except OSError as exc:
            raise ImageError(f"cannot read file ({exc.strerror or exc})") from exc
        return self.file


def _lift_pil_limit(max_pixels: int | None) -> None:
    """Make PIL's bomb limit no stricter than our cap (we check the cap ourselves after the header)."""
    if Image.MAX_IMAGE_PIXELS is not None and (max_pixels is None or Image.MAX_IMAGE_PIXELS < max_pixels):
        Image.MAX_IMAGE_PIXELS = max_pixels


def _bomb_reason(message: str, max_pixels: int | None) -> str:
    match = re.search(r"\((\d+) pixels\)", message)
    size = f"{int(match.group(1)):,} pixels" if match else "the image"
    cap = f"{max_pixels:,}" if max_pixels else f"{Image.MAX_IMAGE_PIXELS:,}"
    return f"{size} is over the --max-pixels cap of {cap}; raise --max-pixels to index it"


def _decode_reason(exc: BaseException, fmt: str) -> str:
    """A short human reason for a decoding failure."""
    text = str(exc)
    if isinstance(exc, MemoryError):
        return f"out of memory decoding {fmt}"
    if isinstance(exc, FileNotFoundError):
        return "file vanished (not found)"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if "truncated" in text.lower() or isinstance(exc, EOFError) or "premature end" in text.lower():
        return f"truncated {fmt}"
    first_line = text.splitlines()[0][:120] if text else type(exc).__name__
    return f"corrupt {fmt} ({first_line})"


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparency goes onto white, 16/32-bit and float greys are scaled to 8 bits."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and values.max(initial=0) > 255):
            values = values / 257.0  # 0..65535 -> 0..255
        elif mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0  # 0..1 floats
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGB", im.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    try:
        return im.convert("RGB")
    except ValueError as exc:
        raise ImageError(f"unsupported colour mode {mode}") from exc


def _exif(im: Image.Image) -> Image.Exif | None:
    try:
        return im.getexif()
    except Exception:  # broken EXIF must not make a good image unreadable
        return None


_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def transpose(im: Image.Image, orientation: int) -> Image.Image:
    """Apply an EXIF orientation as ImageOps.exif_transpose does, without its copy when there is none."""
    method = _TRANSPOSE.get(orientation)
    return im.transpose(method) if method is not None else im


def _info(im: Image.Image, size: tuple[int, int]) -> dict[str, Any]:
    """image_info()'s dict for ``im``, whose header size (before any draft) is ``size``."""
    exif = _exif(im)
    width, height = size
    make = model = taken_at = None
    orientation = 1
    if exif is not None:
        orientation = exif.get(_TAG_ORIENTATION, 1)
        orientation = orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1
        if orientation in _SWAPS_AXES:
            width, height = height, width
        make, model = _text(exif.get(_TAG_MAKE)), _text(exif.get(_TAG_MODEL))
        try:
            sub = exif.get_ifd(_EXIF_IFD)
        except Exception:
            sub = {}
        stamp = sub.get(_TAG_DATETIME_ORIGINAL) or sub.get(_TAG_DATETIME_DIGITIZED)
        taken_at = _parse_exif_datetime(stamp, sub.get(_TAG_OFFSET_TIME_ORIGINAL))
    return {
        "width": width,
        "height": height,
        "format": im.format,
        "taken_at": taken_at,
        "camera_make": make,
        "camera_model": model,
        "orientation": orientation,
    }


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    value = value.replace("\x00", "").strip()
    return value or None


def _parse_exif_datetime(value: object, offset: object = None) -> datetime | None:
    """EXIF 'YYYY:MM:DD HH:MM:SS' (plus OffsetTimeOriginal '+03:00' if present) -> datetime, else None."""
    text = _text(value)
    if not text:
        return None
    try:
        stamp = datetime.strptime(text[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None
    match = re.fullmatch(r"([+-])(\d\d):(\d\d)", _text(offset) or "")
    if match:
        sign = -1 if match.group(1) == "-" else 1
        delta = timedelta(hours=int(match.group(2)), minutes=int(match.group(3)))
        stamp = stamp.replace(tzinfo=timezone(sign * delta))
    return stamp
