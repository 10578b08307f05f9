"""Allreduce between local processes: xllm's ShmAllReduce against torch.distributed gloo.

Two worker processes (spawned) each join a gloo process group and a ShmAllReduce
group, then run both on the same tensor in alternating rounds. Every call is
itself a synchronisation point, and both ranks make exactly the same sequence of
calls (a fixed count per round, no per-rank calibration, which would let the
ranks' call counts drift apart). Each call is timed on its own; a row reports,
for rank 0 and for both ops alike, the best round's median call time after
warm-up (the statistic of bench.ops.common.compare), and in `extra` the median
over all calls. Inputs are reset at the start of
every round (untimed) and start at 2**-60, so the sums neither overflow nor turn
subnormal however many calls a round makes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import shutil
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass

import torch

from bench.ops.common import Row

WORLD_SIZE = 2
REFERENCE = "torch.distributed gloo all_reduce (SUM), same processes"


@dataclass(frozen=True)
class Case:
    label: str
    numel: int
    dtype: torch.dtype
    calls_per_round: int
    rounds: int
    min_ratio: float | None = None


def _cases(quick: bool) -> list[Case]:
    f32, bf16 = torch.float32, torch.bfloat16
    cases = [
        Case("64 KiB fp32", 16 * 1024, f32, 100, 8),  # <= 120 calls: 2**-60 * 2**120 stays finite
        Case("1 MiB fp32", 256 * 1024, f32, 60, 8, min_ratio=3.0),
        Case("1 MiB bf16", 512 * 1024, bf16, 60, 8),
        Case("16 MiB fp32", 4 * 1024 * 1024, f32, 8, 5),
    ]
    if quick:
        cases = [
            Case(c.label, c.numel, c.dtype, max(5, c.calls_per_round // 5), 2, c.min_ratio)
            for c in cases
        ]
    return cases


def _time_calls(fn, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _measure(case: Case, shm, rank: int) -> dict[str, float]:
    """Per op: the best round's median call time, and the median over all calls."""
    import torch.distributed as dist

    gen = torch.Generator().manual_seed(1234 + rank)
    source = (torch.randn(case.numel, generator=gen) * 2.0**-60).to(case.dtype)
    tensor = source.clone()
    ops = {"native": lambda: shm.allreduce(tensor), "gloo": lambda: dist.all_reduce(tensor)}
    for fn in ops.values():  # warm-up: page faults, gloo buffers, branch predictors
        tensor.copy_(source)
        _time_calls(fn, 5)
    rounds: dict[str, list[list[float]]] = {"native": [], "gloo": []}
    for _ in range(case.rounds):
        for name, fn in ops.items():
            tensor.copy_(source)
            dist.barrier()  # both ranks start the round together
            rounds[name].append(_time_calls(fn, case.calls_per_round))
    out = {}
    for name, per_round in rounds.items():
        # The harness's statistic (bench.ops.common.compare): a round's median call,
        # then the best round, so a round that another process disturbed does not count.
        out[name] = min(statistics.median(r) for r in per_round)
        out[name + "_all_calls"] = statistics.median(t for r in per_round for t in r)
    return out


def _worker(rank: int, init_file: str, group: str, quick: bool, results: mp.Queue) -> None:
    import torch.distributed as dist

    from xllm.ops.allreduce import ShmAllReduce

    # One intra-op thread per rank, as for tensor-parallel ranks sharing a host; idle
    # OpenMP threads spinning after a torch op would otherwise steal cores from the peer.
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
        )
        with ShmAllReduce(group, rank, WORLD_SIZE, timeout=60.0) as shm:
            rows = []
            for case in _cases(quick):
                rows.append((case.label, _measure(case, shm, rank), shm.buffer_bytes))
        dist.destroy_process_group()
        results.put((rank, "ok", rows))
    except BaseException as exc:  # reported to the parent, which raises it
        results.put((rank, "error", f"{type(exc).__name__}: {exc}"))


def run(quick: bool) -> list[Row]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    tmpdir = tempfile.mkdtemp(prefix="xllm_bench_ar_")
    init_file = os.path.join(tmpdir, "gloo_store")
    group = f"bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    procs = [
        ctx.Process(target=_worker, args=(r, init_file, group, quick, results), daemon=True)
        for r in range(WORLD_SIZE)
    ]
    by_rank: dict[int, list] = {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + (120 if quick else 600)
        while len(by_rank) < WORLD_SIZE:
            try:
                rank, status, payload = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty as exc:
                raise TimeoutError("allreduce benchmark workers did not finish in time") from exc
            if status != "ok":
                raise RuntimeError(f"allreduce benchmark rank {rank} failed: {payload}")
            by_rank[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(tmpdir, ignore_errors=True)

    # A collective needs every rank on a core at once; on an oversubscribed host each
    # barrier can wait out a peer's time slice, which the rows should say.
    load = os.getloadavg()[0]
    cases = {c.label: c for c in _cases(quick)}
    rows = []
    for (label, stats, buffer_bytes), (_, stats1, _) in zip(by_rank[0], by_rank[1], strict=True):
        case = cases[label]
        row = Row(
            "allreduce",
            f"{WORLD_SIZE} ranks, {label}",
            stats["native"],
            stats["gloo"],
            REFERENCE,
            extra={
                "numel": case.numel,
                "dtype": str(case.dtype).removeprefix("torch."),
                "buffer_bytes": buffer_bytes,
                "native_median_all_calls_s": stats["native_all_calls"],
                "reference_median_all_calls_s": stats["gloo_all_calls"],
                "rank1_native_s": stats1["native"],
                "rank1_reference_s": stats1["gloo"],
                "calls_timed": case.calls_per_round * case.rounds,
                "load_average": load,
                "cpus": os.cpu_count(),
            },
        )
        if case.min_ratio is not None:
            row.target = f">= {case.min_ratio:g}x"
            row.met = row.ratio >= case.min_ratio
            if not row.met:
                row.note = (
                    f"measured at load average {load:.1f} on {os.cpu_count()} CPUs: both "
                    "ranks must be on a core at once; rerun on an idle host"
                )
        rows.append(row)
    return rows
