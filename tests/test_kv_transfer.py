"""KV blocks between instances: exported by one engine, landed in another (streamed and
same-host), over gRPC between two instances, with faults (a corrupt block, a peer that
stalls mid-transfer, a layout mismatch) ending in correct outputs."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest

from xllm import LLM, SamplingParams
from xllm.kvcache.transfer import (
    export_blocks,
    finish_fetch,
    gather_chunk,
    plan_fetch,
    receive_chunk,
    release_export,
)

pytestmark = pytest.mark.timeout(180)

DOC = "The harbour master wrote down every ship, its flag and its cargo, each night. " * 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
# 16-token blocks for every cache dtype (int8 would default to 64): the block counts below.
OPTS = dict(dtype="float32", num_kv_blocks=96, max_num_batched_tokens=512, block_size=16)


@pytest.fixture(scope="module", params=["float32", "bfloat16", "int8"])
def pair(demo_model_dir: Path, request: pytest.FixtureRequest
         ) -> tuple[LLM, LLM, list[int], list[int]]:
    """A peer that has computed the document, and a fresh instance (fp32, bf16 and int8 KV
    caches); the prompt and the greedy output a lone engine gives for it."""
    opts = {**OPTS, "kv_cache_dtype": request.param}
    peer = LLM(model=str(demo_model_dir), **opts)
    prompt = peer.engine.tokenizer.encode(DOC + "Which ship came first?")
    want = peer.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    client = LLM(model=str(demo_model_dir), **opts)
    return peer, client, prompt, want


def _transfer(peer: LLM, client: LLM, prompt: list[int], same_host: bool,
              corrupt_at: int | None = None) -> int:
    server, engine = peer.engine, client.engine
    engine.kv_store._prefill_tps = None  # fetch whatever the costs: this test wants the path
    plan = plan_fetch(engine, prompt, peer_blocks=(len(prompt) - 1) // 16, same_host=same_host)
    assert plan is not None and plan.first == 0
    assert (plan.shm is not None) == same_host
    shm = None if plan.shm is None else (plan.shm, plan.blocks)
    export = export_blocks(server, plan.hashes, plan.tokens, plan.first, plan.layout, shm)
    assert export.count == len(plan.blocks)
    assert (export.sources is None) == same_host
    if same_host:
        data, sums = b"", list(export.checksums)
    else:
        pool = server.scheduler.kv.pool
        pinned = [b for place, b in export.sources]
        assert all(pool.ref_count(b) == 1 for b in pinned)  # held while streamed
        sums, data = gather_chunk(server.kv_store, export, 0, export.count)
        release_export(server, export)
        assert all(pool.ref_count(b) == 0 for b in pinned)
    if corrupt_at is not None:
        sums[corrupt_at] ^= 1  # as if that block had been damaged on the way
    per = 5
    for i in range(0, export.count, per):
        k = min(per, export.count - i)
        nb = engine.kv_store.config.block_bytes
        if not receive_chunk(engine.kv_store, plan, i, k, sums[i:i + k],
                             data[i * nb:(i + k) * nb], verify_in_place=True):
            break
    return finish_fetch(engine, plan, "shm" if same_host else "grpc")


@pytest.mark.parametrize("same_host", [False, True])
def test_fetched_prefix_gives_the_outputs_of_computing_it(pair, same_host: bool) -> None:  # noqa: ANN001
    peer, client, prompt, want = pair
    client.engine.scheduler.reset_prefix_cache()
    n = _transfer(peer, client, prompt, same_host)
    assert n == (len(prompt) - 1) // 16
    out = client.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens == n * 16
    assert out.outputs[0].token_ids == want


def test_a_bad_block_ends_the_fetch_there(pair) -> None:  # noqa: ANN001
    peer, client, prompt, want = pair
    client.engine.scheduler.reset_prefix_cache()
    assert _transfer(peer, client, prompt, same_host=False, corrupt_at=7) == 7
    out = client.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens == 7 * 16 and out.outputs[0].token_ids == want
    client.engine.scheduler.reset_prefix_cache()
    assert _transfer(peer, client, prompt, same_host=True, corrupt_at=3) == 3


def test_no_fetch_when_local_or_when_layouts_differ(pair) -> None:  # noqa: ANN001
    peer, client, prompt, _ = pair
    client.engine.scheduler.reset_prefix_cache()
    client.generate([prompt], GREEDY, use_tqdm=False)  # now it has the prefix itself
    assert plan_fetch(client.engine, prompt, 30, same_host=False) is None
    tokens = prompt[:16 * 8]
    from xllm.ops.block_pool import block_hashes

    export = export_blocks(peer.engine, block_hashes(tokens, 16), tokens, 0, "another-model",
                           None)
    assert export.count == 0


def test_recompute_wins_when_the_peer_is_slow(pair) -> None:  # noqa: ANN001
    peer, client, prompt, _ = pair
    client.engine.scheduler.reset_prefix_cache()
    store = client.engine.kv_store
    store._prefill_tps = 1e7  # an engine that computes prompts faster than it can copy
    try:
        assert plan_fetch(client.engine, prompt, 30, same_host=False) is None
    finally:
        store._prefill_tps = None


@pytest.mark.parametrize("which", ["peer", "client"])
def test_a_device_cache_serves_and_lands_streamed_blocks(demo_model_dir: Path,
                                                         which: str) -> None:
    """A pool reached through torch copies (a GPU engine's) exports and lands streamed
    blocks with the bytes and checksums of a host pool: a fetch between one of each gives
    the outputs of computing the prefix."""
    from conftest import kv_reached_through_torch

    opts = {**OPTS, "kv_cache_dtype": "bfloat16"}
    with kv_reached_through_torch():
        odd = LLM(model=str(demo_model_dir), **opts)
    plain = LLM(model=str(demo_model_dir), **opts)
    peer, client = (odd, plain) if which == "peer" else (plain, odd)
    assert odd.engine.kv_store.staged and not plain.engine.kv_store.staged
    prompt = peer.engine.tokenizer.encode(DOC + "Which ship came first?")
    want = peer.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    n = _transfer(peer, client, prompt, same_host=False)
    assert n == (len(prompt) - 1) // 16
    out = client.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens == n * 16 and out.outputs[0].token_ids == want
    client.engine.scheduler.reset_prefix_cache()
    assert _transfer(peer, client, prompt, same_host=False, corrupt_at=5) == 5


def test_grpc_fetch_and_a_peer_that_stalls_mid_transfer(demo_model_dir: Path,
                                                        monkeypatch) -> None:  # noqa: ANN001
    """Two instances over real gRPC: the fetch lands every block; then a peer that sends
    one chunk and goes silent costs only the blocks after it (recomputed), in bounded time."""
    from xllm.config import EngineConfig
    from xllm.engine.async_engine import AsyncEngine
    from xllm.service import instance as instance_mod
    from xllm.service.instance import InstanceServicer
    from xllm.service.proto import instance_pb2_grpc

    monkeypatch.setattr(instance_mod, "FETCH_STALL_S", 0.5)
    cfg = EngineConfig(model=str(demo_model_dir), max_model_len=512, num_threads=1, **OPTS)
    engines = [AsyncEngine(cfg), AsyncEngine(cfg)]
    for e in engines:
        e.start()
    for e in engines:
        assert e.wait_ready(120), e.error

    class Stalling(InstanceServicer):
        async def FetchBlocks(self, request: Any, context: Any) -> Any:  # noqa: N802
            async for chunk in super().FetchBlocks(request, context):
                yield chunk
                await asyncio.sleep(30)  # the peer hangs after its first chunk

    class Crashing(InstanceServicer):
        async def FetchBlocks(self, request: Any, context: Any) -> Any:  # noqa: N802
            async for chunk in super().FetchBlocks(request, context):
                yield chunk
                raise RuntimeError("the peer died")  # the stream breaks after one chunk

    async def run() -> None:
        servers = []
        addresses = []
        for servicer in (InstanceServicer(engines[0]), Stalling(engines[0]),
                         Crashing(engines[0])):
            server = grpc.aio.server()
            instance_pb2_grpc.add_InstanceServicer_to_server(servicer, server)
            addresses.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
            await server.start()
            servers.append(server)
        client = InstanceServicer(engines[1])
        try:
            prompt = engines[0].engine.tokenizer.encode(DOC + "Name a ship.")
            async for _ in engines[0].generate(prompt, GREEDY):
                pass
            n = (len(prompt) - 1) // 16
            for e in engines:
                e.engine.kv_store._prefill_tps = None
            assert await client.fetch_from_peer("127.0.0.1:1", prompt, n) == 0  # nobody there
            want = [o async for o in engines[0].generate(prompt, GREEDY)][-1]

            async def reset() -> None:
                fut = engines[1].call_on_engine_thread(
                    lambda e: e.scheduler.reset_prefix_cache())
                assert await asyncio.wrap_future(fut)

            for same_host in (True, False):  # shared memory, then the streamed bytes
                monkeypatch.setattr(InstanceServicer, "same_host",
                                    staticmethod(lambda peer, v=same_host: v))
                await reset()
                served = engines[0].engine.kv_store.peer_blocks_served
                assert await client.fetch_from_peer(addresses[0], prompt, n) == n
                assert engines[0].engine.kv_store.peer_blocks_served == served + n
                # the path it took (a loopback caller gets shared memory)
                assert ("shm" if same_host else "grpc") in engines[1].engine.kv_store.peer_bps
                outs = [o async for o in engines[1].generate(prompt, GREEDY)]
                assert outs[-1].num_cached_tokens == n * 16
                assert outs[-1].outputs[0].token_ids == want.outputs[0].token_ids
            # a stalling peer: the first chunk lands, the rest is given up on in 0.5 s
            for address in addresses[1:]:  # one that stalls, one that dies mid-stream
                await reset()
                t0 = asyncio.get_running_loop().time()
                got = await client.fetch_from_peer(address, prompt, n)
                assert 0 < got < n and asyncio.get_running_loop().time() - t0 < 5
                outs = [o async for o in engines[1].generate(prompt, GREEDY)]
                assert outs[-1].num_cached_tokens == got * 16
                assert outs[-1].outputs[0].token_ids == want.outputs[0].token_ids
            # every block the peers pinned for the streams was let go
            fut = engines[0].call_on_engine_thread(
                lambda e: e.scheduler.kv.pool.num_free_blocks)
            assert await asyncio.wrap_future(fut) == engines[0].engine.num_kv_blocks - 1
        finally:
            await client.close_peers()
            for server in servers:
                await server.stop(0.5)

    try:
        asyncio.run(run())
    finally:
        for e in engines:
            e.shutdown()


def test_in_process_cluster_routes_a_prefix_to_a_peer_that_fetches_it(
        demo_model_dir: Path) -> None:
    """A real master (round robin) and two real instances: the first computes a prompt, the
    second gets the same prompt with the first as its hint, fetches its blocks, and reports
    them as cached tokens; both give the same greedy output."""
    from cluster_helpers import cluster, engines

    from xllm.config import EngineConfig

    cfg = EngineConfig(model=str(demo_model_dir), max_model_len=512, num_threads=1, **OPTS)

    async def run(pair: list) -> None:
        async with cluster([(e, "mixed") for e in pair], policy="round_robin") as (_, master):
            prompt = pair[0].engine.tokenizer.encode(DOC + "Where did they sail?")
            n = (len(prompt) - 1) // 16
            first = [o async for o in master.generate(prompt, GREEDY)][-1]
            served = [e.engine.kv_store.peer_blocks_served for e in pair]
            await asyncio.sleep(0.4)  # beats carry the first instance's blocks to the index
            second = [o async for o in master.generate(prompt, GREEDY)][-1]
            assert second.outputs[0].token_ids == first.outputs[0].token_ids
            assert second.num_cached_tokens == n * 16  # fetched from the peer, not computed
            now_served = [e.engine.kv_store.peer_blocks_served for e in pair]
            assert sum(now_served) - sum(served) == n

    with engines(cfg, 2) as pair:
        asyncio.run(run(pair))


def test_the_shared_memory_path_only_maps_xllm_kv_memory(tmp_path: Path) -> None:
    """A FetchBlocks request names a pid and fd to write into: only an xllm KV memfd is
    ever mapped, never another file a process has open; and only a loopback caller gets
    the shared-memory path at all."""
    import ctypes
    import gc
    import os

    from xllm.kvcache.memory import PeerMemory
    from xllm.ops.vmm import VmmPool
    from xllm.service.instance import _is_loopback

    victim = tmp_path / "not-kv.bin"
    victim.write_bytes(bytes(1 << 16))
    fd = os.open(victim, os.O_RDWR)
    try:
        with pytest.raises(PermissionError, match="not an xllm KV memory"):
            PeerMemory.regions(os.getpid(), fd, 4096, 2)
    finally:
        os.close(fd)
    pool = VmmPool(4 << 20)
    mapping, regions = PeerMemory.regions(os.getpid(), pool.fd, 2 << 20, 2)
    assert len(regions) == 2 and regions[1] - regions[0] == 2 << 20
    # A closed memfd's number is soon another memfd's: the cached mapping of the first is
    # never used for the second.
    ctypes.memmove(regions[0], b"old pool", 8)
    old_fd = pool.fd
    del pool, mapping, regions
    gc.collect()
    held = []  # lower numbers other objects freed meanwhile are taken first: keep those
    fresh = VmmPool(4 << 20)
    while fresh.fd != old_fd and len(held) < 256:
        held.append(fresh)
        fresh = VmmPool(4 << 20)
    assert fresh.fd == old_fd  # the number came back
    _, again = PeerMemory.regions(os.getpid(), fresh.fd, 2 << 20, 2)
    assert ctypes.string_at(again[0], 8) == bytes(8)  # the new memory, not the old
    assert _is_loopback("ipv4:127.0.0.1:5000") and _is_loopback("ipv6:[::1]:5000")
    assert not _is_loopback("ipv4:10.0.0.7:5000") and not _is_loopback("")
