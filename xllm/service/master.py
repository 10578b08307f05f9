"""The master's core: the gRPC ``Master`` servicer over the registry, and
:class:`ClusterEngine`, which gives the OpenAI layer of :mod:`xllm.api` the AsyncEngine
interface it serves (``generate`` -> a stream of ``RequestOutput``), backed by the cluster.

So ``xllm-master`` serves exactly xllm-server's HTTP API, errors and chat templates: the
same ``build_app`` runs over a ClusterEngine instead of an AsyncEngine.

Each completion of a request is a *flight*: routed by :class:`~xllm.service.routing.Router`,
streamed from an instance's ``Instance.Generate``. When the instance dies (its stream breaks,
or the registry reports it down after a missed heartbeat deadline) the flight is resumed on
another instance with the prompt plus every token already received, so the client's stream
continues with no gap and no duplicate. At most ``max_attempts`` instances are tried; then
the request ends with EngineDeadError (HTTP 503 / an SSE error event), never a hang.

Online flights are routed at once; offline flights wait in the master's bounded
:class:`~xllm.service.admission.OfflineAdmission` queue for spare capacity (a full queue is
HTTP 503), and a resumed offline flight waits there again, keeping its place.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import grpc

from xllm.engine.async_engine import READY, EngineDeadError, EngineStats
from xllm.engine.outputs import CompletionOutput, RequestOutput
from xllm.sampling_params import SamplingParams
from xllm.service.admission import OfflineAdmission
from xllm.service.instance import params_to_proto
from xllm.service.metrics import MasterMetrics
from xllm.service.pd import PdController
from xllm.service.proto import instance_pb2, instance_pb2_grpc, master_pb2, master_pb2_grpc
from xllm.service.registry import EmbeddedRegistry, InstanceEvent, InstanceRegistry
from xllm.service.routing import RouteDecision, Router, RouteRequest
from xllm.service.state import InstanceInfo, InstanceLoad, InstanceView
from xllm.service.tasks import stop_task

PD_HOLD_MS = 10_000  # a prefill instance holds a prompt's KV this long for its decode

# KvTier (master.proto) -> the prefix index's tier names.
_TIER_NAMES = {master_pb2.KV_TIER_POOL: "pool", master_pb2.KV_TIER_CPU: "cpu",
               master_pb2.KV_TIER_DISK: "disk"}

__all__ = ["ClusterEngine", "MasterServicer", "ModelFacts", "pd_candidates",
           "pd_overflow"]

_log = logging.getLogger("xllm.master")


class MasterServicer(master_pb2_grpc.MasterServicer):
    """``Master`` over a registry. With etcd, registration happens in etcd (Register is
    refused) and every master takes heartbeats (each routes on the instances' load; only
    the leader applies their deadlines)."""

    def __init__(self, registry: InstanceRegistry) -> None:
        self.registry = registry

    async def Register(self, request: master_pb2.RegisterRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> master_pb2.RegisterResponse:
        if not isinstance(self.registry, EmbeddedRegistry):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this master uses etcd: register the instance there (--etcd)")
        try:
            info = InstanceInfo.from_proto(request.info)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        view = self.registry.register(info)  # type: ignore[union-attr]
        r = self.registry
        return master_pb2.RegisterResponse(
            incarnation_id=view.incarnation_id,
            heartbeat_interval_ms=int(r.heartbeat_interval_s * 1000),
            heartbeat_timeout_ms=int(r.heartbeat_timeout_s * 1000))

    async def Heartbeat(self, request: master_pb2.HeartbeatRequest,  # noqa: N802
                        context: grpc.aio.ServicerContext) -> master_pb2.HeartbeatResponse:
        pc = request.prefix_cache
        tiers = [(_TIER_NAMES[d.tier], d.added, d.evicted) for d in request.tier_caches
                 if d.tier in _TIER_NAMES and d.tier != master_pb2.KV_TIER_POOL]
        result = self.registry.heartbeat(
            request.instance_id, request.incarnation_id, request.seq,
            InstanceLoad.from_proto(request.load), pc.added, pc.evicted, pc.full,
            admitted=request.admitted_dispatch_ids, tiers=tiers)
        return master_pb2.HeartbeatResponse(status=int(result.status),  # type: ignore[arg-type]
                                            resync_prefix_cache=result.resync_prefix_cache)

    async def Deregister(self, request: master_pb2.DeregisterRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> master_pb2.DeregisterResponse:
        if isinstance(self.registry, EmbeddedRegistry):
            self.registry.deregister(request.instance_id, request.incarnation_id)
        return master_pb2.DeregisterResponse()


@dataclass
class ModelFacts:
    """The model's facts the OpenAI layer reads (``EngineClient``): the tokenizer (prompts,
    chat template, logprob token texts), the model's config (vocabulary and hidden sizes)
    and the context length."""

    tokenizer: Any
    model_config: Any
    default_max_model_len: int
    registry: InstanceRegistry

    @property
    def max_model_len(self) -> int:
        """The smallest context any live instance holds (a resumed request may go anywhere)."""
        lens = [v.info.capacity.max_model_len for v in self.registry.routable()
                if v.info.capacity.max_model_len]
        return min(lens) if lens else self.default_max_model_len


@dataclass(eq=False)  # identity: flights live in per-instance sets
class _Flight:
    """One completion in flight; what the client has received so far lives here."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    priority: int
    offline: bool
    route: RouteRequest
    generated: list[int] = field(default_factory=list)
    text: str = ""
    attempt: int = 0
    instance_id: str = ""
    call: Any = None
    lost: str | None = None  # why the current instance was given up (set before cancel)
    excluded: set[str] = field(default_factory=set)
    seq: int = 0  # offline: place in the admission queue (kept when resumed)
    admitted: asyncio.Future[RouteDecision] | None = None  # offline: its first queue entry
    # Prefill/decode disaggregation: "prefill" while a prefill instance computes the prompt
    # and the first token, "decode" once a decode instance is to take it on, "" otherwise.
    phase: str = ""
    prefill_address: str = ""  # the prefill instance holding the prompt's KV
    prefill_key: str = ""  # its hold on those blocks (released by the decode's fetch)
    prefill_cached: int = 0  # prompt tokens the prefill instance found cached


