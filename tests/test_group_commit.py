"""Group commit: concurrent writers share one commit, each gets its own result or its own error."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from ruclip_search.group_commit import GroupCommit


class Recorder:
    """A commit function that records its groups, is slow enough for writers to pile up, and fails any group
    holding a negative payload (atomically: a failed group commits nothing)."""

    def __init__(self, delay: float = 0.02) -> None:
        self.delay = delay
        self.groups: list[list[int]] = []
        self.committed: list[int] = []
        self.running = 0
        self.overlap = False
        self.lock = threading.Lock()

    def __call__(self, payloads: Sequence[int]) -> list[int]:
        with self.lock:
            self.running += 1
            self.overlap |= self.running > 1
        try:
            time.sleep(self.delay)
            self.groups.append(list(payloads))
            if any(p < 0 for p in payloads):
                raise ValueError(f"bad payload in {list(payloads)}")
            self.committed += payloads
            return [p * 10 for p in payloads]
        finally:
            with self.lock:
                self.running -= 1


def run_threads(gc: GroupCommit, payloads: list[int]) -> dict[int, object]:
    out: dict[int, object] = {}
    start = threading.Barrier(len(payloads))

    def one(p: int) -> None:
        start.wait()
        try:
            out[p] = gc.submit(p)
        except ValueError as e:
            out[p] = e

    threads = [threading.Thread(target=one, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive(), "a writer hung"
    return out


def test_concurrent_writes_share_commits_and_get_their_own_results() -> None:
    commit = Recorder()
    gc = GroupCommit(commit)
    payloads = list(range(1, 41))
    out = run_threads(gc, payloads)
    assert out == {p: p * 10 for p in payloads}
    assert sorted(commit.committed) == payloads  # each committed exactly once
    assert not commit.overlap  # one commit at a time
    assert gc.submits == 40 and gc.groups < 20  # combined: 40 writes in a handful of commits
    assert max(len(g) for g in commit.groups) > 1


def test_a_bad_write_fails_alone() -> None:
    commit = Recorder()
    gc = GroupCommit(commit)
    payloads = [1, 2, 3, -4, 5, 6, 7, 8]
    out = run_threads(gc, payloads)
    assert isinstance(out[-4], ValueError)
    assert {p: out[p] for p in payloads if p > 0} == {p: p * 10 for p in payloads if p > 0}
    assert sorted(commit.committed) == [p for p in payloads if p > 0]


def test_group_size_is_bounded_and_sequential_callers_are_not_delayed() -> None:
    commit = Recorder(delay=0.01)
    gc = GroupCommit(commit, max_group=4)
    run_threads(gc, list(range(1, 33)))
    assert max(len(g) for g in commit.groups) <= 4
    commit.groups.clear()
    for p in (100, 101, 102):  # one caller at a time: one commit each, nothing waits for company
        assert gc.submit(p) == p * 10
    assert commit.groups == [[100], [101], [102]]


def test_an_error_reaches_a_lone_caller() -> None:
    gc = GroupCommit(Recorder(delay=0))
    with pytest.raises(ValueError, match="bad payload"):
        gc.submit(-1)
    assert gc.submit(2) == 20  # and the committer is not wedged
