"""Block events: the KV store reports what each tier gains and loses; the master's tiered
prefix index applies them and equals what the instances hold, per tier; routing values a
pool hit above a CPU-tier hit above a disk-tier hit above none."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace
from pathlib import Path

import pytest

from xllm.kvcache.store import KVStore, KVStoreConfig
from xllm.sampling_params import SamplingParams
from xllm.scheduler import Request, Scheduler, SchedulerConfig
from xllm.service.prefix_index import TIERS, TieredPrefixIndex, prompt_block_hashes
from xllm.service.registry import EmbeddedRegistry
from xllm.service.routing import Router, RouteRequest
from xllm.service.state import Capacity, InstanceInfo, InstanceLoad

pytestmark = pytest.mark.timeout(120)


def _brute(index: TieredPrefixIndex, slot: int, hashes: list[int]) -> tuple[int, int, int]:
    out, i = [0, 0, 0], 0
    for k, tier in enumerate(TIERS):
        while i < len(hashes) and index.holds(slot, hashes[i], tier):
            out[k] += 1
            i += 1
    return out[0], out[1], out[2]


def test_tiered_match_equals_the_engines_lookup_order() -> None:
    rng = random.Random(0)
    for _ in range(300):
        index = TieredPrefixIndex()
        slots = [index.add_instance() for _ in range(rng.randint(1, 5))]
        hashes = list(range(100, 100 + rng.randint(1, 12)))
        for slot in slots:
            for tier in TIERS:
                index.apply(slot, [h for h in hashes if rng.random() < 0.6], (), tier=tier)
        got = index.match_tiers(hashes)
        for slot in slots:
            want = _brute(index, slot, hashes)
            assert got.get(slot, (0, 0, 0)) == want
            assert index.match(hashes).get(slot, 0) == sum(want)
    with pytest.raises(ValueError, match="tier"):
        index.apply(0, [1], (), tier="tape")


def test_registry_applies_tier_deltas_and_full_beats() -> None:
    reg = EmbeddedRegistry()
    v = reg.register(InstanceInfo("a", "127.0.0.1:1", capacity=Capacity(8)), now=0.0)
    inc, load = v.incarnation_id, InstanceLoad()
    reg.heartbeat("a", inc, 1, load, added=[1, 2], full=True, now=0.1,
                  tiers=[("cpu", [3, 4], ()), ("disk", [5], ())])
    assert reg.index.blocks_per_tier(v.slot) == {"pool": 2, "cpu": 2, "disk": 1}
    reg.heartbeat("a", inc, 2, load, added=[6], evicted=[1], now=0.2,
                  tiers=[("cpu", [1], [3]), ("disk", [], [5])])
    assert reg.index.holds(v.slot, 1, "cpu") and not reg.index.holds(v.slot, 1)
    assert reg.index.blocks_per_tier(v.slot) == {"pool": 2, "cpu": 2, "disk": 0}
    # a full beat replaces every tier; one it leaves out holds nothing
    reg.heartbeat("a", inc, 3, load, added=[9], full=True, now=0.3, tiers=[("disk", [7], ())])
    assert reg.index.blocks_per_tier(v.slot) == {"pool": 1, "cpu": 0, "disk": 1}


def test_prefix_aware_values_pool_over_cpu_over_disk() -> None:
    reg = EmbeddedRegistry()
    views = [reg.register(InstanceInfo(n, f"127.0.0.1:{i + 1}", capacity=Capacity(8, block_size=4)))
             for i, n in enumerate("abcd")]
    prompt = list(range(41))  # 10 full blocks before the last token
    hashes = prompt_block_hashes(prompt, 4)
    for v, tier in zip(views, ("pool", "cpu", "disk", None), strict=True):
        tiers = [] if tier in (None, "pool") else [(tier, hashes, ())]
        reg.heartbeat(v.instance_id, v.incarnation_id, 1, InstanceLoad(),
                      added=hashes if tier == "pool" else [], full=True, tiers=tiers)
    router = Router("prefix_aware", 4)
    order = []
    for _ in range(3):
        d = router.route(RouteRequest(prompt), reg.routable(), reg.index)
        order.append(d.instance.instance_id)
        assert d.matched_tokens == 40
        # the chosen one is taken out so the next best shows
        reg.deregister(d.instance.instance_id, d.instance.incarnation_id)
    assert order == ["a", "b", "c"]
    # measured rates set the weights: a slow disk is worth less than a fast one
    load = InstanceLoad(prefill_tokens_per_s=1000.0, kv_block_bytes=1 << 20,
                        disk_tier_load_bytes_per_s=1e9)
    w_cpu, w_disk = load.tier_weights(16)
    assert w_cpu == 0.9 and w_disk == pytest.approx(1 - (1 << 20) / 1e9 / 0.016)


def _store() -> KVStore:
    cfg = KVStoreConfig(num_blocks=40, num_layers=1, num_kv_heads=1, block_size=4, head_size=8,
                        dtype_bytes=4, idle_seconds=0.0)
    return KVStore(replace(cfg, cpu_tier_bytes=12 * cfg.block_bytes))


def test_events_keep_an_index_equal_to_the_store_through_a_random_workload(tmp_path) -> None:  # noqa: ANN001
    """The scheduler, the pool and both tiers under random requests with shared prefixes,
    preemption, aborts and idle releases (no model: sampled tokens are random); a listener
    applying the drained events after random steps holds exactly what each tier holds."""
    store = _store()
    disk_cfg = replace(store.config, disk_tier_dir=str(tmp_path), disk_tier_bytes=30 * 256)
    store.close()
    store = KVStore(disk_cfg)
    store.enable_events()
    sched = Scheduler(SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=32, block_size=4,
                                      num_blocks=40, max_model_len=64), store=store)
    index = TieredPrefixIndex()
    slot = index.add_instance()
    rng = random.Random(5)
    stems = [[rng.randrange(1000) for _ in range(rng.randint(4, 20))] for _ in range(5)]

    def sync() -> None:
        for tier, (added, evicted) in store.drain_events().items():
            index.apply(slot, added, evicted, tier=tier)

    def check() -> None:
        store.flush()
        sync()
        for tier, hashes in store.cached_hashes().items():
            assert set(hashes) == index.tiers[tier]._held[slot], tier

    n = 0
    for step in range(400):
        if rng.random() < 0.3 and len(sched.requests) < 10:
            prompt = rng.choice(stems) + [rng.randrange(1000) for _ in range(rng.randint(1, 9))]
            params = SamplingParams(max_tokens=rng.randint(1, 12))
            sched.add_request(Request(f"r{n}", prompt, params, eos_token_ids=set()))
            n += 1
        if rng.random() < 0.05 and sched.requests:
            sched.abort_requests(rng.choice(list(sched.requests)))
        out = sched.schedule()
        sched.update_from_output(out, [[rng.randrange(1000)] if s.samples else []
                                       for s in out.scheduled])
        if not sched.has_unfinished_requests():
            store.maintain(now=time.monotonic() + 100)  # idle: page groups released
        if rng.random() < 0.2:
            sync()
        if step % 50 == 49:
            check()
    check()
    assert store.cpu.num_blocks and store.disk.num_blocks  # the workload reached every tier
    store.close()


def test_in_process_cluster_index_equals_the_instance_per_tier(demo_model_dir: Path,
                                                               tmp_path: Path) -> None:
    """A real master and a real instance (CPU and disk tiers, a small pool): after a random
    workload and a few beats, the master's index of the instance, per tier, is exactly what
    the instance's KV store holds."""
    from cluster_helpers import cluster, engines

    from xllm.config import EngineConfig

    cfg = EngineConfig(
        model=str(demo_model_dir), dtype="float32", max_model_len=256, num_kv_blocks=48,
        num_threads=1, kv_offload_cpu_gb=0.01, kv_offload_disk=str(tmp_path / "kv"),
        kv_offload_disk_gb=0.05)

    async def run(engine) -> None:  # noqa: ANN001
        async with cluster([(engine, "mixed")], beat_s=0.2) as (reg, _):
            view = reg.routable()[0]
            rng = random.Random(3)
            stems = [[rng.randrange(100, 40000) for _ in range(40)] for _ in range(4)]
            for _ in range(4):
                streams = [engine.generate(rng.choice(stems) + [rng.randrange(100, 40000)
                                                                for _ in range(rng.randint(1, 30))],
                                           SamplingParams(max_tokens=4, ignore_eos=True))
                           for _ in range(4)]
                for stream in streams:
                    async for _ in stream:
                        pass
            fut = engine.call_on_engine_thread(lambda e: (e.kv_store.flush(),
                                                          e.kv_store.maintain()))
            await asyncio.wrap_future(fut)
            await asyncio.sleep(0.7)  # beats after the last change
            fut = engine.call_on_engine_thread(lambda e: e.kv_store.cached_hashes())
            actual: dict[str, list[int]] = await asyncio.wrap_future(fut)  # type: ignore[assignment]
            assert set(actual) == {"pool", "cpu", "disk"}
            assert actual["disk"], "the workload should reach the disk tier"
            for tier, hashes in actual.items():
                assert reg.index.tiers[tier]._held[view.slot] == set(hashes), tier

    with engines(cfg, 1) as (engine,):
        asyncio.run(run(engine))


