"""The KV store (xllm.kvcache): memory mapped on demand, the CPU tier below the pool, and the
block copies between them, each against a plain reference; then the engine end to end."""

from __future__ import annotations

import ctypes
from dataclasses import replace

import pytest
import torch

from xllm import _C, LLM, SamplingParams
from xllm.kvcache.memory import KVMemory
from xllm.kvcache.pool import OnDemandBlockPool
from xllm.kvcache.store import KVStore, KVStoreConfig
from xllm.ops.block_pool import ROOT_HASH, block_hashes

# ---- memory on demand -------------------------------------------------------------------


def test_memory_geometry_and_views_alias_the_regions() -> None:
    mem = KVMemory(num_blocks=40, num_layers=2, segment_bytes=3 * 1024, target_page_bytes=16384)
    # a page is a whole number of segments and of system pages
    assert mem.page_bytes % mem.segment_bytes == 0 and mem.page_bytes % 4096 == 0
    assert mem.blocks_per_group == mem.page_bytes // mem.segment_bytes
    assert mem.num_groups == -(-40 // mem.blocks_per_group)
    assert mem.mapped_bytes == 0
    mem.map_group(0)
    assert mem.mapped_bytes == mem.page_bytes * 4
    views = mem.tensors((40, 1, 3, 256), torch.float32)
    assert len(views) == 2 and all(k.shape == (40, 1, 3, 256) for k, _ in views)
    k1 = views[1][0]
    k1[0].fill_(7.0)  # layer 1's key cache is region 2
    raw = mem.vmm.tensor(torch.float32, (mem.segment_bytes // 4,), offset=2 * mem.region_bytes)
    assert torch.all(raw == 7.0)
    with pytest.raises(ValueError, match="already mapped"):
        mem.map_group(0)
    mem.unmap_group(0)
    with pytest.raises(ValueError, match="not mapped"):
        mem.unmap_group(0)
    mem.map_group(0)  # remapped pages read as zeros
    assert torch.all(k1[0] == 0)
    with pytest.raises(ValueError, match="does not cover"):
        mem.tensors((39, 1, 3, 256), torch.float32)


def _pool(num_blocks: int = 50, idle: float = 10.0) -> OnDemandBlockPool:
    mem = KVMemory(num_blocks, 1, 4096, target_page_bytes=4 * 4096)  # 4 blocks per group
    return OnDemandBlockPool(mem, idle_seconds=idle)


def test_pool_maps_groups_only_when_blocks_run_short() -> None:
    pool = _pool()
    mem = pool.memory
    assert mem.num_mapped_groups == 1 and pool.num_free_blocks == 49
    a = pool.allocate(3)  # group 0 holds blocks 1..3
    assert a == [1, 2, 3] and mem.num_mapped_groups == 1
    b = pool.allocate(6)  # two more groups, mapped lowest first
    assert sorted(b) == list(range(4, 10)) and mem.num_mapped_groups == 3
    pool.cache_blocks(a, [101, 102, 103])
    pool.free(a)
    # cached free blocks are reused before more memory is mapped
    c = pool.allocate(5)
    assert mem.num_mapped_groups == 3 and pool.lookup([101]) == []
    assert pool.allocate(10**6) is None
    pool.free(b)
    pool.free(c)
    assert pool.num_free_blocks == 49


def test_pool_gives_idle_groups_back_and_keeps_held_ones() -> None:
    evicted: list[int] = []
    pool = _pool(idle=5.0)
    pool.on_evict = evicted.extend
    mem = pool.memory
    blocks = pool.allocate(40)
    assert mem.num_mapped_groups == 11
    pool.cache_blocks(blocks, list(range(1000, 1040)))
    keep = [b for b in blocks if b // 4 == 7]  # one block held keeps group 7
    pool.free([b for b in blocks if b not in keep])
    assert pool.maintain(100.0) == 5.0  # idle from now on; due in 5 s
    assert pool.maintain(103.0) == pytest.approx(2.0)
    assert pool.maintain(105.0) is None
    # all but group 0 (the null block's) and group 7 are back
    assert mem.num_mapped_groups == 2
    assert mem.is_mapped(7) and mem.is_mapped(0)
    # the 40 blocks were 4..43 (mapped blocks come first); all but group 7's were unmapped
    assert blocks == list(range(4, 44))
    assert len(evicted) == 36  # and their hashes reported
    assert pool.lookup([1000]) == [] and pool.lookup([1024]) == [28]
    assert pool.num_free_blocks == 49 - len(keep)
    # the pool grows again on demand
    again = pool.allocate(30)
    assert again is not None and len(set(again)) == 30
    for b in again:
        assert mem.is_mapped(b // 4)


def test_work_resuming_after_a_pause_keeps_its_memory() -> None:
    """An offline engine between two batches calls no upkeep; its next step must not give
    back the memory it is about to use."""
    pool = _pool(idle=5.0)
    pool.free(pool.allocate(20))
    assert pool.maintain(0.0, busy=True) == 5.0  # spare from now on
    groups = pool.memory.num_mapped_groups
    assert pool.maintain(60.0, busy=True) == 5.0  # a minute with no upkeep: a new clock
    assert pool.memory.num_mapped_groups == groups
    assert pool.maintain(61.0, busy=True) == pytest.approx(4.0)
    assert pool.maintain(65.0, busy=True) is None  # spare for 5 s of steps: released
    assert pool.memory.num_mapped_groups == 1


def test_pool_release_waits_for_work_then_idleness() -> None:
    pool = _pool(idle=1.0)
    blocks = pool.allocate(20)
    assert pool.maintain(0.0) is None  # busy: nothing free to give back
    pool.free(blocks)
    assert pool.maintain(1.0) == 1.0
    got = pool.allocate(20)  # busy again before the deadline: the clock restarts
    assert pool.maintain(2.5) is None
    pool.free(got)
    assert pool.maintain(3.0) == 1.0


# ---- block copies ----------------------------------------------------------------------


def _regions(caches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
    return [t.data_ptr() for pair in caches for t in pair]


@pytest.mark.parametrize("head_size", [8, 3])  # segments of 256 bytes, and of 96 (a tail)
def test_checksums_agree_at_every_isa_level(isa: str, head_size: int) -> None:
    """The checksum is one value at every level (a block may be read by another CPU)."""
    torch.manual_seed(1)
    caches = [(torch.randn(6, 2, 4, head_size), torch.randn(6, 2, 4, head_size))
              for _ in range(2)]
    seg = 2 * 4 * head_size * 4
    tier = torch.zeros(4 * 4 * seg, dtype=torch.uint8)
    sums = _C.kv_gather_blocks(_regions(caches), seg, [1, 5], tier.data_ptr(), 4 * seg, [0, 2])
    _C.set_cpu_isa("scalar")
    try:
        ref = _C.kv_gather_blocks(_regions(caches), seg, [1, 5], tier.data_ptr(), 4 * seg, [1, 3])
    finally:
        _C.set_cpu_isa(isa)
    assert sums == ref
    assert torch.equal(tier[:4 * seg], tier[4 * seg:8 * seg])
    assert sums[0] == _C.kv_block_checksum(tier.data_ptr(), 4 * seg, seg)


def test_gather_and_scatter_match_torch_and_catch_corruption() -> None:
    torch.manual_seed(0)
    caches = [(torch.randn(12, 2, 4, 8), torch.randn(12, 2, 4, 8)) for _ in range(3)]
    seg = 2 * 4 * 8 * 4
    slot_bytes = 6 * seg
    tier = torch.zeros(5 * slot_bytes, dtype=torch.uint8)
    blocks, slots = [3, 7, 1], [4, 0, 2]
    sums = _C.kv_gather_blocks(_regions(caches), seg, blocks, tier.data_ptr(), slot_bytes, slots)
    for b, s in zip(blocks, slots, strict=True):
        want = torch.cat([t[b].reshape(-1) for pair in caches for t in pair])
        got = tier[s * slot_bytes:(s + 1) * slot_bytes].view(torch.float32)
        assert torch.equal(got, want)
    assert len(set(sums)) == 3
    assert sums[0] == _C.kv_block_checksum(tier.data_ptr() + 4 * slot_bytes, slot_bytes, seg)
    dst = [(torch.zeros(12, 2, 4, 8), torch.zeros(12, 2, 4, 8)) for _ in range(3)]
    n = _C.kv_scatter_blocks(tier.data_ptr(), slot_bytes, slots, sums, _regions(dst), seg,
                             [5, 6, 9])
    assert n == 3
    for (k, v), (k2, v2) in zip(caches, dst, strict=True):
        assert torch.equal(k2[[5, 6, 9]], k[blocks]) and torch.equal(v2[[5, 6, 9]], v[blocks])
    tier[0 * slot_bytes + 100] ^= 1  # one flipped bit in the second block's slot
    assert _C.kv_scatter_blocks(tier.data_ptr(), slot_bytes, slots, sums, _regions(dst), seg,
                                [5, 6, 9]) == 1
    with pytest.raises(ValueError, match="same length"):
        _C.kv_gather_blocks(_regions(caches), seg, [1], tier.data_ptr(), slot_bytes, [0, 1])


# ---- the store -----------------------------------------------------------------------------


def _store(cpu_blocks: int) -> KVStore:
    cfg = KVStoreConfig(num_blocks=24, num_layers=2, num_kv_heads=2, block_size=4, head_size=8,
                        dtype_bytes=4, idle_seconds=0.0)
    return KVStore(replace(cfg, cpu_tier_bytes=cpu_blocks * cfg.block_bytes))


def test_store_writes_back_and_loads_with_lru_eviction() -> None:
    store = _store(cpu_blocks=3)
    caches = store.kv_caches(torch.float32)
    pool = store.pool
    tokens = list(range(100, 116))
    hashes = block_hashes(tokens, 4)
    blocks = pool.allocate(4)
    for i, b in enumerate(blocks):
        for k, v in caches:
            k[b].fill_(float(i + 1))
            v[b].fill_(-float(i + 1))
    parents = [ROOT_HASH, *hashes[:-1]]
    contents = [(parents[i], tuple(tokens[4 * i:4 * i + 4])) for i in range(4)]
    store.offer(blocks, hashes, contents)  # 4 blocks, 3 slots: the chain's head goes in
    store.flush()
    tier = store.tiers[0]
    assert tier.num_blocks == 3 and tier.bytes_written == 3 * tier.slot_bytes
    hits = store.lookup(hashes, ROOT_HASH, tokens, 0)
    assert [len(h.slots) for h in hits] == [3]
    assert store.lookup(hashes, ROOT_HASH, [0] * 16, 0) == []  # content confirmed, not hash only
    pool.free(blocks)
    fresh = [b for b in pool.allocate(8) if b not in blocks][:3]
    assert store.load(hits, fresh) == 3
    for i, b in enumerate(fresh):
        for k, v in caches:
            assert torch.all(k[b] == i + 1) and torch.all(v[b] == -(i + 1))
    # a corrupted slot ends the hit there; the slot leaves the tier
    bad = hits[0].slots[1]
    mv = memoryview(tier.memory)
    mv[bad * tier.slot_bytes + 5] ^= 0xFF
    assert store.load(hits, fresh) == 1
    assert tier.corrupt_blocks == 1
    assert [len(h.slots) for h in store.lookup(hashes, ROOT_HASH, tokens, 0)] == [1]
    store.close()


def test_a_load_waits_for_the_steps_in_flight() -> None:
    """Overlap scheduling: a tier load (into blocks a preempted request's step in flight may
    still write) starts only once every step begun before it has ended."""
    import threading

    store = _store(cpu_blocks=4)
    caches = store.kv_caches(torch.float32)
    tokens = list(range(200, 208))
    hashes = block_hashes(tokens, 4)
    blocks = store.pool.allocate(2)
    for k, v in caches:
        for b in blocks:
            k[b].fill_(3.0)
            v[b].fill_(-3.0)
    store.offer(blocks, hashes, [(ROOT_HASH, tuple(tokens[:4])), (hashes[0], tuple(tokens[4:]))])
    store.flush()
    hits = store.lookup(hashes, ROOT_HASH, tokens, 0)
    fresh = [b for b in store.pool.allocate(6) if b not in blocks][:2]
    store.step_began()
    loaded: list[int] = []
    loader = threading.Thread(target=lambda: loaded.append(store.load(hits, fresh)))
    loader.start()
    loader.join(0.3)
    assert loader.is_alive() and not loaded  # waits for the step in flight
    store.step_ended()
    loader.join(10)
    assert loaded == [2]
    for k, v in caches:
        assert torch.all(k[fresh] == 3.0) and torch.all(v[fresh] == -3.0)
    assert store.load(hits, fresh) == 2  # no step in flight: at once
    store.close()


def test_claim_waits_for_a_write_still_reading_its_block() -> None:
    store = _store(cpu_blocks=8)
    store.kv_caches(torch.float32)
    tokens = list(range(8))
    hashes = block_hashes(tokens, 4)
    blocks = store.pool.allocate(2)
    store.offer(blocks, hashes, [(ROOT_HASH, tuple(tokens[:4])), (hashes[0], tuple(tokens[4:]))])
    store.claim(blocks)  # returns only once the copy has finished and is published
    assert not store._pending_blocks and store.tiers[0].num_blocks == 2
    store.close()


# ---- the engine end to end ------------------------------------------------------------------

DOC = ("The lighthouse keeper kept a log of every ship that passed the rocky point. " * 14)
QUESTIONS = ["What did the keeper record?", "Where were the rocks?", "Summarise the log."]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _flood(llm: LLM) -> None:
    """Distinct prompts that need more blocks than the pool has, so the document's cached
    blocks are evicted from the pool."""
    prompts = [f"Unrelated note {i}: " + "lorem ipsum dolor sit amet " * 25 for i in range(6)]
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)


TIERS = {"cpu": dict(kv_offload_cpu_gb=0.2),
         "disk": dict(kv_offload_disk_gb=0.2),
         "cpu+disk": dict(kv_offload_cpu_gb=0.012, kv_offload_disk_gb=0.2)}


def _tier_opts(tiers: str, tmp_path) -> dict:  # noqa: ANN001
    opts = dict(TIERS[tiers])
    if "kv_offload_disk_gb" in opts:
        opts["kv_offload_disk"] = str(tmp_path / "kv")
    return opts


@pytest.mark.parametrize(("kv_dtype", "tiers"), [("float32", "cpu"), ("bfloat16", "cpu"),
                                                 ("float32", "disk"), ("bfloat16", "cpu+disk"),
                                                 ("int8", "cpu+disk")])
def test_outputs_identical_from_pool_and_tiers(demo_model_dir, tmp_path, kv_dtype: str,  # noqa: ANN001
                                               tiers: str) -> None:
    prompts = [DOC + q for q in QUESTIONS]
    # The pool and tier sizes are made for 16-token blocks (int8 would default to 64).
    opts = dict(dtype="float32", kv_cache_dtype=kv_dtype, num_kv_blocks=72, block_size=16,
                max_num_batched_tokens=512, max_num_seqs=4)
    plain = LLM(model=str(demo_model_dir), enable_prefix_caching=False, **opts)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, GREEDY, use_tqdm=False)]
    del plain
    llm = LLM(model=str(demo_model_dir), **opts, **_tier_opts(tiers, tmp_path))
    first = llm.generate(prompts[:1], GREEDY, use_tqdm=False)[0]
    assert first.outputs[0].token_ids == want[0]
    _flood(llm)
    store = llm.engine.kv_store
    store.flush()
    bottom = store.tiers[-1]
    assert bottom.num_blocks > 0
    for prompt, ref in zip(prompts, want, strict=True):
        out = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == ref
        assert out.num_cached_tokens >= 16 * 10  # the document's blocks, not recomputed
        _flood(llm)
        store.flush()
    assert bottom.hit_blocks > 0  # the cpu+disk case: the small CPU tier wrote down to disk
    # each re-asked prompt's tier blocks were prefetched on arrival (the loader thread),
    # then taken as a pool hit at admission
    assert store.num_prefetches >= len(prompts)
    llm.engine.close()


def test_disk_tier_survives_a_restart_and_ignores_another_layout(demo_model_dir,  # noqa: ANN001
                                                                 tmp_path) -> None:
    prompt = DOC + QUESTIONS[0]
    opts = dict(dtype="float32", num_kv_blocks=72, max_num_batched_tokens=512,
                kv_offload_disk=str(tmp_path / "kv"), kv_offload_disk_gb=0.1)
    llm = LLM(model=str(demo_model_dir), **opts)
    want = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    llm.engine.kv_store.flush()
    llm.engine.close()
    del llm
    again = LLM(model=str(demo_model_dir), **opts)
    out = again.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == want and out.num_cached_tokens >= 16 * 10
    assert again.engine.kv_store.disk.hit_blocks > 0
    again.engine.close()
    del again
    other = LLM(model=str(demo_model_dir), **{**opts, "kv_cache_dtype": "bfloat16"})
    out = other.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens == 0  # another dtype: another directory, never read
    assert len(list((tmp_path / "kv").iterdir())) == 2
    other.engine.close()


@pytest.fixture
def small_fs(tmp_path):  # noqa: ANN001, ANN201
    """A 4 MiB tmpfs (a disk that fills after ~11 demo blocks); skipped where mount is not
    allowed."""
    import subprocess

    path = tmp_path / "small"
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield path
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_full_disk_falls_back_to_recompute(demo_model_dir, small_fs) -> None:  # noqa: ANN001
    prompt = DOC + QUESTIONS[1]
    llm = LLM(model=str(demo_model_dir), dtype="float32", num_kv_blocks=72,
              max_num_batched_tokens=512, kv_offload_disk=str(small_fs), kv_offload_disk_gb=0.1)
    disk = llm.engine.kv_store.disk
    want = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    _flood(llm)
    llm.engine.kv_store.flush()
    assert disk.write_errors > 0  # ENOSPC: those blocks were never published
    out = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == want
    llm.engine.close()


def test_unreadable_disk_blocks_fall_back_to_recompute(demo_model_dir, tmp_path) -> None:  # noqa: ANN001
    import os

    prompt = DOC + QUESTIONS[1]
    llm = LLM(model=str(demo_model_dir), dtype="float32", num_kv_blocks=72,
              max_num_batched_tokens=512, kv_offload_disk=str(tmp_path / "kv"),
              kv_offload_disk_gb=0.1)
    store = llm.engine.kv_store
    disk = store.disk
    want = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    _flood(llm)
    store.flush()
    tokens = llm.engine.tokenizer.encode(prompt)
    hit = disk.lookup(block_hashes(tokens, 16), ROOT_HASH, tokens, 0, 16)
    assert len(hit) >= 6
    # one block's bytes flipped on disk: the hit ends there
    with open(disk.path / "blocks.bin", "r+b") as f:
        f.seek(hit[4] * disk.slot_bytes + 777)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))
    out = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == want
    assert disk.corrupt_blocks == 1 and out.num_cached_tokens == 4 * 16
    # the file cut short under the tier: a short read, recomputed
    _flood(llm)
    store.flush()
    os.truncate(disk.path / "blocks.bin", min(hit) * disk.slot_bytes)
    out = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == want and disk.read_errors > 0
    llm.engine.close()


def test_bad_disk_tier_flags_are_clear_errors(tmp_path) -> None:  # noqa: ANN001
    from xllm.config import EngineConfig

    with pytest.raises(ValueError, match="kv_offload_disk_gb"):
        EngineConfig(kv_offload_disk=str(tmp_path))
    with pytest.raises(ValueError, match="kv_offload_disk "):
        EngineConfig(kv_offload_disk_gb=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        EngineConfig(kv_offload_cpu_gb=-1.0)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cfg = KVStoreConfig(num_blocks=8, num_layers=1, num_kv_heads=1, block_size=4, head_size=8,
                        dtype_bytes=4, disk_tier_dir=str(blocker / "kv"), disk_tier_bytes=1 << 20)
    with pytest.raises(ValueError, match="cannot be used"):
        KVStore(cfg)


def test_corrupt_cpu_tier_block_is_recomputed(demo_model_dir) -> None:  # noqa: ANN001
    prompt = DOC + QUESTIONS[0]
    llm = LLM(model=str(demo_model_dir), dtype="float32", num_kv_blocks=72,
              max_num_batched_tokens=512, kv_offload_cpu_gb=0.2)
    want = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    _flood(llm)
    store = llm.engine.kv_store
    store.flush()
    tier = store.tiers[0]
    mv = memoryview(tier.memory)
    tokens = llm.engine.tokenizer.encode(prompt)
    hashes = block_hashes(tokens, 16)
    hit = tier.lookup(hashes, ROOT_HASH, tokens, 0, 16)
    assert len(hit) >= 4
    mv[hit[3] * tier.slot_bytes + 1234] ^= 0x40
    out = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == want
    assert tier.corrupt_blocks == 1 and out.num_cached_tokens == 3 * 16
    llm.engine.close()


def test_engine_gives_kv_memory_back_when_idle(demo_model_dir) -> None:  # noqa: ANN001
    llm = LLM(model=str(demo_model_dir), dtype="float32", kv_cache_memory_gb=0.5,
              kv_idle_release_s=0.0, max_num_batched_tokens=2048)
    store = llm.engine.kv_store
    idle = store.mapped_bytes
    # 16 prompts of ~25 blocks, all running at once: ~3 of the pool's 5 page groups
    prompts = [f"Request {i}: " + "tell me a long story about ships " * 60 for i in range(16)]
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    burst = store.mapped_bytes
    assert burst > idle
    store.maintain()
    store.maintain()
    assert store.mapped_bytes < burst
    assert store.mapped_bytes <= idle + 2 * store.memory.page_bytes * store.memory.num_regions
    out = llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4),
                       use_tqdm=False)  # and serves again after
    assert all(o.finished for o in out)


