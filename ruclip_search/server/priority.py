"""The writer process's CPU priority: Linux's SCHED_IDLE, lifted to its niceness while it starves.

Why SCHED_IDLE: a write's CPU costs the searches less by its amount than by when it runs. A search thread that
wakes while the writer holds a core waits, at nice 10, for the writer's time slice to end; a SCHED_IDLE writer
is preempted at once (figures: defaults.WRITER_PRIORITY).

The risk it brings: SCHED_IDLE gets almost no CPU (weight 3 against 1024) while other work keeps every core
busy, so a write could wait as long as the machine stays saturated. So the server runs a guard thread beside
each child: every defaults.WRITER_STARVE_WINDOW it reads the child's run-queue delay (/proc/PID/schedstat);
when the child waited for a core more than defaults.WRITER_STARVED of that time, the guard moves it to
SCHED_OTHER at its niceness for defaults.WRITER_LIFT seconds, then back. Leaving SCHED_IDLE needs CAP_SYS_NICE
or an RLIMIT_NICE that allows the niceness (Docker's default capabilities have neither): where the guard could
not lift the child, the child runs at its niceness alone, as before.
"""

from __future__ import annotations

import logging
import os
import resource
import select
import sys
import threading
import time
from typing import Any

from .. import defaults

log = logging.getLogger("ruclip_search.server")

IDLE = "idle"
_CAP_SYS_NICE = 23


def _has_cap_sys_nice() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_NICE & 1)
    except (OSError, ValueError):
        pass
    return False


def _rlimit_allows(nice: int) -> bool:
    """RLIMIT_NICE's hard limit lets a process of niceness `nice` leave SCHED_IDLE (after raising its soft one)."""
    hard = resource.getrlimit(resource.RLIMIT_NICE)[1]
    return hard == resource.RLIM_INFINITY or hard >= 20 - nice


def idle_possible(nice: int) -> bool:
    """Whether a child can run under SCHED_IDLE with a guard that can lift it: Linux with SCHED_IDLE, pidfds and
    schedstat, and the right to move a process out of SCHED_IDLE at niceness `nice`."""
    if not sys.platform.startswith("linux") or not hasattr(os, "SCHED_IDLE") or not hasattr(os, "pidfd_open"):
        return False
    if not os.path.exists(f"/proc/{os.getpid()}/schedstat"):
        return False
    return _has_cap_sys_nice() or _rlimit_allows(nice)


def enter(nice: int, idle: bool) -> None:
    """In the child: take niceness `nice` and, if `idle`, SCHED_IDLE (the niceness is what a lift restores)."""
    if nice:
        os.nice(nice)
    if idle:
        soft, hard = resource.getrlimit(resource.RLIMIT_NICE)
        if soft != resource.RLIM_INFINITY and soft < 20 - nice and not _has_cap_sys_nice():
            resource.setrlimit(resource.RLIMIT_NICE, (hard if hard == resource.RLIM_INFINITY else
                                                      min(hard, 20 - nice), hard))  # fmt: skip
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def _run_delay_ns(pid: int) -> int:
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[1])


class Guard:
    """Lifts a SCHED_IDLE child to SCHED_OTHER while it starves (see the module doc); a daemon thread that ends
    with the child or `stop()`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.lifts = 0  # times the child was lifted (statistics and tests)
        self.lifted = False
        self._pidfd = os.pidfd_open(pid)  # readable once the child exited: its pid is never one reused
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ruclip-writer-guard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _alive(self) -> bool:
        return not select.select([self._pidfd], [], [], 0)[0]

    def _set(self, policy: int) -> None:
        os.sched_setscheduler(self.pid, policy, os.sched_param(0))

    def _run(self) -> None:
        window = float(defaults.WRITER_STARVE_WINDOW)
        lifted_until = 0.0
        try:
            last = _run_delay_ns(self.pid)
            while not self._stop.wait(window):
                if not self._alive():
                    return
                waited = _run_delay_ns(self.pid)
                delay, last = waited - last, waited
                now = time.monotonic()
                if self.lifted and now >= lifted_until:
                    self._set(os.SCHED_IDLE)
                    self.lifted = False
                elif not self.lifted and delay > defaults.WRITER_STARVED * window * 1e9:
                    self._set(os.SCHED_OTHER)
                    self.lifted, lifted_until = True, now + float(defaults.WRITER_LIFT)
                    self.lifts += 1
                    (log.info if self.lifts == 1 else log.debug)(
                        "writer process %d waited %.0f of %.0f ms for a core: running it at its niceness for %g s",
                        self.pid, delay / 1e6, window * 1e3, defaults.WRITER_LIFT)  # fmt: skip
        except (ProcessLookupError, FileNotFoundError):  # the child is gone
            pass
        except OSError as e:  # not allowed after all: leave it lifted if it was, else it keeps SCHED_IDLE
            log.warning("writer process %d: cannot change its CPU priority (%s); the guard stops", self.pid, e)
        finally:
            os.close(self._pidfd)


def spec(raw: Any) -> tuple[int, bool]:
    """(niceness, whether SCHED_IDLE) from a writer priority: an int niceness, or IDLE (WRITER_NICE beneath)."""
    if raw == IDLE:
        return defaults.WRITER_NICE, True
    return int(raw), False
