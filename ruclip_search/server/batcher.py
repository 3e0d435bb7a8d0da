"""Concurrent PUT (by embedding) and DELETE requests of one index, committed together from the event loop.

A request hands its write to the index's batcher and awaits it; while one group commits in the batcher's
single writer thread, the next requests queue up and go in the following group. One thread hop and one
transaction per group, not per request: under load, the thread hand-offs of a request-per-thread design
cost more CPU than the writes themselves, and the searches running beside them paid for it.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..defaults import WRITE_BATCH


class WriteBatcher:
    """Per served index: `await put(...)` / `await remove(...)` return once the write is committed and
    searchable (or raise its own error); groups of at most WRITE_BATCH requests."""

    def __init__(self, index: Any) -> None:
        self._index = index
        self._pending: list[tuple[tuple[list[dict[str, Any]], list[str]], asyncio.Future[Any]]] = []
        self._running = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ruclip-writer")
        self.groups = 0  # commits run (statistics: requests per group says how much was combined)
        self.requests = 0

    async def put(self, item: dict[str, Any]) -> Any:
        """Add or replace one photo (a dict of `Index.add`'s arguments); its Hit."""
        hits, _ = await self._submit([item], [])
        return hits[0]

    async def remove(self, key: str) -> bool:
        """Remove one photo by key; whether it was there."""
        _, removed = await self._submit([], [key])
        return removed > 0

    async def _submit(self, items: list[dict[str, Any]], keys: list[str]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append(((items, keys), future))
        self.requests += 1
        if not self._running:
            self._running = True
            loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                group, self._pending = self._pending[:WRITE_BATCH], self._pending[WRITE_BATCH:]
                self.groups += 1
                try:
                    results = await loop.run_in_executor(self._executor, self._index.write_many, [r for r, _ in group])
                except BaseException as e:  # noqa: BLE001 - a storage failure: every request of the group hears it
                    results = [e] * len(group)
                for (_, future), result in zip(group, results, strict=True):
                    if future.cancelled():  # the client went away; the write stands (it was committed)
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._running = False

    def close(self) -> None:
        self._executor.shutdown(wait=True)


__all__ = ["WriteBatcher"]
