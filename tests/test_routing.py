"""Routing policies, the cluster prefix index, and a shared-prefix cluster simulation."""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest

from xllm.ops.block_pool import PyBlockPool, py_block_hashes
from xllm.sampling_params import SamplingParams
from xllm.scheduler.kv_cache_manager import KVCacheManager
from xllm.scheduler.request import Request
from xllm.service.prefix_index import PrefixIndex, prompt_block_hashes
from xllm.service.routing import (
    POLICIES,
    NoInstanceAvailable,
    PrefixAwarePolicy,
    Router,
    RouteRequest,
    SloAwarePolicy,
    make_policy,
)
from xllm.service.state import Capacity, InstanceInfo, InstanceLoad, InstanceView

BS = 16


def make_cluster(n: int, seats: int = 16) -> tuple[list[InstanceView], PrefixIndex]:
    index = PrefixIndex()
    views = [
        InstanceView(
            InstanceInfo(f"i{k}", f"127.0.0.1:{7000 + k}", capacity=Capacity(seats, block_size=BS)),
            index.add_instance(),
        )
        for k in range(n)
    ]
    return views, index


# ---- prefix index ----------------------------------------------------------------------


def test_prompt_hashes_match_the_engine_prefix_cache() -> None:
    rng = random.Random(0)
    for length in (1, 15, 16, 17, 33, 200):
        tokens = [rng.randrange(50_000) for _ in range(length)]
        req = Request("r", tokens, SamplingParams())
        KVCacheManager(PyBlockPool(64), BS).get_computed_blocks(req)  # hashes as the engine
        n = (length - 1) // BS
        assert prompt_block_hashes(tokens, BS) == req.block_hashes[:n]
        assert prompt_block_hashes(tokens, BS) == py_block_hashes(tokens[: n * BS], BS)


def test_prefix_index_match_equals_brute_force() -> None:
    rng = random.Random(1)
    index = PrefixIndex()
    slots = [index.add_instance() for _ in range(6)]
    held: dict[int, set[int]] = {s: set() for s in slots}
    universe = list(range(1, 40))
    for _ in range(200):
        s = rng.choice(slots)
        if rng.random() < 0.1:  # a full resync
            new = set(rng.sample(universe, rng.randrange(20)))
            index.apply(s, new, [99], full=True)
            held[s] = new
        else:
            add = rng.sample(universe, rng.randrange(6))
            ev = rng.sample(universe, rng.randrange(6))
            index.apply(s, add, ev)
            held[s] = (held[s] - set(ev)) | set(add)
        query = rng.sample(universe, rng.randrange(1, 10))
        expect = {}
        for slot, h in held.items():
            d = 0
            while d < len(query) and query[d] in h:
                d += 1
            if d:
                expect[slot] = d
        assert index.match(query) == expect
        assert all(index.num_blocks(slot) == len(h) for slot, h in held.items())


def test_prefix_index_remove_frees_and_reuses_slot() -> None:
    index = PrefixIndex()
    a, b = index.add_instance(), index.add_instance()
    index.apply(a, [1, 2, 3], [])
    index.apply(b, [1, 2], [])
    index.remove_instance(a)
    assert index.match([1, 2, 3]) == {b: 2}
    assert index.add_instance() == a and index.num_blocks(a) == 0
    with pytest.raises(ValueError, match="slot 7"):
        index.apply(7, [1], [])


# ---- policies ----------------------------------------------------------------------------


def test_make_policy_names_and_bad_name() -> None:
    assert sorted(POLICIES) == ["least_load", "prefix_aware", "round_robin", "slo_aware"]
    for name in POLICIES:
        assert make_policy(name).name == name
    with pytest.raises(ValueError, match="policy must be one of"):
        make_policy("random")
    with pytest.raises(ValueError, match="balance_rel"):
        PrefixAwarePolicy(balance_rel=0.5)
    with pytest.raises(ValueError, match="ttft_slo_ms"):
        SloAwarePolicy(ttft_slo_ms=0)


