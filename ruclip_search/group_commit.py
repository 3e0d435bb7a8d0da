"""Group commit: concurrent writers hand their writes to one leader that commits them in one transaction.

Each caller still returns only after its own write is committed (and whatever the commit function does
after, e.g. making it searchable), but N concurrent writes cost one transaction, one fsync and one catch-up
instead of N. This is the database technique (PostgreSQL's commit_delay, InnoDB's group commit) applied
above the store: SQLite allows one writer at a time, so without it concurrent API writes queue on the
database lock and each pays the whole fixed cost of a transaction.

Hand-written because no maintained library does leader/follower batching for synchronous callers (queue-
based batchers add a thread hop and a fixed delay to every write).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class _Request(Generic[In, Out]):
    __slots__ = ("done", "error", "lead", "payload", "result")

    def __init__(self, payload: In) -> None:
        self.payload = payload
        self.done = threading.Event()
        self.lead = False  # set (with done) when this request's thread must commit the next group
        self.result: Out | None = None
        self.error: BaseException | None = None


class GroupCommit(Generic[In, Out]):
    """Calls `commit(payloads) -> results` (one result per payload, in order) for groups of concurrent
    `submit` calls; at most one commit runs at a time.

    When a group's commit raises, each of its requests is committed again alone, so one bad write fails
    only its own caller (the commit must be atomic: all of a group or nothing).
    """

    def __init__(self, commit: Callable[[Sequence[In]], Sequence[Out]], max_group: int = 256) -> None:
        self._commit = commit
        self._max = max_group
        self._lock = threading.Lock()
        self._queue: list[_Request[In, Out]] = []
        self._busy = False  # a leader is committing
        self.groups = 0  # commits run (statistics: groups vs submits says how much was combined)
        self.submits = 0

    def submit(self, payload: In) -> Out:
        """Commit `payload` (with whatever else is waiting) and return its result, or raise its error."""
        request: _Request[In, Out] = _Request(payload)
        with self._lock:
            self.submits += 1
            self._queue.append(request)
            lead = not self._busy
            self._busy = True
        if not lead:
            request.done.wait()
            if request.lead:  # the previous leader handed the next group to this thread
                request.done.clear()
                request.lead = False
                lead = True
        if lead:
            self._lead(request)
        if request.error is not None:
            raise request.error
        return request.result  # type: ignore[return-value]

    def _lead(self, own: _Request[In, Out]) -> None:
        """Commit the waiting requests (own among them), then pass leadership to the next waiter, if any."""
        with self._lock:
            group, self._queue = self._queue[: self._max], self._queue[self._max :]
        try:
            self._run(group)
        finally:
            with self._lock:
                successor = self._queue[0] if self._queue else None
                if successor is None:
                    self._busy = False
            for r in group:
                r.done.set()
            if own not in group:  # cannot happen (own was queued before it led); never leave it hanging
                own.error = RuntimeError("group commit lost a request")
            if successor is not None:
                successor.lead = True
                successor.done.set()

    def _run(self, group: list[_Request[In, Out]]) -> None:
        self.groups += 1
        try:
            results = self._commit([r.payload for r in group])
        except BaseException as e:
            if len(group) == 1:
                group[0].error = e
                return
            for r in group:  # find the bad one(s): each alone
                self._run([r])
            return
        for r, result in zip(group, results, strict=True):
            r.result = result