def test_metrics_show_mapped_memory_tiers_and_load_latency() -> None:
    from prometheus_client import generate_latest

    from xllm.api.metrics import ServerMetrics
    from xllm.engine.async_engine import EngineStats

    store = _store(cpu_blocks=4)
    store.kv_caches(torch.float32)
    tokens = list(range(8))
    hashes = block_hashes(tokens, 4)
    blocks = store.pool.allocate(2)
    store.offer(blocks, hashes, [(ROOT_HASH, tuple(tokens[:4])), (hashes[0], tuple(tokens[4:]))])
    store.flush()
    hits = store.lookup(hashes, ROOT_HASH, tokens, 0)
    assert store.load(hits, store.pool.allocate(2)) == 2
    metrics = ServerMetrics(lambda: EngineStats(kv_store=store.stats()))
    text = generate_latest(metrics.registry).decode()
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line and not line.startswith("#")}
    slot = store.tiers[0].slot_bytes
    assert values["xllm_kv_mapped_bytes"] == store.mapped_bytes > 0
    assert values['xllm_kv_tier_blocks{tier="cpu"}'] == 2
    assert values['xllm_kv_tier_capacity_blocks{tier="cpu"}'] == 4
    assert values['xllm_kv_tier_hit_blocks_total{tier="cpu"}'] == 2
    assert values['xllm_kv_tier_written_bytes_total{tier="cpu"}'] == 2 * slot
    assert values['xllm_kv_tier_read_bytes_total{tier="cpu"}'] == 2 * slot
    assert values["xllm_kv_load_seconds_count"] == 1
    assert values['xllm_kv_load_seconds_bucket{le="+Inf"}'] == 1
    store.close()


