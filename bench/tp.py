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

``--busy-wait S1,S2,...`` runs TP=2 once per value of how long a waiting rank keeps its core
before sleeping (``xllm.runtime.tp.BUSY_WAIT_S``, the group's on every rank), in turns,
``--rounds N`` times over (this machine's speed drifts: compare within a round).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from bench.throughput import _cpu_name, _prompts, _tokens_per_second

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
    args = parser.parse_args(argv)
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
            runs = [(1, None)] + [(2, w) for _ in range(args.rounds) for w in waits]
            for tp, wait in runs:
                if wait is not None:
                    tp_module.BUSY_WAIT_S = wait
                row = {"format": fmt, "busy_wait": wait,
                       **run(scenario, tp, FORMATS[fmt], args.repeats)}
                base = base or row["tokens_per_s"]
                row["vs_tp1"] = row["tokens_per_s"] / base
                rows.append(row)

                def pct(key: str, r: dict = row) -> str:
                    return "" if r[key] is None else f"{100 * r[key]:.1f}%"

                shown = "" if wait is None else f"{wait:g}"
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
