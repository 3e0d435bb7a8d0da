"""JPEGs decoded in batches by `torchvision.io.decode_jpeg` (nvJPEG on a GPU) and preprocessed with tensor ops,
so a GPU build never takes the pixels off the card; the same code runs on the CPU, which is how CI tests it.

Files are read, hashed and their headers parsed by CPU threads (into pinned buffers for a GPU). A file goes the
tensor way only when it is a JPEG that nvJPEG decodes in a batch (on its hardware engine where the GPU has one):
Huffman baseline or extended sequential, 8-bit, three components, its end-of-image marker present (libjpeg only
warns about a truncated file and fills it grey; the CPU path records it as an error). Everything else goes, per
file, to the fallback (the indexer's CPU worker processes), which records errors exactly as before: PNG, HEIC,
RAW, video, CMYK, greyscale, 12-bit, arithmetic-coded, truncated, over the pixel cap, unreadable, any file the
decoder refuses, and progressive JPEGs (torchvision decodes those one at a time, in software, under a global lock;
the workers' reduced-scale PIL decode of them runs on every core).

Preprocessing matches `Preprocessor` (the reference transform): centre square crop, antialiased bilinear resize
(torch's antialias kernel is PIL's), rounding to 8 bits as PIL does, EXIF orientation (applied to the small
result, as `fast` mode does), normalisation. It decodes at full size (nvJPEG has no DCT scaling), so on the CPU
it is slower than `fast` mode's draft decode: it is for the GPU.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import threading
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol, TypeVar

import torch
import torch.nn.functional as F

from . import _signals, media
from .decode import image_info
from .loader import Loaded, _meta, file_hash
from .preprocess import Preprocessor, _unorient_box, centre_crop

#: Start-of-frame markers of the JPEGs taken: Huffman baseline and extended sequential.
TENSOR_SOF = frozenset({0xC0, 0xC1})
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # DHT, JPG and DAC share the range
_SWAPS_AXES = {5, 6, 7, 8}
#: Batches decoded ahead of the caller (each holds its preprocessed pixels: 256 x 0.6 MB on a GPU build).
QUEUED = 2
_DONE = object()


class _Fallback(Protocol):
    def run(self, jobs: Sequence[Any]) -> Iterable[tuple[Any, Loaded]]: ...


class _HasPath(Protocol):
    path: str


J = TypeVar("J", bound=_HasPath)


def tensor_jpeg(data: bytes | memoryview) -> bool:
    """Whether `data` is a JPEG the tensor path takes (see the module docstring); reads the header only."""
    return _header_end(data) is not None


def _header_end(data: bytes | memoryview) -> int | None:
    """Where the first scan starts in a JPEG the tensor path takes (the header is all before it); else None."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i, n, sof, sos = 2, len(data), None, None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None  # not at a marker: a malformed header
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if marker in _SOF:
            if i + 10 > n:
                return None
            sof = (marker, data[i + 4], data[i + 9])  # (marker, bits per sample, components)
        elif marker == 0xDA:
            sos = i
            break
        i += 2 + length
    if sof is None or sos is None or sof[0] not in TENSOR_SOF or sof[1] != 8 or sof[2] != 3:
        return None
    # Inside entropy-coded data 0xFF is always followed by 0x00 or a restart marker, so an FFD9 after the first
    # scan can only be the end-of-image marker: without it the file is truncated. (Looked for in the last 64 KiB:
    # a file with a longer trailer, such as an MPO's second image, goes to the CPU path.)
    return sos if b"\xff\xd9" in bytes(data[max(sos, n - 65536) :]) else None


@lru_cache(maxsize=1)
def nvjpeg_available() -> bool:
    """Whether torchvision can decode a JPEG on the first CUDA device (nvJPEG); decodes a tiny one to see."""
    if not torch.cuda.is_available():
        return False
    try:
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 100, 50)).save(buf, "JPEG")
        out = _decode([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], torch.device("cuda"))
        return tuple(out[0].shape) == (3, 16, 16)
    except Exception:
        return False