def test_round_robin_cycles() -> None:
    views, index = make_cluster(3)
    router = Router("round_robin", BS)
    got = [router.route(RouteRequest([1, 2, 3]), views, index).instance for _ in range(6)]
    assert [v.instance_id for v in got] == ["i0", "i1", "i2"] * 2


def test_least_load_uses_queue_running_kv_and_pending() -> None:
    views, index = make_cluster(3)
    views[0].load = InstanceLoad(num_waiting=2, num_running=4)
    views[1].load = InstanceLoad(num_running=4, kv_usage=0.9)
    views[2].load = InstanceLoad(num_running=5)
    router = Router("least_load", BS)
    assert router.route(RouteRequest([1]), views, index).instance is views[2]
    # seats used x16: i0 8, i1 4 + 0.9 * 16, i2 5 + 2 per routed request (queued) until the
    # next report
    picks = [router.route(RouteRequest([1]), views, index).instance.instance_id for _ in range(3)]
    assert picks == ["i2", "i0", "i2"]
    assert views[2].pending_requests == 3 and views[0].pending_requests == 1


def test_prefix_aware_prefers_longest_prefix_within_balance() -> None:
    views, index = make_cluster(3)
    rng = random.Random(2)
    prompt = [rng.randrange(1000) for _ in range(10 * BS + 3)]
    hashes = prompt_block_hashes(prompt, BS)
    index.apply(views[0].slot, hashes[:3], [])
    index.apply(views[1].slot, hashes[:8], [])
    router = Router(PrefixAwarePolicy(balance_abs=0.5, balance_rel=1.5), BS)
    d = router.route(RouteRequest(prompt), views, index)
    assert d.instance is views[1] and d.matched_tokens == 8 * BS
    assert views[1].pending_prefill_tokens == len(prompt) - 8 * BS
    # the whole prompt is now (optimistically) cached on i1
    assert index.match(hashes) == {views[0].slot: 3, views[1].slot: 10}
    # i1 far busier than the idlest instance: the prefix no longer wins
    views[1].load = InstanceLoad(num_running=16)  # score 1.0 > 0 * 1.5 + 0.5
    views[1].pending_requests = 0
    d = router.route(RouteRequest(prompt), views, index)
    assert d.instance is views[0] and d.matched_tokens == 3 * BS


def test_prefix_aware_counts_queued_requests_not_kv_share_as_load() -> None:
    views, index = make_cluster(2)
    prompt = list(range(20 * BS + 5))
    hashes = prompt_block_hashes(prompt, BS)
    index.apply(views[0].slot, hashes, [])
    router = Router("prefix_aware", BS)
    # The holder runs 3 requests that fill 70% of its KV; the other is idle. Running
    # requests batch, and this prompt's prefix blocks are already there: it stays.
    views[0].load = InstanceLoad(num_running=3, kv_usage=0.7)
    d = router.route(RouteRequest(prompt), views, index)
    assert d.instance is views[0] and d.matched_tokens == 20 * BS
    # Requests queueing there (the routed one counts until the next report) move it.
    views[0].load = InstanceLoad(num_running=3, num_waiting=1, kv_usage=0.7)
    assert router.route(RouteRequest(prompt), views, index).instance is views[1]
    # So does a KV cache at its ceiling, where a new request would preempt one.
    views[0].load = InstanceLoad(num_running=1, kv_usage=0.95)
    views[0].pending_requests = 0
    assert router.route(RouteRequest(prompt), views, index).instance is views[1]


