"""The KV store on the demo model: tiers against the pool alone, transfer rates, memory.

    python -m bench.kvcache [--docs 16] [--doc-tokens 1024] [--idle 30] [--json PATH]
                            [--parts workload,transfer,peer,memory,remote]
                            [--peer-paths shm,grpc]

Parts (each engine in this CPU's default dtype, one run, one machine):

``workload``: a shared-document workload whose prefix working set is 4x the pool. ``--docs``
documents of ``--doc-tokens`` tokens (random token ids); the pool holds a quarter of them.
``--tp 2`` runs its engines tensor-parallel (the tiers then hold every rank's heads of a
block). Round 1 asks each document one question (cold), round 2 asks each a new question in the
same order (re-asked: the document is a prefix hit if anything still holds it). Requests go
one at a time through an ``LLMEngine``; TTFT is from ``add_request`` to the first token.
Run three times, on fresh engines: ``pool`` (no tier: LRU has evicted every document by the
time it is re-asked), ``pool+cpu`` (``kv_offload_cpu_gb`` holding every document) and
``pool+disk`` (a disk tier as large, in ``--disk-dir``). Reports TTFT
p50/p99 per round and the prefix hit rate (cached / prompt tokens) of round 2; the ratio of
round-2 p50s is the issue's target (>= 3x). ``load_vs_recompute``: the mean time of the
CPU tier's loads in round 2 (each a whole document, ``--doc-tokens`` tokens) against the
median round-2 TTFT of ``pool`` (the same document recomputed): target >= 10x.

``transfer``: single-thread rates over the demo's block size (all layers, K and V) in this
CPU's default KV dtype, for as many blocks as 512 MiB holds: ``memcpy`` (ctypes.memmove
between two buffers of that size, the reference), the CPU tier's write (``kv_gather_blocks``:
pool blocks -> tier slots with checksums) and load (``kv_scatter_blocks``, checksums
verified). Best of 5 each. Target: both >= 50% of memcpy. Then the disk tier: its write of
the same blocks (background thread, timed to the last one published), and its load path
against a plain sequential read of the same file, each after dropping the file from the page
cache; best of 3. Target: the load >= 50% of the sequential read.

``peer``: two instances, each its own process, over real gRPC on loopback: one holds the same
number of blocks as ``transfer`` in its prefix cache, the other fetches them (the path a
master's hint starts), over shared memory (the peer writes into the fetcher's KV memory) and
streamed over gRPC; best of 3 each against memcpy of the same bytes. Targets: shared memory
>= 50% of memcpy, gRPC >= 1 GB/s. ``--peer-paths shm,grpc,mooncake`` adds the Mooncake
transfer engine (TCP; the fetcher reads the blocks from the peer's memory itself). Its
engine listens on every interface, so that path runs only in a network namespace of its
own: ``unshare -n sh -c "ip link set lo up && python -m bench.kvcache --parts peer
--peer-paths shm,grpc,mooncake"``. ``--tp 2``: both instances tensor-parallel, a block
every rank's heads (shared memory maps each rank's memfd; Mooncake reads each part).

``remote`` (not in the default parts; needs root and ``ip netns``): a tensor-parallel
rank's share of the pool on another host. The demo's KV store at TP=2 (its heads split 2
and 1) in one network namespace, rank 1's share served by a PartServer in another, joined by
a veth pair; 256 MiB of whole blocks written to the CPU tier and loaded back through
``KVStore.readable`` / ``land`` (best of 3), against the same store with both parts in its
process (in place), memcpy of the whole blocks, and the wire: a plain TCP stream of the
remote part's bytes over the same pair.

``memory``: an engine whose pool's ceiling is 1 GiB serves a burst of long prompts, all at
once and all running together, that fills most of the pool; then it sits idle for
``--idle`` seconds (upkeep runs when due, as the server's engine thread does). Reports
mapped KV memory before, at the peak, and after, and the share of what the burst mapped
that was returned (target >= 80%); and the time to grow the pool by one page group (map
it, and first touch of its pages).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import random
import statistics
import tempfile
import time
from dataclasses import replace

import torch

from bench.throughput import _cpu_name
from xllm import _C, SamplingParams
from xllm.config import EngineConfig
from xllm.engine.llm_engine import LLMEngine
from xllm.kvcache.memory import KVMemory
from xllm.kvcache.mooncake import MooncakeTransport
from xllm.kvcache.store import KVStore, KVStoreConfig
from xllm.ops.block_pool import ROOT_HASH, block_hashes


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def _ttft(engine: LLMEngine, rid: str, prompt: list[int]) -> tuple[float, int]:
    """Runs one request alone; (seconds to its first token, cached prompt tokens)."""
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    t0 = time.perf_counter()
    engine.add_request(rid, prompt, params)
    first = None
    cached = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if first is None and out.outputs[0].token_ids:
                first = time.perf_counter() - t0
                cached = out.num_cached_tokens
    assert first is not None
    return first, cached


def run_workload(args: argparse.Namespace) -> dict:
    rng = random.Random(0)
    probe = LLMEngine(EngineConfig(model="demo", num_kv_blocks=2), progress=False)
    vocab = probe.model_config.vocab_size
    store_cfg = probe.kv_store.config
    bs = probe.config.block_size
    del probe
    docs = [[rng.randrange(100, vocab) for _ in range(args.doc_tokens)] for _ in range(args.docs)]
    questions = [[[rng.randrange(100, vocab) for _ in range(16)] for _ in docs] for _ in range(2)]
    blocks_per_prompt = -(-(args.doc_tokens + 16) // bs)
    pool_blocks = max(args.docs // 4, 1) * blocks_per_prompt + 1  # a quarter of the documents
    tier_gb = 1.25 * args.docs * blocks_per_prompt * store_cfg.block_bytes / (1 << 30)
    result: dict = {"docs": args.docs, "doc_tokens": args.doc_tokens, "tp": args.tp,
                    "pool_blocks": pool_blocks,
                    "block_bytes": store_cfg.block_bytes, "cpu_tier_gb": round(tier_gb, 3)}
    variants = (("pool", {}), ("pool+cpu", {"kv_offload_cpu_gb": tier_gb}),
                ("pool+disk", {"kv_offload_disk": None, "kv_offload_disk_gb": tier_gb}))
    for name, tier_opts in variants:
        tmp = None
        if "kv_offload_disk" in tier_opts:
            tmp = tempfile.TemporaryDirectory(dir=args.disk_dir)
            tier_opts = {**tier_opts, "kv_offload_disk": tmp.name}
        engine = LLMEngine(EngineConfig(model="demo", num_kv_blocks=pool_blocks,
                                        max_num_batched_tokens=2048,
                                        tensor_parallel_size=args.tp, **tier_opts),
                           progress=False)
        _ttft(engine, "warm", docs[0][:64])
        rounds = []
        cached_tokens = prompt_tokens = 0
        for r in range(2):
            times = []
            for i, doc in enumerate(docs):
                seconds, cached = _ttft(engine, f"r{r}-{i}", doc + questions[r][i])
                times.append(seconds)
                if r == 1:
                    cached_tokens += cached
                    prompt_tokens += len(doc) + 16
                engine.kv_store.flush()  # the next request sees every write-back published
            rounds.append(times)
        store = engine.kv_store
        loads = store.stats()
        row = {
            "round1_ttft_p50_ms": 1e3 * statistics.median(rounds[0]),
            "round1_ttft_p99_ms": 1e3 * _percentile(rounds[0], 99),
            "round2_ttft_p50_ms": 1e3 * statistics.median(rounds[1]),
            "round2_ttft_p99_ms": 1e3 * _percentile(rounds[1], 99),
            "round2_hit_rate": cached_tokens / prompt_tokens,
        }
        if store.num_loads:
            row["mean_load_ms"] = 1e3 * loads.load_sum / store.num_loads
            row["num_loads"] = store.num_loads
        result[name] = row
        engine.close()
        del engine
        if tmp is not None:
            tmp.cleanup()
    pool = result["pool"]
    for name in ("pool+cpu", "pool+disk"):
        tier = result[name]
        tier["round2_p50_speedup"] = pool["round2_ttft_p50_ms"] / tier["round2_ttft_p50_ms"]
        if "mean_load_ms" in tier:
            tier["load_vs_recompute"] = pool["round2_ttft_p50_ms"] / tier["mean_load_ms"]
    return result


def _best(fn, repeats: int = 5) -> float:  # noqa: ANN001
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run_transfer(args: argparse.Namespace) -> dict:
    probe = LLMEngine(EngineConfig(model="demo", num_kv_blocks=2), progress=False)
    c = probe.kv_store.config
    del probe
    n = max(1, (512 << 20) // c.block_bytes)
    store = KVStore(KVStoreConfig(num_blocks=n + 1, num_layers=c.num_layers,
                                  num_kv_heads=c.num_kv_heads, block_size=c.block_size,
                                  head_size=c.head_size, dtype_bytes=c.dtype_bytes,
                                  cpu_tier_bytes=(n + 2) * c.block_bytes))
    caches = store.kv_caches(torch.bfloat16 if c.dtype_bytes == 2 else torch.float32)
    blocks = store.pool.allocate(n)  # maps every group
    for k, v in caches:
        k.normal_()
        v.normal_()
    tier = store.tiers[0]
    slots = list(range(1, n + 1))
    nbytes = n * c.block_bytes
    t_memcpy = _memcpy_seconds(nbytes)
    sums: list[int] = []

    def gather() -> None:
        sums[:] = _C.kv_gather_blocks(store.regions, c.segment_bytes, blocks, tier.address,
                                      tier.slot_bytes, slots)

    t_gather = _best(gather)

    def scatter() -> None:
        ok = _C.kv_scatter_blocks(tier.address, tier.slot_bytes, slots, sums, store.regions,
                                  c.segment_bytes, blocks)
        assert ok == n

    t_scatter = _best(scatter)
    store.close()
    gbs = lambda t: nbytes / t / 1e9  # noqa: E731
    row = {"blocks": n, "block_bytes": c.block_bytes, "bytes": nbytes,
           "memcpy_GBps": gbs(t_memcpy), "cpu_tier_write_GBps": gbs(t_gather),
           "cpu_tier_load_GBps": gbs(t_scatter),
           "write_vs_memcpy": t_memcpy / t_gather, "load_vs_memcpy": t_memcpy / t_scatter}
    row.update(_disk_rates(c, n, args))
    return row


def _drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _disk_rates(c: KVStoreConfig, n: int, args: argparse.Namespace) -> dict:
    """The disk tier's load path (reads in staging chunks, checksums, copies into the pool)
    against a plain sequential read of the same file, each after dropping it from the page
    cache (posix_fadvise; where the OS ignores that, both read from the cache)."""
    with tempfile.TemporaryDirectory(dir=args.disk_dir) as tmp:
        store = KVStore(replace(c, num_blocks=n + 1, disk_tier_dir=tmp,
                                disk_tier_bytes=(n + 2) * c.block_bytes))
        caches = store.kv_caches(torch.bfloat16 if c.dtype_bytes == 2 else torch.float32)
        blocks = store.pool.allocate(n)
        for k, v in caches:
            k.normal_()
            v.normal_()
        tokens = list(range(n * c.block_size))
        hashes = block_hashes(tokens, c.block_size)
        parents = [ROOT_HASH, *hashes[:-1]]
        contents = [(parents[i], tuple(tokens[i * c.block_size:(i + 1) * c.block_size]))
                    for i in range(n)]
        t0 = time.perf_counter()
        store.offer(blocks, hashes, contents)
        store.flush()
        write_s = time.perf_counter() - t0
        disk = store.disk
        assert disk is not None and disk.num_blocks == n
        path = str(disk.path / "blocks.bin")
        nbytes = n * c.block_bytes
        buf = bytearray(8 << 20)
        plain, tier = [], []
        for _ in range(3):
            _drop_cache(path)
            fd = os.open(path, os.O_RDONLY)
            t0 = time.perf_counter()
            off, end = c.block_bytes, (n + 1) * c.block_bytes  # the slots written (1..n)
            while off < end:
                got = os.preadv(fd, [memoryview(buf)[:min(len(buf), end - off)]], off)
                off += got
            plain.append(time.perf_counter() - t0)
            os.close(fd)
            _drop_cache(path)
            hits = store.lookup(hashes, ROOT_HASH, tokens, 0)
            t0 = time.perf_counter()
            assert store.load(hits, blocks) == n
            tier.append(time.perf_counter() - t0)
        store.close()
    return {"disk_write_GBps": nbytes / write_s / 1e9,
            "disk_seq_read_GBps": nbytes / min(plain) / 1e9,
            "disk_tier_load_GBps": nbytes / min(tier) / 1e9,
            "disk_load_vs_seq_read": min(plain) / min(tier)}


def _memcpy_seconds(nbytes: int) -> float:
    """Best of 5: one thread's memmove between two buffers of nbytes (the reference)."""
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8).fill_(2)
    return _best(lambda: ctypes.memmove(dst.data_ptr(), src.data_ptr(), nbytes))


