"""Helper processes (forkserver, decoding workers) never outlive the build that started them (issue 14).

Real processes: a builder is killed (SIGKILL), interrupted (Ctrl-C to its process group) or terminated
(SIGTERM) at moments chosen on evidence (its child processes exist, the index's row count grows); then no
process of its tree may be left after 5 s, and a clean stop must exit with one line and no traceback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ROOT, TINY_MODEL, ctrl_c_default, make_photos, sigint_ignored
from proctree import Proc, descendants, describe, kill_all, parent_of, rows, run_builder, wait_gone

pytestmark = [
    pytest.mark.crash,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="walks /proc"),
]
N_PHOTOS = 240
GONE_WITHIN_S = 5.0


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough photos (256 px) that decoding with two workers takes several seconds."""
    folder = tmp_path_factory.mktemp("lifetime") / "photos"
    make_photos(folder, N_PHOTOS, size=256)
    return folder


def wait_for(proc: subprocess.Popen, ready: Callable[[], bool], what: str, timeout: float = 90) -> None:
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            pytest.fail(f"the build ended (rc {proc.returncode}) before {what}: {err[-2000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def workers_of(pid: int) -> list[Proc]:
    """Grandchildren of the builder: processes the forkserver forked (the decoding workers)."""
    return [p for p in descendants(pid) if parent_of(p) not in (pid, None)]


def forkserver_started(pid: int) -> bool:
    return any("multiprocessing.forkserver" in line for line in describe(descendants(pid)))


class Decoding:
    """Evidence that workers are decoding: the workers exist and the row count grew since we first saw rows."""

    def __init__(self, pid: int, index: Path, workers: int, grow_by: int = 1) -> None:
        self.pid, self.index, self.workers, self.grow_by = pid, index, workers, grow_by
        self.first: int | None = None

    def __call__(self) -> bool:
        n = rows(self.index)
        if n <= 0:
            return False
        if self.first is None:
            self.first = n
        return n >= self.first + self.grow_by and len(workers_of(self.pid)) >= self.workers


def assert_tree_gone(tree: list[Proc]) -> float:
    left, waited = wait_gone(tree, GONE_WITHIN_S)
    try:
        assert not left, f"still running {GONE_WITHIN_S} s after the builder stopped: {describe(left)}"
    finally:
        kill_all(left)
    return waited


@pytest.mark.parametrize("moment", ["forkserver starting", "decoding", "decoding, later"])
def test_sigkill_leaves_no_helper_process(tmp_path: Path, many_photos: Path, moment: str) -> None:
    index = tmp_path / "idx"
    proc = run_builder(many_photos, index, workers=2, batch_size=4)
    try:
        if moment == "forkserver starting":  # while it imports its preload modules: the start-up race
            wait_for(proc, lambda: forkserver_started(proc.pid), "the forkserver started")
        else:
            grow_by = 4 if moment == "decoding" else 40
            wait_for(proc, Decoding(proc.pid, index, workers=2, grow_by=grow_by), "workers decoding")
        tree = descendants(proc.pid)
        if moment != "forkserver starting":
            assert len([p for p in tree if parent_of(p) != proc.pid]) >= 2, describe(tree)  # the workers
            assert rows(index) < N_PHOTOS  # killed mid-build
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    waited = assert_tree_gone(tree)
    print(f"{moment}: {len(tree)} helper processes gone {waited:.2f} s after SIGKILL")


def run_cli_build(photos: Path, index: Path) -> subprocess.Popen:
    """`python -m ruclip_search.cli build` with the tiny model, in its own process group (as a shell job)."""
    cmd = [sys.executable, "-m", "ruclip_search.cli", "build", str(photos), "--index", str(index), "--model",
           str(TINY_MODEL), "--device", "cpu", "--workers", "2", "--batch-size", "4", "--quiet"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env["PYTHONFAULTHANDLER"] = "1"  # a hung build dumps its threads' stacks on SIGABRT (see below)
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=ctrl_c_default,
    )


@pytest.mark.parametrize(
    ("how", "code", "message"),
    [
        ("ctrl-c", 130, "Error: interrupted; what was committed is kept"),
        ("sigterm", 143, "Error: terminated; what was committed is kept"),
    ],
)
def test_cli_build_stops_cleanly(tmp_path: Path, many_photos: Path, tiny_model_path: Path, how: str, code: int,
                                 message: str) -> None:  # fmt: skip
    index = tmp_path / "idx"
    proc = run_cli_build(many_photos, index)
    tree: list[Proc] = []
    try:
        wait_for(proc, Decoding(proc.pid, index, workers=2, grow_by=4), "workers decoding")
        tree = descendants(proc.pid)
        committed = rows(index)
        if how == "ctrl-c":  # a terminal sends SIGINT to the whole foreground process group
            assert not sigint_ignored(proc.pid)
            os.killpg(proc.pid, signal.SIGINT)
        else:  # `kill PID`
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"the build did not stop within 60 s of {how}: {err.decode(errors='replace')[-6000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    try:
        text = err.decode(errors="replace")
        assert proc.returncode == code, text
        assert "Traceback" not in text
        assert text.strip().splitlines() == [text.strip()] and text.startswith(message), text
        assert out == b""
        assert_tree_gone(tree)
        assert rows(index) >= committed > 0  # committed batches are kept
    finally:
        kill_all(tree)