def test_prefix_aware_sends_an_uncached_prefix_where_fewest_requests_are() -> None:
    """A prompt cached nowhere goes by queued and running requests; KV usage only breaks
    ties (with least_load's score, 3% more KV outweighed two more running requests)."""
    views, index = make_cluster(2, seats=256)
    router = Router("prefix_aware", BS)
    views[0].load = InstanceLoad(num_running=3, kv_usage=0.10)
    views[1].load = InstanceLoad(num_running=1, kv_usage=0.13)
    d = router.route(RouteRequest(list(range(20 * BS))), views, index)
    assert d.instance is views[1] and d.matched_tokens == 0
    # Equal request counts: the emptier KV cache takes it, whichever the rotation starts at.
    views[1].load = InstanceLoad(num_running=3, kv_usage=0.13)
    for k in range(4):
        prompt = [200_000 + k, *range(20 * BS)]
        d = router.route(RouteRequest(prompt), views, index)
        assert d.instance is views[0]
        d.instance.settle(d.dispatch_id)  # its stream started: no longer pending


def test_prefix_aware_spreads_one_hot_prefix() -> None:
    """64 requests with one shared prefix and no heartbeat in between: the load guard
    spills them over all instances instead of piling them on the first that cached it."""
    views, index = make_cluster(4)
    router = Router("prefix_aware", BS)
    prompt = list(range(40 * BS))
    counts: dict[str, int] = {}
    for k in range(64):
        d = router.route(RouteRequest([*prompt, 100_000 + k]), views, index)
        counts[d.instance.instance_id] = counts.get(d.instance.instance_id, 0) + 1
    assert len(counts) == 4 and max(counts.values()) - min(counts.values()) <= 4


def test_slo_aware_predicts_and_meets_targets() -> None:
    views, index = make_cluster(3)
    # i0: fast prefill but a long prefill queue; i1: slower, empty; i2: slow decode.
    views[0].load = InstanceLoad(num_waiting_prefill_tokens=20_000, prefill_tokens_per_s=10_000,
                                 num_running=4, tpot_ms=20)  # fmt: skip
    views[1].load = InstanceLoad(prefill_tokens_per_s=4_000, num_running=4, tpot_ms=25)
    views[2].load = InstanceLoad(prefill_tokens_per_s=20_000, num_running=8, tpot_ms=80)
    prompt = list(range(2000))
    ttft0, tpot0 = SloAwarePolicy.predict(views[0], len(prompt), 0)
    assert ttft0 == pytest.approx(1000 * 22_000 / 10_000 + tpot0)
    assert tpot0 == pytest.approx(20 * (0.5 + 0.5 * 5 / 4))
    router = Router(SloAwarePolicy(ttft_slo_ms=1000, tpot_slo_ms=50), BS)
    d = router.route(RouteRequest(prompt), views, index)
    assert d.instance is views[1] and d.predicted_ttft_ms is not None
    assert d.predicted_ttft_ms <= 1000 and d.predicted_tpot_ms <= 50
    # per-request targets override the policy's: a loose TPOT target lets i2 (fastest TTFT
    # among the least loaded that meet) compete; an impossible TTFT picks the smallest miss
    d = router.route(RouteRequest(prompt, ttft_slo_ms=1.0, tpot_slo_ms=1e6), views, index)
    assert d.instance is views[2]  # 2000 / 20k tok/s + one step: the least TTFT overshoot


def test_router_offline_needs_spare_capacity() -> None:
    views, index = make_cluster(2, seats=4)
    views[0].load = InstanceLoad(num_running=4)
    views[1].load = InstanceLoad(num_running=1, kv_usage=0.95)
    router = Router("round_robin", BS)
    with pytest.raises(NoInstanceAvailable, match="spare capacity"):
        router.route(RouteRequest([1, 2], offline=True), views, index)
    views[1].load = InstanceLoad(num_running=1)
    assert router.route(RouteRequest([1, 2], offline=True), views, index).instance is views[1]
    with pytest.raises(NoInstanceAvailable, match="alive"):
        router.route(RouteRequest([1, 2]), [], index)


