"""The master's exact in-transit accounting: a dispatch routed to an instance counts as
pending there until a heartbeat whose load includes it lists its id, or its stream starts,
ends or fails. Unit tests over the registry and ClusterEngine with fake streams, then one
in-process cluster (real gRPC, a real engine) checking the instance side: every id a beat
lists is counted in that beat's load."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest

from xllm.engine.async_engine import EngineDeadError
from xllm.sampling_params import SamplingParams
from xllm.service.master import ClusterEngine, MasterServicer, ModelFacts
from xllm.service.proto import instance_pb2, master_pb2_grpc
from xllm.service.registry import EmbeddedRegistry, HeartbeatStatus
from xllm.service.routing import RouteDecision, Router, RouteRequest
from xllm.service.state import Capacity, InstanceInfo, InstanceLoad, InstanceView

pytestmark = pytest.mark.timeout(60)


def _info(name: str = "a", port: int = 9000) -> InstanceInfo:
    return InstanceInfo(name, f"127.0.0.1:{port}", capacity=Capacity(8, block_size=4))


def _route(router: Router, reg: EmbeddedRegistry, prompt: list[int]) -> RouteDecision:
    return router.route(RouteRequest(prompt), reg.routable(), reg.index)


def _beat(reg: EmbeddedRegistry, view: InstanceView, seq: int, admitted: Iterable[int] = (),
          **load: Any) -> HeartbeatStatus:
    return reg.heartbeat(view.instance_id, view.incarnation_id, seq, InstanceLoad(**load),
                         full=True, admitted=admitted).status


def test_a_beat_settles_only_the_dispatches_it_counts() -> None:
    reg = EmbeddedRegistry()
    v = reg.register(_info())
    router = Router("least_load", block_size=4)
    d1 = _route(router, reg, list(range(10)))
    d2 = _route(router, reg, list(range(100, 106)))
    assert d1.instance is v and d1.dispatch_id and d2.dispatch_id != d1.dispatch_id
    assert (v.pending_requests, v.pending_prefill_tokens) == (2, 16)
    # The beat's snapshot was taken before either reached the engine: both stay pending.
    assert _beat(reg, v, 1) is HeartbeatStatus.OK
    assert (v.pending_requests, v.pending_prefill_tokens) == (2, 16)
    assert v.load_score() == pytest.approx(2 * 2 / 8)
    # This one counts d1 (a waiting request): d1 is in the load now, d2 still in transit.
    _beat(reg, v, 2, admitted=[d1.dispatch_id], num_waiting=1, num_waiting_prefill_tokens=10)
    assert (v.pending_requests, v.pending_prefill_tokens) == (1, 6)
    assert v.load.num_waiting == 1 and v.load_score() == pytest.approx(2 * 2 / 8)
    # An overtaken beat (seq 2 again) keeps the newer load but still settles its ids.
    _beat(reg, v, 2, admitted=[d2.dispatch_id], num_running=7)
    assert v.load.num_waiting == 1 and v.load.num_running == 0
    assert (v.pending_requests, v.pending_prefill_tokens, v.in_transit) == (0, 0, {})
    # A repeated id (a beat resent after a lost answer) settles nothing twice.
    _beat(reg, v, 3, admitted=[d1.dispatch_id, d2.dispatch_id])
    assert (v.pending_requests, v.pending_prefill_tokens) == (0, 0)


def test_prefix_hits_are_not_booked_as_prefill() -> None:
    reg = EmbeddedRegistry()
    v = reg.register(_info())
    _beat(reg, v, 1)
    router = Router("prefix_aware", block_size=4)
    prompt = list(range(20))
    # Books its blocks as (optimistically) cached: the full blocks before the last token,
    # which is always computed -- 4 of 4 tokens each.
    first = _route(router, reg, prompt)
    again = _route(router, reg, prompt)
    assert again.matched_tokens == 16
    assert v.in_transit == {first.dispatch_id: 20, again.dispatch_id: 4}
    assert v.pending_prefill_tokens == 24


def test_ids_of_an_old_incarnation_are_ignored() -> None:
    reg = EmbeddedRegistry()
    router = Router("round_robin", block_size=4)
    old = reg.register(_info())
    d_old = _route(router, reg, [1, 2, 3])
    new = reg.register(_info())  # a restart: the old incarnation goes down
    assert old.in_transit == {} and old.pending_requests == 0
    assert new.in_transit == {} and new.pending_requests == 0  # starts empty
    d_new = _route(router, reg, [4, 5, 6])
    assert d_new.instance is new and new.pending_requests == 1
    # The old incarnation's beat is refused whatever it lists ...
    assert _beat(reg, old, 5, admitted=[d_new.dispatch_id]) is HeartbeatStatus.STALE
    assert new.pending_requests == 1
    # ... and the new one's beat cannot settle a dispatch sent to the old one.
    assert not new.settle(d_old.dispatch_id)
    _beat(reg, new, 1, admitted=[d_old.dispatch_id])
    assert new.in_transit == {d_new.dispatch_id: 3}


def test_a_dead_instance_drops_its_dispatches() -> None:
    reg = EmbeddedRegistry(heartbeat_interval_s=0.25, heartbeat_timeout_s=1.0)
    v = reg.register(_info(), now=0.0)
    _route(Router("least_load"), reg, [1, 2, 3])
    assert v.pending_requests == 1
    assert reg.check_deadlines(now=5.0) == [v]
    assert (v.pending_requests, v.pending_prefill_tokens, v.in_transit) == (0, 0, {})


def test_dispatch_ids_differ_between_routers() -> None:
    """Two masters (--etcd) beat-listened by one instance must not settle each other's."""
    reg = EmbeddedRegistry()
    reg.register(_info())
    a, b = Router("round_robin"), Router("round_robin")
    ids_a = {_route(a, reg, [1]).dispatch_id for _ in range(50)}
    ids_b = {_route(b, reg, [1]).dispatch_id for _ in range(50)}
    assert len(ids_a) == len(ids_b) == 50 and not ids_a & ids_b and 0 not in ids_a | ids_b


