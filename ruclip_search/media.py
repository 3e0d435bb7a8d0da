"""What kind of media a file is (photo, camera RAW, video, or nothing to index), from its name and first bytes,
and the per-file decode deadline RAW and video decoding run under.

Photos are whatever Pillow or pillow-heif opens: their extensions come from Pillow's own plugin registry (so a
format Pillow learns is indexed without a change here). A file whose extension is unknown is sniffed: its first
bytes must show an image or a video container, else it is skipped (text, archives, documents) without being
recorded as an error.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from functools import lru_cache

from .errors import ImageError

PHOTO, RAW, VIDEO = "photo", "raw", "video"

#: Camera RAW formats LibRaw (rawpy) decodes.
RAW_EXTENSIONS = frozenset(
    ".dng .cr2 .cr3 .crw .nef .nrw .arw .srf .sr2 .raf .orf .rw2 .pef .srw .3fr .erf .kdc .mrw .x3f .iiq .rwl".split()
)
#: Video containers PyAV (FFmpeg) demuxes.
VIDEO_EXTENSIONS = frozenset(".mp4 .mov .m4v .mkv .webm .avi .3gp .3g2 .mts .m2ts".split())
#: The stills of a RAW+JPEG pair or a Live Photo, in order of preference when a stem has several.
STILL_EXTENSIONS = (".jpg", ".jpeg", ".heic", ".heif", ".hif", ".png", ".tif", ".tiff", ".webp", ".avif")
#: The video half of a Live Photo (iPhone: IMG_0001.HEIC + IMG_0001.MOV).
LIVE_EXTENSIONS = frozenset({".mov"})

# Pillow formats whose plugins only identify a file and need an external program or handler to decode it.
_PIL_UNDECODABLE = frozenset({"EPS", "BUFR", "GRIB", "HDF5", "MPEG", "FITS"})
_IMAGE_MAGIC = (
    b"\xff\xd8\xff",  # JPEG, MPO
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF
    b"MM\x00*",
    b"II+\x00",  # BigTIFF
    b"MM\x00+",
    b"\x00\x00\x00\x0cjP  \r\n\x87\n",  # JPEG 2000 (JP2)
    b"\xff\x4f\xff\x51",  # JPEG 2000 codestream
    b"\x00\x00\x01\x00",  # ICO
    b"\x00\x00\x02\x00",  # CUR
    b"qoif",
    b"8BPS",  # PSD
    b"DDS ",
    b"\x97JB2",
)
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"})
_EBML = b"\x1a\x45\xdf\xa3"  # Matroska, WebM


@lru_cache(maxsize=1)
def image_extensions() -> frozenset[str]:
    """Extensions of every format Pillow (with pillow-heif registered) can open, lower case with the dot."""
    from PIL import Image

    from . import decode  # noqa: F401  (registers the HEIF/AVIF openers)

    Image.init()
    return frozenset(
        ext.lower()
        for ext, fmt in Image.registered_extensions().items()
        if fmt in Image.OPEN and fmt not in _PIL_UNDECODABLE
    ) | frozenset({".jpe", ".jfif", ".mpo", ".heic", ".heif", ".hif", ".avif"})


def known_extension(ext: str) -> bool:
    """Whether files with this extension (lower case, with the dot) are media without looking inside."""
    return ext in RAW_EXTENSIONS or ext in VIDEO_EXTENSIONS or ext in image_extensions()


def sniff(head: bytes) -> str | None:
    """PHOTO, VIDEO or None (not media) from a file's first 16+ bytes."""
    if head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return PHOTO
    if head[4:8] == b"ftyp":
        return PHOTO if head[8:12] in _HEIF_BRANDS else VIDEO
    if head.startswith(_EBML) or (head[:4] == b"RIFF" and head[8:12] == b"AVI "):
        return VIDEO
    return None


def _head(path: str | os.PathLike[str]) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(32)
    except OSError:
        return b""


def kind_of(path: str | os.PathLike[str], *, sniff_unknown: bool = True) -> str | None:
    """PHOTO, RAW or VIDEO for a file to index, or None to skip it; by extension, else by its first bytes."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext in RAW_EXTENSIONS:
        return RAW
    if ext in VIDEO_EXTENSIONS:
        return VIDEO
    if ext in image_extensions():
        return PHOTO
    return sniff(_head(path)) if sniff_unknown else None


# -- decode deadline --------------------------------------------------------------------------------
#: Set in decoding worker processes (loader._worker_init): a decode past its hard deadline kills the worker,
#: which the pool pins on the file. Never set in a caller's own process.
_hard_kill = False


def enable_hard_deadline() -> None:
    """Let `deadline` kill this process when a decode is stuck in C code past twice its deadline (workers only)."""
    global _hard_kill
    _hard_kill = True


@contextlib.contextmanager
def deadline(seconds: float | None, what: str) -> Iterator[None]:
    """Raise ImageError if the body runs longer than `seconds` (a SIGALRM timer, main thread only).

    The timer fires between FFmpeg packets and after each LibRaw call, so a slow decode stops there. Code that
    never returns to Python cannot be interrupted: in a worker process, a watchdog then kills the process at
    twice the deadline, and the pool records the file as having killed its worker.
    """
    if not seconds or seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum: int, frame: object) -> None:
        raise ImageError(f"{what} took longer than {seconds:g} s; skipped (a damaged or unusual file?)")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    watchdog = None
    if _hard_kill:
        watchdog = threading.Timer(2 * seconds + 5, os._exit, args=(70,))
        watchdog.daemon = True
        watchdog.start()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if watchdog is not None:
            watchdog.cancel()


def missing_extra(module: str, what: str) -> ImageError:
    """The error for a file whose decoder is an optional dependency that is not installed."""
    return ImageError(
        f"{what} needs the optional package {module!r}: install it with `pip install 'ruclip-search[media]'`"
    )