def _peer_chain(c: KVStoreConfig, n: int) -> tuple[list[int], list[int]]:
    """The token chain the peer part's blocks are cached under, and its block hashes."""
    tokens = [100 + (i % 30000) for i in range(n * c.block_size + 1)]
    return tokens, block_hashes(tokens[:-1], c.block_size)


def serve_peer(n: int, mooncake: bool, tp: int = 1) -> None:
    """The serving instance of the peer part, in its own process (as instances are): an
    engine holding ``n`` blocks of random bytes in its prefix cache under the chain's
    hashes, behind a gRPC server on loopback (and a Mooncake transfer engine serving its KV
    memory, with ``mooncake``); prints its port, serves until stdin closes."""
    import sys

    import grpc

    from xllm.engine.async_engine import AsyncEngine
    from xllm.service.instance import InstanceServicer
    from xllm.service.proto import instance_pb2_grpc

    engine = AsyncEngine(EngineConfig(model="demo", num_kv_blocks=n + 8,
                                      tensor_parallel_size=tp))
    engine.start()
    assert engine.wait_ready(300), engine.error
    c = engine.engine.kv_store.config
    tokens, hashes = _peer_chain(c, n)

    def seed(e: LLMEngine) -> int:
        kv = e.scheduler.kv
        blocks = kv.reserve_blocks(n)
        assert blocks is not None
        for k, v in e.runner.kv_caches:
            k[blocks].normal_()
            v[blocks].normal_()
        parents = [ROOT_HASH, *hashes[:-1]]
        contents = [(parents[i], tuple(tokens[i * c.block_size:(i + 1) * c.block_size]))
                    for i in range(n)]
        kv.adopt_blocks(blocks, hashes, contents, n)
        return len(kv.pool.lookup(hashes))

    async def run() -> None:
        assert await asyncio.wrap_future(engine.call_on_engine_thread(seed)) == n
        server = grpc.aio.server()
        servicer = InstanceServicer(engine)
        if mooncake:
            servicer.mooncake = MooncakeTransport("127.0.0.1")
            servicer.mooncake.serve(engine.engine.kv_store)
        instance_pb2_grpc.add_InstanceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"PORT {port}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await server.stop(0.5)

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()


