"""KV blocks between instances over the Mooncake transfer engine (xllm/kvcache/mooncake.py).

Mooncake's engine listens on every interface of its host, so the two instances run inside
a network namespace the test makes (``unshare -n``, ``lo`` up): this file re-runs itself
there as a script. In it, two engines with real gRPC servers on 127.0.0.1, the peer with a
CPU tier, the client told the peer is on another host (so neither shared memory nor the
gRPC byte stream carries the blocks):

- a prefix in the peer's pool, then only in its CPU tier, read over Mooncake: every block
  lands, the outputs equal computing it, the path measured is "mooncake";
- a peer that describes a bad block: the fetch ends there and the rest is recomputed;
- a peer whose transfer engine is gone (its session unreachable): nothing lands, in
  bounded time, and the outputs are still right;
- every block the peer pinned for the readers is let go.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xllm import LLM, SamplingParams

pytestmark = pytest.mark.timeout(300)

DOC = "The harbour master wrote down every ship, its flag and its cargo, each night. " * 12
OPTS = dict(dtype="float32", kv_cache_dtype="bfloat16", num_kv_blocks=96,
            max_num_batched_tokens=512, block_size=16, max_model_len=512, num_threads=1)


def _namespace_prefix() -> list[str] | None:
    """unshare's arguments for a network namespace this process may make (as root, or in a
    user namespace), or None."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return None
    for prefix in (["unshare", "-n"], ["unshare", "-rn"]):
        try:
            ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return prefix
    return None


@pytest.mark.parametrize("tp", [1, 2])
def test_mooncake_fetch_in_a_network_namespace(demo_model_dir: Path, tp: int) -> None:
    """(``tp`` 2: both instances tensor-parallel on this host, a block every rank's heads:
    the peer describes each part's segments in its own memory, registered with its engine
    as the workers' memfds are mapped in rank 0.)"""
    from xllm.kvcache.mooncake import mooncake_available

    if tp > 1 and len(os.sched_getaffinity(0)) < 2:
        pytest.skip("TP=2 needs two cores")

    if importlib.util.find_spec("mooncake") is None:
        pytest.skip("mooncake-transfer-engine-non-cuda is not installed (the test extra has it)")
    why = mooncake_available()
    if why is not None:
        pytest.skip(f"the Mooncake engine does not import (apt-get install libibverbs1): {why}")
    prefix = _namespace_prefix()
    if prefix is None:
        pytest.skip("cannot make a network namespace here (unshare -n / -rn)")
    script = (f"ip link set lo up && exec {sys.executable} {Path(__file__)} {demo_model_dir} "
              f"{tp}")
    run = subprocess.run([*prefix, "sh", "-c", script], capture_output=True, text=True,
                         timeout=280)
    tail = run.stdout[-3000:] + run.stderr[-6000:]
    assert run.returncode == 0, tail
    assert "MOONCAKE OK" in run.stdout, tail


HTTP = """
import json, sys, urllib.request
req = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode() if len(sys.argv) > 2
                             else None, headers={"content-type": "application/json"})
print(urllib.request.urlopen(req, timeout=120).read().decode())
"""


def _http(ns: str, url: str, body: dict | None = None) -> str:
    """A request from inside namespace ``ns`` (the test's own namespace cannot reach it)."""
    args = ["ip", "netns", "exec", ns, sys.executable, "-c", HTTP, url]
    if body is not None:
        args.append(json.dumps(body))
    return subprocess.run(args, capture_output=True, text=True, timeout=150,
                          check=True).stdout


