"""Sample a few frames of one video (MP4, MOV, M4V, MKV, WebM, AVI, 3GP) through PyAV (FFmpeg).

A video is indexed by the frames at fixed fractions of its duration (defaults.VIDEO_FRACTIONS). Each is found
by seeking to the keyframe at or before its time and taking that keyframe: one seek and about one decoded frame
per sample, whatever the video's length, so an hour of 4K costs what a clip does and memory holds one frame at
a time (never the stream). Only when two samples fall on the same keyframe (a long group of pictures) are a
few more frames decoded forward (at most defaults.VIDEO_SEEK_FRAMES). Frames are scaled in FFmpeg (swscale)
straight to the size the model needs. Every failure is an ImageError, as for images.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from PIL import Image

from . import defaults
from .errors import ImageError
from .media import missing_extra


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise missing_extra("av", "a video file") from None
    # No av.logging.set_level: it routes FFmpeg's messages through a Python callback, and a decoder thread
    # waiting for the GIL to log while the main thread waits for it in seek() deadlocked a test (PyAV 18).
    return av


def _open(path: str | os.PathLike[str]) -> tuple[Any, Any, Any]:
    av = _av()
    try:
        container = av.open(os.fspath(path), metadata_errors="ignore")
    except FileNotFoundError:
        raise ImageError("file vanished (not found)") from None
    except Exception as exc:
        raise ImageError(_reason(exc)) from exc
    if not container.streams.video:
        container.close()
        raise ImageError("no video stream in this file")
    stream = container.streams.video[0]  # FFmpeg's default threading: a decoding worker is one core already
    return av, container, stream


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
    low = text.lower()
    if "moov atom not found" in low or "end of file" in low or "truncat" in low or isinstance(exc, EOFError):
        return f"truncated video ({text})"
    return f"corrupt or unsupported video ({text})"


def _duration(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def _start(stream: Any) -> float:
    return float(stream.start_time * stream.time_base) if stream.start_time is not None and stream.time_base else 0.0


def _to_image(frame: Any, short_side: int | None) -> Image.Image:
    """The frame as upright RGB, scaled by FFmpeg so its short side is `short_side` (never enlarged)."""
    w, h = frame.width, frame.height
    if short_side and min(w, h) > short_side:
        scale = short_side / min(w, h)
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
    image = frame.reformat(width=w, height=h, format="rgb24").to_image()
    rotation = int(round(getattr(frame, "rotation", 0) or 0)) % 360
    return image.rotate(rotation, expand=True) if rotation in (90, 180, 270) else image


def sample_frames(
    path: str | os.PathLike[str],
    *,
    short_side: int | None = None,
    fractions: Sequence[float] = defaults.VIDEO_FRACTIONS,
    max_decode: int = defaults.VIDEO_SEEK_FRAMES,
) -> tuple[list[tuple[float, Image.Image]], dict[str, Any]]:
    """([(t seconds, RGB frame)], info) for the frames near `fractions` of the duration; info as
    decode.image_info (width, height, format, taken_at, camera_make, camera_model) plus `duration` (s)."""
    av, container, stream = _open(path)
    try:
        duration = _duration(container, stream)
        start = _start(stream)
        info = _info(container, stream, path, duration)
        targets = [start + duration * f for f in fractions] if duration else [start]
        frames: list[tuple[float, Image.Image]] = []
        taken: set[int] = set()
        try:
            for target in targets:
                found = _frame_near(container, stream, target, taken, max_decode)
                if found is None:
                    continue  # every frame up to the cap was taken already (a very long GOP): nothing new here
                pts, t, frame = found
                taken.add(pts)
                frames.append((round(max(0.0, t - start), 3), _to_image(frame, short_side)))
        except ImageError:
            raise
        except MemoryError:
            raise ImageError("out of memory decoding video") from None
        except Exception as exc:  # av.FFmpegError and its kin
            raise ImageError(_reason(exc)) from exc
        return frames, info  # never empty: the first sample either finds its keyframe or raises
    finally:
        container.close()


def _frame_near(container: Any, stream: Any, target: float, taken: set[int], max_decode: int) -> Any:
    """(pts, t, frame): the keyframe at or before `target`, or the first frame after it not in `taken` (up to
    `max_decode` frames) when that keyframe was sampled already; None when that frame was too."""
    container.seek(max(0, int(target / stream.time_base)), stream=stream, backward=True, any_frame=False)
    decoded, keyframe_taken = 0, False
    for frame in container.decode(stream):
        decoded += 1
        pts = frame.pts if frame.pts is not None else -decoded
        t = float(frame.time) if frame.time is not None else target
        if decoded == 1:
            keyframe_taken = pts in taken
            if not keyframe_taken:
                return pts, t, frame
        if keyframe_taken and (t >= target - 1e-3 or decoded >= max_decode):
            return (pts, t, frame) if pts not in taken else None
    if decoded == 0:
        raise ImageError(f"truncated video: no frame at {target:.1f} s")
    return None


def frame_at(path: str | os.PathLike[str], t: float, *, short_side: int | None = None) -> Image.Image:
    """The frame shown at about `t` seconds (the keyframe at or before it), as upright RGB: thumbnails of hits."""
    av, container, stream = _open(path)
    try:
        target = _start(stream) + max(0.0, float(t))
        container.seek(max(0, int(target / stream.time_base)), stream=stream, backward=True, any_frame=False)
        best = None
        for i, frame in enumerate(container.decode(stream)):
            best = frame
            if frame.time is None or frame.time >= target - 1e-3 or i + 1 >= defaults.VIDEO_SEEK_FRAMES:
                break
        if best is None:
            raise ImageError(f"no frame at {t:.1f} s")
        return _to_image(best, short_side)
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(_reason(exc)) from exc
    finally:
        container.close()


def _info(container: Any, stream: Any, path: str | os.PathLike[str], duration: float | None) -> dict[str, Any]:
    meta = {str(k).lower(): v for k, v in {**container.metadata, **stream.metadata}.items()}
    width, height = stream.codec_context.width, stream.codec_context.height
    rotate = meta.get("rotate")
    if rotate in ("90", "270", "-90"):
        width, height = height, width
    ext = os.path.splitext(os.fspath(path))[1].lstrip(".").upper()
    fmt = {"M4V": "MP4", "3G2": "3GP", "M2TS": "MTS"}.get(ext, ext) or container.format.name.split(",")[0].upper()
    return {
        "width": width or None,
        "height": height or None,
        "format": fmt,
        "taken_at": _when(meta.get("com.apple.quicktime.creationdate") or meta.get("creation_time")),
        "camera_make": meta.get("com.apple.quicktime.make") or meta.get("make") or None,
        "camera_model": meta.get("com.apple.quicktime.model") or meta.get("model") or None,
        "orientation": 1,
        "duration": round(duration, 3) if duration else None,
    }


def _when(value: object) -> datetime | None:
    """QuickTime/Matroska creation time ('2021-06-01T15:30:00.000000Z', '2021-06-01T18:30:00+0300')."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip().replace("Z", "+00:00")
    text = re.sub(r"([+-]\d\d)(\d\d)$", r"\1:\2", text)
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        return None
    if stamp.year <= 1970 or (stamp.year == 1904 and stamp.month == 1):  # unset QuickTime epochs
        return None
    return stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=timezone.utc)
