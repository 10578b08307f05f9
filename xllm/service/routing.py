"""Routing policies: which instance serves a request.

Every policy implements :meth:`RoutingPolicy.select` over the routable instances (the
registry's live :class:`~xllm.service.state.InstanceView` records) and the cluster's
:class:`~xllm.service.prefix_index.PrefixIndex`; :func:`make_policy` builds one by name
(``--policy``). :class:`Router` wraps a policy with what every policy needs: offline
requests only go to instances with spare capacity, and each decision is booked on the
chosen instance (pending load, optimistic prefix blocks) so a burst arriving between two
heartbeats sees it.

Policies never block and never copy the cluster: a decision is a pass over the instances
plus, for the prefix-aware ones, one walk over the prompt's block hashes.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from xllm.service.prefix_index import TieredPrefixIndex, prompt_block_hashes
from xllm.service.state import InstanceView, SpareCapacity

MIN_PEER_BLOCKS = 2  # a peer must hold this many more prompt blocks to be worth a hint

__all__ = [
    "POLICIES",
    "LeastLoadPolicy",
    "NoInstanceAvailable",
    "PrefixAwarePolicy",
    "RoundRobinPolicy",
    "RouteDecision",
    "RouteRequest",
    "Router",
    "RoutingPolicy",
    "SloAwarePolicy",
    "make_policy",
]

log = logging.getLogger(__name__)


class NoInstanceAvailable(RuntimeError):
    """No routable instance (none alive, or none with spare capacity for offline work)."""


@dataclass(slots=True)
class RouteRequest:
    """What routing needs to know about a request. ``block_hashes`` are filled in once per
    request (by :class:`Router`, with the cluster's block size) and reused on a retry."""

    prompt_token_ids: Sequence[int]
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None
    offline: bool = False
    block_hashes: list[int] | None = None


@dataclass(frozen=True, slots=True)
class RouteDecision:
    instance: InstanceView
    matched_tokens: int = 0  # prompt tokens the master expects to hit the prefix cache
    predicted_ttft_ms: float | None = None
    predicted_tpot_ms: float | None = None
    # Set by Router: the id this dispatch is booked under on ``instance`` (send it in
    # GenerateRequest.dispatch_id; settle it on the view when the stream starts or ends).
    dispatch_id: int = 0
    # Set by Router: another instance holding a longer cached prefix of the prompt (its
    # gRPC address and the prompt blocks it holds), which ``instance`` may fetch from.
    kv_peer: str = ""
    kv_peer_blocks: int = 0


class RoutingPolicy(ABC):
    """Chooses one of ``instances`` (non-empty, all alive) for ``request``. ``select`` has
    no side effects on the instances (Router books the decision); a policy may keep its
    own state (a round-robin cursor)."""

    name: ClassVar[str]

    @abstractmethod
    def select(
        self, request: RouteRequest, instances: Sequence[InstanceView], index: TieredPrefixIndex
    ) -> RouteDecision: ...


class RoundRobinPolicy(RoutingPolicy):
    name = "round_robin"

    def __init__(self) -> None:
        self._cursor = itertools.count()

    def select(
        self, request: RouteRequest, instances: Sequence[InstanceView], index: TieredPrefixIndex
    ) -> RouteDecision:
        return RouteDecision(instances[next(self._cursor) % len(instances)])


def _least_loaded(instances: Sequence[InstanceView], start: int) -> InstanceView:
    """Lowest load score; ties go to the first at or after ``start`` (rotating the start
    spreads equal instances instead of piling onto the first)."""
    n = len(instances)
    best = instances[start % n]
    best_score = best.load_score()
    for k in range(1, n):
        v = instances[(start + k) % n]
        s = v.load_score()
        if s < best_score:
            best, best_score = v, s
    return best


class LeastLoadPolicy(RoutingPolicy):
    """The instance with the lowest :meth:`InstanceView.load_score` (queued and running
    requests over its seats, plus KV usage, counting what was routed since its last beat)."""

    name = "least_load"

    def __init__(self) -> None:
        self._cursor = itertools.count()

    def select(
        self, request: RouteRequest, instances: Sequence[InstanceView], index: TieredPrefixIndex
    ) -> RouteDecision:
        return RouteDecision(_least_loaded(instances, next(self._cursor)))


class PrefixAwarePolicy(RoutingPolicy):
    """The instance holding the longest cached prefix of the prompt, among those not much
    busier than the idlest one.

    Busy means queued work, in requests: ``2 * (waiting + routed since its last report) +
    running``. An instance is *eligible* when that is at most ``min * balance_rel +
    balance_abs`` over the instances and its KV usage is under ``max_kv_usage``: a hot
    prefix keeps going to the instance that caches it until requests pile up there, then
    spills to the idlest instance, which caches the prefix in turn. KV usage is only a
    ceiling, not part of the comparison: requests sharing a cached prefix share its blocks,
    and counting each running request's KV share as load (as ``least_load`` does) moved a
    group away from its cache after two or three requests and made the copies evict each
    other (bench.cluster: 1.15x round_robin's hit rate). With no prefix hit anywhere it takes
    the instance with the least such work (KV usage breaks ties).
    """

    name = "prefix_aware"

    def __init__(self, balance_abs: float = 4.0, balance_rel: float = 1.5,
                 max_kv_usage: float = 0.9) -> None:
        if balance_abs < 0:
            raise ValueError(f"balance_abs must be >= 0 (requests), got {balance_abs}")
        if balance_rel < 1:
            raise ValueError(f"balance_rel must be >= 1, got {balance_rel}")
        if not 0 < max_kv_usage <= 1:
            raise ValueError(f"max_kv_usage must be in (0, 1], got {max_kv_usage}")
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.max_kv_usage = max_kv_usage
        self._cursor = itertools.count()

    def select(
        self, request: RouteRequest, instances: Sequence[InstanceView], index: TieredPrefixIndex
    ) -> RouteDecision:
        tiers = index.match_tiers(request.block_hashes or ())
        start = next(self._cursor)
        work = [v.work() for v in instances]
        # A pool hit counts in full; a tier hit by the share of recompute time its load
        # saves on that instance (pool above CPU above disk above none).
        matches: dict[int, float] = {}
        for v in instances:
            hit = tiers.get(v.slot)
            if hit is not None:
                w_cpu, w_disk = v.load.tier_weights(v.info.capacity.block_size)
                matches[v.slot] = hit[0] + w_cpu * hit[1] + w_disk * hit[2]
        if not matches:
            # A prefix cached nowhere goes where the fewest requests are, KV usage breaking
            # ties: least_load's score, where a few KV blocks outweigh a queued request, put
            # three of four new groups on one instance (bench.cluster's kill phase).
            n = len(instances)
            i = min(range(n), key=lambda k: (work[(start + k) % n],
                                             instances[(start + k) % n].load.kv_usage))
            return RouteDecision(instances[(start + i) % n])
        limit = min(work) * self.balance_rel + self.balance_abs
        best: InstanceView | None = None
        best_key = (-1.0, 0.0)
        n = len(instances)
        for k in range(n):
            i = (start + k) % n
            v = instances[i]
            if work[i] > limit or v.load.kv_usage > self.max_kv_usage:
                continue
            key = (matches.get(v.slot, 0.0), -v.load_score())
            if key > best_key:
                best, best_key = v, key
        if best is None:  # every instance near its KV ceiling: the least loaded takes it
            return RouteDecision(_least_loaded(instances, start))
        hit = tiers.get(best.slot)
        return RouteDecision(best, matched_tokens=sum(hit) * best.info.capacity.block_size
                             if hit else 0)


class SloAwarePolicy(RoutingPolicy):
    """Predicts each instance's TTFT and TPOT for this request from its reported metrics
    and picks the least-loaded one meeting the request's targets (``ttft_slo_ms`` /
    ``tpot_slo_ms``, else the policy's defaults; no target = no constraint). If none meets
    them, the one that misses them by the smallest factor.

    TTFT: the prefill tokens queued ahead (reported + routed since) plus this prompt's
    uncached tokens, over the instance's recent prefill throughput, plus one decode step;
    without a throughput report, its recent TTFT scaled by its queue. TPOT: its recent TPOT
    with the batch one larger, taking half a step as fixed cost and half as per-sequence
    cost (a deliberately simple model: one observation cannot fit both terms).
    """

    name = "slo_aware"

    def __init__(self, ttft_slo_ms: float | None = None, tpot_slo_ms: float | None = None) -> None:
        for name, v in (("ttft_slo_ms", ttft_slo_ms), ("tpot_slo_ms", tpot_slo_ms)):
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be > 0 or None, got {v}")
        self.ttft_slo_ms = ttft_slo_ms
        self.tpot_slo_ms = tpot_slo_ms
        self._cursor = itertools.count()

    @staticmethod
    def predict(v: InstanceView, prompt_len: int, matched_tokens: int) -> tuple[float, float]:
        """(TTFT ms, TPOT ms) predicted for a request of ``prompt_len`` tokens of which
        ``matched_tokens`` hit v's prefix cache."""
        load = v.load
        running = load.num_running + v.pending_requests
        if load.num_running > 0:
            tpot = load.tpot_ms * (0.5 + 0.5 * (running + 1) / load.num_running)
        else:
            tpot = load.tpot_ms
        if load.prefill_tokens_per_s > 0:
            queued = load.num_waiting_prefill_tokens + v.pending_prefill_tokens
            prefill = queued + max(prompt_len - matched_tokens, 1)
            ttft = 1000.0 * prefill / load.prefill_tokens_per_s + tpot
        else:
            queued_reqs = load.num_waiting + v.pending_requests
            ttft = load.ttft_ms * (1.0 + queued_reqs / v.info.capacity.max_num_seqs)
        return ttft, tpot

    def select(
        self, request: RouteRequest, instances: Sequence[InstanceView], index: TieredPrefixIndex
    ) -> RouteDecision:
        ttft_slo = request.ttft_slo_ms if request.ttft_slo_ms is not None else self.ttft_slo_ms
        tpot_slo = request.tpot_slo_ms if request.tpot_slo_ms is not None else self.tpot_slo_ms
        matches = index.match(request.block_hashes or ())
        prompt_len = len(request.prompt_token_ids)
        n = len(instances)
        start = next(self._cursor)
        best: RouteDecision | None = None
        best_key: tuple[float, float, float] = (float("inf"),) * 3
        for k in range(n):
            v = instances[(start + k) % n]
            matched = matches.get(v.slot, 0) * v.info.capacity.block_size
            ttft, tpot = self.predict(v, prompt_len, matched)
            # Worst ratio of prediction to target: <= 1 meets every target.
            miss = max(
                ttft / ttft_slo if ttft_slo else 0.0,
                tpot / tpot_slo if tpot_slo else 0.0,
            )
            # Meeting instances rank by load (keep headroom everywhere); the rest by miss.
            key = (0.0, v.load_score(), ttft) if miss <= 1.0 else (1.0, miss, ttft)
            if key < best_key:
                best_key = key
                best = RouteDecision(v, matched, ttft, tpot)
        assert best is not None
        return best


POLICIES: dict[str, type[RoutingPolicy]] = {
    p.name: p for p in (RoundRobinPolicy, LeastLoadPolicy, PrefixAwarePolicy, SloAwarePolicy)
}


def make_policy(name: str, **options: Any) -> RoutingPolicy:
    """The policy called ``name`` (``--policy``), built with ``options``."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {name!r}")
    return cls(**options)


class Router:
    """Applies a policy to the registry's routable instances and books the decision.

    ``block_size``: the KV block size to hash prompts in when the instances do not agree on
    one; otherwise the one they registered (their capacity's block_size), which is what
    their prefix caches hash in (an int8 KV cache defaults to 64-token blocks, others to
    16), whatever the master's own flags say. Instances that disagree are warned about:
    the prefix caches of those of another size are then never matched.
    ``spare``: when an instance may take offline work.
    """

    def __init__(self, policy: RoutingPolicy | str, block_size: int = 16,
                 spare: SpareCapacity | None = None) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.block_size = block_size
        self.spare = spare or SpareCapacity()
        self._warned_sizes: set[tuple[int, ...]] = set()
        # Dispatch ids from a random start: with several masters (--etcd) or a restarted
        # one, an instance's heartbeat reaches masters whose ids must not collide (2^62
        # apart on average; never 0, which means "untracked" on the wire).
        self._dispatch_ids = itertools.count(secrets.randbits(62) + 1)

    def _block_size_of(self, instances: Sequence[InstanceView]) -> int:
        """The block size the instances registered, when they all did the same (else ours,
        with a warning once per set of sizes)."""
        size = instances[0].info.capacity.block_size
        if all(v.info.capacity.block_size == size for v in instances):
            return size
        sizes = tuple(sorted({v.info.capacity.block_size for v in instances}))
        if sizes not in self._warned_sizes:
            self._warned_sizes.add(sizes)
            log.warning("instances of one model keep KV blocks of different sizes %s; prompts "
                        "are hashed in %d-token blocks, so the others' prefix caches are never "
                        "matched: start them with the same --block-size and --kv-cache-dtype",
                        list(sizes), self.block_size)
        return self.block_size

    def route(
        self, request: RouteRequest, instances: Sequence[InstanceView], index: TieredPrefixIndex
    ) -> RouteDecision:
        """Chooses an instance and books the request on it: a new dispatch in transit there
        (one more pending request, its uncached prompt tokens as pending prefill, see
        :meth:`InstanceView.book`), and its prompt's blocks as (optimistically) cached there
        -- the instance's heartbeats confirm or correct the blocks. The caller settles the
        dispatch (``decision.instance.settle(decision.dispatch_id)``) when its stream starts
        or ends, or if it is never sent. Raises NoInstanceAvailable when nothing can take
        the request."""
        if request.offline:
            instances = [v for v in instances if self.spare.admits(v)]
        if not instances:
            kind = "with spare capacity for offline work" if request.offline else "alive"
            raise NoInstanceAvailable(f"no instance is {kind}")
        if request.block_hashes is None:
            request.block_hashes = prompt_block_hashes(request.prompt_token_ids,
                                                       self._block_size_of(instances))
        decision = self.policy.select(request, instances, index)
        v = decision.instance
        dispatch_id = next(self._dispatch_ids)
        peer, peer_blocks = self._peer_hint(request, v, instances, index)
        v.book(dispatch_id, len(request.prompt_token_ids) - decision.matched_tokens)
        if request.block_hashes:
            index.apply(v.slot, request.block_hashes, ())
        # Positional: dataclasses.replace costs several microseconds per decision.
        return RouteDecision(v, decision.matched_tokens, decision.predicted_ttft_ms,
                             decision.predicted_tpot_ms, dispatch_id, peer, peer_blocks)

    @staticmethod
    def _peer_hint(request: RouteRequest, chosen: InstanceView,
                   instances: Sequence[InstanceView],
                   index: TieredPrefixIndex) -> tuple[str, int]:
        """The instance holding the longest cached prefix of the prompt (in any tier) when
        it holds at least MIN_PEER_BLOCKS more blocks than the chosen one: the chosen
        instance may fetch them instead of recomputing (it decides, from its costs)."""
        if not request.block_hashes or len(instances) < 2:
            return "", 0
        matches = index.match(request.block_hashes)
        have = matches.get(chosen.slot, 0)
        best, best_blocks = None, have + MIN_PEER_BLOCKS - 1
        for v in instances:
            n = matches.get(v.slot, 0)
            if n > best_blocks and v is not chosen:
                best, best_blocks = v, n
        return (best.info.address, best_blocks) if best is not None else ("", 0)
