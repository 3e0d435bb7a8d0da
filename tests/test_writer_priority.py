"""The writer process's CPU priority (server/priority.py): SCHED_IDLE where the server can lift it, a niceness
elsewhere, and a guard that lifts a starving writer to its niceness and lowers it again."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from ruclip_search import defaults
from ruclip_search.errors import RuclipSearchError
from ruclip_search.server import priority
from ruclip_search.server.writer import WriterProcess, writer_priority

linux_idle = pytest.mark.skipif(not priority.idle_possible(defaults.WRITER_NICE),
                                reason="SCHED_IDLE with a liftable guard needs Linux and CAP_SYS_NICE or RLIMIT_NICE")  # fmt: skip


def test_the_priority_comes_from_the_environment(monkeypatch):
    """`idle` or a niceness; anything else is an error naming the variable; unset is defaults.WRITER_PRIORITY."""
    monkeypatch.setattr(priority, "idle_possible", lambda nice: True)
    monkeypatch.delenv("RUCLIP_SEARCH_WRITER_NICE", raising=False)
    assert writer_priority() == "idle" == defaults.WRITER_PRIORITY
    monkeypatch.setenv("RUCLIP_SEARCH_WRITER_NICE", "7")
    assert writer_priority() == 7
    assert WriterProcess(None)._nice == 7
    monkeypatch.setenv("RUCLIP_SEARCH_WRITER_NICE", "idle")
    assert writer_priority() == "idle"
    monkeypatch.setenv("RUCLIP_SEARCH_WRITER_NICE", "lowest")
    with pytest.raises(RuclipSearchError, match="RUCLIP_SEARCH_WRITER_NICE.*or `idle`.*'lowest'"):
        writer_priority()
    assert priority.spec("idle") == (defaults.WRITER_NICE, True)
    assert priority.spec("3") == (3, False)


def test_idle_falls_back_to_the_niceness_where_the_guard_could_not_lift(monkeypatch):
    """Without CAP_SYS_NICE and with RLIMIT_NICE at 0 (Docker's defaults) a SCHED_IDLE child could never be
    lifted again, so `idle` means niceness WRITER_NICE there."""
    monkeypatch.setattr(priority, "_has_cap_sys_nice", lambda: False)
    monkeypatch.setattr(priority.resource, "getrlimit", lambda which: (0, 0))
    assert not priority.idle_possible(defaults.WRITER_NICE)
    monkeypatch.delenv("RUCLIP_SEARCH_WRITER_NICE", raising=False)
    assert writer_priority() == defaults.WRITER_NICE
    monkeypatch.setattr(priority.resource, "getrlimit", lambda which: (0, 20 - defaults.WRITER_NICE))
    assert priority.idle_possible(defaults.WRITER_NICE) == sys.platform.startswith("linux")


_CHILD = """
import sys, time
from ruclip_search.server import priority
priority.enter(int(sys.argv[1]), True)
print("ready", flush=True)
while True:
    pass
"""
_BURNER = "while True:\n    pass\n"


@linux_idle
@pytest.mark.subprocess
def test_the_guard_lifts_a_starving_writer_and_lowers_it_again(monkeypatch):
    """A SCHED_IDLE process that shares its one core with a busy normal process gets almost none of it; the guard
    moves it to SCHED_OTHER at its niceness (and it then gets its share), then back to SCHED_IDLE."""
    monkeypatch.setattr(defaults, "WRITER_LIFT", 0.6)
    cpu = min(os.sched_getaffinity(0))
    child = subprocess.Popen([sys.executable, "-c", _CHILD, "10"], stdout=subprocess.PIPE, text=True)
    burner = subprocess.Popen([sys.executable, "-c", _BURNER])
    guard = None
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        for proc in (child, burner):
            os.sched_setaffinity(proc.pid, {cpu})
        assert os.sched_getscheduler(child.pid) == os.SCHED_IDLE
        assert os.getpriority(os.PRIO_PROCESS, child.pid) == 10

        def ran_ms(seconds: float) -> float:
            before = int(open(f"/proc/{child.pid}/schedstat").read().split()[0])
            time.sleep(seconds)
            return (int(open(f"/proc/{child.pid}/schedstat").read().split()[0]) - before) / 1e6

        starved = ran_ms(0.3)  # unguarded: SCHED_IDLE beside a busy process on one core
        guard = priority.Guard(child.pid)
        deadline = time.monotonic() + 5
        while not guard.lifted and time.monotonic() < deadline:
            time.sleep(0.01)
        assert guard.lifts == 1 and os.sched_getscheduler(child.pid) == os.SCHED_OTHER
        assert os.getpriority(os.PRIO_PROCESS, child.pid) == 10  # its niceness kept
        lifted = ran_ms(0.3)
        assert lifted > max(3 * starved, 15.0), (starved, lifted)  # nice 10 beside nice 0: ~10 % of the core, 30 ms
        burner.kill()
        burner.wait()
        deadline = time.monotonic() + 5
        while guard.lifted and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not guard.lifted and os.sched_getscheduler(child.pid) == os.SCHED_IDLE
        time.sleep(0.3)
        assert guard.lifts == 1  # not starved any more (it has the core to itself): it stays SCHED_IDLE
    finally:
        if guard is not None:
            guard.stop()
        for proc in (child, burner):
            proc.kill()
            proc.wait()


@linux_idle
@pytest.mark.subprocess
def test_a_served_writer_runs_idle_with_its_guard(tmp_path, tiny_model_path, monkeypatch):
    """The server's writer process runs under SCHED_IDLE at niceness WRITER_NICE, guarded; with a niceness in
    the environment it runs at that niceness, unguarded."""
    import numpy as np
    from fastapi.testclient import TestClient

    from ruclip_search.search import Index
    from ruclip_search.server import create_app

    Index.create(tmp_path / "index", model=str(tiny_model_path), device="cpu").close()
    for env, policy, nice in ((None, os.SCHED_IDLE, defaults.WRITER_NICE), ("4", os.SCHED_OTHER, 4)):
        if env is None:
            monkeypatch.delenv("RUCLIP_SEARCH_WRITER_NICE", raising=False)
        else:
            monkeypatch.setenv("RUCLIP_SEARCH_WRITER_NICE", env)
        app = create_app([tmp_path / "index"], write_token="w", device="cpu", writer_process=True)
        with TestClient(app) as client:
            dim = client.get("/info").json()["indexes"][0]["info"]["dim"]
            v = np.random.default_rng(0).normal(size=dim)
            r = client.put("/photos/a", json={"embedding": (v / np.linalg.norm(v)).tolist()},
                           headers={"Authorization": "Bearer w"})  # fmt: skip
            assert r.status_code == 200, r.text
            writer = app.state.server.served["index"].writer
            assert os.sched_getscheduler(writer.pid) == policy
            assert os.getpriority(os.PRIO_PROCESS, writer.pid) == nice
            assert (writer._guard is not None) == (env is None)
