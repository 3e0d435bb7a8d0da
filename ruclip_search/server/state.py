"""`ServerState`: everything one app serves, built once by `create_app` and read by routes through a dependency.

It lives in `app.state.server`; `get_state` hands it to the routes, so no route closes over `create_app`'s
locals and tests can look at (or adjust) what an app holds.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request

from ..defaults import DECODE_SLOTS, MAX_PIXELS
from ..encoder import ModelCache
from ..errors import IndexNotFoundError
from .batcher import WriteBatcher
from .thumbnails import ThumbCache

log = logging.getLogger("ruclip_search.server")


class Served:
    """One index plus its refresh throttle; only one request at a time pays for a refresh check."""

    def __init__(self, name: str, index: Any, interval: float, owned: bool, default: bool) -> None:
        self.name, self.index, self.interval, self.owned, self.default = name, index, interval, owned, default
        self.url_suffix = "" if default else f"?index={name}"  # hits of other indexes name theirs in their URLs
        self._next = 0.0
        self._lock = threading.Lock()
        self._writes: WriteBatcher | None = None
        self.writer: Any = None  # the WriterProcess committing this index's fast-path writes (None: in-process)

    @property
    def writes(self) -> WriteBatcher:
        """The batcher that commits this index's concurrent API writes together (made on first use)."""
        if self._writes is None:
            self._writes = WriteBatcher(self.index)
        return self._writes

    def close(self) -> None:
        """Finish pending writes; close the index if this app opened it."""
        if self.writer is not None:
            self.writer.close()
        if self._writes is not None:
            self._writes.close()
        if self.owned:
            self.index.close()

    def refresh_due(self) -> bool:
        """Whether `maybe_refresh` would look for a new version now (cheap: no I/O)."""
        return time.monotonic() >= self._next

    def maybe_refresh(self) -> None:
        """Pick up a finished build (at most every `interval` seconds; a failed check keeps the old version)."""
        now = time.monotonic()
        if now < self._next or not self._lock.acquire(blocking=False):
            return
        try:
            self._next = now + self.interval
            if self.index.refresh():
                log.info("index %s: now serving version %s", self.name, self.index.version)
        except Exception:  # a build may be mid-way: keep serving the version we have
            log.warning("index %s: refresh failed, still serving version %s", self.name, self.index.version,
                        exc_info=True)  # fmt: skip
        finally:
            self._lock.release()


@dataclass(eq=False)
class ServerState:
    """The served indexes (first = default), limits, tokens, caches and the bounds on concurrent work."""

    served: dict[str, Served]
    models: ModelCache
    thumbs: ThumbCache
    token: str | None
    max_upload_bytes: int
    max_pixels: int  # uploads
    write_token: str | None = None  # None: the indexes are open read-only and every write answers 403
    allow_roots: tuple[Path, ...] = ()  # resolved folders whose files PUT /photos may name by path
    # Model and FAISS work uses all cores by itself: more concurrent queries than cores only thrash. With writes
    # enabled one core is left to the writer thread and the event loop that answer PUT/DELETE (None: that rule).
    # Measured at 1M photos on 2 cores, 4 writers beside 4 searchers, all flat out: with 2 search slots the
    # searches took the CPU and writes reached 119-164/s (5 runs); with 1, 225, 289 and 154/s (3 runs).
    search_slots: int | None = None
    # Writes committed by a writer process per index (niceness defaults.WRITER_NICE) instead of this process's thread:
    # the searches then keep every core (see server/writer.py).
    writer_process: bool = False
    busy: threading.BoundedSemaphore = field(init=False)
    # Decoding an image (a thumbnail's original, an upload) can allocate width x height x 3 bytes, so it runs
    # under its own small bound: with FastAPI's 40 worker threads, unbounded thumbnail requests for huge
    # PNGs could hold 40 full-size images at once. The thumbnail cap is the indexer's (MAX_PIXELS), not the
    # upload cap: every image the index accepted keeps its thumbnail, and the bound keeps the worst case
    # at decode_slots x MAX_PIXELS x 3 bytes (~1.1 GB). JPEGs decode far smaller (draft mode). An image
    # above the cap (only in an index built with a raised --max-pixels) answers 404 image_unreadable.
    decode_slots: int = DECODE_SLOTS
    thumb_max_pixels: int = MAX_PIXELS
    decoding: threading.BoundedSemaphore = field(init=False)

    def __post_init__(self) -> None:
        self.decoding = threading.BoundedSemaphore(max(1, self.decode_slots))
        writes_here = self.write_token if not self.writer_process else None
        self.busy = threading.BoundedSemaphore(max(1, self.search_slots or default_search_slots(writes_here)))
        if self.writer_process and self.write_token is not None:
            from .uploads import MULTIPART_SLACK
            from .writer import WriterProcess, writer_priority

            try:
                nice = writer_priority()
            except BaseException:
                self.close()  # the indexes this app opened
                raise
            for s in self.served.values():
                if s.owned:  # an Index handed in open belongs to the caller (and may be in memory only)
                    s.writer = WriterProcess(s.index, nice, token=self.write_token,
                                             limit=self.max_upload_bytes + MULTIPART_SLACK, name=s.name)  # fmt: skip

    @property
    def default_name(self) -> str:
        return next(iter(self.served))

    def close(self) -> None:
        """Close the indexes this app opened (not those handed in already open)."""
        for s in self.served.values():
            s.close()


