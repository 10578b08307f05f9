"""Tensor parallelism across hosts: the TCP group (torch.distributed's store for the
rendezvous, native sums and gathers and the step messages over one socket per worker), and
an engine whose worker runs in another network namespace, reached over a veth pair."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from xllm import LLM, SamplingParams
from xllm.config import EngineConfig
from xllm.ops.tcp_group import TcpGroup, parse_address

GROUP_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from xllm.ops.tcp_group import TcpGroup
    g = TcpGroup(sys.argv[1], 1, None, timeout=20)
    x = torch.arange(1000, dtype=torch.float32) * 0.37
    g.allreduce(x)
    y = (torch.arange(64, dtype=torch.float32) / 7).to(torch.bfloat16)
    g.allreduce(y)
    g.gather(torch.full((3, 2), 5.0), None)
    g.gather(torch.arange(6.0).view(3, 2) + 10, None, 3)
    first = g.broadcast(None, wait_forever=True)
    second = g.broadcast(None, wait_forever=True)
    print(json.dumps([x.tolist(), y.float().tolist(), first.decode(), second.decode(),
                      g.get("note").decode()]), flush=True)
    g.broadcast(None, wait_forever=True)  # ends when rank 0 closes: RuntimeError
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_addresses_and_config_errors() -> None:
    assert parse_address("10.0.0.1:29500") == ("10.0.0.1", 29500)
    assert parse_address("[::1]:80") == ("::1", 80)
    for bad in ("10.0.0.1", "host:0", "host:x", ":80"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_address(bad)
    with pytest.raises(ValueError, match="HOST:PORT"):
        EngineConfig(tensor_parallel_size=2, tp_master="nohost")
    with pytest.raises(ValueError, match="tensor_parallel_size >= 2"):
        EngineConfig(tp_master="127.0.0.1:29500")
    # Rank 0 with ranks elsewhere keeps all of this host's cores.
    config = EngineConfig(tensor_parallel_size=8, tp_master="127.0.0.1:29500")
    assert config.threads == len(os.sched_getaffinity(0))


def _pair_of_ranks(timeout: float = 5.0):  # noqa: ANN202
    from xllm import _C

    a, b = socket.socketpair()
    return (a, b), _C.TcpCollective(0, 2, [a.fileno()], timeout), \
        _C.TcpCollective(1, 2, [b.fileno()], timeout)


def _both(f0, f1):  # noqa: ANN001, ANN202
    """f0 on this thread and f1 on another, at once: (result or exception) of each."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(f1)
        try:
            mine = f0()
        except Exception as e:  # noqa: BLE001 - returned for the test to look at
            mine = e
        try:
            theirs = other.result(timeout=30)
        except Exception as e:  # noqa: BLE001
            theirs = e
    return mine, theirs


def test_tcp_collective_sums_in_rank_order_and_survives_a_mismatched_call() -> None:
    """The native TCP sums: bit-identical on both ranks and equal to rank 0's part plus rank
    1's (fp32; bf16 and bf16 sums summed in fp32 and rounded once, as ShmAllReduce does);
    rows joined by gather; a call that disagrees fails on both ranks with one message and
    the next call works; a rank that leaves fails the other's call at once."""
    socks, r0, r1 = _pair_of_ranks()
    try:
        gen = torch.Generator().manual_seed(0)
        parts = [torch.randn(3001, generator=gen) for _ in range(2)]
        for dtype, bf16_sums in ((torch.float32, False), (torch.bfloat16, False),
                                 (torch.float32, True)):
            x = [p.to(dtype).clone() for p in parts]
            got = _both(lambda x=x, b=bf16_sums: r0.allreduce(x[0], b),
                        lambda x=x, b=bf16_sums: r1.allreduce(x[1], b))
            assert torch.equal(got[0], got[1])
            narrow = dtype == torch.bfloat16 or bf16_sums
            a, b = (p.to(dtype) for p in parts)
            want = ((a.to(torch.bfloat16).float() + b.to(torch.bfloat16).float())
                    .to(torch.bfloat16).to(dtype) if narrow else a + b)
            assert torch.equal(got[0], want)
        src = [torch.arange(6.0).view(3, 2) + 10 * r for r in range(2)]
        dst = torch.empty(3, 4)
        _both(lambda: r0.gather(src[0], dst, 3), lambda: r1.gather(src[1], None, 3))
        assert torch.equal(dst, torch.cat(src, dim=1))
        errs = _both(lambda: r0.allreduce(torch.ones(10)), lambda: r1.allreduce(torch.ones(11)))
        assert all(isinstance(e, ValueError) and "same call" in str(e) for e in errs), errs
        ok = _both(lambda: r0.allreduce(torch.ones(4)), lambda: r1.allreduce(torch.ones(4)))
        assert all(torch.equal(t, torch.full((4,), 2.0)) for t in ok)
        socks[1].close()  # rank 1 leaves
        with pytest.raises(RuntimeError, match="closed its connection"):
            r0.allreduce(torch.ones(4))
        with pytest.raises(RuntimeError, match="unusable"):
            r0.allreduce(torch.ones(4))
    finally:
        for s in socks:
            s.close()