def _settle_unsent(admitted: asyncio.Future[RouteDecision]) -> None:
    """An offline flight placed by the admission queue but abandoned before its dispatch
    was sent: its booking must not stay in transit."""
    if admitted.done() and not admitted.cancelled() and admitted.exception() is None:
        decision = admitted.result()
        decision.instance.settle(decision.dispatch_id)


class ClusterStream:
    """The AsyncEngine ``RequestStream`` interface over ``n`` flights (one per completion)."""

    def __init__(self, engine: ClusterEngine, request_id: str, prompt: list[int],
                 params: SamplingParams, priority: int, offline: bool) -> None:
        self.request_id = request_id
        self.engine = engine
        self.prompt = prompt
        self.offline = offline
        self.started = False
        self.finished = False
        self._events: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self._outs = [CompletionOutput(i, "", []) for i in range(params.n)]
        self._cached = 0
        self._embedding: list[float] | None = None  # an embedding request's, once finished
        self._tasks: list[asyncio.Task[None]] = []
        self._flights: list[_Flight] = []
        seq = engine.admission.next_seq()
        for i in range(params.n):
            p = replace(params, n=1, seed=None if params.seed is None else params.seed + i)
            rid = request_id if params.n == 1 else f"{request_id}#{i}"
            if p.logprobs is not None:
                self._outs[i].logprobs = []
            flight = _Flight(rid, prompt, p, priority, offline, RouteRequest(prompt,
                                                                             offline=offline))
            if offline:  # queued now, so the queue's bound holds however many arrive at once
                flight.seq = seq
                flight.admitted = engine.admission.enqueue(flight.route, priority, seq)
            self._flights.append(flight)
            self._tasks.append(asyncio.create_task(self._fly(i, flight)))

    async def _fly(self, index: int, flight: _Flight) -> None:
        try:
            async for resp in self.engine._run_flight(flight):
                self._events.put_nowait((index, resp))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - handed to the reader, who maps it to HTTP
            self._events.put_nowait((index, e))

    def __aiter__(self) -> ClusterStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        index, resp = await self._events.get()
        if isinstance(resp, BaseException):
            self.abort()
            raise resp
        self.started = True
        c = self._outs[index]
        ids = list(resp.token_ids)
        c.token_ids = c.token_ids + ids
        c.text += resp.text_delta
        if c.logprobs is not None:
            for lp in resp.logprobs:
                entry = dict(zip(lp.top_token_ids, lp.top_logprobs, strict=False))
                entry[lp.token_id] = lp.logprob
                c.logprobs.append(entry)
        if resp.finish_reason:
            c.finish_reason = resp.finish_reason
            kind = resp.WhichOneof("stop_reason")
            c.stop_reason = getattr(resp, kind) if kind else None
            self._cached = max(self._cached, resp.usage.cached_tokens)
            if resp.embedding:
                self._embedding = list(resp.embedding)
        done = all(o.finish_reason is not None for o in self._outs)
        if done:
            self.finished = True
            self.engine._streams.pop(self.request_id, None)
        outputs = [CompletionOutput(o.index, o.text, o.token_ids, o.finish_reason, o.stop_reason,
                                    None if o.logprobs is None else list(o.logprobs))
                   for o in self._outs]
        return RequestOutput(self.request_id, None, self.prompt, outputs, done,
                             num_cached_tokens=self._cached,
                             deltas={index: (resp.text_delta, ids)},
                             embedding=self._embedding if done else None)

    def abort(self) -> None:
        self.finished = True
        self.engine._streams.pop(self.request_id, None)
        for t in self._tasks:
            t.cancel()
        for f in self._flights:  # out of the offline queue even if its task never ran
            if f.admitted is not None:
                f.admitted.cancel()
                _settle_unsent(f.admitted)

    async def __aenter__(self) -> ClusterStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.abort()