def _decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """decode_jpeg of a batch to RGB uint8 (3, H, W) tensors on `device`."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs in favour of TorchCodec, which has no batched nvJPEG
        # decode of images yet; 0.26 (the GPU machine's) and 0.29 both have this one.
        warnings.simplefilter("ignore", DeprecationWarning)
        out = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return list(out)


def orient(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation to a (C, H, W) tensor, as PIL's ImageOps.exif_transpose does."""
    if orientation == 2:
        return x.flip(-1)
    if orientation == 3:
        return x.flip(-2, -1)
    if orientation == 4:
        return x.flip(-2)
    if orientation == 5:
        return x.transpose(-2, -1)
    if orientation == 6:
        return x.transpose(-2, -1).flip(-1)
    if orientation == 7:
        return x.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return x.transpose(-2, -1).flip(-2)
    return x


class TensorPreprocess:
    """Decoded uint8 (3, H, W) pixels on any device -> the model's normalised float32 (3, S, S) input."""

    def __init__(self, pre: Preprocessor, device: torch.device | str = "cpu") -> None:
        self.size = pre.image_size
        std = torch.tensor(pre.std, dtype=torch.float64)[:, None, None]
        self.scale = (1.0 / (255.0 * std)).to(torch.float32).to(device)
        self.shift = (torch.tensor(pre.mean, dtype=torch.float64)[:, None, None] / std).to(torch.float32).to(device)

    def __call__(self, pixels: torch.Tensor, orientation: int = 1) -> torch.Tensor:
        height, width = pixels.shape[-2:]  # as stored, before orientation
        oriented = (height, width) if orientation in _SWAPS_AXES else (width, height)
        left, top, right, bottom = _unorient_box(centre_crop(*oriented), orientation, width, height)
        x = pixels[:, top:bottom, left:right].unsqueeze(0).float()  # (1, 3, side, side)
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
            x = x.round_().clamp_(0, 255)  # PIL's resize gives 8-bit pixels
        return orient(x[0], orientation).mul_(self.scale).sub_(self.shift)


@dataclass(slots=True)
class _Read:
    """A file read by a thread: its bytes (None: it goes to the fallback), hash and header metadata."""

    data: torch.Tensor | None
    digest: bytes | None = None
    info: dict[str, Any] | None = None


