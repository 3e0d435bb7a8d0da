"""Process-wide thread pools, made on first use: one per purpose, shared by every index and store of the process
(a pool per object would multiply threads on a server that opens several indexes)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

_POOLS: dict[str, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()


def shared_pool(name: str, workers: int) -> ThreadPoolExecutor:
    """The pool named `name` (its threads are named after it): `workers` threads, made on the first call."""
    with _LOCK:
        pool = _POOLS.get(name)
        if pool is None:
            pool = _POOLS[name] = ThreadPoolExecutor(workers, thread_name_prefix=name)
        return pool