def default_search_slots(write_token: str | None) -> int:
    """How many searches run at once: one per core, less one core for the writes when this process commits them."""
    cores = max(1, os.cpu_count() or 1)
    return max(1, cores - 1) if write_token is not None else cores


def open_indexes(
    index_dirs: Sequence[str | os.PathLike[str] | Any], *, model: Any, device: str, models: ModelCache,
    refresh_interval: float, writable: bool = False, db: str | Sequence[str | None] | None = None,
) -> dict[str, Served]:  # fmt: skip
    """Open every folder (already opened `Index` objects are served as given), named uniquely, first default.

    `writable` opens the folders for writes (a server with a write token); read-only otherwise. `db`: the
    PostgreSQL URL of the only folder's index, or one URL (or None: SQLite) per folder.

    All indexes get their text model from `models`, so indexes of one model share one loaded text tower.
    Opening fails here for a missing or unbuilt index (IndexNotFoundError), and closes what it had opened.
    """
    from ..search import Index

    if not index_dirs:
        raise IndexNotFoundError("No index to serve: pass at least one --index DIR.")
    dbs = _dbs(db, len(index_dirs))
    opened: list[tuple[Any, bool]] = []
    try:
        for item, url in zip(index_dirs, dbs, strict=True):
            if isinstance(item, (str, os.PathLike)):
                index = Index.open(item, writable=writable, model=model, device=device, models=models, db=url)
                opened.append((index, True))
            else:
                opened.append((item, False))
    except BaseException:
        for idx, owned in opened:
            if owned:
                idx.close()
        raise
    names = _unique_names([idx for idx, _ in opened])
    return {
        name: Served(name, idx, refresh_interval, owned, default=i == 0)
        for i, (name, (idx, owned)) in enumerate(zip(names, opened, strict=True))
    }


def _dbs(db: str | Sequence[str | None] | None, n: int) -> list[str | None]:
    """One database URL (or None: SQLite) per served folder; IndexNotFoundError when they do not pair up."""
    if db is None or isinstance(db, str):
        if db is not None and n > 1:
            raise IndexNotFoundError(f"One --db for {n} indexes: give one --db per --index (one database per index).")
        return [db] * n
    if len(db) != n:
        raise IndexNotFoundError(f"{len(db)} --db for {n} --index: give one --db per --index, in the same order.")
    return list(db)


def _unique_names(indexes: Sequence[Any]) -> list[str]:
    names: list[str] = []
    for idx in indexes:
        base = str(getattr(idx, "name", "") or "index")
        name, n = base, 2
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.append(name)
    return names


async def get_state(request: Request) -> ServerState:
    """FastAPI dependency: the app's ServerState."""
    return request.app.state.server


__all__ = ["ServerState", "Served", "get_state", "open_indexes"]