class TensorDecoder:
    """Decode JPEGs in batches on `device` (see the module docstring); other files go to `fallback`.

    `run` yields (job, Loaded) like the CPU decoder, with pixels as float32 (3, S, S) tensors on `device`.
    `decoded` and `fell_back` count the files that went each way.
    """

    def __init__(self, pre: Preprocessor, device: torch.device | str, fallback: _Fallback,
                 max_pixels: int | None, batch: int = 64, threads: int | None = None, ahead: int = 3) -> None:  # fmt: skip
        self.device = torch.device(device)
        self.pre, self.fallback, self.max_pixels = pre, fallback, max_pixels
        self.batch, self.ahead = max(1, batch), max(1, ahead)
        self.threads = threads or min(16, (os.cpu_count() or 2) * 2)
        self.prep = TensorPreprocess(pre, self.device)
        self.pin = self.device.type == "cuda"
        self.decoded = 0
        self.fell_back = 0
        # a fallback batch waits for this many files, so the CPU workers get whole chunks to share
        self.fallback_batch = max(self.batch, 64)

    def _read(self, path: str) -> _Read:
        """Read, hash and parse one file's header (runs in a thread); `data` None sends it to the fallback."""
        if media.kind_of(path) != media.PHOTO:
            return _Read(None)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    return _Read(None)
                buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
                view = memoryview(buf.numpy())
                if f.readinto(view) != size or f.read(1):  # the file changed while being read
                    return _Read(None)
        except OSError:
            return _Read(None)
        header = _header_end(view)
        if header is None:
            return _Read(None)
        try:  # PIL reads the header only: give it those bytes, not a copy of the whole file
            info = image_info(io.BytesIO(view[: header + 64]))
        except Exception:  # the CPU path records what is wrong with it
            return _Read(None)
        if self.max_pixels is not None and info["width"] * info["height"] > self.max_pixels:
            return _Read(None)
        return _Read(buf, file_hash(view), info)

    def run(self, jobs: Sequence[J]) -> Iterator[tuple[J, Loaded]]:
        """Yield (job, Loaded) for every job: tensor-path files batch by batch, the others through the fallback.

        A producer thread reads (with its pool of reader threads), decodes and preprocesses up to QUEUED batches
        ahead, so on a GPU decoding overlaps the model and the commits that the caller runs between batches; the
        fallback (the CPU workers) runs in the caller's thread.
        """
        batches = [list(jobs[i : i + self.batch]) for i in range(0, len(jobs), self.batch)]
        ready: queue.Queue[Any] = queue.Queue(maxsize=QUEUED)
        stop = threading.Event()
        producer = threading.Thread(target=self._produce, args=(batches, ready, stop), name="ruclip-tensor-decode",
                                    daemon=True)  # fmt: skip
        producer.start()
        fallback: list[J] = []
        try:
            while (item := _signals.get(ready)) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                done, refused = item
                yield from done
                fallback += refused
                if len(fallback) >= self.fallback_batch:
                    yield from self._fall_back(fallback)
                    fallback = []
        finally:
            stop.set()
            while producer.is_alive():  # unblock a producer waiting for room, until it sees `stop`
                with contextlib.suppress(queue.Empty), _signals.held():
                    ready.get(timeout=0.1)
            producer.join()
        if fallback:
            yield from self._fall_back(fallback)

    def _produce(self, batches: list[list[J]], ready: queue.Queue[Any], stop: threading.Event) -> None:
        """The producer thread: ([(job, Loaded)], [refused job]) per batch into `ready`, then _DONE (or the error)."""
        try:
            with ThreadPoolExecutor(self.threads, thread_name_prefix="ruclip-read") as pool:
                pending: deque[tuple[list[J], list[Future[_Read]]]] = deque()
                nxt = 0
                try:
                    while (nxt < len(batches) or pending) and not stop.is_set():
                        while nxt < len(batches) and len(pending) < self.ahead:
                            pending.append((batches[nxt], [pool.submit(self._read, j.path) for j in batches[nxt]]))
                            nxt += 1
                        batch, futures = pending.popleft()
                        item = self._batch(batch, [f.result() for f in futures])
                        if self.device.type == "cuda":
                            torch.cuda.current_stream(self.device).synchronize()  # the caller's clock sees it done
                        while not stop.is_set():
                            try:
                                ready.put(item, timeout=0.1)
                                break
                            except queue.Full:
                                continue
                finally:
                    for _, futures in pending:
                        for f in futures:
                            f.cancel()
        except BaseException as e:  # handed to the caller, which raises it
            ready.put(e)
        ready.put(_DONE)

    def _fall_back(self, jobs: list[J]) -> Iterable[tuple[J, Loaded]]:
        self.fell_back += len(jobs)
        return self.fallback.run(jobs)

    def _batch(self, batch: list[J], reads: list[_Read]) -> tuple[list[tuple[J, Loaded]], list[J]]:
        """Decode and preprocess one batch's JPEGs: ([(job, Loaded)], [jobs for the fallback])."""
        take = [(job, r) for job, r in zip(batch, reads, strict=True) if r.data is not None]
        refused = [job for job, r in zip(batch, reads, strict=True) if r.data is None]
        done: list[tuple[J, Loaded]] = []
        if not take:
            return done, refused
        try:
            images: list[torch.Tensor | None] = list(_decode([r.data for _, r in take], self.device))
        except Exception:  # one file the decoder refuses fails the batch: find it, decode the others
            images = [self._decode_one(r.data) for _, r in take]
        for (job, r), image in zip(take, images, strict=True):
            if image is None:
                refused.append(job)
                continue
            assert r.info is not None
            try:
                pixels = self.prep(image, r.info["orientation"])
            except Exception:
                refused.append(job)
                continue
            self.decoded += 1
            done.append((job, Loaded(pixels, r.digest, _meta(r.info), None)))  # type: ignore[arg-type]
        return done, refused

    def _decode_one(self, data: torch.Tensor | None) -> torch.Tensor | None:
        try:
            return _decode([data], self.device)[0]  # type: ignore[list-item]
        except Exception:
            return None