def pd_candidates(fresh: list[InstanceView], started: bool, max_tokens: int | None,
                  prompt_len: int = 0, slo_ttft_ms: float | None = None,
                  slo_tpot_ms: float | None = None,
                  recent_overflow: Mapping[str, int] | None = None
                  ) -> tuple[str, list[InstanceView]]:
    """Prefill/decode disaggregation: with a prefill and a decode instance among ``fresh``,
    a new request goes to a prefill instance (the prompt and its first token) and one with
    tokens already (``started``) to a decode instance; otherwise (a role missing, or gone)
    any instance serves the whole request. With a TTFT SLO, a new request that every
    prefill instance would start too late goes whole to a decode instance that can take
    it (:func:`pd_overflow`). Returns the phase ("prefill", "decode", "" for the whole
    request, or "overflow": the whole request on a decode instance) and the instances that
    may take it."""
    prefill = [v for v in fresh if v.info.role == "prefill"]
    decode = [v for v in fresh if v.info.role == "decode"]
    if started:
        return ("decode", decode) if decode else ("", fresh)
    if prefill and decode and max_tokens != 1:
        if slo_ttft_ms is not None and prompt_len > 0:
            takers = pd_overflow(prefill, decode, prompt_len, max_tokens, slo_ttft_ms,
                                 slo_tpot_ms, recent_overflow)
            if takers:
                return "overflow", takers
        return "prefill", prefill
    return "", fresh


def _prompt_ms(v: InstanceView, tokens: int, model: InstanceView) -> float | None:
    """ms for v to compute ``tokens`` prompt tokens: its speed model's TTFT, else
    ``model``'s (an instance of the same cluster that has one, else a prefill instance),
    else ``model``'s or its own measured prompt throughput (which counts queueing, so it
    errs long; a decode instance's counts the one token it computes after a KV fetch, so
    it comes last); None with none of these."""
    for speed in (v.load.speed, model.load.speed):
        if speed is not None:
            return max(speed.ttft_ms(tokens), 0.0)
    for tps in (model.load.prefill_tokens_per_s, v.load.prefill_tokens_per_s):
        if tps > 0:
            return 1000.0 * tokens / tps
    return None


# The share of the TPOT SLO a decode instance's running requests may be predicted to use
# after taking overflow prompts (the rest is kept for the prediction's error).
OVERFLOW_TPOT_SHARE = 0.8
# Overflow prompts count against a decode instance for the decode time of this many tokens
# at the TPOT SLO (about the life of the requests running there when they were sent).
OVERFLOW_WINDOW_TOKENS = 128