@pytest.mark.parametrize("pd", [False, True], ids=["mixed", "prefill-decode"])
def test_cluster_on_two_hosts_fetches_a_prefix_over_mooncake(two_hosts,  # noqa: ANN001
                                                            demo_model_dir: Path,
                                                            pd: bool) -> None:
    """xllm-master and an instance on one host, another instance on the other (network
    namespaces joined by a veth pair), both with --kv-mooncake tcp. Mixed: round-robin
    routing sends a re-asked document to the instance that lacks it, which fetches the
    prefix from its peer over Mooncake. Prefill/decode: the decode instance pulls each
    prompt's blocks from the prefill instance's hold over Mooncake. Their /metrics say
    which path the blocks took; the answers are those of computing them."""
    from xllm.kvcache.mooncake import mooncake_available

    if mooncake_available() is not None:
        pytest.skip(f"the Mooncake engine does not import: {mooncake_available()}")
    (ns_a, addr_a), (ns_b, addr_b) = two_hosts
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, GLOG_minloglevel="2", PYTHONUNBUFFERED="1")
    grpc_port = random.randrange(20000, 40000)
    procs = [subprocess.Popen(["ip", "netns", "exec", ns_a, str(bin_dir / "xllm-master"),
                               "--host", addr_a, "--port", "8100", "--grpc-port",
                               str(grpc_port), "--policy", "round_robin"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)]
    try:
        for ns, addr, port, role in ((ns_a, addr_a, 8101, "prefill" if pd else "mixed"),
                                     (ns_b, addr_b, 8102, "decode" if pd else "mixed")):
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, str(bin_dir / "xllm-server"), "--host", addr,
                 "--port", str(port), "--master", f"{addr_a}:{grpc_port}", "--kv-mooncake",
                 "tcp", "--num-threads", "1", "--max-model-len", "1024", "--role", role],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
        deadline = time.monotonic() + 150
        while True:
            try:
                listed = json.loads(_http(ns_a, f"http://{addr_a}:8100/cluster/instances"))
                if len(listed) == 2:
                    break
            except subprocess.SubprocessError:
                pass
            assert time.monotonic() < deadline, "the instances did not register"
            assert all(p.poll() is None for p in procs), "a server exited"
            time.sleep(1)
        doc = "The harbour master wrote down every ship, its flag and its cargo. " * 20
        answers = []
        for question in ("Name a ship.", "Name a flag.", "Name a cargo."):
            out = json.loads(_http(ns_a, f"http://{addr_a}:8100/v1/completions", {
                "model": "demo", "prompt": doc + question, "max_tokens": 8,
                "temperature": 0}))
            answers.append(out)
        cached = [a["usage"]["prompt_tokens_details"]["cached_tokens"] for a in answers]
        # the document's blocks (PD: what the prefill instance found cached)
        assert cached[0] == 0 and min(cached[1:]) >= 16 * 16, cached
        by_path = {}
        for ns, addr, port in ((ns_a, addr_a, 8101), (ns_b, addr_b, 8102)):
            for line in _http(ns, f"http://{addr}:{port}/metrics").splitlines():
                if line.startswith("xllm_kv_peer_path_blocks_total"):
                    path = line.split('path="')[1].split('"')[0]
                    by_path[path] = by_path.get(path, 0) + float(line.split()[-1])
        # mixed: the re-asked document's blocks; PD: every prompt's first handoff
        assert by_path["mooncake"] >= 16 and by_path["grpc"] == by_path["shm"] == 0, by_path
        plain = LLM(str(demo_model_dir), max_model_len=1024)
        for a, question in zip(answers, ("Name a ship.", "Name a flag.", "Name a cargo."),
                               strict=True):
            ref = plain.generate([doc + question], SamplingParams(temperature=0, max_tokens=8),
                                 use_tqdm=False)[0].outputs[0].text
            assert a["choices"][0]["text"] == ref
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs[::-1]:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# ---- the part that runs inside the namespace ----------------------------------------------


