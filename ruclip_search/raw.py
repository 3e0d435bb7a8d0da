"""Open one camera RAW file (DNG, CR2, CR3, NEF, ARW, RAF, ORF, RW2, PEF, ...) through rawpy (LibRaw).

The embedded preview is used when its short side reaches the model's input size: it is the camera's own
rendering and costs a JPEG decode, where demosaicing costs ~10x more (see scripts/bench_media.py). Otherwise the
sensor data is demosaiced at half size (each 2x2 Bayer block becomes one pixel: no interpolation, 4x fewer
pixels). Every failure is an ImageError, as for other images.
"""

from __future__ import annotations

import io
import warnings
from datetime import datetime
from typing import Any

import numpy as np
from PIL import Image

from . import decode
from .errors import ImageError
from .media import missing_extra

# LibRaw's `flip` -> EXIF orientation (LibRaw: 3 = 180 degrees, 5 = 90 counter-clockwise, 6 = 90 clockwise).
_FLIP_TO_ORIENTATION = {0: 1, 3: 3, 5: 8, 6: 6}


def decode_raw(
    data: bytes, *, min_side: int, fmt: str = "RAW", max_pixels: int | None = decode.DEFAULT_MAX_PIXELS
) -> tuple[Image.Image, dict[str, Any]]:
    """(RGB image, image_info-style dict with `raw_source` "preview" or "demosaic") of a RAW file's bytes.

    `min_side`: the smallest short side of a usable embedded preview (the model's input size); `fmt` is the
    format name recorded (the extension, e.g. "CR2").
    """
    try:
        import rawpy
    except ImportError:
        raise missing_extra("rawpy", "a camera RAW file") from None
    try:
        with rawpy.imread(io.BytesIO(data)) as raw:
            sizes = raw.sizes
            orientation = _FLIP_TO_ORIENTATION.get(sizes.flip, 1)
            width, height = (sizes.height, sizes.width) if orientation in (6, 8) else (sizes.width, sizes.height)
            image, source = _preview(raw, rawpy, orientation, max_pixels, min_side), "preview"
            if image is None or min(image.size) < min_side:
                if max_pixels is not None and sizes.width * sizes.height > max_pixels:
                    raise ImageError(
                        f"{sizes.width}×{sizes.height} pixels is over the --max-pixels cap of {max_pixels:,}; "
                        "raise --max-pixels to index it"
                    )
                rgb = raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8, no_auto_bright=False)
                image, source = Image.fromarray(np.ascontiguousarray(rgb), "RGB"), "demosaic"
            stamp = raw.other.timestamp
    except ImageError:
        raise
    except MemoryError:
        raise ImageError(f"out of memory decoding {fmt}") from None
    except Exception as exc:  # LibRawError and its kin: unsupported, truncated, corrupt
        text = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise ImageError(f"cannot decode {fmt} RAW ({type(exc).__name__}: {text})") from exc
    make, model, taken = _tiff_tags(data)
    if taken is None and isinstance(stamp, datetime) and stamp.year > 1970:
        taken = stamp
    info = {
        "width": width, "height": height, "format": fmt, "taken_at": taken, "camera_make": make,
        "camera_model": model, "orientation": 1, "raw_source": source,
    }  # fmt: skip
    return image, info


def _preview(raw: Any, rawpy: Any, orientation: int, max_pixels: int | None, min_side: int) -> Image.Image | None:
    """The embedded preview as an oriented RGB image, or None when there is none LibRaw can give. A JPEG preview
    is decoded at a reduced DCT scale keeping its short side >= 1.5 x `min_side` (as photos are)."""
    try:
        thumb = raw.extract_thumb()
    except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
        return None
    except rawpy.LibRawError:
        return None  # a broken preview: the sensor data may still be fine
    if thumb.format == rawpy.ThumbFormat.JPEG:
        try:
            decoded = decode.decode(bytes(thumb.data), max_pixels=max_pixels, draft_size=round(1.5 * min_side))
        except ImageError:
            return None
        # a preview with its own EXIF orientation is already upright; most carry none and follow the RAW's
        return decoded.image if decoded.info["orientation"] != 1 else decode.transpose(decoded.image, orientation)
    if thumb.format == rawpy.ThumbFormat.BITMAP:
        return decode.transpose(Image.fromarray(np.ascontiguousarray(thumb.data), "RGB"), orientation)
    return None


def _tiff_tags(data: bytes) -> tuple[str | None, str | None, datetime | None]:
    """Camera make, model and capture time from a TIFF-structured RAW's EXIF (DNG, CR2, NEF, ARW, PEF...)."""
    if data[:4] not in (b"II*\x00", b"MM\x00*"):
        return None, None, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                exif = im.getexif()
                make, model = decode._text(exif.get(0x010F)), decode._text(exif.get(0x0110))
                try:
                    sub = exif.get_ifd(0x8769)
                except Exception:
                    sub = {}
                stamp = sub.get(0x9003) or sub.get(0x9004) or exif.get(0x0132)
                return make, model, decode._parse_exif_datetime(stamp, sub.get(0x9011))
    except Exception:
        return None, None, None