def pd_overflow(prefill: list[InstanceView], decode: list[InstanceView], prompt_len: int,
                max_tokens: int | None, slo_ttft_ms: float, slo_tpot_ms: float | None,
                recent_tokens: Mapping[str, int] | None = None) -> list[InstanceView]:
    """The decode instances that should serve a new request whole (prefill included):
    empty unless every prefill instance's predicted TTFT (the prompt tokens queued on it,
    reported and routed since, then this prompt) misses ``slo_ttft_ms``. A decode instance
    qualifies when it would give the first token sooner, and its running requests' TPOT
    stays within ``OVERFLOW_TPOT_SHARE`` of ``slo_tpot_ms``: every prompt its steps compute
    meanwhile stalls them all, so the stalls of the overflow prompts sent to it recently
    (``recent_tokens``: instance id -> their tokens), of those queued there and of this one
    are spread over ``max_tokens`` of output (128 when unbounded) on top of its reported
    TPOT. Bursts of long prompts then spill onto the decode instances' spare time instead of
    queueing at the prefill ones, as far as that time goes."""
    def queued(v: InstanceView) -> int:
        return v.load.num_waiting_prefill_tokens + v.pending_prefill_tokens

    reference = next((v for v in prefill + decode if v.load.speed is not None), prefill[0])
    # The prompts queued ahead at this prompt's rate of ms per token.
    ttft_p = []
    for v in prefill:
        ms = _prompt_ms(v, prompt_len, reference)
        if ms is None:
            return []  # nothing to predict with: keep to the roles
        ttft_p.append(ms * (queued(v) + prompt_len) / prompt_len)
    best_p = min(ttft_p)
    if best_p <= slo_ttft_ms:
        return []
    out_len = max(max_tokens or 128, 1)
    takers = []
    for v in decode:
        prompt_ms = _prompt_ms(v, prompt_len, reference)
        if prompt_ms is None:
            continue
        per_token = prompt_ms / prompt_len
        ttft_d = per_token * (queued(v) + prompt_len) + v.load.tpot_ms
        stall = per_token * ((recent_tokens or {}).get(v.instance_id, 0) + queued(v)
                             + prompt_len)
        tpot_d = v.load.tpot_ms + stall / out_len
        if ttft_d < best_p and (slo_tpot_ms is None
                                or tpot_d <= OVERFLOW_TPOT_SHARE * slo_tpot_ms):
            takers.append(v)
    return takers


