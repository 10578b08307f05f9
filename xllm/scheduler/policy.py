"""Who goes first and who is preempted: the importance order and the waiting queue.

Importance, most important first: online before offline, then lower ``priority`` value
(vLLM's rule), then earlier arrival, then earlier ``add_request``. That order is total, so
"the least important running request" is always one request and preemption never cycles.

A *waiting* request may preempt a running one only when it outranks it by class or priority
(``outranks``): arrival order alone never preempts, as in vLLM, where FCFS work is never
evicted by later FCFS work.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from xllm.scheduler.request import Request

__all__ = ["WaitingQueue", "importance_key", "least_important", "outranks"]


def importance_key(request: Request) -> tuple[bool, int, float, int]:
    """Sort key: smaller = more important."""
    return (request.offline, request.priority, request.arrival_time, request.seq)


def outranks(request: Request, other: Request) -> bool:
    """True when request is strictly more important than other by class or priority."""
    return (request.offline, request.priority) < (other.offline, other.priority)


def least_important(*groups: Iterable[Request]) -> Request | None:
    """The least important request of the first non-empty group (callers pass offline
    requests first: any offline request is less important than every online one)."""
    for group in groups:
        victim = max(group, key=importance_key, default=None)
        if victim is not None:
            return victim
    return None


class WaitingQueue:
    """Waiting requests of one class, most important first: a binary heap keyed by
    (priority, arrival_time, seq), O(log n) push and pop.

    ``discard`` (abort, finish) is O(1): the entry stays in the heap and is skipped when it
    reaches the top; the heap is rebuilt once dead entries outnumber live ones, so its size
    stays O(live). A preempted request goes back under its original key, which puts it ahead
    of every request of its priority that arrived after it.
    """

    __slots__ = ("_heap", "_live", "_num_dead")

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Request]] = []
        self._live: set[int] = set()  # seq of the requests that are really queued
        self._num_dead = 0

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, request: Request) -> bool:
        return request.seq in self._live

    def push(self, request: Request) -> None:
        if request.seq in self._live:
            raise ValueError(f"request {request.request_id!r} is already queued")
        self._live.add(request.seq)
        # seq is unique, so tuples never compare the Request itself.
        heapq.heappush(self._heap, (request.priority, request.arrival_time, request.seq, request))

    def peek(self) -> Request | None:
        heap, live = self._heap, self._live
        while heap and heap[0][2] not in live:
            heapq.heappop(heap)
            self._num_dead -= 1
        return heap[0][3] if heap else None

    def remove(self, request: Request) -> None:
        """Takes request out of the queue: popped when it is the head (the usual case, an
        admission), else lazily like discard. ValueError if it is not queued."""
        if request.seq not in self._live:
            raise ValueError(f"request {request.request_id!r} is not queued")
        if self.peek() is request:
            heapq.heappop(self._heap)
            self._live.remove(request.seq)
        else:  # preemptions during its admission queued something ahead of it
            self.discard(request)

    def discard(self, request: Request) -> bool:
        """Removes request if queued (lazily); True if it was."""
        if request.seq not in self._live:
            return False
        self._live.remove(request.seq)
        self._num_dead += 1
        if self._num_dead > 64 and self._num_dead > len(self._live):
            self._heap = [e for e in self._heap if e[2] in self._live]
            heapq.heapify(self._heap)
            self._num_dead = 0
        return True

    def __iter__(self):  # type: ignore[no-untyped-def]
        """Live requests, in no particular order (for metrics and tests)."""
        return (e[3] for e in self._heap if e[2] in self._live)