def test_tcp_collective_with_three_ranks_sums_in_rank_order() -> None:
    """Rank 0 with two workers (a connection each): every rank gets ((r0 + r1) + r2) in fp32
    and rank 0 the rows of all three side by side."""
    from concurrent.futures import ThreadPoolExecutor

    from xllm import _C

    (a1, b1), (a2, b2) = socket.socketpair(), socket.socketpair()
    ranks = [_C.TcpCollective(0, 3, [a1.fileno(), a2.fileno()], 5.0),
             _C.TcpCollective(1, 3, [b1.fileno()], 5.0),
             _C.TcpCollective(2, 3, [b2.fileno()], 5.0)]
    gen = torch.Generator().manual_seed(1)
    parts = [torch.randn(777, generator=gen) for _ in range(3)]
    rows = [torch.arange(8.0).view(4, 2) + 100 * r for r in range(3)]
    dst = torch.empty(4, 6)

    def job(r: int) -> torch.Tensor:
        out = ranks[r].allreduce(parts[r].clone())
        ranks[r].gather(rows[r], dst if r == 0 else None, 4)
        return out

    try:
        with ThreadPoolExecutor(3) as pool:
            sums = list(pool.map(job, range(3), timeout=30))
        want = (parts[0] + parts[1]) + parts[2]
        assert all(torch.equal(t, want) for t in sums)
        assert torch.equal(dst, torch.cat(rows, dim=1))
    finally:
        for sock in (a1, b1, a2, b2):
            sock.close()


def test_tcp_collective_times_out_on_a_silent_rank() -> None:
    socks, r0, _ = _pair_of_ranks(timeout=0.3)
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="sent nothing"):
            r0.allreduce(torch.ones(4))
        assert time.monotonic() - t0 < 3
    finally:
        for s in socks:
            s.close()