def test_router_hashes_in_the_instances_block_size(caplog: pytest.LogCaptureFixture) -> None:
    """Prompts are hashed in the block size the instances registered (an int8 KV cache's 64
    tokens), not the master's own; instances that disagree get a warning and the master's."""
    index = PrefixIndex()

    def view(k: int, block_size: int) -> InstanceView:
        info = InstanceInfo(f"i{k}", f"127.0.0.1:{7100 + k}",
                            capacity=Capacity(8, block_size=block_size))
        return InstanceView(info, index.add_instance())

    views = [view(0, 64), view(1, 64)]
    router = Router("round_robin", BS)
    prompt = list(range(300))
    request = RouteRequest(prompt)
    router.route(request, views, index)
    assert request.block_hashes == prompt_block_hashes(prompt, 64)
    with caplog.at_level("WARNING", logger="xllm.service.routing"):
        request = RouteRequest(prompt)
        router.route(request, [*views, view(2, 32)], index)
    assert request.block_hashes == prompt_block_hashes(prompt, BS)
    assert "different sizes [32, 64]" in caplog.text


# ---- simulation: cluster prefix-cache hit rate ----------------------------------------------


class SimInstance:
    """An instance's prefix cache as an LRU of block hashes with a fixed capacity, and its
    running requests; it reports both the way an instance heartbeats."""

    def __init__(self, view: InstanceView, capacity_blocks: int) -> None:
        self.view = view
        self.capacity = capacity_blocks
        self.cache: OrderedDict[int, None] = OrderedDict()
        self.added: set[int] = set()
        self.evicted: set[int] = set()
        self.running: list[int] = []  # finish ticks
        self.seq = 0

    def serve(self, hashes: list[int], tick: int, duration: int) -> int:
        hit = 0
        while hit < len(hashes) and hashes[hit] in self.cache:
            hit += 1
        for h in hashes:
            if h in self.cache:
                self.cache.move_to_end(h)
            else:
                self.cache[h] = None
                self.added.add(h)
                self.evicted.discard(h)
        while len(self.cache) > self.capacity:
            h, _ = self.cache.popitem(last=False)
            self.evicted.add(h)
            self.added.discard(h)
        self.running.append(tick + duration)
        return hit

    def heartbeat(self, index: PrefixIndex, tick: int) -> None:
        self.running = [t for t in self.running if t > tick]
        self.seq += 1
        self.view.load = InstanceLoad(num_running=len(self.running))
        self.view.pending_requests = 0
        index.apply(self.view.slot, self.added, self.evicted)
        self.added, self.evicted = set(), set()


def simulate(policy: str, seed: int = 3) -> float:
    """Cluster prefix-cache hit rate (hit blocks / looked-up blocks) for 8 groups of
    requests sharing a 512-token prefix (plus a 32-token unique suffix), arriving in random
    order at 4 instances that each cache about 3 prefixes."""
    rng = random.Random(seed)
    views, index = make_cluster(4)
    sims = [SimInstance(v, capacity_blocks=3 * 34) for v in views]
    by_view = {id(s.view): s for s in sims}
    prefixes = [[rng.randrange(50_000) for _ in range(512)] for _ in range(8)]
    router = Router(policy, BS)
    hit = looked_up = 0
    for tick in range(480):
        prompt = rng.choice(prefixes) + [rng.randrange(50_000) for _ in range(33)]
        req = RouteRequest(prompt)
        d = router.route(req, views, index)
        assert req.block_hashes is not None
        hit += by_view[id(d.instance)].serve(req.block_hashes, tick, duration=6)
        looked_up += len(req.block_hashes)
        if tick % 4 == 3:  # a heartbeat from every instance every 4 arrivals
            for s in sims:
                s.heartbeat(index, tick)
    return hit / looked_up


def test_prefix_aware_hit_rate_beats_round_robin() -> None:
    rr = simulate("round_robin")
    pa = simulate("prefix_aware")
    ll = simulate("least_load")
    assert pa >= 1.5 * rr, (pa, rr)
    assert pa >= 1.5 * ll, (pa, ll)
    assert pa > 0.8  # 8 prefixes on 4 instances that fit 3 each: nearly every block hits