class _Call:
    """A fake Generate stream the test drives: ``put`` a response or an exception."""

    def __init__(self, req: instance_pb2.GenerateRequest) -> None:
        self.req = req
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    def put(self, item: Any) -> None:
        self.queue.put_nowait(item)

    def cancel(self) -> None:
        self.queue.put_nowait(asyncio.CancelledError())

    def __aiter__(self) -> _Call:
        return self

    async def __anext__(self) -> instance_pb2.GenerateResponse:
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item


def _unavailable() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                grpc.aio.Metadata(), details="connection reset")


def test_stream_start_end_or_failure_settles_without_a_beat() -> None:
    async def run() -> None:
        reg = EmbeddedRegistry()
        v = reg.register(_info())
        facts = ModelFacts(tokenizer=None, model_config=None, default_max_model_len=256,
                           registry=reg)
        engine = ClusterEngine(None, facts, reg, Router("least_load"), max_attempts=1)
        calls: list[_Call] = []

        class Stub:
            def __init__(self, address: str) -> None:
                pass

            def Generate(self, req: instance_pb2.GenerateRequest) -> _Call:  # noqa: N802
                calls.append(_Call(req))
                return calls[-1]

        engine._stub = Stub  # type: ignore[assignment,method-assign]
        params = SamplingParams(max_tokens=2)

        # The RPC fails before any beat: the dispatch is not in transit any more.
        failing = engine.generate([1, 2, 3], params)
        await asyncio.sleep(0.01)
        assert list(v.in_transit) == [calls[0].req.dispatch_id] and v.pending_requests == 1
        calls[0].put(_unavailable())
        with pytest.raises(EngineDeadError, match="UNAVAILABLE"):
            _ = [o async for o in failing]
        assert (v.pending_requests, v.pending_prefill_tokens, v.in_transit) == (0, 0, {})

        # The first message settles it; the end does not count it twice.
        ok = engine.generate([4, 5, 6, 7], params)
        await asyncio.sleep(0.01)
        assert v.pending_requests == 1 and v.pending_prefill_tokens == 4
        calls[1].put(instance_pb2.GenerateResponse(token_ids=[9], text_delta="x"))
        first = await ok.__anext__()
        assert first.outputs[0].token_ids == [9] and v.pending_requests == 0
        calls[1].put(instance_pb2.GenerateResponse(token_ids=[9], finish_reason="length"))
        assert (await ok.__anext__()).finished
        assert (v.pending_requests, v.pending_prefill_tokens) == (0, 0)

        # The client leaves before any output: cancelled, settled.
        gone = engine.generate([8], params)
        await asyncio.sleep(0.01)
        assert v.pending_requests == 1
        gone.abort()
        await asyncio.sleep(0.01)
        assert (v.pending_requests, v.in_transit) == (0, {})
        await engine.close()

    asyncio.run(run())