class ClusterEngine:
    """The cluster as an ``xllm.engine.protocol.EngineClient`` (the module docstring says how
    it serves), for the OpenAI layer of xllm-master.

    ``max_attempts``: instances one completion may use in all (first try + resumes);
    ``instance_wait_s``: how long a flight waits for a live instance it has not failed on;
    ``max_offline_queued``: offline requests that may wait at the master for capacity.
    """

    # The instances do not send prompt logprobs back yet: echo + logprobs and
    # prompt_logprobs are refused (400).
    supports_prompt_logprobs = False

    def __init__(self, config: Any, facts: ModelFacts, registry: InstanceRegistry,
                 router: Router, *, max_attempts: int = 4, instance_wait_s: float = 3.0,
                 max_offline_queued: int = 1024, pd: PdController | None = None) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.config = config
        self.facts = facts
        self.registry = registry
        self.router = router
        self.max_attempts = max_attempts
        self.instance_wait_s = instance_wait_s
        self.num_resumed = 0  # flights moved to another instance (a metric, and for tests)
        self.num_pd_handoffs = 0  # flights a prefill instance handed to a decode instance
        self.num_pd_overflows = 0  # new flights a decode instance took whole (pd_overflow)
        self._overflows: deque[tuple[float, str, int]] = deque()  # (when, instance, tokens)
        self.num_role_switches = 0
        self.num_migrated = 0  # flights a role switch handed to another instance
        self.admission = OfflineAdmission(registry, router, max_queued=max_offline_queued,
                                          instance_wait_s=instance_wait_s)
        self.metrics = MasterMetrics()  # the master's /metrics (master_server registers them)
        # PD planning (--pd-policy): meters the traffic always; plans roles when dynamic.
        self.pd = pd or PdController("static")
        self._pd_task: asyncio.Task[None] | None = None
        self._streams: dict[str, ClusterStream] = {}
        self._by_instance: dict[str, set[_Flight]] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._ids = 0
        self._closed = False
        registry.subscribe(self._on_event)

    # ---- what the OpenAI layer reads (EngineClient) ----------------------------------------

    @property
    def model_path(self) -> str:
        return str(self.config.model)

    @property
    def tokenizer(self) -> Any:
        return self.facts.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.facts.max_model_len

    @property
    def vocab_size(self) -> int:
        return int(self.facts.model_config.vocab_size)

    @property
    def hidden_size(self) -> int:
        return int(self.facts.model_config.hidden_size)

    @property
    def state(self) -> str:
        if self._closed:
            return "stopped"
        return READY if self.registry.routable() else "unavailable"

    @property
    def error(self) -> str | None:
        if self.state == READY:
            return None
        return "no instance of the cluster is alive; retry shortly"

    def stats(self) -> EngineStats:
        views = self.registry.routable()
        n = max(len(views), 1)
        return EngineStats(
            state=self.state, num_running=sum(v.load.num_running for v in views),
            num_waiting=sum(v.load.num_waiting for v in views),
            kv_cache_usage=sum(v.load.kv_usage for v in views) / n)

    def num_unstarted(self) -> int:
        """Online requests without output yet (the server's overload limit): offline ones
        waiting at the master are bounded by the admission queue instead, so a backlog of
        offline work never makes online requests look overloaded."""
        return sum(1 for s in list(self._streams.values()) if not s.started and not s.offline)

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self.state == READY

    def new_request_id(self) -> str:
        self._ids += 1
        return f"mreq-{self._ids}-{time.monotonic_ns() % 1_000_000_000}"

    def generate(self, prompt: str | list[int], params: SamplingParams, *,
                 request_id: str | None = None, priority: int = 0,
                 offline: bool = False) -> ClusterStream:
        if self.state != READY:
            raise EngineDeadError(self.error or "the master is stopped")
        if offline:
            self.admission.check_room(params.n)  # AdmissionQueueFull: HTTP 503 "overloaded"
        if isinstance(prompt, str):
            prompt = self.facts.tokenizer.encode(prompt)
        rid = request_id or self.new_request_id()
        self.pd.meter.arrive(time.monotonic(), len(prompt), params.max_tokens)
        stream = ClusterStream(self, rid, list(prompt), params, priority, offline)
        self._streams[rid] = stream
        return stream

    def shutdown(self, timeout: float = 10.0) -> None:
        self._closed = True
        for s in list(self._streams.values()):
            s.abort()

    async def close(self) -> None:
        self.shutdown()
        await stop_task(self._pd_task)
        await self.admission.close()
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()

    # ---- flights ---------------------------------------------------------------------------

    def _on_event(self, event: InstanceEvent) -> None:
        if event.kind != "down":
            return
        self.metrics.instance_down()
        iid = event.view.instance_id
        for flight in list(self._by_instance.get(iid, ())):
            if flight.call is not None and flight.lost is None:
                flight.lost = f"instance {iid} went down ({event.reason})"
                flight.call.cancel()
        ch = self._channels.pop(event.view.info.address, None)
        if ch is not None:
            asyncio.get_running_loop().create_task(ch.close())

    def _stub(self, address: str) -> instance_pb2_grpc.InstanceStub:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = grpc.aio.insecure_channel(address)
        return instance_pb2_grpc.InstanceStub(ch)

    async def _pick(self, flight: _Flight) -> RouteDecision:
        """Routes the flight (booked on the chosen instance: the caller settles it)."""
        if flight.offline:  # waits for spare capacity; a resumed flight keeps its place
            admitted = flight.admitted or self.admission.enqueue(
                flight.route, flight.priority, flight.seq, flight.excluded, resumed=True)
            flight.admitted = None
            try:
                return await admitted
            except asyncio.CancelledError:
                _settle_unsent(admitted)  # placed, but the flight is gone before sending
                raise
        deadline = time.monotonic() + self.instance_wait_s
        while True:
            t0 = time.perf_counter()
            live = self.registry.routable()
            fresh = [v for v in live if v.instance_id not in flight.excluded]
            if not fresh and live and time.monotonic() >= deadline:
                fresh = list(live)  # maybe the earlier failure was transient
            if fresh:
                overflow = self.pd.overflow
                phase, fresh = pd_candidates(
                    fresh, bool(flight.generated), flight.params.max_tokens,
                    len(flight.prompt), self.pd.slo_ttft_ms if overflow else None,
                    self.pd.slo_tpot_ms, self._recent_overflow() if overflow else None)
                flight.phase = phase
                decision = self.router.route(flight.route, fresh, self.registry.index)
                if phase == "overflow":  # a decode instance takes it whole
                    self.num_pd_overflows += 1
                    self.metrics.pd_overflows.inc()
                    self._overflows.append((time.monotonic(), decision.instance.instance_id,
                                            len(flight.prompt)))
                self.metrics.routing_seconds.observe(time.perf_counter() - t0)
                return decision
            if not live and time.monotonic() >= deadline or self._closed:
                raise EngineDeadError(f"no instance is alive to serve request "
                                      f"{flight.request_id} (attempt {flight.attempt + 1})")
            await asyncio.sleep(0.05)

    def _recent_overflow(self) -> dict[str, int]:
        """Prompt tokens sent whole to each decode instance by overflow within the last
        OVERFLOW_WINDOW_TOKENS x the TPOT SLO (none without one)."""
        if not self._overflows or self.pd.slo_tpot_ms is None:
            return {}
        horizon = time.monotonic() - OVERFLOW_WINDOW_TOKENS * self.pd.slo_tpot_ms / 1e3
        while self._overflows and self._overflows[0][0] < horizon:
            self._overflows.popleft()
        recent: dict[str, int] = {}
        for _, iid, tokens in self._overflows:
            recent[iid] = recent.get(iid, 0) + tokens
        return recent

    def start_pd(self) -> None:
        """Starts the dynamic PD loop (``--pd-policy dynamic``); on the running loop."""
        if self.pd.policy == "dynamic" and self._pd_task is None:
            self._pd_task = asyncio.get_running_loop().create_task(self._pd_loop(),
                                                                   name="pd-planner")

    async def _pd_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.pd.interval_s)
            try:
                await self.pd_round()
            except Exception:  # noqa: BLE001 - a failed round must not end planning
                _log.exception("PD planning round failed")

    async def pd_round(self) -> None:
        """One planning round: the planner's moves, made (every switch at once) and timed."""
        moves = self.pd.plan(time.monotonic(), self.registry.routable())
        if not moves:
            return
        record = self.pd.decisions[-1]
        _log.info("PD planner: %s", record.reason)
        t0 = time.monotonic()
        results = await asyncio.gather(
            *(self.switch_role(v.instance_id, role) for v, role in moves),
            return_exceptions=True)
        record.switch_seconds = round(time.monotonic() - t0, 3)
        for r in results:
            if isinstance(r, BaseException):
                record.errors.append(f"{type(r).__name__}: {r}")
            else:
                record.migrated += r.migrated

    async def switch_role(self, instance_id: str, role: str, drain_timeout_s: float = 30.0,
                          migrate: bool = True) -> instance_pb2.SetRoleResponse:
        """Tells an instance to serve another role (PD). It refuses work of its old role at
        once, lets what it holds finish, then answers; turning prefill with ``migrate``, it
        hands its decoding requests off at once instead (their KV held for the decode
        instance each resumes on). The master routes to it by its new role from the start
        (the instance takes new-role work while it drains); heartbeats keep reporting the
        role."""
        view = self.registry.get(instance_id)
        if view is None:
            raise ValueError(f"no live instance {instance_id!r}")
        view.info = replace(view.info, role=role)
        resp = await self._stub(view.info.address).SetRole(
            instance_pb2.SetRoleRequest(role=role, drain_timeout_ms=int(drain_timeout_s * 1e3),
                                        migrate=migrate),
            timeout=drain_timeout_s + 5)
        if self.registry.get(instance_id) is view and view.info.role != resp.role:
            view.info = replace(view.info, role=resp.role)
        self.num_role_switches += 1
        self.metrics.role_switches.inc()
        return resp

    async def _run_flight(self, flight: _Flight) -> Any:
        """Yields the flight's GenerateResponses, resuming on another instance when one
        dies. EngineDeadError after max_attempts; ValueError when an instance refuses the
        request itself (bad input is not retried)."""
        last_error = ""
        lost_at: float | None = None  # when the previous instance was given up (a resume)
        while True:
            decision = await self._pick(flight)
            view, dispatch_id = decision.instance, decision.dispatch_id
            iid = flight.instance_id = view.instance_id
            flight.lost = None
            params, phase = flight.params, flight.phase
            kv_peer, kv_peer_blocks = decision.kv_peer, decision.kv_peer_blocks
            if phase == "prefill":  # the prompt and the first token; the KV held for D
                # (min_tokens past the first token is the decode instance's to keep)
                params = replace(params, max_tokens=1, min_tokens=min(params.min_tokens, 1))
            elif flight.prefill_address and flight.prefill_address != view.info.address:
                # After a PD handoff or a role switch's hand-off: the instance it left holds
                # the KV of every token but the last.
                kv_peer = flight.prefill_address
                kv_peer_blocks = ((len(flight.prompt) + len(flight.generated) - 1)
                                  // view.info.capacity.block_size)
            req = instance_pb2.GenerateRequest(
                request_id=f"{flight.request_id}@{flight.attempt}{phase[:1]}",
                prompt_token_ids=flight.prompt, generated_token_ids=flight.generated,
                generated_text=flight.text, sampling_params=params_to_proto(params),
                priority=flight.priority, offline=flight.offline, attempt=flight.attempt,
                dispatch_id=dispatch_id, kv_peer=kv_peer, kv_peer_blocks=kv_peer_blocks,
                hold_kv_ms=PD_HOLD_MS if phase == "prefill" else 0,
                kv_peer_hold=flight.prefill_key if phase == "decode" and kv_peer else "")
            try:
                flight.call = self._stub(view.info.address).Generate(req)
            except BaseException:
                view.settle(dispatch_id)
                raise
            self._by_instance.setdefault(iid, set()).add(flight)
            handed_off = False
            try:
                async for resp in flight.call:
                    # A first message means the engine has it (its load counts it, or will
                    # by the next beat): in transit no longer, whether or not a beat said so.
                    view.settle(dispatch_id)
                    if resp.handoff_hold:  # a role switch handed it off, its KV held there
                        flight.prefill_address = view.info.address
                        flight.prefill_key = resp.handoff_hold
                        handed_off = True
                        break
                    if lost_at is not None and resp.token_ids:
                        self.metrics.resume_seconds.observe(time.monotonic() - lost_at)
                        lost_at = None
                    flight.generated.extend(resp.token_ids)
                    flight.text += resp.text_delta
                    if phase == "prefill" and resp.finish_reason == "length" and (
                            flight.params.max_tokens is None
                            or len(flight.generated) < flight.params.max_tokens):
                        # Only the prefill's own limit: the stream goes on from a decode
                        # instance, which takes the KV from this one.
                        flight.prefill_address = view.info.address
                        flight.prefill_key = req.request_id
                        flight.prefill_cached = resp.usage.cached_tokens
                        handoff = instance_pb2.GenerateResponse()
                        handoff.CopyFrom(resp)
                        handoff.ClearField("finish_reason")
                        handoff.ClearField("usage")
                        yield handoff
                        break
                    if phase == "decode" and flight.prefill_address and resp.finish_reason:
                        # cached = what the prefill instance found, not what D fetched
                        resp.usage.cached_tokens = flight.prefill_cached
                    yield resp
                    if resp.finish_reason:
                        self.pd.meter.finish(time.monotonic(), len(flight.generated),
                                             flight.params.max_tokens)
                        return
                if handed_off:
                    self.num_migrated += 1
                    self.metrics.migrated_flights.inc()
                    continue  # to another instance (not a failure: nothing excluded)
                if phase == "prefill" and flight.prefill_address:
                    self.num_pd_handoffs += 1
                    self.metrics.pd_handoffs.inc()
                    continue  # to a decode instance (not a failure: nothing excluded)
                last_error = f"instance {iid} ended the stream before the request finished"
            except asyncio.CancelledError:
                if flight.lost is None:
                    flight.call.cancel()
                    raise
                last_error = flight.lost
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise ValueError(e.details()) from None
                last_error = f"instance {iid}: {e.code().name}: {e.details()}"
            finally:  # ended, failed or cancelled: nothing of it is in transit any more
                view.settle(dispatch_id)
                self._by_instance.get(iid, set()).discard(flight)
            flight.excluded.add(iid)
            lost_at = time.monotonic()
            flight.attempt += 1
            if flight.attempt >= self.max_attempts:
                raise EngineDeadError(
                    f"request {flight.request_id} failed on {flight.attempt} instance(s); "
                    f"the last error: {last_error}")
            self.num_resumed += 1
            self.metrics.resumed_flights.inc()
            _log.warning("resuming %s after %d tokens (attempt %d): %s", flight.request_id,
                         len(flight.generated), flight.attempt + 1, last_error)