def _interfaces() -> set[str]:
    """This process's network namespace's interfaces (/proc/self/net/dev is per namespace;
    /sys/class/net is the sysfs of the namespace it was mounted in)."""
    with open("/proc/self/net/dev") as f:
        return {line.split(":")[0].strip() for line in f.readlines()[2:]}


def run_peer(args: argparse.Namespace) -> dict:
    """Two instances, each its own process, over real gRPC on loopback: the other process
    (:func:`serve_peer`) holds a chain of blocks as large as the transfer part's; this one
    fetches it, over the shared-memory path and over the streamed gRPC path, best of 3
    each (and over Mooncake where ``--peer-paths`` names it), its cache emptied between
    runs."""
    import subprocess
    import sys

    from xllm.engine.async_engine import AsyncEngine
    from xllm.service.instance import InstanceServicer

    probe = LLMEngine(EngineConfig(model="demo", num_kv_blocks=2), progress=False)
    c = probe.kv_store.config
    del probe
    n = max(4, (512 << 20) // c.block_bytes)
    tokens, _ = _peer_chain(c, n)
    nbytes = n * c.block_bytes
    t_memcpy = _memcpy_seconds(nbytes)
    paths = args.peer_paths.split(",")
    if set(paths) - {"shm", "grpc", "mooncake"}:
        raise SystemExit(f"--peer-paths: unknown paths in {args.peer_paths!r}")
    mooncake = "mooncake" in paths
    if mooncake and _interfaces() - {"lo"}:
        raise SystemExit("the Mooncake path listens on every interface: run it in a network "
                         "namespace of its own (unshare -n sh -c \"ip link set lo up && "
                         "python -m bench.kvcache --parts peer --peer-paths ...\")")
    cmd = [sys.executable, "-m", "bench.kvcache", "--serve-peer", str(n), "--tp", str(args.tp)]
    peer = subprocess.Popen(cmd + (["--mooncake"] if mooncake else []),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    engine = AsyncEngine(EngineConfig(model="demo", num_kv_blocks=n + 8,
                                      tensor_parallel_size=args.tp))
    engine.start()
    try:
        assert engine.wait_ready(300), engine.error
        line = ""
        while not line.startswith("PORT "):
            line = peer.stdout.readline()  # type: ignore[union-attr]
            assert line, "the serving instance died"
        address = f"127.0.0.1:{line.split()[1]}"

        transport = MooncakeTransport("127.0.0.1") if mooncake else None

        async def run() -> dict:
            client = InstanceServicer(engine)
            engine.engine.kv_store._prefill_tps = None  # always fetch: this measures it
            rows = {}
            try:
                for path in paths:
                    same = path == "shm"
                    client.same_host = staticmethod(lambda peer, v=same: v)  # type: ignore
                    client.mooncake = transport if path == "mooncake" else None
                    best = float("inf")
                    for _ in range(3):
                        fut = engine.call_on_engine_thread(
                            lambda e: e.scheduler.reset_prefix_cache())
                        assert await asyncio.wrap_future(fut)
                        t0 = time.perf_counter()
                        got = await client.fetch_from_peer(address, tokens, n)
                        best = min(best, time.perf_counter() - t0)
                        assert got == n, (path, got)
                    rows[f"{path}_GBps"] = nbytes / best / 1e9
                    rows[f"{path}_vs_memcpy"] = t_memcpy / best
            finally:
                await client.close_peers()
                if transport is not None:
                    transport.close()
            return rows

        rows = asyncio.run(run())
    finally:
        engine.shutdown()
        peer.stdin.close()  # type: ignore[union-attr]
        peer.wait(30)
    return {"blocks": n, "bytes": nbytes, "tp": args.tp, "memcpy_GBps": nbytes / t_memcpy / 1e9,
            **rows}


def run_memory(args: argparse.Namespace) -> dict:
    engine = LLMEngine(EngineConfig(model="demo", kv_cache_memory_gb=1.0,
                                    max_num_batched_tokens=2048, max_num_seqs=256),
                       progress=False)
    store = engine.kv_store
    rng = random.Random(1)
    vocab = engine.model_config.vocab_size
    bs = engine.config.block_size
    capacity_tokens = (engine.num_kv_blocks - 1) * bs
    n = max(1, int(0.85 * capacity_tokens) // 1024)
    before = store.mapped_bytes
    # Enough output tokens that the first prompts still run when the last is admitted, so the
    # burst holds most of the pool at once.
    steps_to_admit = -(-n * 1024 // engine.config.max_num_batched_tokens)
    params = SamplingParams(temperature=0.0, max_tokens=steps_to_admit + 8, ignore_eos=True)
    for i in range(n):
        engine.add_request(f"burst-{i}", [rng.randrange(100, vocab) for _ in range(1023)], params)
    peak = before
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        peak = max(peak, store.mapped_bytes)
    burst_s = time.perf_counter() - t0
    after_burst = store.mapped_bytes
    end = time.monotonic() + args.idle
    while True:
        due = engine.maintain()
        left = end - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(left, due if due is not None else left))
    after_idle = store.mapped_bytes
    engine.close()
    del engine
    # one page group: map it, then the first write to its pages (the OS fills them)
    c = store.config
    mem = KVMemory(64 * 1024, c.num_layers, c.segment_bytes)
    map_s, touch_s = [], []
    for g in range(1, 9):
        t = time.perf_counter()
        mem.map_group(g)
        map_s.append(time.perf_counter() - t)
        view = mem.vmm.tensor(torch.uint8, (mem.page_bytes,), offset=g * mem.page_bytes)
        t = time.perf_counter()
        for r in range(mem.num_regions):
            mem.vmm.tensor(torch.uint8, (mem.page_bytes,),
                           offset=r * mem.region_bytes + g * mem.page_bytes).fill_(1)
        touch_s.append(time.perf_counter() - t)
        del view
    burst_mapped = peak - before
    return {"ceiling_bytes": store.memory.reserved_bytes if store.memory else None,
            "burst_prompts": n, "burst_seconds": burst_s, "mapped_before": before,
            "mapped_peak": peak, "mapped_after_burst": after_burst, "idle_seconds": args.idle,
            "mapped_after_idle": after_idle,
            "returned_share": (peak - after_idle) / burst_mapped if burst_mapped else None,
            "group_bytes": mem.page_bytes * mem.num_regions,
            "grow_map_ms": 1e3 * statistics.median(map_s),
            "grow_first_touch_ms": 1e3 * statistics.median(touch_s)}


# ---- remote: a tensor-parallel rank's part on another host ---------------------------------


def _part_geometry() -> tuple[KVStoreConfig, tuple[int, ...]]:
    """The demo's KV store at TP=2 in this CPU's default dtype (its KV heads split 2 and 1)
    and each rank's heads, for ``--tp`` blocks' worth of 256 MiB."""
    from types import SimpleNamespace

    from xllm.layers.parallel import head_shard

    probe = LLMEngine(EngineConfig(model="demo", num_kv_blocks=2), progress=False)
    c, mc = probe.kv_store.config, probe.model_config
    del probe
    heads = tuple(head_shard(mc.num_attention_heads, mc.num_key_value_heads,
                             SimpleNamespace(size=2, rank=r)).num_kv_heads for r in range(2))
    part = replace(c, num_kv_heads=heads[0], parts=2, part_heads=heads)
    n = max(1, (256 << 20) // part.block_bytes)
    return replace(part, num_blocks=n + 1, cpu_tier_bytes=(n + 2) * part.block_bytes), heads


def serve_part(heads: int) -> None:
    """The other host's side (``--serve-part``, run in its namespace): rank 1's share of the
    pool (its ``heads``), mapped and filled, served by a PartServer; and a plain TCP source of
    the same bytes (the wire's reference). Prints both ports; serves until stdin closes."""
    import socket
    import sys
    import threading

    from xllm.kvcache.parts import PartServer

    c, _ = _part_geometry()
    seg = c.part_segment(1)
    memory = KVMemory(c.num_blocks, c.num_layers, seg, tensors_per_layer=c.tensors_per_layer)
    for g in range(memory.num_groups):
        memory.map_group(g)
    for region in memory.regions:
        ctypes.memset(region, 0x5A, c.num_blocks * seg)
    host = os.environ["XLLM_BENCH_HOST"]
    server = PartServer(host)
    server.memory = memory
    source = socket.create_server((host, 0))
    nbytes = (c.num_blocks - 1) * seg * memory.num_regions

    def stream() -> None:
        data = memoryview(bytearray(8 << 20))
        while True:
            conn, _ = source.accept()
            with conn:
                left = nbytes
                while left:
                    left -= conn.send(data[:min(left, len(data))])

    threading.Thread(target=stream, daemon=True).start()
    print(server.port, source.getsockname()[1], flush=True)
    sys.stdin.read()


def _whole_block_rates(store: KVStore, n: int) -> tuple[float, float]:
    """Seconds (best of 3) to write blocks 1..n to the CPU tier and to load them back, in
    the store's chunks, each through ``readable`` and ``land`` as the store's own copies go."""
    c, tier = store.config, store.cpu
    assert tier is not None
    blocks = slots = list(range(1, n + 1))
    sums: list[int] = []
    step = store.chunk_blocks

    def write() -> None:
        sums.clear()
        for at in range(0, n, step):
            regions, ids = store.readable(blocks[at:at + step])
            sums.extend(_C.kv_gather_blocks(regions, c.segments_arg, ids, tier.address,
                                            tier.slot_bytes, slots[at:at + step]))

    def load() -> None:
        for at in range(0, n, step):
            part = slots[at:at + step]
            got = store.land(blocks[at:at + step], lambda regions, ids, part=part, at=at:
                             _C.kv_scatter_blocks(tier.address, tier.slot_bytes, part,
                                                  sums[at:at + len(part)], regions,
                                                  c.segments_arg, ids))
            assert got == len(part)

    return _best(write, 3), _best(load, 3)


def remote_rank0(host: str, port: int, raw_port: int) -> None:
    """Rank 0's side (``--remote-rank0``, in the other namespace): whole blocks to and from
    a CPU tier with the other part behind the link, against the same with both parts in
    this process, memcpy, and the wire (a plain TCP stream of the remote part's bytes)."""
    import socket

    from xllm.kvcache.parts import PartLink

    c, _ = _part_geometry()
    n = c.num_blocks - 1
    rates: dict[str, float] = {}
    for where in ("in_place", "remote"):
        store = KVStore(c)
        store.pool.allocate(n)  # maps every group
        for region in store.regions:
            ctypes.memset(region, 0x33, n * c.segment_bytes)
        if where == "remote":
            store.attach_link(PartLink([(host, port)], [c.part_bytes(1)]))
        else:
            other = KVMemory(c.num_blocks, c.num_layers, c.part_segment(1),
                             tensors_per_layer=c.tensors_per_layer)
            for g in range(other.num_groups):
                other.map_group(g)
            store.attach_parts(other.regions, keep=[other])
        rates[f"{where}_write_s"], rates[f"{where}_load_s"] = _whole_block_rates(store, n)
        store.close()

    remote_bytes = n * c.part_bytes(1)
    buf = bytearray(8 << 20)

    def wire() -> None:
        with socket.create_connection((host, raw_port)) as conn:
            left = remote_bytes
            while left:
                got = conn.recv_into(buf)
                assert got
                left -= got

    t_wire = _best(wire, 3)
    nbytes = n * c.block_bytes
    t_memcpy = _memcpy_seconds(nbytes)
    gbs = lambda t: nbytes / t / 1e9  # noqa: E731
    row = {"blocks": n, "block_bytes": c.block_bytes, "part_heads": list(c.part_heads),
           "remote_part_bytes": remote_bytes, "memcpy_GBps": gbs(t_memcpy),
           "wire_GBps_remote_part": remote_bytes / t_wire / 1e9}
    for where in ("in_place", "remote"):
        for op in ("write", "load"):
            row[f"{where}_{op}_GBps"] = gbs(rates[f"{where}_{op}_s"])
    for op in ("write", "load"):  # the remote part's bytes over the link vs the wire's rate
        row[f"remote_{op}_vs_wire"] = t_wire / rates[f"remote_{op}_s"]
    print(json.dumps(row), flush=True)


def run_remote(args: argparse.Namespace) -> dict:
    """A rank's part on another host (see the module doc): both sides in network namespaces
    joined by a veth pair."""
    import subprocess
    import sys

    from bench.netns import two_namespaces

    with two_namespaces("xbench") as ((ns_a, _), (ns_b, addr_b)):
        env = dict(os.environ, XLLM_BENCH_HOST=addr_b)
        server = subprocess.Popen(["ip", "netns", "exec", ns_b, sys.executable, "-m",
                                   "bench.kvcache", "--serve-part", "1"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env=env)
        try:
            port, raw_port = server.stdout.readline().split()
            out = subprocess.run(["ip", "netns", "exec", ns_a, sys.executable, "-m",
                                  "bench.kvcache", "--remote-rank0", addr_b, port, raw_port],
                                 capture_output=True, text=True, timeout=600)
            if out.returncode:
                raise RuntimeError(f"rank 0's side failed: {out.stderr[-3000:]}")
            return json.loads(out.stdout.strip().splitlines()[-1])
        finally:
            server.kill()
            server.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--doc-tokens", type=int, default=1024)
    parser.add_argument("--idle", type=float, default=30.0)
    parser.add_argument("--tp", type=int, default=1,
                        help="tensor_parallel_size of the workload and peer parts' engines "
                             "(one host)")
    parser.add_argument("--parts", default="workload,transfer,peer,memory")
    parser.add_argument("--disk-dir", default=None,
                        help="where the disk tier's files go (default: the system's temp dir)")
    parser.add_argument("--json")
    parser.add_argument("--peer-paths", default="shm,grpc",
                        help="the peer part's paths: shm, grpc, mooncake (in a network "
                             "namespace only)")
    parser.add_argument("--serve-peer", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mooncake", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-part", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--remote-rank0", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_peer:
        serve_peer(args.serve_peer, args.mooncake, args.tp)
        return 0
    if args.serve_part:
        serve_part(args.serve_part)
        return 0
    if args.remote_rank0:
        host, port, raw = args.remote_rank0
        remote_rank0(host, int(port), int(raw))
        return 0
    parts = args.parts.split(",")
    unknown = set(parts) - {"workload", "transfer", "peer", "memory", "remote"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    report = {"cpu": _cpu_name(), "isa": _C.detected_isa(),
              "cores": len(os.sched_getaffinity(0)), "date": time.strftime("%Y-%m-%d %H:%M")}
    print(f"CPU {report['cpu']} ({report['isa']}), {report['cores']} cores")
    runners = {"workload": run_workload, "transfer": run_transfer, "peer": run_peer,
               "memory": run_memory, "remote": run_remote}
    for part in parts:
        report[part] = runners[part](args)
        print(part, json.dumps(report[part], indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