def test_in_process_cluster_beats_list_what_their_load_counts(served_engine: Any,
                                                              demo_model_dir: Path) -> None:
    """A real master (gRPC + registry + router) and a real instance on one event loop:
    every dispatch is listed by some beat, each beat's load counts what it lists, and
    nothing stays in transit once the streams are done."""
    from xllm.service.instance import InstanceRuntime

    async def run() -> None:
        reg = EmbeddedRegistry(heartbeat_interval_s=0.25, heartbeat_timeout_s=5.0)
        beats: list[tuple[float, list[int], InstanceLoad]] = []
        apply = reg.heartbeat

        def recording(*args: Any, **kw: Any) -> Any:
            beats.append((time.monotonic(), list(kw.get("admitted", ())), args[3]))
            return apply(*args, **kw)

        reg.heartbeat = recording  # type: ignore[method-assign]
        server = grpc.aio.server()
        master_pb2_grpc.add_MasterServicer_to_server(MasterServicer(reg), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await reg.start()
        runtime = InstanceRuntime(served_engine, master=f"127.0.0.1:{port}", etcd=None)
        await runtime.start()
        router = Router("least_load", served_engine.config.block_size)
        decisions: list[RouteDecision] = []
        route = router.route

        def recording_route(*args: Any, **kw: Any) -> RouteDecision:
            decisions.append(route(*args, **kw))
            return decisions[-1]

        router.route = recording_route  # type: ignore[method-assign]
        facts = ModelFacts(tokenizer=None, model_config=None, default_max_model_len=256,
                           registry=reg)
        cluster = ClusterEngine(None, facts, reg, router)
        try:
            deadline = time.monotonic() + 30
            while not reg.routable() or reg.routable()[0].last_seq == 0:
                assert time.monotonic() < deadline, "the instance never registered and beat"
                await asyncio.sleep(0.02)
            view = reg.routable()[0]
            # Long enough that no request ends between entering the engine and the next
            # snapshot (a 250 ms beat), so until the first one ends, each beat's load must
            # count every id it lists. (After, a late id -- carried over a beat whose
            # snapshot timed out -- may name a finished request: allowed, never early.)
            params = SamplingParams(max_tokens=64, ignore_eos=True)
            streams = [cluster.generate([10 + k, 20 + k, 30 + k, 40, 50], params)
                       for k in range(6)]
            ended: dict[int, float] = {}

            async def drain(k: int) -> None:
                async for out in streams[k]:
                    if out.finished:
                        ended[k] = time.monotonic()

            await asyncio.wait_for(asyncio.gather(*(drain(k) for k in range(6))), 45)
            await asyncio.sleep(0.6)  # two more beats
            sent = {d.dispatch_id for d in decisions}
            listed = [i for _, ids, _ in beats for i in ids]
            assert len(sent) == 6 and sent <= set(listed), (sent, listed)
            first_end = min(ended.values())
            checked = [(ids, load) for at, ids, load in beats if ids and at < first_end]
            assert checked, "no beat listed a dispatch while the requests ran"
            for ids, load in checked:
                assert load.num_waiting + load.num_running >= len(ids), (ids, load)
            assert (view.pending_requests, view.pending_prefill_tokens, view.in_transit) == (
                0, 0, {})
        finally:
            await cluster.close()
            await runtime.close(0.5)
            await reg.close()
            await server.stop(0.5)

    asyncio.run(run())