def test_swap_preemption_gives_the_outputs_of_no_preemption(demo_model_dir) -> None:  # noqa: ANN001
    prompts = [f"Story {i}: " + "the ships sailed past the lighthouse at night " * 9
               for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    roomy = LLM(model=str(demo_model_dir), dtype="float32", num_kv_blocks=400)
    want = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    del roomy
    tight = LLM(model=str(demo_model_dir), dtype="float32", num_kv_blocks=40,
                max_num_batched_tokens=256, kv_offload_cpu_gb=0.1)
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, params, use_tqdm=False)]
    assert got == want
    engine = tight.engine
    store = engine.kv_store
    assert engine.scheduler.num_preempted > 0
    assert store.num_swapped > 0 and store.cpu.hit_blocks > 0
    engine.close()


def test_swap_or_recompute_follows_measured_costs() -> None:
    store = _store(cpu_blocks=8)
    store.kv_caches(torch.float32)
    assert store.swap_cheaper(4, 16)  # nothing measured yet: memory copies are taken to win
    block = store.config.block_bytes
    store._write_bps = store._load_bps = 2 * block  # two blocks a second each way
    store.observe_prefill(100, 1.0)  # 100 tokens a second
    assert store._prefill_tps == 100
    # 4 blocks: 2 s + 2 s of copies against 16 tokens (0.16 s) of recompute
    assert not store.swap_cheaper(4, 16)
    assert store.swap_cheaper(4, 1000)  # 10 s of recompute
    store.observe_prefill(10, 0.001)  # too small a step to measure anything
    assert store._prefill_tps == 100
    store.close()