def _inside(model_dir: str, tp: int) -> None:
    import grpc

    from xllm import SamplingParams
    from xllm.config import EngineConfig
    from xllm.engine.async_engine import AsyncEngine
    from xllm.kvcache.mooncake import MooncakeTransport
    from xllm.service import instance as instance_mod
    from xllm.service.instance import InstanceServicer
    from xllm.service.proto import instance_pb2_grpc

    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    instance_mod.FETCH_STALL_S = 2.0
    # The client is told its peer is on another host: no shared memory, Mooncake instead.
    InstanceServicer.same_host = staticmethod(lambda peer: False)
    opts = dict(OPTS, tensor_parallel_size=tp)
    peer_cfg = EngineConfig(model=model_dir, kv_offload_cpu_gb=0.05, **opts)
    engines = [AsyncEngine(peer_cfg), AsyncEngine(EngineConfig(model=model_dir, **opts))]
    for e in engines:
        e.start()
    for e in engines:
        assert e.wait_ready(120), e.error
    transports = [MooncakeTransport("127.0.0.1"), MooncakeTransport("127.0.0.1")]
    transports[0].serve(engines[0].engine.kv_store)

    async def run() -> None:
        server = grpc.aio.server()
        peer = InstanceServicer(engines[0])
        peer.mooncake = transports[0]
        instance_pb2_grpc.add_InstanceServicer_to_server(peer, server)
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        client = InstanceServicer(engines[1])
        client.mooncake = transports[1]
        store = engines[1].engine.kv_store

        async def on_engine(fn):  # noqa: ANN001, ANN202
            return await asyncio.wrap_future(engines[0].call_on_engine_thread(fn))

        async def reset_client() -> None:
            fut = engines[1].call_on_engine_thread(lambda e: e.scheduler.reset_prefix_cache())
            assert await asyncio.wrap_future(fut)

        async def check(prompt: list[int], want: list[int], got: int) -> None:
            outs = [o async for o in engines[1].generate(prompt, greedy)]
            assert outs[-1].num_cached_tokens == got * 16, (outs[-1].num_cached_tokens, got)
            assert outs[-1].outputs[0].token_ids == want

        try:
            prompt = engines[0].engine.tokenizer.encode(DOC + "Name a ship.")
            want = [o async for o in engines[0].generate(prompt, greedy)][-1]
            want_ids = want.outputs[0].token_ids
            n = (len(prompt) - 1) // 16
            for e in engines:
                e.engine.kv_store._prefill_tps = None  # fetch whatever the costs

            parts = store.config.distinct_parts
            assert parts == tp and engines[0].engine.kv_store.config.distinct_parts == tp
            # 1. from the peer's pool (runs of blocks, a read per region)
            served = engines[0].engine.kv_store.peer_blocks_served
            assert await client.fetch_from_peer(address, prompt, n) == n
            assert engines[0].engine.kv_store.peer_blocks_served == served + n
            assert "mooncake" in store.peer_bps and "grpc" not in store.peer_bps
            assert store.stats().peer_blocks_by_path == (("mooncake", n),)
            await check(prompt, want_ids, n)

            # 2. only in the peer's CPU tier (slots, a read each)
            engines[0].engine.kv_store.flush()
            assert await on_engine(lambda e: e.scheduler.reset_prefix_cache())
            assert engines[0].engine.kv_store.cpu.num_blocks >= n
            await reset_client()
            assert await client.fetch_from_peer(address, prompt, n) == n
            await check(prompt, want_ids, n)
            print("tier slots read:", n, flush=True)

            # 3. a peer that describes a damaged block: the blocks before it only
            real = instance_mod.describe

            def damaged(store_, sources):  # noqa: ANN001, ANN202
                addresses, strides, sums = real(store_, sources)
                sums[4] ^= 1
                return addresses, strides, sums

            instance_mod.describe = damaged
            await reset_client()
            try:
                assert await client.fetch_from_peer(address, prompt, n) == 4
            finally:
                instance_mod.describe = real
            await check(prompt, want_ids, 4)

            # 4. a peer whose transfer engine is unreachable: nothing lands, in bounded time
            session = transports[0].session
            transports[0].session = "127.0.0.1:1"
            await reset_client()
            t0 = time.monotonic()
            try:
                assert await client.fetch_from_peer(address, prompt, n) == 0
            finally:
                transports[0].session = session
            assert time.monotonic() - t0 < 40
            await check(prompt, want_ids, 0)

            # every block the peer pinned for the readers was let go
            await asyncio.sleep(0.5)
            free = await on_engine(lambda e: e.scheduler.kv.pool.num_free_blocks)
            assert free == engines[0].engine.num_kv_blocks - 1, free
        finally:
            await client.close_peers()
            await server.stop(0.5)

    try:
        asyncio.run(run())
    finally:
        for e in engines:
            e.shutdown()
        for t in transports:
            t.close()
    print("MOONCAKE OK", flush=True)


if __name__ == "__main__":
    _inside(sys.argv[1], int(sys.argv[2]))
