"""`Watcher`: keep an index in step with photo folders while files appear, change, move and go.

A watchdog observer collects the changed paths; a path is indexed once its size and mtime have stayed the same
for `settle` seconds (a file still being copied or written is never indexed half-way: every event and every
change seen by the settle check restarts its clock). Paths that settle together go in one batch, committed
through `indexer.sync_paths` (build's own diff, content-hash, decode and commit path). On start, the observer
is started first and then one incremental build catches up with what changed while nobody watched.

Locking: the index lock is taken per batch (inside sync_paths), never for the watcher's lifetime, so
`ruclip-index build`, `reindex`, `compact` and other writers take turns with it; a batch that finds the index
locked stays pending and is retried every `defaults.WATCH_RETRY` seconds.

FAISS: a batch does not rewrite the FAISS file (`write_index=False`): its rows are logged in the store's change
log, and every open `Index` searches them in its recent segment (other processes within
`defaults.REFRESH_INTERVAL`). The watcher compacts (rewrites the FAISS file, under the lock, via sync_paths)
when it is idle and the file has missed changes for `defaults.WATCH_REINDEX` seconds, or at once when more
than `defaults.SEGMENT_MAX` changes piled up; so a long-running watch keeps readers' segments small even when
no writable Index is open to compact in the background.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

from . import defaults
from .errors import IndexLockedError, IndexNotFoundError, ModelMismatchError, RuclipSearchError
from .indexer import BuildReport, Progress, build, default_batch_size, sync_paths
from .loader import _Decoder
from .media import known_extension

_TICK = 0.05  # how often pending paths are stat'ed while they settle (seconds)


@dataclass(frozen=True)
class WatchEvent:
    """What the watcher did. `kind`: "ready" (caught up, watching now), "batch" (a batch was committed),
    "waiting" (another process holds the index lock: retrying), "error" (a batch failed: retrying)."""

    kind: str
    report: BuildReport | None = None
    paths: int = 0
    #: "batch": seconds from the last change seen of the batch's newest file to its commit (settle included)
    latency_s: float | None = None
    message: str = ""


OnEvent = Callable[[WatchEvent], None]


@dataclass
class _Pending:
    sig: tuple[int, int, int] | None  # (file type, size, mtime_ns); None: missing
    since: float  # monotonic time of the last event for it or change of `sig`


def _signature(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns


def _is_dir(sig: tuple[int, int, int] | None) -> bool:
    return sig is not None and sig[0] == stat.S_IFDIR


class Watcher:
    """Keeps the index `index` in step with the folders `roots` until `stop()`; reports through `on_event`.

    `run()` watches in the calling thread until stopped or interrupted (the CLI); `start()` catches up, then
    watches in a background thread (`serve --watch`). Decoding workers (`workers`, 0: decode in this process)
    are kept running between batches and stopped with the watcher. `write_index`: sync_paths' per-batch FAISS
    policy (default False: searchable through the change log; the watcher compacts when idle).
    """

    def __init__(
        self,
        roots: Sequence[str | os.PathLike[str]],
        index: str | os.PathLike[str],
        model: Any = None,
        *,
        device: str = "auto",
        batch_size: int | None = None,
        workers: int = defaults.WATCH_WORKERS,
        exclude: Iterable[str] = (),
        follow_symlinks: bool = False,
        max_pixels: int | None = defaults.MAX_PIXELS,
        settle: float = defaults.WATCH_SETTLE,
        gather: float = defaults.WATCH_GATHER,
        write_index: bool | None = False,
        on_event: OnEvent | None = None,
        progress: Progress | None = None,
        db: str | None = None,
    ) -> None:
        self.db = db  # the index's PostgreSQL URL (None: SQLite in the index folder)
        self.roots = [os.path.abspath(os.fspath(r)) for r in roots]
        if not self.roots:
            raise RuclipSearchError("No photo folder given: pass at least one PHOTOS_DIR.")
        for root in self.roots:
            if not os.path.isdir(root):
                raise RuclipSearchError(f"No such folder: {root!r}. Check the path and run again.")
        self.index = Path(index)
        self.model_arg, self.device, self.batch_size, self.workers = model, device, batch_size, workers
        self.exclude, self.follow_symlinks, self.max_pixels = tuple(exclude), follow_symlinks, max_pixels
        self.settle, self.gather, self.write_index = settle, gather, write_index
        self.on_event, self.progress = on_event, progress
        self._index_prefix = os.path.abspath(self.index).rstrip(os.sep) + os.sep
        self._pending: dict[str, _Pending] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._observer: Any = None
        self._decoder: _Decoder | None = None
        self._model: Any = None
        self._thread: threading.Thread | None = None
        self._reindex_at: float | None = None  # when to rewrite the FAISS file the batches left stale
        self._unflushed = 0  # changes committed since the FAISS file was last written

    # -- life cycle ----------------------------------------------------------------------------------
    def run(self) -> None:
        """Catch up, then watch in this thread until `stop()` or KeyboardInterrupt (which propagates)."""
        try:
            self._begin()
            self._loop()
        finally:
            self._shutdown()

    def start(self) -> None:
        """Catch up (in this thread), then watch in a background thread; returns once watching."""
        try:
            self._begin()
        except BaseException:
            self._shutdown()
            raise
        self._thread = threading.Thread(target=self._background, name="ruclip-search watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop watching: the batch in progress is finished, the observer and decoding workers are stopped."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def pending(self) -> int:
        """Paths seen changing and not yet committed."""
        with self._cond:
            return len(self._pending)

    def _background(self) -> None:
        try:
            self._loop()
        except Exception as e:  # reported, not raised: nobody would see it in this thread
            self._emit(WatchEvent("error", message=f"stopped watching: {e}"))
        finally:
            self._shutdown()

    def _begin(self) -> None:
        self._model = self._load_model()
        self._start_observer()  # before the catch-up: what changes during it is pending, not lost
        report = build(
            self.roots, index=self.index, model=self._model, device=self.device, batch_size=self.batch_size,
            workers=None if self.workers else 0, exclude=self.exclude, follow_symlinks=self.follow_symlinks,
            max_pixels=self.max_pixels, progress=self.progress, db=self.db,
        )  # fmt: skip
        if self.workers > 0:
            ahead = self.batch_size or default_batch_size(self.device)
            self._decoder = _Decoder(None, self.max_pixels, self.workers, ahead=ahead)
            self._decoder.prestart()
        self._emit(WatchEvent("ready", report=report))

    def _load_model(self) -> Any:
        """The image model, loaded once: the one given, else the index's, else the default."""
        if self.model_arg is not None and not isinstance(self.model_arg, (str, os.PathLike)):
            return self.model_arg
        name = self.model_arg
        if name is None:
            from .store import DB_NAME, Store

            if self.db is not None:
                with contextlib.suppress(IndexNotFoundError), Store.open(self.index, db=self.db) as store:
                    name = store.model_name
            elif (self.index / DB_NAME).exists():
                with Store.open(self.index) as store:
                    name = store.model_name
        from .encoder import load_model

        return load_model(name or defaults.MODEL, device=self.device, parts=("image",))

    def _start_observer(self) -> None:
        observer = Observer()
        handler = _Handler(self)
        for root in self.roots:
            observer.schedule(handler, root, recursive=True)
        observer.start()
        self._observer = observer

    def _shutdown(self) -> None:
        self._stop.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()
            self._observer = None
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None

    def _emit(self, event: WatchEvent) -> None:
        if self.on_event is not None:
            self.on_event(event)

    # -- events --------------------------------------------------------------------------------------
    def note(self, paths: Iterable[str], is_directory: bool = False) -> None:
        """Paths that changed (the observer calls this; so may a caller that knows better)."""
        now = time.monotonic()
        with self._cond:
            for path in paths:
                if not self._wanted(path, is_directory):
                    continue
                entry = self._pending.get(path)
                if entry is None:
                    self._pending[path] = _Pending(_signature(path), now)
                else:
                    entry.since = now
            self._cond.notify_all()

    def _wanted(self, path: str, is_directory: bool) -> bool:
        """Cheap pre-filter: not the index's own files, no hidden names, media extensions (or none) only."""
        if path.startswith(self._index_prefix) or path == self._index_prefix[:-1]:
            return False
        root = next((r for r in self.roots if path == r or path.startswith(r.rstrip(os.sep) + os.sep)), None)
        if root is None:
            return False
        rel = os.path.relpath(path, root) if path != root else ""
        if any(part.startswith(".") for part in rel.split(os.sep) if rel):
            return False
        ext = os.path.splitext(path)[1].lower()
        return is_directory or ext == "" or known_extension(ext)

    # -- batches -------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._next_batch()
            if batch is None:
                return
            self._process(batch)

    def _next_batch(self) -> dict[str, _Pending] | None:
        """Wait until some paths have settled, then take them (and those settling with them); None: stopped.

        An empty dict: nothing pending, and the FAISS file left stale by earlier batches is due a rewrite.
        """
        with self._cond:
            while not self._stop.is_set():
                due = self._reindex_at is not None and time.monotonic() >= self._reindex_at
                if due and (not self._pending or self._unflushed > defaults.SEGMENT_MAX):
                    return {}
                if not self._pending:
                    wait = None if self._reindex_at is None else max(0.0, self._reindex_at - time.monotonic())
                    self._cond.wait(wait)
                    continue
                now = time.monotonic()
                for path, entry in self._pending.items():
                    sig = _signature(path)
                    if sig != entry.sig:
                        entry.sig, entry.since = sig, now
                ready = [p for p, e in self._pending.items() if now - e.since >= self.settle]
                unready = [p for p in self._pending if now - self._pending[p].since < self.settle]
                if unready:  # a folder waits for files still changing below it (its walk would read them)
                    ready = [
                        p
                        for p in ready
                        if not (_is_dir(self._pending[p].sig) and any(u.startswith(p + os.sep) for u in unready))
                    ]
                if ready:
                    first = min(self._pending[p].since for p in ready) + self.settle
                    if not unready or now - first >= self.gather or len(ready) >= defaults.WATCH_MAX_BATCH:
                        return {p: self._pending.pop(p) for p in ready[: defaults.WATCH_MAX_BATCH]}
                self._cond.wait(_TICK)
        return None

    def _process(self, batch: dict[str, _Pending]) -> None:
        write_index = True if not batch else self.write_index
        try:
            report = sync_paths(
                self.index, self.roots, list(batch), model=self._model, device=self.device,
                batch_size=self.batch_size, exclude=self.exclude, follow_symlinks=self.follow_symlinks,
                max_pixels=self.max_pixels, write_index=write_index, decoder=self._decoder, db=self.db,
            )  # fmt: skip
        except ModelMismatchError:
            raise  # the index was rebuilt with another model: this watcher's model can never write to it
        except IndexLockedError as e:
            self._retry(batch, WatchEvent("waiting", paths=len(batch), message=str(e)))
            return
        except (RuclipSearchError, OSError) as e:
            self._retry(batch, WatchEvent("error", paths=len(batch), message=str(e)))
            return
        now = time.monotonic()
        changed = report.added + report.updated + report.moved + report.removed + report.failed
        if not batch or write_index is True:
            self._reindex_at, self._unflushed = None, 0  # the FAISS file is up to date
        elif changed:
            self._unflushed += changed
            if self._reindex_at is None:
                self._reindex_at = now + defaults.WATCH_REINDEX
            if self._unflushed > defaults.SEGMENT_MAX:
                self._reindex_at = now
        if batch:
            latency = now - max(e.since for e in batch.values())
            self._emit(WatchEvent("batch", report=report, paths=len(batch), latency_s=round(latency, 3)))

    def _retry(self, batch: dict[str, _Pending], event: WatchEvent) -> None:
        """Put a failed batch back (still settled, so it goes first next time) and wait a little."""
        with self._cond:
            for path, entry in batch.items():
                self._pending.setdefault(path, entry)
        if not batch:
            self._reindex_at = time.monotonic() + defaults.WATCH_REINDEX
        self._emit(event)
        self._stop.wait(defaults.WATCH_RETRY)


class _Handler(FileSystemEventHandler):
    """Forwards watchdog's events to the watcher as changed paths (both ends of a move)."""

    def __init__(self, watcher: Watcher) -> None:
        super().__init__()
        self.watcher = watcher

    def on_any_event(self, event: Any) -> None:
        kind = event.event_type
        if kind in ("opened", "closed_no_write") or (event.is_directory and kind == "modified"):
            return
        paths = [event.src_path, event.dest_path] if kind == "moved" else [event.src_path]
        self.watcher.note([os.fsdecode(p) for p in paths if p], event.is_directory)