def test_prefetch_lands_while_other_work_runs(demo_model_dir) -> None:  # noqa: ANN001
    """A request that waits behind running work has its tier blocks loaded in the
    background; by its admission they are pool blocks (no load on the step's path)."""
    prompt = DOC + QUESTIONS[2]
    llm = LLM(model=str(demo_model_dir), dtype="float32", num_kv_blocks=72,
              max_num_batched_tokens=256, max_num_seqs=1, kv_offload_cpu_gb=0.2)
    engine = llm.engine
    want = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    _flood(llm)
    store = engine.kv_store
    store.flush()
    tokens = engine.tokenizer.encode(prompt)
    assert not engine.scheduler.kv.pool.lookup(block_hashes(tokens, 16)[:1])  # not in the pool
    busy = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    engine.add_request("busy", "Count slowly from one to thirty.", busy)
    engine.step()  # "busy" runs; the seat is taken (max_num_seqs=1)
    loads_before = store.num_loads
    engine.add_request("doc", tokens, GREEDY)
    assert store.prefetching("doc") or store.num_prefetches > 0
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs[out.request_id] = out
    assert outs["doc"].outputs[0].token_ids == want
    assert outs["doc"].num_cached_tokens >= 16 * 10
    assert store.num_prefetches >= 1 and store.num_loads == loads_before + 1  # the prefetch
    llm.engine.close()