def test_router_hints_a_peer_holding_a_longer_prefix() -> None:
    reg = EmbeddedRegistry()
    a, b = (reg.register(InstanceInfo(n, f"127.0.0.1:{p}", capacity=Capacity(8, block_size=4)))
            for n, p in (("a", 7001), ("b", 7002)))
    prompt = list(range(41))
    hashes = prompt_block_hashes(prompt, 4)
    reg.heartbeat("a", a.incarnation_id, 1, InstanceLoad(num_running=6), full=True,
                  tiers=[("disk", hashes, ())])  # a holds it, on disk, and is busy
    reg.heartbeat("b", b.incarnation_id, 1, InstanceLoad(), added=hashes[:3], full=True)
    d = Router("least_load", 4).route(RouteRequest(prompt), reg.routable(), reg.index)
    assert d.instance is b
    assert (d.kv_peer, d.kv_peer_blocks) == ("127.0.0.1:7001", 10)
    # b is now booked as holding the prompt in its pool (the router's optimistic entry):
    # prefix_aware picks it over a's disk copy, and a holds no more than it: no hint
    d = Router("prefix_aware", 4).route(RouteRequest(prompt), reg.routable(), reg.index)
    assert d.instance is b and (d.kv_peer, d.kv_peer_blocks) == ("", 0)


def test_scheduler_and_kv_store_import_no_torch() -> None:
    """The scheduler drives the store (pool, memory on demand, tiers, events) without torch;
    only the runner's views of the memory need it."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from xllm.kvcache.store import KVStore, KVStoreConfig\n"
        "from xllm.scheduler import Scheduler, SchedulerConfig\n"
        "import xllm.kvcache.transfer\n"
        "cfg = KVStoreConfig(num_blocks=16, num_layers=1, num_kv_heads=1, block_size=4,\n"
        "                    head_size=8, dtype_bytes=4, cpu_tier_bytes=1 << 16)\n"
        "store = KVStore(cfg)\n"
        "Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=8, block_size=4,\n"
        "                          num_blocks=16, max_model_len=32), store=store)\n"
        "store.close()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
