"""Online/offline admission at the master, without processes: the spare-capacity rule, the
offline queue's order (priority, then arrival; a resumed request keeps its place), its
bound, cancellation, exclusions and failure with no instance; and ClusterEngine over fake
instance streams: online requests are routed at once while offline ones wait for capacity."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import pytest

from xllm.engine.async_engine import EngineDeadError, EngineOverloadedError
from xllm.sampling_params import SamplingParams
from xllm.service.admission import AdmissionQueueFull, OfflineAdmission
from xllm.service.master import ClusterEngine, ModelFacts
from xllm.service.proto import instance_pb2
from xllm.service.registry import EmbeddedRegistry
from xllm.service.routing import Router, RouteRequest
from xllm.service.state import Capacity, InstanceInfo, InstanceLoad, SpareCapacity

pytestmark = pytest.mark.timeout(30)


def _cluster(n: int, seats: int = 2) -> tuple[EmbeddedRegistry, Router]:
    registry = EmbeddedRegistry()
    for k in range(n):
        registry.register(
            InstanceInfo(
                f"i{k}",
                f"127.0.0.1:{7000 + k}",
                capacity=Capacity(max_num_seqs=seats, num_kv_blocks=100, block_size=16),
            )
        )
    return registry, Router("least_load", 16, SpareCapacity(max_kv_usage=0.8))


_seq = iter(range(1, 1 << 30))


def _beat(registry: EmbeddedRegistry, iid: str, admitted: Iterable[int] = (), **load: Any) -> None:
    """A load report from ``iid`` whose load counts the dispatches ``admitted`` (ids booked
    on other instances are ignored, as a real master ignores them)."""
    view = registry.get(iid)
    assert view is not None
    registry.heartbeat(
        iid, view.incarnation_id, next(_seq), InstanceLoad(**load), full=True, admitted=admitted
    )


def test_spare_capacity_rule() -> None:
    registry, _ = _cluster(1, seats=4)
    view = registry.get("i0")
    assert view is not None
    rule = SpareCapacity(max_kv_usage=0.8, max_waiting=1)
    assert rule.admits(view)
    view.load = InstanceLoad(num_running=3)
    assert rule.admits(view)
    view.pending_requests = 1  # routed since the last report: the last seat is taken
    assert not rule.admits(view)
    view.pending_requests = 0
    view.load = InstanceLoad(num_running=1, num_waiting=2)  # its own queue is too long
    assert not rule.admits(view)
    view.load = InstanceLoad(num_running=1, num_waiting=1)
    assert rule.admits(view)
    view.load = InstanceLoad(kv_usage=0.8)
    assert not rule.admits(view)
    view.load = InstanceLoad(kv_usage=0.5)
    view.pending_prefill_tokens = 800  # 800 / (100 blocks * 16) = 0.5 more: over 0.8
    assert not rule.admits(view)
    for kw, match in [
        ({"max_kv_usage": 0.0}, "max_kv_usage"),
        ({"max_kv_usage": 1.5}, "max_kv_usage"),
        ({"max_waiting": -1}, "max_waiting"),
    ]:
        with pytest.raises(ValueError, match=match):
            SpareCapacity(**kw)


def test_offline_queue_order_bound_cancel_and_exclusions() -> None:
    async def run() -> None:
        registry, router = _cluster(2)
        q = OfflineAdmission(registry, router, max_queued=4, instance_wait_s=1.0)
        for iid in ("i0", "i1"):
            _beat(registry, iid, num_running=2)  # every seat taken
        futs = {}
        for name, prio in [("a", 5), ("b", 1), ("c", 1), ("d", 0)]:
            futs[name] = q.enqueue(RouteRequest([1, 2, 3], offline=True), prio, q.next_seq())
        with pytest.raises(AdmissionQueueFull, match="offline queue is full"):
            q.enqueue(RouteRequest([1], offline=True), 0, q.next_seq())
        assert isinstance(AdmissionQueueFull("x"), EngineOverloadedError)  # HTTP 503
        assert q.dispatch() == 0 and len(q) == 4

        futs["d"].cancel()  # the client went away: out of the queue
        await asyncio.sleep(0)
        assert len(q) == 3
        _beat(registry, "i0", num_running=1)  # one seat frees up
        assert q.dispatch() == 1
        assert futs["b"].done() and futs["b"].result().instance.instance_id == "i0"  # prio 1
        assert q.dispatch() == 0  # i0's seat is booked until a report counts it
        _beat(registry, "i0", num_running=1)  # a report that does not: still booked
        assert q.dispatch() == 0
        _beat(registry, "i0", admitted=[futs["b"].result().dispatch_id])  # b came and went
        _beat(registry, "i1")
        assert q.dispatch() == 2
        assert futs["c"].done() and futs["a"].done()
        placed = [futs[k].result() for k in "ca"]
        assert {d.instance.instance_id for d in placed} == {"i0", "i1"}
        await asyncio.sleep(0)
        assert len(q) == 0

        # A resumed request keeps its place and is admitted even when the queue is full;
        # it avoids the instance it failed on until instance_wait_s has passed.
        done = [d.dispatch_id for d in placed]
        _beat(registry, "i0", admitted=done)
        _beat(registry, "i1", admitted=done, num_running=2)
        early = q.enqueue(RouteRequest([4], offline=True), 9, 0, {"i0"}, resumed=True)
        late = q.enqueue(RouteRequest([5], offline=True), 9, q.next_seq())
        assert q.dispatch() == 1 and late.done() and not early.done()
        _beat(registry, "i0", admitted=[late.result().dispatch_id])
        assert q.dispatch() == 0  # only i0 has room, and early failed there
        assert q.dispatch(now=time.monotonic() + 1.5) == 1
        assert early.result().instance.instance_id == "i0"
        await q.close()

    asyncio.run(run())


def test_offline_queue_fails_without_instances_and_on_close() -> None:
    async def run() -> None:
        registry = EmbeddedRegistry()
        q = OfflineAdmission(registry, Router("round_robin", 16), instance_wait_s=0.2, poll_s=0.02)
        lost = q.enqueue(RouteRequest([1], offline=True), 0, q.next_seq())
        with pytest.raises(EngineDeadError, match="no instance is alive"):
            await asyncio.wait_for(lost, 2)
        waiting = q.enqueue(RouteRequest([1], offline=True), 0, q.next_seq())
        await q.close()
        with pytest.raises(EngineDeadError, match="shutting down"):
            await waiting
        with pytest.raises(EngineDeadError):
            q.enqueue(RouteRequest([1], offline=True), 0, 0)

    asyncio.run(run())


class _FakeCall:
    """A Generate stream the test feeds: one token per ``step()``."""

    def __init__(self, req: instance_pb2.GenerateRequest, address: str) -> None:
        self.req, self.address = req, address
        self.queue: asyncio.Queue[instance_pb2.GenerateResponse | None] = asyncio.Queue()
        self.left = req.sampling_params.max_tokens - len(req.generated_token_ids)

    def step(self) -> None:
        self.left -= 1
        resp = instance_pb2.GenerateResponse(token_ids=[7], text_delta="x")
        if self.left == 0:
            resp.finish_reason = "length"
        self.queue.put_nowait(resp)

    def cancel(self) -> None:
        self.queue.put_nowait(None)

    def __aiter__(self) -> _FakeCall:
        return self

    async def __anext__(self) -> instance_pb2.GenerateResponse:
        item = await self.queue.get()
        if item is None:
            raise asyncio.CancelledError
        return item


def test_cluster_engine_online_first_offline_waits_for_capacity() -> None:
    async def run() -> None:
        registry, router = _cluster(1, seats=2)
        facts = ModelFacts(
            tokenizer=None, model_config=None, default_max_model_len=256, registry=registry
        )
        engine = ClusterEngine(None, facts, registry, router, max_offline_queued=3)
        engine.admission.poll_s = 0.01
        calls: list[_FakeCall] = []

        class Stub:
            def __init__(self, address: str) -> None:
                self.address = address

            def Generate(self, req: instance_pb2.GenerateRequest) -> _FakeCall:  # noqa: N802
                calls.append(_FakeCall(req, self.address))
                return calls[-1]

        engine._stub = Stub  # type: ignore[assignment,method-assign]
        _beat(registry, "i0", num_running=2)  # busy: no room for offline work
        params = SamplingParams(max_tokens=2)
        offline = [engine.generate([1, 2, 3], params, offline=True, priority=p) for p in (3, 1, 2)]
        with pytest.raises(EngineOverloadedError, match="offline queue is full"):
            engine.generate([1, 2, 3], params, offline=True)
        assert engine.num_unstarted() == 0  # offline backlog is not online overload
        online = engine.generate([4, 5], params, priority=9)
        await asyncio.sleep(0.05)
        assert [c.req.offline for c in calls] == [False]  # online went at once
        assert engine.num_unstarted() == 1
        calls[0].step()
        calls[0].step()
        outs = [o async for o in online]
        assert outs[-1].finished and outs[-1].outputs[0].token_ids == [7, 7]

        _beat(registry, "i0", num_running=1)  # one seat: the most important offline one
        await asyncio.sleep(0.05)
        assert [c.req.priority for c in calls[1:]] == [1]
        view = registry.get("i0")
        assert view is not None and view.pending_requests == 1
        # A report taken before that dispatch reached the engine: its seat stays booked.
        _beat(registry, "i0", num_running=1)
        await asyncio.sleep(0.05)
        assert [c.req.priority for c in calls[1:]] == [1] and view.pending_requests == 1
        # The report that counts it (a running online request finished meanwhile).
        _beat(registry, "i0", admitted=[calls[1].req.dispatch_id], num_running=1)
        await asyncio.sleep(0.05)
        assert [c.req.priority for c in calls[1:]] == [1, 2]
        assert list(view.in_transit) == [calls[2].req.dispatch_id]
        # Its first token settles that dispatch without any report: the seat the report
        # left free goes to the last offline request.
        calls[2].step()
        await asyncio.sleep(0.05)
        assert [c.req.priority for c in calls[1:]] == [1, 2, 3]
        assert list(view.in_transit) == [calls[3].req.dispatch_id]
        for c in calls[1:]:
            while c.left > 0:
                c.step()
        for s in offline:
            outs = [o async for o in s]
            assert outs[-1].outputs[0].finish_reason == "length"
        assert len(engine.admission) == 0
        assert view.pending_requests == 0 and not view.in_transit  # every stream ended
        assert len({c.req.dispatch_id for c in calls}) == len(calls) and calls[0].req.dispatch_id
        await engine.close()

    asyncio.run(run())