def test_closing_waits_for_peer_copies_and_refuses_new_ones() -> None:
    """A peer transfer copies on another thread: close() waits for it (the memory must
    outlive the copy), and no copy starts once the store is closing."""
    import threading

    store = _store(cpu_blocks=2)
    store.kv_caches(torch.float32)
    entered, release = threading.Event(), threading.Event()
    closed = threading.Event()

    def copy() -> None:
        with store.off_thread_copy() as allowed:
            assert allowed
            entered.set()
            release.wait(10)

    worker = threading.Thread(target=copy)
    worker.start()
    assert entered.wait(10)
    closer = threading.Thread(target=lambda: (store.close(), closed.set()))
    closer.start()
    assert not closed.wait(0.3)  # held back by the copy in flight
    release.set()
    assert closed.wait(10)
    worker.join()
    closer.join()
    with store.off_thread_copy() as allowed:
        assert not allowed


# ---- a KV cache outside host memory (the GPU engine's, reached through torch) ---------------


def _device_store(cpu_blocks: int, dtype: torch.dtype = torch.bfloat16
                  ) -> tuple[KVStore, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A store whose pool is plain tensors it reaches through torch copies only (what it
    does with a CUDA cache; the tensors are on the CPU here), with their caches."""
    from xllm.ops.kv_cache import allocate_kv_caches

    cfg = KVStoreConfig(num_blocks=24, num_layers=2, num_kv_heads=2, block_size=4, head_size=8,
                        dtype_bytes=dtype.itemsize, idle_seconds=0.0, on_demand=False,
                        cpu_tier_bytes=cpu_blocks * 2 * 2 * 2 * 4 * 8 * dtype.itemsize)
    store = KVStore(cfg)
    caches = allocate_kv_caches(2, 24, 2, 4, 8, dtype)
    store.attach_device([t for pair in caches for t in pair])
    return store, caches


def test_a_device_cache_moves_whole_blocks_through_staging(monkeypatch) -> None:  # noqa: ANN001
    """A pool the native copies cannot reach: tier writes and loads gather and land its
    blocks through a host staging area, in chunks of it, with the slot bytes and checksums
    of a store that reaches the same bytes in place; a corrupted slot still ends the load
    there."""
    import xllm.kvcache.store as store_mod

    monkeypatch.setattr(store_mod, "STAGING_BYTES", 3 * 512)  # 3 blocks a chunk
    store, caches = _device_store(cpu_blocks=8)
    assert store.staged and store.whole and store.chunk_blocks == 3
    assert store.regions == [] and store.memory_parts() is None  # no same-host mapping
    tokens = list(range(300, 328))
    hashes = block_hashes(tokens, 4)
    blocks = store.pool.allocate(7)
    gen = torch.Generator().manual_seed(3)
    for k, v in caches:
        k[blocks] = torch.randn(k[blocks].shape, generator=gen).to(k.dtype)
        v[blocks] = torch.randn(v[blocks].shape, generator=gen).to(v.dtype)
    want = [[(k[b].clone(), v[b].clone()) for k, v in caches] for b in blocks]
    parents = [ROOT_HASH, *hashes[:-1]]
    store.offer(blocks, hashes, [(parents[i], tuple(tokens[4 * i:4 * i + 4]))
                                 for i in range(7)])
    store.flush()
    tier = store.tiers[0]
    assert tier.num_blocks == 7
    # the same bytes in place (a host store's native gather) give the same slots and sums
    host = [t.clone() for pair in caches for t in pair]
    slots = list(tier.index.lookup(hashes))
    ref = bytearray(7 * tier.slot_bytes)
    ref_sums = _C.kv_gather_blocks([t.data_ptr() for t in host], store.config.segments_arg,
                                   blocks, ctypes.addressof(ctypes.c_char.from_buffer(ref)),
                                   tier.slot_bytes, list(range(7)))
    assert [tier.checksums[s] for s in slots] == ref_sums
    for i, s in enumerate(slots):
        got = bytes(memoryview(tier.memory)[s * tier.slot_bytes:(s + 1) * tier.slot_bytes])
        assert got == bytes(ref[i * tier.slot_bytes:(i + 1) * tier.slot_bytes])
    hits = store.lookup(hashes, ROOT_HASH, tokens, 0)
    store.pool.free(blocks)
    fresh = [b for b in store.pool.allocate(20) if b not in blocks][:7]
    for k, v in caches:
        k[fresh] = 0
        v[fresh] = 0
    assert store.load(hits, fresh) == 7
    for i, b in enumerate(fresh):
        for (k, v), (wk, wv) in zip(caches, want[i], strict=True):
            assert torch.equal(k[b], wk) and torch.equal(v[b], wv)
    mv = memoryview(tier.memory)
    mv[slots[4] * tier.slot_bytes + 9] ^= 0xFF  # the second chunk's second block
    for k, _ in caches:
        k[fresh] = 0
    assert store.load(store.lookup(hashes, ROOT_HASH, tokens, 0), fresh) == 4
    assert torch.equal(caches[0][0][fresh[3]], want[3][0][0])  # the blocks before it landed
    store.close()


def test_a_device_cache_is_refused_where_it_cannot_be_reached() -> None:
    store, caches = _device_store(cpu_blocks=2)
    with pytest.raises(ValueError, match="tensors"):
        store.attach_device([caches[0][0]])
    with pytest.raises(ValueError, match="contiguous blocks"):
        store.attach_device([t.transpose(1, 2) for pair in caches for t in pair])
    cfg = KVStoreConfig(num_blocks=24, num_layers=2, num_kv_heads=2, block_size=4, head_size=8,
                        dtype_bytes=4, on_demand=False, parts=2, part_heads=(1, 1))
    with pytest.raises(ValueError, match="under tensor parallelism are CPU-only"):
        KVStore(cfg).attach_device([t for pair in caches for t in pair])
    store.close()


@pytest.mark.parametrize("tiers", ["cpu", "disk"])
def test_outputs_identical_with_a_device_cache_and_tiers(demo_model_dir, tmp_path,  # noqa: ANN001
                                                          tiers: str) -> None:
    """The engine end to end with its pool reached only through torch copies (how a CUDA
    engine's tiers work; the tensors stay on the CPU here): re-asked prompts come back
    from the tier with the outputs of no prefix caching."""
    from conftest import kv_reached_through_torch

    prompts = [DOC + q for q in QUESTIONS[:2]]
    opts = dict(dtype="float32", kv_cache_dtype="bfloat16", num_kv_blocks=72, block_size=16,
                max_num_batched_tokens=512, max_num_seqs=4)
    plain = LLM(model=str(demo_model_dir), enable_prefix_caching=False, **opts)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, GREEDY, use_tqdm=False)]
    del plain
    with kv_reached_through_torch():
        llm = LLM(model=str(demo_model_dir), **opts, **_tier_opts(tiers, tmp_path))
    store = llm.engine.kv_store
    assert store.device_part is not None and store.staged
    llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    _flood(llm)
    store.flush()
    for prompt, ref in zip(prompts, want, strict=True):
        out = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == ref
        assert out.num_cached_tokens >= 16 * 10
        _flood(llm)
        store.flush()
    assert store.tiers[-1].hit_blocks > 0
    llm.engine.close()


def test_int8_rows_halve_the_cache_and_are_refused_off_the_cpu(demo_model_dir) -> None:  # noqa: ANN001
    """kv_cache_dtype int8: rows of head_size int8 values and their fp32 scale, so a block
    takes (64 + 4) / (2 * 64) of a bf16 block's bytes for the demo's head size; the engine
    writes and reads them (its greedy tokens mostly agree with a bf16 cache's)."""
    from xllm.config import EngineConfig

    with pytest.raises(ValueError, match="int8 runs on the CPU kernels only"):
        EngineConfig(kv_cache_dtype="int8", device="cuda")
    with pytest.raises(ValueError, match="float16 or int8, got 'fp8'"):
        EngineConfig(kv_cache_dtype="fp8")
    opts = dict(dtype="bfloat16", num_kv_blocks=72, max_num_batched_tokens=512)
    outs, configs = {}, {}
    for kv in ("bfloat16", "int8"):
        llm = LLM(model=str(demo_model_dir), kv_cache_dtype=kv, **opts)
        configs[kv] = llm.engine.kv_store.config
        key_cache = llm.engine.runner.model.model.layers[0].self_attn.attn.key_cache
        assert key_cache.dtype == (torch.int8 if kv == "int8" else torch.bfloat16)
        outs[kv] = [o.outputs[0].token_ids for o in llm.generate(
            [DOC + q for q in QUESTIONS], GREEDY, use_tqdm=False)]
        llm.engine.close()
    hs = llm.engine.model_config.head_dim
    # int8 defaults to 64-token blocks (16 stay 16 when asked for), the others to 16.
    assert (configs["int8"].block_size, configs["bfloat16"].block_size) == (64, 16)
    assert EngineConfig(kv_cache_dtype="int8", block_size=16).block_size == 16
    per_token = {kv: c.block_bytes // c.block_size for kv, c in configs.items()}
    assert per_token["int8"] * 2 * hs == per_token["bfloat16"] * (hs + 4)
    same = sum(a == b for x, y in zip(outs["int8"], outs["bfloat16"], strict=True)
               for a, b in zip(x, y, strict=False))
    assert same >= 0.5 * sum(map(len, outs["bfloat16"]))


def test_a_memory_follows_another_with_other_groups() -> None:
    """A tensor-parallel worker's memory (other heads, so other segments and groups) maps
    exactly its groups that hold a block of rank 0's mapped groups, and unmaps the rest."""
    import numpy as np

    lead = KVMemory(1000, 2, 8192)  # 256 blocks a group
    worker = KVMemory(1000, 2, 4096)  # 512 blocks a group
    assert (lead.blocks_per_group, worker.blocks_per_group) == (256, 512)
    for group in (0, 3):
        lead.map_group(group)
    assert worker.follow(lead.mapped_groups(), lead.blocks_per_group) == (2, 0)
    assert worker.mapped_groups() == [True, True]  # blocks 0-255 and 768-999
    lead.unmap_group(3)
    assert worker.follow(lead.mapped_groups(), lead.blocks_per_group) == (0, 1)
    assert worker.mapped_groups() == [True, False]

    def covered(memory: KVMemory) -> np.ndarray:
        out = np.zeros(memory.num_blocks, dtype=bool)
        for g, on in enumerate(memory.mapped_groups()):
            out[list(memory.group_blocks(g))] = on
        return out

    rng = np.random.default_rng(0)
    small = KVMemory(1000, 1, 4096 * 5)  # 2 MiB pages hold 102 blocks
    for _ in range(20):
        for g in range(lead.num_groups):
            if rng.random() < 0.5 and not lead.is_mapped(g):
                lead.map_group(g)
            elif rng.random() < 0.5 and lead.is_mapped(g):
                lead.unmap_group(g)
        for follower in (worker, small):
            follower.follow(lead.mapped_groups(), lead.blocks_per_group)
            need = covered(lead)
            have = covered(follower)
            assert not (need & ~have).any()  # every block rank 0 may use is backed
            for g in range(follower.num_groups):  # and nothing more than that
                assert follower.is_mapped(g) == bool(need[list(follower.group_blocks(g))].any())
    with pytest.raises(ValueError, match="do not cover"):
        worker.follow([True] * 3, 256)


def test_a_store_of_parts_copies_whole_blocks_once_they_are_attached() -> None:
    """Tensor parallelism's store: parts of 2 and 1 KV heads. Until the other part's regions
    are attached the store is not whole (no blocks between instances); attached, a tier
    write and load move both parts' segments (unequal), checked, and equal a plain
    gather of each part."""
    cfg = KVStoreConfig(num_blocks=24, num_layers=2, num_kv_heads=2, block_size=4, head_size=8,
                        dtype_bytes=4, idle_seconds=0.0, parts=2, part_heads=(2, 1))
    store = KVStore(replace(cfg, cpu_tier_bytes=4 * cfg.block_bytes))
    assert cfg.segments == (256,) * 4 + (128,) * 4 and cfg.block_bytes == 1536
    assert not store.whole and not store.single_part
    assert store.layout_key() != KVStore(replace(cfg, part_heads=(1, 2))).layout_key()
    caches = store.kv_caches(torch.float32)
    other = KVMemory(24, 2, 128)
    other.map_group(0)
    other_caches = other.tensors((24, 1, 4, 8), torch.float32)
    with pytest.raises(ValueError, match="regions"):
        store.attach_parts(other.regions[:2])
    store.attach_parts(other.regions, keep=[other])
    assert store.whole and not store.single_part
    blocks = store.pool.allocate(2)
    gen = torch.Generator().manual_seed(0)
    for k, v in caches + other_caches:
        k[blocks] = torch.randn(k[blocks].shape, generator=gen)
        v[blocks] = torch.randn(v[blocks].shape, generator=gen)
    want = [torch.cat([t[b].flatten() for pair in caches + other_caches for t in pair])
            for b in blocks]
    slots = store.cpu.index.allocate(2)
    sums = _C.kv_gather_blocks(store.regions, cfg.segments_arg, blocks, store.cpu.address,
                               store.cpu.slot_bytes, slots)
    for i, s in enumerate(slots):  # a slot: the block's segments, both parts, in order
        raw = bytearray(ctypes.string_at(store.cpu.address + s * store.cpu.slot_bytes,
                                         cfg.block_bytes))
        assert torch.equal(torch.frombuffer(raw, dtype=torch.float32), want[i])
    for k, v in caches + other_caches:  # wipe, then load back and check
        k[blocks] = 0.0
        v[blocks] = 0.0
    assert _C.kv_scatter_blocks(store.cpu.address, store.cpu.slot_bytes, slots, sums,
                                store.regions, cfg.segments_arg, blocks) == 2
    for i, b in enumerate(blocks):
        got = torch.cat([t[b].flatten() for pair in caches + other_caches for t in pair])
        assert torch.equal(got, want[i])
    bad = [sums[0], sums[1] ^ 1]
    assert _C.kv_scatter_blocks(store.cpu.address, store.cpu.slot_bytes, slots, bad,
                                store.regions, cfg.segments_arg, blocks) == 1


def test_a_store_with_a_part_on_another_host_moves_whole_blocks_through_its_server(
        monkeypatch) -> None:  # noqa: ANN001
    """Ranks on other hosts: the other part is served by a PartServer (here on loopback). A
    tier write and load move whole blocks through it, in chunks of the staging area, with
    the same slot bytes and checksums as a store that maps both parts in place; a load
    into a block of a page group the worker has not mapped yet maps it; a pull of unmapped
    memory, a server gone, and a rank that answers nonsense each fail the copy (recomputed),
    never the engine."""
    import socket
    import threading

    import xllm.kvcache.store as store_module
    from xllm.kvcache.parts import PartLink, PartServer, PartsUnavailable

    monkeypatch.setattr(store_module, "STAGING_BYTES", 2 * 1536)  # chunks of 2 blocks
    cfg = KVStoreConfig(num_blocks=96, num_layers=2, num_kv_heads=2, block_size=4, head_size=8,
                        dtype_bytes=4, idle_seconds=0.0, parts=2, part_heads=(2, 1),
                        cpu_tier_bytes=8 * 1536)
    store = KVStore(cfg)
    caches = store.kv_caches(torch.float32)
    worker = KVMemory(96, 2, 128, blocks_per_group=32)
    worker_caches = worker.tensors((96, 1, 4, 8), torch.float32)
    server = PartServer("127.0.0.1", "s3cret")
    server.memory = worker
    link = PartLink([("127.0.0.1", server.port)], [4 * 128], timeout=5.0, token="s3cret")
    with pytest.raises(ValueError, match="block bytes"):
        store.attach_link(PartLink([("127.0.0.1", server.port)], [4 * 256]))
    store.attach_link(PartLink([("127.0.0.1", server.port)], [4 * 128], timeout=5.0,
                               token="guess"))
    assert store.whole and store.chunk_blocks == 2 and store.memory_parts() is None
    blocks = store.pool.allocate(5)  # rank 0 maps their group; the worker follows
    worker.map_group(0)
    with pytest.raises(PartsUnavailable):  # a connection without the token is dropped
        store.readable(blocks[:1])
    store.link = link
    gen = torch.Generator().manual_seed(1)
    for k, v in caches + worker_caches:
        k[blocks] = torch.randn(k[blocks].shape, generator=gen)
        v[blocks] = torch.randn(v[blocks].shape, generator=gen)
    both = store.regions + worker.regions  # what a one-host store reaches in place
    want_bytes, want_sums = _C.kv_gather_bytes(both, cfg.segments_arg, blocks)
    assert want_bytes.count(0) < len(want_bytes) // 2  # (random bytes in both parts)
    regions, ids = store.readable(blocks[:2])
    assert _C.kv_gather_bytes(regions, cfg.segments_arg, ids) == (want_bytes[:2 * 1536],
                                                                  want_sums[:2])

    # the CPU tier: written through the server (3 chunks), the same slots as in place
    tokens = list(range(100, 120))
    hashes = block_hashes(tokens, 4)
    parents = [ROOT_HASH, *hashes[:-1]]
    contents = [(parents[i], tuple(tokens[4 * i:4 * i + 4])) for i in range(5)]
    store.offer(blocks, hashes, contents)
    store.flush()
    tier = store.cpu
    hits = store.lookup(hashes, ROOT_HASH, tokens, 0)
    assert [len(h.slots) for h in hits] == [5]
    slots = list(hits[0].slots)
    assert [tier.checksums[s] for s in slots] == want_sums
    assert b"".join(ctypes.string_at(tier.address + s * tier.slot_bytes, 1536)
                    for s in slots) == want_bytes

    # loaded back into blocks of a group the worker has not mapped: it maps it
    fresh = list(range(70, 75))
    assert store.memory.is_mapped(70 // store.memory.blocks_per_group)  # (rank 0's groups)
    assert not worker.is_mapped(2)
    assert store.load(hits, fresh) == 5
    assert worker.is_mapped(2)
    assert _C.kv_gather_bytes(both, cfg.segments_arg, fresh) == (want_bytes, want_sums)

    # blocks between instances: streamed out of the pool and landed through the server
    from xllm.kvcache.transfer import Export, FetchPlan, gather_chunk, receive_chunk

    sums, data = gather_chunk(store, Export(0, 5, [], [("pool", b) for b in blocks]), 0, 5)
    assert (data, sums) == (want_bytes, want_sums)
    plan = FetchPlan(hashes, tokens, 0, list(range(80, 85)), store.layout_key(), None)
    assert receive_chunk(store, plan, 0, 5, sums, data) and plan.filled == 5
    assert _C.kv_gather_bytes(both, cfg.segments_arg, plan.blocks) == (want_bytes, want_sums)

    # a pull of blocks whose group the worker does not have mapped fails, the server lives on
    with pytest.raises(PartsUnavailable, match="not mapped"):
        store.readable([40])
    regions, ids = store.readable(fresh[:2])
    assert _C.kv_gather_bytes(regions, cfg.segments_arg, ids) == (want_bytes[:2 * 1536],
                                                                  want_sums[:2])

    # a rank that answers nonsense, then one that is gone: copies fail, loads recompute
    liar = socket.create_server(("127.0.0.1", 0))

    def lie() -> None:
        conn, _ = liar.accept()
        conn.recv(1 << 16)
        conn.sendall(b"\x00" * 12 + b"garbage")
        conn.close()

    threading.Thread(target=lie, daemon=True).start()
    store.link = PartLink([("127.0.0.1", liar.getsockname()[1])], [4 * 128], timeout=5.0)
    with pytest.raises(PartsUnavailable):
        store.readable(blocks[:1])
    liar.close()
    server.close()
    store.link = link
    link.close()
    store.link = PartLink([("127.0.0.1", server.port)], [4 * 128], timeout=2.0,
                          token="s3cret")
    assert store.load(hits, fresh) == 0  # not an exception: recomputed
    assert tier.corrupt_blocks == 0 and tier.num_blocks == 5  # the tier's bytes are fine
    store.close()


def test_a_latent_cache_replicates_loaded_blocks_to_a_rank_on_another_host() -> None:
    """MLA under TP with a rank on another host: a block is rank 0's part (read in place);
    one that lands here (a tier load) is pushed on to the remote replica, and a replica that
    cannot be written makes the load count nothing (recomputed)."""
    from xllm.kvcache.parts import PartLink, PartServer

    cfg = KVStoreConfig(num_blocks=64, num_layers=2, num_kv_heads=1, block_size=4, head_size=8,
                        dtype_bytes=4, idle_seconds=0.0, parts=2, replicated=True,
                        tensors_per_layer=1, cpu_tier_bytes=4 * 256)
    store = KVStore(cfg)
    caches = store.kv_caches(torch.float32)
    worker = KVMemory(64, 2, 128, tensors_per_layer=1, blocks_per_group=32)
    server = PartServer("127.0.0.1")
    server.memory = worker
    store.attach_link(PartLink([("127.0.0.1", server.port)], [2 * 128], timeout=5.0))
    assert store.whole and store.single_part and store.chunk_blocks >= 4
    blocks = store.pool.allocate(2)
    for k, _ in caches:
        k[blocks] = torch.randn(k[blocks].shape)
    regions, ids = store.readable(blocks)
    assert regions == store.regions and ids == blocks  # in place: rank 0's part is the block
    want = _C.kv_gather_bytes(store.regions, cfg.segment_bytes, blocks)
    assert want[0].count(0) < len(want[0]) // 2
    slots = store.cpu.index.allocate(2)
    sums = _C.kv_gather_blocks(store.regions, cfg.segment_bytes, blocks, store.cpu.address,
                               store.cpu.slot_bytes, slots)
    target = [40, 41]  # in the worker's second group, not mapped there yet
    landed = store.land(target, lambda regions, ids: _C.kv_scatter_blocks(
        store.cpu.address, store.cpu.slot_bytes, slots, sums, regions, cfg.segment_bytes, ids))
    assert landed == 2 and worker.is_mapped(1)
    assert _C.kv_gather_bytes(store.regions, cfg.segment_bytes, target) == want
    assert _C.kv_gather_bytes(worker.regions, cfg.segment_bytes, target) == want
    server.close()
    assert store.land(target, lambda regions, ids: _C.kv_scatter_blocks(
        store.cpu.address, store.cpu.slot_bytes, slots, sums, regions, cfg.segment_bytes,
        ids)) == 0
    store.close()
