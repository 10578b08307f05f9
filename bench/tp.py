"""Tensor parallelism on one host: TP=2 (one core a rank) against TP=1 (two threads).

    python -m bench.tp [--scenarios single,batch16,prefill509] [--formats default,fp32]
                       [--idle single,batch16,batch64] [--repeats K] [--json PATH]
                       [--busy-wait S1,S2 [--rounds N]]

For each weight format (``default``: this CPU's default, bf16/int8 on AMX machines;
``fp32``: exact fp32 GGUF blocks) and scenario (bench.throughput's prompts: one stream of
128 tokens, 16 x 128, one 509-token prompt), the demo model runs at TP=1 on all cores and
at TP=2 with one core per rank, in this process (rank 0) and a worker. Reported per run:
tokens per second, and from the engine's own counters, as shares of the engine's wall time
with work: rank 0's time in sums, gathers and step messages (``tp_share``; ``waits``: the part
of it rank 0 spent waiting for the other rank to arrive, the skew of their work rather than
the transfer), and the time the
model (forward passes and LM head) sat idle (``idle``: the engine's scheduling, step
inputs, sampling, outputs and loop). ``--idle`` also runs those scenarios at TP=1 for the
idle share alone (batch 1, 16 and 64 with the defaults). Each run is a warm-up then a timed
pass, as bench.throughput; ``--repeats K`` times the pass K times and reports the
medians (the 509-token prefill is one step, so one pass is one noisy sample).

``--tcp`` adds TP=2 with the worker on "another host": rank 0 and the worker in two network
namespaces joined by a veth pair (made and removed by the run; needs root and ``ip netns``),
a core each, over TCP (``--tp-master``: the step messages and ``_C.TcpCollective``'s sums).

``--gloo`` adds TP=2 with the sums over torch.distributed's gloo (``--tp-backend gloo``, the
path NCCL takes on CUDA; no native decoder stack) beside the native shared-memory group.

``--busy-wait S1,S2,...`` runs TP=2 once per value of how long a waiting rank keeps its core
before sleeping (``xllm.runtime.tp.BUSY_WAIT_S``, the group's on every rank), in turns,
``--rounds N`` times over (this machine's speed drifts: compare within a round).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

from bench.netns import two_namespaces
from bench.throughput import _cpu_name, _prompts, _tokens_per_second

Hosts = tuple[tuple[str, str], tuple[str, str]]  # (namespace, address) of rank 0's, the worker's

FORMATS = {"default": {}, "fp32": {"dtype": "float32", "weight_format": "blocks"}}


def run(scenario: str, tp: int, options: dict, repeats: int = 1) -> dict:
    from xllm import LLM, SamplingParams

    llm = LLM("demo", tensor_parallel_size=tp, max_model_len=1024, **options)
    engine = llm.engine
    try:
        prompts, max_new = _prompts(llm.tokenizer, scenario)
        params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
        llm.generate(prompts, params, use_tqdm=False)  # warm-up
        passes = []
        for _ in range(repeats):
            engine.scheduler.reset_prefix_cache()
            def counters() -> tuple[float, ...]:
                return (engine.model_busy_seconds, engine.model_idle_seconds,
                        engine.tp_reduce_seconds, engine.tp_message_seconds,
                        engine.tp_wait_seconds)

            before = counters()
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - start
            busy, idle, reduce, message, wait = (now - then for now, then in zip(
                counters(), before, strict=True))
            wall = busy + idle  # the engine's time with work, steps and the gaps between them
            passes.append({"tokens_per_s": _tokens_per_second(prompts, max_new, seconds),
                           "seconds": seconds,
                           "tp_share": (reduce + message) / wall if tp > 1 else None,
                           "reduce_share": reduce / wall if tp > 1 else None,
                           "message_share": message / wall if tp > 1 else None,
                           # of tp_share: waiting for the other rank (skew, not transfer)
                           "wait_share": wait / wall if tp > 1 else None,
                           "idle": idle / wall if wall else 0.0})
        row: dict = {"scenario": scenario, "tp": tp, "passes": passes}
        for key in passes[0]:
            values = [p[key] for p in passes]
            row[key] = None if values[0] is None else statistics.median(values)
        return row
    finally:
        engine.close()


def run_tcp(scenario: str, fmt: str, repeats: int, hosts: Hosts) -> dict:
    """run() at TP=2 with rank 0 in one namespace (core 0) and the worker in the other
    (core 1), over TCP."""
    (ns_a, addr), (ns_b, _) = hosts
    cmd = ["ip", "netns", "exec", ns_a, "taskset", "-c", "0", sys.executable, "-m", "bench.tp",
           "--tcp-rank0", f"{addr}:{random.randrange(20000, 40000)}", "--worker-ns", ns_b,
           "--scenarios", scenario, "--formats", fmt, "--repeats", str(repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    rows = [line[4:] for line in out.stdout.splitlines() if line.startswith("ROW ")]
    if out.returncode or not rows:
        raise RuntimeError(f"the TCP run failed: {out.stderr[-2000:]}")
    return json.loads(rows[-1])


def tcp_rank0(master: str, worker_ns: str, scenario: str, fmt: str, repeats: int) -> None:
    """Rank 0's side of run_tcp (in its namespace): starts the worker in the other one and
    prints the run's row."""
    worker = subprocess.Popen(["ip", "netns", "exec", worker_ns, "taskset", "-c", "1",
                               sys.executable, "-m", "xllm.runtime.worker", "--master", master,
                               "--rank", "1", "--cores", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        row = run(scenario, 2, {**FORMATS[fmt], "tp_master": master}, repeats)
        print("ROW " + json.dumps(row), flush=True)
    finally:
        worker.kill()
        worker.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default="single,batch16,prefill509")
    parser.add_argument("--formats", default="default,fp32")
    parser.add_argument("--idle", default="", help="scenarios for the TP=1 idle share alone")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--busy-wait", default=None, metavar="S1,S2",
                        help="TP=2 once per busy-wait value (seconds), in turns")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--tcp", action="store_true",
                        help="add TP=2 over TCP, the worker in another network namespace")
    parser.add_argument("--gloo", action="store_true",
                        help="add TP=2 with the sums over torch.distributed's gloo")
    parser.add_argument("--tcp-rank0", help=argparse.SUPPRESS)
    parser.add_argument("--worker-ns", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tcp_rank0:
        tcp_rank0(args.tcp_rank0, args.worker_ns, args.scenarios, args.formats, args.repeats)
        return 0
    if args.tcp:
        with two_namespaces("xbench") as hosts:
            return _main(args, hosts)
    return _main(args, None)


def _main(args: argparse.Namespace, hosts: Hosts | None) -> int:
    from xllm.runtime import tp as tp_module

    waits = ([float(v) for v in args.busy_wait.split(",")] if args.busy_wait
             else [tp_module.BUSY_WAIT_S])
    if len(os.sched_getaffinity(0)) < 2:
        print("bench.tp needs two cores", file=sys.stderr)
        return 2
    rows = []
    print(f"CPU: {_cpu_name()}, {len(os.sched_getaffinity(0))} cores")
    print(f"{'format':<8} {'scenario':<10} {'TP':>2} {'wait':>5} {'tok/s':>8} {'vs TP1':>7} "
          f"{'tp_share':>8} {'reduce':>7} {'msg':>6} {'waits':>6} {'idle':>6}")
    for fmt in args.formats.split(","):
        for scenario in args.scenarios.split(","):
            base = None
            runs = [(1, None, "")] + [(2, w, "") for _ in range(args.rounds) for w in waits]
            if hosts is not None:
                runs.append((2, None, "tcp"))
            if args.gloo:
                runs.append((2, None, "gloo"))
            for tp, wait, over in runs:
                if wait is not None:
                    tp_module.BUSY_WAIT_S = wait
                if over == "tcp":
                    measured = run_tcp(scenario, fmt, args.repeats, hosts)
                else:
                    extra = {"tp_backend": "gloo"} if over == "gloo" else {}
                    measured = run(scenario, tp, {**FORMATS[fmt], **extra}, args.repeats)
                row = {"format": fmt, "busy_wait": wait, "tcp": over == "tcp",
                       "gloo": over == "gloo", **measured}
                base = base or row["tokens_per_s"]
                row["vs_tp1"] = row["tokens_per_s"] / base
                rows.append(row)

                def pct(key: str, r: dict = row) -> str:
                    return "" if r[key] is None else f"{100 * r[key]:.1f}%"

                shown = over or ("" if wait is None else f"{wait:g}")
                print(f"{fmt:<8} {scenario:<10} {tp:>2} {shown:>5} {row['tokens_per_s']:8.1f} "
                      f"{row['vs_tp1']:6.2f}x {pct('tp_share'):>8} {pct('reduce_share'):>7} "
                      f"{pct('message_share'):>6} {pct('wait_share'):>6} {pct('idle'):>6}",
                      flush=True)
    for scenario in filter(None, args.idle.split(",")):
        row = {"format": "default", "idle_only": True, **run(scenario, 1, {}, args.repeats)}
        rows.append(row)
        print(f"idle share, TP=1, default, {scenario}: {100 * row['idle']:.1f}% "
              f"({row['tokens_per_s']:.1f} tok/s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": _cpu_name(), "cores": len(os.sched_getaffinity(0)),
                       "argv": sys.argv[1:], "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
