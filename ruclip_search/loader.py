"""Read, hash, decode and preprocess files in worker processes ahead of the model.

`load_one` turns one path into a `Loaded` (pixels and metadata, or the reason it failed): a photo by `decode`, a
camera RAW by `raw`, a video (several frames) by `video`, each RAW or video under a decode deadline; `_Decoder` runs it
over many files in a process pool, several chunks ahead of the consumer, and pins a file that kills its
worker on that file instead of stopping the build.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from . import _procs, _signals, defaults, media
from .errors import ImageError, RuclipSearchError

CHUNK = 8  # files per worker task: small enough to balance load and to isolate a crashing file cheaply
WORKER_DIED = "worker process died while decoding this file (crash or out of memory)"
MAIN_GUARD_HINT = (
    "decoding workers import the script that calls build(), which then runs build() again in each of them: "
    'put the call under `if __name__ == "__main__":`'
)


@dataclass(frozen=True, slots=True)
class FileMeta:  # what the header/EXIF says; field names equal the store's image columns
    width: int | None = None
    height: int | None = None
    format: str | None = None
    taken_at: str | None = None  # ISO 8601
    camera_make: str | None = None
    camera_model: str | None = None


@dataclass(frozen=True, slots=True)
class Loaded:
    """What a worker made of one file: pixels and metadata, or the reason it failed."""

    pixels: np.ndarray | None  # (3, H, W) float32, None when the file failed; a video's: (N, 3, H, W)
    content_hash: bytes | None
    meta: FileMeta | None
    error: str | None
    frame_times: tuple[float, ...] | None = None  # a video: the time (s) of each of its N frames
    duration: float | None = None  # a video's length (s)


#: A loader: (preprocessor, path, max_pixels) -> Loaded. Must be a module-level function (it is pickled
#: by reference into the worker processes).
Loader = Callable[[Any, str, "int | None"], Loaded]


#: Files above this size (videos, in practice) are hashed on their size and three 4 MiB samples (start, middle,
#: end) instead of every byte: reading an hour of 4K (~20 GB) to recognise a move would cost minutes.
SAMPLED_HASH_ABOVE = 64 * 1024 * 1024
_SAMPLE = 4 * 1024 * 1024


def file_hash(data: bytes) -> bytes:
    """Content hash used to recognise moves, renames and duplicates (the same as `hash_file` of that file)."""
    if len(data) > SAMPLED_HASH_ABOVE:
        mid = (len(data) - _SAMPLE) // 2
        return _sampled([data[:_SAMPLE], data[mid : mid + _SAMPLE], data[-_SAMPLE:]], len(data))
    return hashlib.blake2b(data, digest_size=16).digest()


def _sampled(parts: list[bytes], size: int) -> bytes:
    h = hashlib.blake2b(size.to_bytes(8, "little"), digest_size=16, person=b"sampled")
    for part in parts:
        h.update(part)
    return h.digest()


def hash_file(path: str) -> bytes | None:
    """Content hash of a file, read in chunks (memory stays small), or None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > SAMPLED_HASH_ABOVE:
                parts = []
                for offset in (0, (size - _SAMPLE) // 2, size - _SAMPLE):
                    f.seek(offset)
                    parts.append(f.read(_SAMPLE))
                return _sampled(parts, size)
            h = hashlib.blake2b(digest_size=16)
            while chunk := f.read(1 << 20):
                h.update(chunk)
            return h.digest()
    except OSError:
        return None


def _failed(reason: str, digest: bytes | None = None) -> Loaded:
    return Loaded(None, digest, None, reason)


def _meta(info: dict[str, Any]) -> FileMeta:
    taken = info.get("taken_at")
    return FileMeta(
        width=info.get("width"),
        height=info.get("height"),
        format=info.get("format"),
        taken_at=taken.isoformat() if hasattr(taken, "isoformat") else taken,
        camera_make=info.get("camera_make"),
        camera_model=info.get("camera_model"),
    )


def load_video(preprocessor: Any, path: str, max_pixels: int | None) -> Loaded:
    """Sample, hash and preprocess one video's frames (the file is never read whole); never raises."""
    from . import video

    digest = hash_file(path)
    if digest is None:
        return _failed("file vanished before it could be read" if not os.path.exists(path) else "cannot read")
    try:
        with media.deadline(defaults.DECODE_TIMEOUT, "decoding this video"):
            size = round(1.5 * preprocessor.image_size)  # as the JPEG draft: the resize still antialiases
            frames, info = video.sample_frames(path, short_side=size)
            pixels = np.stack([preprocessor(image).numpy() for _, image in frames])
    except ImageError as e:
        return _failed(str(e) or "cannot decode video", digest)
    except Exception as e:
        return _failed(f"cannot decode video: {type(e).__name__}: {e}", digest)
    times = tuple(t for t, _ in frames)
    return Loaded(pixels, digest, _meta(info), None, frame_times=times, duration=info.get("duration"))


def load_one(preprocessor: Any, path: str, max_pixels: int | None) -> Loaded:
    """Read, hash, decode and preprocess one file; never raises for a bad file (the reason is in `error`)."""
    kind = media.kind_of(path)
    if kind == media.VIDEO:
        return load_video(preprocessor, path, max_pixels)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return _failed("file vanished before it could be read")
    except PermissionError:
        return _failed("permission denied")
    except OSError as e:
        return _failed(f"cannot read: {e.strerror or e}")
    digest = file_hash(data)
    if not data:
        return _failed("empty file (0 bytes)", digest)
    try:
        if kind == media.RAW:
            from .raw import decode_raw

            fmt = os.path.splitext(path)[1].lstrip(".").upper() or "RAW"
            with media.deadline(defaults.DECODE_TIMEOUT, "decoding this RAW file"):
                image, info = decode_raw(data, min_side=preprocessor.image_size, fmt=fmt, max_pixels=max_pixels)
                tensor = preprocessor(image)
        else:
            tensor, info = preprocessor.load_with_info(io.BytesIO(data), max_pixels=max_pixels)
    except ImageError as e:
        return _failed(str(e) or "cannot decode", digest)
    except Exception as e:  # a decoder bug must not stop the build either
        return _failed(f"cannot decode: {type(e).__name__}: {e}", digest)
    return Loaded(tensor.numpy(), digest, _meta(info), None)


# -- worker side -------------------------------------------------------------------------------------
def _worker_init() -> None:
    _procs.worker_init()  # ignore Ctrl-C (the builder handles it); exit when the builder dies
    media.enable_hard_deadline()  # a decode stuck in C code past its deadline kills this worker, not the build
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


def _noop() -> None:
    """A task that touches no file: proves a new worker process can start."""


def _load_chunk(loader: Loader, preprocessor: Any, max_pixels: int | None, paths: list[str]) -> list[Loaded]:
    return [loader(preprocessor, p, max_pixels) for p in paths]


# -- parent side -------------------------------------------------------------------------------------
class _HasPath(Protocol):
    path: str


J = TypeVar("J", bound=_HasPath)


class _Decoder:
    """Decodes jobs in a process pool, several chunks ahead; isolates files that kill a worker.

    `loader` does the work for one file (default `load_one`); tests pass a module-level function that
    misbehaves on purpose, so production code carries no test hooks.
    """

    def __init__(
        self, preprocessor: Any, max_pixels: int | None, workers: int, ahead: int = 0, loader: Loader = load_one
    ) -> None:
        self.pre, self.max_pixels, self.workers, self.loader = preprocessor, max_pixels, workers, loader
        # chunks in flight: enough to fill a whole model batch while the previous one encodes
        self.depth = max(2 * workers, -(-ahead // CHUNK) + workers)
        self.pool: ProcessPoolExecutor | None = None
        self._probe: Future | None = None

    def prestart(self) -> None:
        """Start the worker processes now (they need no model), so they boot while the model loads."""
        if self.workers > 0 and self.pool is None:
            with _signals.held():
                self.pool = self._new_pool()
                self._probe = self.pool.submit(_noop)

    def _check_started(self) -> None:
        """A pool whose workers cannot run a no-op cannot start: fatal, not a bad file."""
        if self._probe is None:
            return
        try:
            _signals.wait(self._probe)
        except BrokenProcessPool as e:
            self.close()
            raise RuclipSearchError(MAIN_GUARD_HINT + " (or worker processes cannot start on this machine)") from e
        finally:
            self._probe = None

    def _new_pool(self) -> ProcessPoolExecutor:
        ctx = multiprocessing.get_context("forkserver")
        # _procs first: on import in the forkserver it ties the forkserver and its workers to our lifetime
        ctx.set_forkserver_preload(["ruclip_search._procs", "ruclip_search.preprocess", "ruclip_search.decode"])
        _procs.start_forkserver()
        return ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_worker_init)

    def _restart(self) -> None:
        with _signals.held():
            if self.pool is not None:
                self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._new_pool()

    def close(self) -> None:
        """Cancel queued chunks, let running ones finish, and wait for the workers to exit.

        Interrupted (Ctrl-C, SIGTERM, an error), this waits for at most one chunk per worker: killing them
        instead can cut a result message in half, and then the pool's manager thread waits for the rest of
        it for ever (seen in test_cli_build_stops_cleanly).
        """
        if self.pool is not None:
            with _signals.held():  # a second Ctrl-C comes after the clean-up, not inside the pool's locks
                self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def _submit(self, paths: list[str]) -> Future:
        assert self.pool is not None
        return _signals.call(self.pool.submit, _load_chunk, self.loader, self.pre, self.max_pixels, paths)

    def run(self, jobs: Sequence[J]) -> Iterable[tuple[J, Loaded]]:
        """Yield (job, Loaded) in job order; at most self.depth chunks in flight."""
        if self.workers <= 0:
            for job in jobs:
                yield job, self.loader(self.pre, job.path, self.max_pixels)
            return
        chunks = [list(jobs[i : i + CHUNK]) for i in range(0, len(jobs), CHUNK)]
        depth = self.depth
        pending: deque[tuple[list[J], Future]] = deque()
        nxt = 0
        self.prestart()
        self._check_started()
        while nxt < len(chunks) or pending:
            while nxt < len(chunks) and len(pending) < depth:
                chunk = chunks[nxt]
                pending.append((chunk, self._submit([j.path for j in chunk])))
                nxt += 1
            chunk, fut = pending.popleft()
            try:
                results = _signals.wait(fut)
            except BrokenProcessPool:
                suspects = [chunk] + [c for c, _ in pending]
                pending.clear()
                self._restart()
                for c in suspects:
                    yield from self._isolate(c)
                continue
            yield from zip(chunk, results, strict=True)

    def _isolate(self, chunk: list[J]) -> Iterable[tuple[J, Loaded]]:
        """Decode one file at a time so a worker death is pinned on the file that caused it."""
        for job in chunk:
            try:
                result = _signals.wait(self._submit([job.path]))[0]
            except BrokenProcessPool:
                self._restart()
                result = _failed(WORKER_DIED)
            yield job, result
