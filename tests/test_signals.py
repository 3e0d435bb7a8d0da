"""Ctrl-C and SIGTERM held back inside pool calls, then delivered (ruclip_search._signals)."""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from ruclip_search import _signals


class Stop(Exception):
    pass


@pytest.fixture
def raising_sigterm() -> Iterator[list[str]]:
    """A SIGTERM handler that raises, as the CLI's does; yields a log of where it ran."""
    log: list[str] = []

    def handler(signum: int, frame: object) -> None:
        log.append("handler")
        raise Stop

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield log
    finally:
        signal.signal(signal.SIGTERM, old)


def test_signal_inside_held_is_delivered_after_the_block(raising_sigterm: list[str]) -> None:
    with pytest.raises(Stop), _signals.held():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # several bytecode boundaries: the original handler would have raised here
        raising_sigterm.append("block finished")
    assert raising_sigterm == ["block finished", "handler"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # both handlers are back
    with pytest.raises(Stop):  # and a signal after the block raises at once, as before
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)


def test_ctrl_c_stops_a_wait_promptly_and_leaves_the_pool_usable() -> None:
    with ThreadPoolExecutor(1) as pool:
        slow: Future[None] = pool.submit(time.sleep, 2)
        timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            _signals.wait(slow)
        assert time.monotonic() - t0 < 0.2 + 3 * _signals.SLICE_S
        assert _signals.wait(pool.submit(lambda: 7)) == 7  # no lock of the pool was left held


def test_get_returns_items_and_off_main_thread_held_is_a_no_op() -> None:
    q: queue.Queue[int] = queue.Queue()
    threading.Timer(0.15, q.put, (3,)).start()
    assert _signals.get(q) == 3
    seen: list[object] = []

    def off_main() -> None:
        with _signals.held():
            seen.append(signal.getsignal(signal.SIGINT))

    t = threading.Thread(target=off_main)
    t.start()
    t.join()
    assert seen == [signal.default_int_handler]
