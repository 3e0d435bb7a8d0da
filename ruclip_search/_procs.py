"""Helper processes die with the process that started them, however it dies (even `kill -9`).

The decoding pool runs on multiprocessing's forkserver: the builder starts the forkserver, the forkserver
forks the workers. Left alone, a killed builder leaves them all running for ever: every worker holds a
copy of the forkserver's "alive" pipe (so the forkserver never sees the builder go) and of its task queue
(so it never sees end-of-file either). Two layers make them exit:

* Linux: the parent-death signal, `prctl(PR_SET_PDEATHSIG, SIGKILL)`. It fires when the *thread* that
  forked the child exits, so each process arms it against its own parent: the forkserver against the
  builder (this module is the first in the forkserver's preload list and arms it on import), each worker
  against the forkserver (an at-fork hook registered in the forkserver, so it runs before any worker
  code). The builder dies -> the kernel kills the forkserver -> the kernel kills the workers. After
  arming, each checks that its parent is still the expected one: if it died before the signal was armed,
  no signal will ever come, so it exits at once.
* Everywhere else (and as a second line on Linux): workers close their copy of the alive pipe, so the
  forkserver's own check (end-of-file when every client is gone) works and it exits with the builder;
  where prctl is missing a watchdog thread in each worker exits when its parent pid changes (the
  forkserver died and the worker was re-parented). A thread, not a signal, because nothing else tells a
  process portably that its parent died; polling getppid() costs nothing, and a thread is started only
  in workers, never in the forkserver, which must stay single-threaded to fork safely.

The resource tracker (multiprocessing's own helper) exits by itself once the builder and the workers,
which hold its pipe, are gone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import sys
import threading
import time
from typing import Any

_PR_SET_PDEATHSIG = 1
#: Set (to the builder's pid) only while the builder starts the forkserver; tells it whom to die with.
PARENT_ENV = "RUCLIP_SEARCH_FORKSERVER_PARENT"
WATCHDOG_INTERVAL_S = 0.5

_armed = False  # this process already dies with its parent (set in workers by the at-fork hook)


def _pdeathsig() -> bool:
    """Arm SIGKILL on parent death for this process; False where prctl is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _die_with_parent(expected_ppid: int | None) -> bool:
    """Arm the parent-death signal; exit now if the parent is already gone. False when prctl is missing."""
    if not _pdeathsig():
        return False
    if expected_ppid is not None and os.getppid() != expected_ppid:
        os._exit(1)  # the parent died before the signal was armed: it will never come
    return True


def _watch_parent(ppid: int) -> None:
    """Exit when re-parented (the parent died). For systems without the parent-death signal."""

    def watch() -> None:
        while os.getppid() == ppid:
            time.sleep(WATCHDOG_INTERVAL_S)
        os._exit(1)

    threading.Thread(target=watch, name="ruclip-search parent watchdog", daemon=True).start()


def _in_forkserver() -> bool:
    """True while multiprocessing's forkserver main() imports its preload modules (this process)."""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code is multiprocessing.forkserver.main.__code__:
            return True
        frame = frame.f_back
    return False


def _on_fork_in_forkserver(forkserver_pid: int) -> None:
    """In a new worker, right after the forkserver forked it: die with the forkserver."""
    global _armed
    _armed = _die_with_parent(forkserver_pid)


def _init_forkserver() -> None:
    # Ctrl-C reaches the whole process group; the builder handles it and shuts the pool down. The
    # forkserver ignores SIGINT itself only after its preload, and its workers restore the handler it
    # had before: ignoring it here, first, covers the preload and every worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.environ.pop(PARENT_ENV, None)
    if parent is not None:
        _die_with_parent(int(parent))
    me = os.getpid()
    os.register_at_fork(after_in_child=lambda: _on_fork_in_forkserver(me))


def worker_init() -> None:
    """Pool initializer: ignore Ctrl-C, and make sure this worker exits with its parent (see the module doc)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The alive pipe is only for starting processes, which workers never do; closing our copy lets the
    # forkserver notice that the builder is gone.
    server: Any = getattr(multiprocessing.forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if isinstance(fd, int):
        try:
            os.close(fd)
        except OSError:
            pass
        server._forkserver_alive_fd = None
    if not _armed and not _die_with_parent(None):
        _watch_parent(os.getppid())


def start_forkserver() -> None:
    """Start the forkserver (if not yet running) from this thread, so that it dies with this process.

    The parent-death signal fires when the starting *thread* exits: it is armed only when that is the
    main thread, which lives as long as the process; a forkserver started from another thread relies on
    the alive pipe instead.
    """
    if threading.current_thread() is threading.main_thread():
        os.environ[PARENT_ENV] = str(os.getpid())
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        os.environ.pop(PARENT_ENV, None)


if _in_forkserver():
    _init_forkserver()
