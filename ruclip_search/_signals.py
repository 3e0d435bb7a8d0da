"""Ctrl-C and SIGTERM held back while the main thread is inside a pool's or a queue's locks.

Python runs a signal handler in the main thread between two bytecodes, and the handlers that stop a build
raise (KeyboardInterrupt, the CLI's SIGTERM subclass of it). Raised inside `concurrent.futures` or `queue`
code just after a `with lock:` took its lock, the exception leaves that lock held for ever (a `with` is not
atomic against asynchronous exceptions), and the pool's manager thread then blocks on it: the build hangs in
its clean-up instead of stopping (seen once in test_cli_build_stops_cleanly[sigterm]: the manager thread
stuck in the idle-worker semaphore that `submit` had entered). No library guards against this, so the few
calls into those locks are made inside `held()`, which records the signal and re-delivers it to the original
handler once the call has returned, outside every lock. Waits are cut into short slices (`wait`), so a held
signal stops a build within a tenth of a second.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, TimeoutError
from typing import Any, TypeVar

T = TypeVar("T")
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SLICE_S = 0.1  # longest a held Ctrl-C waits while `wait` blocks


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Delay SIGINT/SIGTERM handlers that are Python functions until the block has run; no-op off the main
    thread (signal handlers only ever run in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    saved: dict[int, Any] = {}

    def record(signum: int, frame: Any) -> None:
        caught.append(signum)

    try:
        for sig in _SIGNALS:
            if callable(signal.getsignal(sig)):  # SIG_DFL/SIG_IGN raise nothing in Python: leave them
                saved[sig] = signal.signal(sig, record)
        yield
    finally:
        failed: BaseException | None = None
        for sig, old in saved.items():  # restore every one, even if a signal arrives in between
            try:
                signal.signal(sig, old)
            except BaseException as e:  # noqa: BLE001 - the handler restored a moment ago raised: finish first
                signal.signal(sig, old)
                failed = failed or e
        if failed is not None:
            raise failed
        for sig in dict.fromkeys(caught):  # each signal once, in the order they came
            saved[sig](sig, None)


def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` with Ctrl-C and SIGTERM held until it returns (for calls that do not block)."""
    with held():
        return fn(*args, **kwargs)


def _sliced(block: Callable[[float], T], timed_out: type[BaseException]) -> T:
    """`block(SLICE_S)` in held slices until it returns without `timed_out`: Ctrl-C stops the wait promptly."""
    while True:
        with held():
            try:
                return block(SLICE_S)
            except timed_out:
                pass


def wait(future: Future[T]) -> T:
    """`future.result()`, waited for in short held slices."""
    return _sliced(lambda t: future.result(timeout=t), TimeoutError)


def get(q: queue.Queue[T]) -> T:
    """`q.get()`, waited for in short held slices (a queue's lock is as exposed as a pool's)."""
    return _sliced(lambda t: q.get(timeout=t), queue.Empty)