def test_tcp_group_sums_gathers_and_messages_exactly() -> None:
    """Two processes over 127.0.0.1: bit-identical sums on both ranks (bf16 summed in fp32,
    rounded once), a gather in rank order, messages after the workers' announcement; a
    worker whose rank 0 leaves fails its wait at once."""
    master = f"127.0.0.1:{_free_port()}"
    worker = subprocess.Popen([sys.executable, "-c", GROUP_SCRIPT, master],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        g = TcpGroup(master, 0, 2, timeout=20, store_items={"note": b"spec"})
        x = torch.arange(1000, dtype=torch.float32) * 0.37
        expected = x + x
        g.allreduce(x)
        assert torch.equal(x, expected)
        y = (torch.arange(64, dtype=torch.float32) / 7).to(torch.bfloat16)
        y_expected = (y.float() * 2).to(torch.bfloat16)
        g.allreduce(y)
        assert torch.equal(y, y_expected)
        dst = torch.empty(2, 3, 2)
        g.gather(torch.full((3, 2), 4.0), dst)
        assert dst[0].eq(4.0).all() and dst[1].eq(5.0).all()
        joined = torch.empty(3, 4)
        g.gather(torch.arange(6.0).view(3, 2), joined, 3)  # rows side by side
        assert torch.equal(joined, torch.cat([torch.arange(6.0).view(3, 2),
                                              torch.arange(6.0).view(3, 2) + 10], dim=1))
        assert g.broadcast(b"ready", wait_forever=True) == b"ready"
        g.broadcast(b"step one")
        assert g.alive()
        line = worker.stdout.readline()
        got = json.loads(line)
        assert got[0] == expected.tolist() and got[1] == y_expected.float().tolist()
        assert got[2:] == ["ready", "step one", "spec"]
        g.close()
        assert worker.wait(timeout=10) != 0  # its wait failed rather than hung
        assert "closed" in worker.stderr.read()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


# ------------------------------------------------------------- two hosts: network namespaces

@contextlib.contextmanager
def _ranks(two_hosts, script: str, *args: str):  # noqa: ANN001, ANN202
    """Rank 0 running ``script`` (argv: args, then the master address) in one namespace and
    a worker (rank 1) in the other: (rank 0's process, the worker's), killed at the end if
    still running."""
    (ns_a, addr_a), (ns_b, _) = two_hosts
    master = f"{addr_a}:{random.randrange(20000, 40000)}"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    rank0 = subprocess.Popen(["ip", "netns", "exec", ns_a, sys.executable, "-c", script,
                              *args, master],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    worker = subprocess.Popen(["ip", "netns", "exec", ns_b, sys.executable, "-m",
                               "xllm.runtime.worker", "--master", master, "--rank", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=env)
    try:
        yield rank0, worker
    finally:
        for p in (rank0, worker):
            if p.poll() is None:
                p.kill()
                p.wait()


def _first_line(rank0: subprocess.Popen, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    line = ""
    while not line and time.monotonic() < deadline and rank0.poll() is None:
        line = rank0.stdout.readline()
    assert line, f"rank 0 gave no result: {rank0.stderr.read()[-3000:]}"
    return json.loads(line)


RANK0_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from xllm import LLM, SamplingParams
    model, master = sys.argv[1], sys.argv[2]
    llm = LLM(model, tensor_parallel_size=2, tp_master=master, dtype="float32",
              weight_format="blocks", max_model_len=256, num_kv_blocks=64)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    seeded = SamplingParams(temperature=0.9, seed=5, max_tokens=12, n=2, ignore_eos=True)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    g = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    s = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts[:1], seeded,
                                                                 use_tqdm=False)]
    native = llm.engine.runner.model._stack is not None  # summing through the TCP group
    print(json.dumps({"greedy": g, "seeded": s, "native": native}), flush=True)
    sys.stdin.readline()  # the test kills the worker, then says go
    t0 = time.monotonic()
    try:
        llm.generate(prompts, greedy, use_tqdm=False)
        print(json.dumps({"error": None}), flush=True)
    except Exception as e:
        print(json.dumps({"error": type(e).__name__, "seconds": time.monotonic() - t0}),
              flush=True)
    llm.engine.close()
""")


def test_engine_with_a_worker_on_another_host(two_hosts, demo_model_dir: Path) -> None:  # noqa: ANN001
    """Rank 0 (the engine) in one namespace, rank 1 in the other, talking over the veth pair:
    greedy and seeded outputs equal one rank's; then the worker is killed and the engine's
    next step fails within seconds instead of hanging."""
    with _ranks(two_hosts, RANK0_SCRIPT, str(demo_model_dir)) as (rank0, worker):
        got = _first_line(rank0)
        assert got["native"]  # the native decoder stack, its sums over TCP
        ref = LLM(str(demo_model_dir), dtype="float32", weight_format="blocks",
                  max_model_len=256, num_kv_blocks=64)
        greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        seeded = SamplingParams(temperature=0.9, seed=5, max_tokens=12, n=2, ignore_eos=True)
        prompts = ["The capital of France is", "def fibonacci(n):"]
        assert got["greedy"] == [o.outputs[0].token_ids
                                 for o in ref.generate(prompts, greedy, use_tqdm=False)]
        assert got["seeded"] == [[c.token_ids for c in o.outputs]
                                 for o in ref.generate(prompts[:1], seeded, use_tqdm=False)]
        worker.kill()
        worker.wait(timeout=10)
        rank0.stdin.write("go\n")
        rank0.stdin.flush()
        after = json.loads(rank0.stdout.readline())
        assert after["error"] == "RuntimeError" and after["seconds"] < 10, after
        assert rank0.wait(timeout=30) == 0, rank0.stderr.read()[-3000:]


RANK0_TIERS_SCRIPT = textwrap.dedent("""
    import json, sys
    from xllm import LLM, SamplingParams
    model, tiers, master = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    prompts, floods = json.loads(sys.stdin.readline())
    llm = LLM(model, tensor_parallel_size=2, tp_master=master, dtype="float32",
              weight_format="blocks", max_model_len=128, num_kv_blocks=24, block_size=8,
              max_num_seqs=1, **tiers)
    store = llm.engine.kv_store
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    out = [llm.generate([prompts[0]], params, use_tqdm=False)[0]]
    for prompt in prompts[1:]:
        llm.generate(floods, SamplingParams(max_tokens=4), use_tqdm=False)  # evicts the doc
        store.flush()
        out.append(llm.generate([prompt], params, use_tqdm=False)[0])
    print(json.dumps({"tokens": [o.outputs[0].token_ids for o in out],
                      "cached": [o.num_cached_tokens for o in out],
                      "link": store.link is not None, "whole": store.whole,
                      "hits": store.tiers[0].hit_blocks,
                      "corrupt": store.tiers[0].corrupt_blocks}), flush=True)
    llm.engine.close()
""")


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_kv_tiers_with_a_worker_on_another_host(two_hosts, demo_model_dir: Path,  # noqa: ANN001
                                                tmp_path: Path, tier: str) -> None:
    """KV tiers under TP=2 with rank 1 in the other namespace: rank 0's tier holds whole
    blocks, the worker's heads of each pulled through its part server and pushed back on a
    load. A document evicted from the pool by other prompts comes back from the CPU tier or
    from disk, and the answers equal TP=1's without tiers."""
    gen = torch.Generator().manual_seed(7)
    doc = torch.randint(0, 1000, (64,), generator=gen).tolist()
    prompts = [doc + torch.randint(0, 1000, (5,), generator=gen).tolist() for _ in range(3)]
    floods = [torch.randint(0, 1000, (70,), generator=gen).tolist() for _ in range(4)]
    tiers = (dict(kv_offload_cpu_gb=0.05) if tier == "cpu" else
             dict(kv_offload_disk=str(tmp_path / "kv"), kv_offload_disk_gb=0.05))
    with _ranks(two_hosts, RANK0_TIERS_SCRIPT, str(demo_model_dir),
                json.dumps(tiers)) as (rank0, _):
        rank0.stdin.write(json.dumps([prompts, floods]) + "\n")
        rank0.stdin.flush()
        got = _first_line(rank0)
        assert got["link"] and got["whole"]
        assert all(c >= 64 for c in got["cached"][1:]), got["cached"]  # the doc, from the tier
        assert got["hits"] >= 16 and got["corrupt"] == 0
        ref = LLM(str(demo_model_dir), dtype="float32", weight_format="blocks",
                  max_model_len=128, num_kv_blocks=24, block_size=8, max_num_seqs=1)
        params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
        assert got["tokens"] == [o.outputs[0].token_ids
                                 for o in ref.generate(prompts, params, use_tqdm=False)]
        assert rank0.wait(timeout=30) == 0, rank0.stderr.read()[-3000:]
