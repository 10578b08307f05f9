"""Online/offline admission at the master.

Online requests are never held here: they are routed the moment they arrive, over every
live instance, and the instances' schedulers run them before offline work (preempting
offline requests when seats or KV blocks run out). Offline requests wait in this bounded
queue until some live instance has spare capacity (:class:`~xllm.service.state.SpareCapacity`:
a free seat, nothing queued in its scheduler, KV usage under a threshold), and then go there.
The queue is ordered by ``priority`` (lower first), then arrival; a resumed offline request
keeps its original place. A full queue refuses new offline requests at once
(:class:`AdmissionQueueFull`, an ``EngineOverloadedError``: HTTP 503 "overloaded").

The queue is drained on the master's event loop: once right after the enqueues of a loop
turn, and every ``poll_s`` by a task (load reports arrive every 250 ms, so spare capacity
appears at that pace).
Each pass is one walk over the waiting requests in order while some instance has room;
every placement is booked on the instance (Router), so one pass never overfills it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from dataclasses import dataclass, field

from xllm.engine.async_engine import EngineDeadError, EngineOverloadedError
from xllm.service.registry import InstanceRegistry
from xllm.service.routing import RouteDecision, Router, RouteRequest
from xllm.service.tasks import stop_task

__all__ = ["AdmissionQueueFull", "OfflineAdmission"]


class AdmissionQueueFull(EngineOverloadedError):
    """The master's offline queue is full; retry later."""


@dataclass(order=True)
class _Waiting:
    priority: int
    seq: int  # arrival order; a resumed request keeps its first one
    future: asyncio.Future[RouteDecision] = field(compare=False)
    route: RouteRequest = field(compare=False)
    excluded: set[str] = field(compare=False)
    since: float = field(compare=False)  # when it (re)entered the queue


class OfflineAdmission:
    """The master's queue of offline requests (see the module docstring).

    ``max_queued``: offline requests that may wait at once (new ones beyond it are refused);
    ``instance_wait_s``: after this long a request may go back to an instance it failed on
    (when it is the only one with room), and with no live instance at all it fails;
    ``poll_s``: how often the queue looks for newly spare capacity.
    """

    def __init__(
        self,
        registry: InstanceRegistry,
        router: Router,
        *,
        max_queued: int = 1024,
        instance_wait_s: float = 3.0,
        poll_s: float = 0.05,
    ) -> None:
        if max_queued < 0:
            raise ValueError(f"max_queued must be >= 0, got {max_queued}")
        if poll_s <= 0:
            raise ValueError(f"poll_s must be > 0, got {poll_s}")
        self.registry = registry
        self.router = router
        self.max_queued = max_queued
        self.instance_wait_s = instance_wait_s
        self.poll_s = poll_s
        self._heap: list[_Waiting] = []
        self._num_waiting = 0  # futures not yet done (the heap also holds cancelled ones)
        self._seqs = itertools.count()
        self._kicked = False  # a dispatch is scheduled for this loop turn
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def __len__(self) -> int:
        """Offline requests waiting for capacity."""
        return self._num_waiting

    def next_seq(self) -> int:
        """An arrival number: give it to :meth:`enqueue` for the request's every entry."""
        return next(self._seqs)

    def check_room(self, n: int) -> None:
        """Raises AdmissionQueueFull unless ``n`` more requests fit in the queue."""
        if self._num_waiting + n > self.max_queued:
            raise AdmissionQueueFull(
                f"the master's offline queue is full ({self._num_waiting} offline requests "
                f"wait for spare capacity, limit {self.max_queued}); retry later"
            )

    def enqueue(
        self,
        route: RouteRequest,
        priority: int,
        seq: int,
        excluded: set[str] | None = None,
        *,
        resumed: bool = False,
    ) -> asyncio.Future[RouteDecision]:
        """Queues an offline request; the future resolves to the routing decision (the
        instance it may go to, already booked there: the caller settles the dispatch), or
        fails with EngineDeadError. A new request (not
        ``resumed``) is refused with AdmissionQueueFull when the queue is full; cancelling
        the future takes the request out of the queue."""
        if self._closed:
            raise EngineDeadError("the master is shutting down")
        if not resumed:
            self.check_room(1)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[RouteDecision] = loop.create_future()
        future.add_done_callback(self._left)
        self._num_waiting += 1
        heapq.heappush(
            self._heap, _Waiting(priority, seq, future, route, excluded or set(), time.monotonic())
        )
        if self._task is None:
            self._task = loop.create_task(self._run(), name="offline-admission")
        if not self._kicked:  # one pass for all the requests enqueued in this turn
            self._kicked = True
            loop.call_soon(self._kick)
        return future

    def _kick(self) -> None:
        self._kicked = False
        if not self._closed:
            self.dispatch()

    def _left(self, _: asyncio.Future[RouteDecision]) -> None:
        self._num_waiting -= 1

    def dispatch(self, now: float | None = None) -> int:
        """One pass: places waiting requests, in order, on instances with spare capacity;
        returns how many were placed. Requests that may not go to any instance with room
        (they failed there) keep their place for later passes."""
        now = time.monotonic() if now is None else now
        live = self.registry.routable()
        if not live:
            self._fail_stale(now)
            return 0
        spare = [v for v in live if self.router.spare.admits(v)]
        placed = 0
        kept: list[_Waiting] = []
        while spare and self._heap:
            w = heapq.heappop(self._heap)
            if w.future.done():
                continue  # cancelled while it waited
            fits = [v for v in spare if v.instance_id not in w.excluded]
            if not fits and now - w.since >= self.instance_wait_s:
                fits = spare  # maybe the earlier failure was transient
            if not fits:
                kept.append(w)
                continue
            decision = self.router.route(w.route, fits, self.registry.index)
            w.future.set_result(decision)
            placed += 1
            spare = [v for v in spare if self.router.spare.admits(v)]  # booked: recheck
        for w in kept:
            heapq.heappush(self._heap, w)
        return placed

    def _fail_stale(self, now: float) -> None:
        """With no live instance: fail requests that waited instance_wait_s, like online."""
        kept = []
        for w in self._heap:
            if w.future.done():
                continue
            if now - w.since >= self.instance_wait_s:
                w.future.set_exception(
                    EngineDeadError("no instance is alive to serve this offline request")
                )
            else:
                kept.append(w)
        self._heap = kept
        heapq.heapify(self._heap)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            self.dispatch()

    async def close(self) -> None:
        """Stops the queue; requests still waiting fail with EngineDeadError."""
        self._closed = True
        if self._task is not None:
            await stop_task(self._task)
            self._task = None
        for w in self._heap:
            if not w.future.done():
                w.future.set_exception(EngineDeadError("the master is shutting down"))
        self._heap.clear()
