"""Overlap scheduling against the synchronous engine, on the demo model.

    python -m bench.overlap [--scenarios single,batch16,batch64] [--formats default]
                            [--tp 1] [--threads N] [--repeats 3] [--json PATH]

For each weight format (``default``: this CPU's default; ``fp32``: exact fp32 GGUF blocks)
and scenario (bench.throughput's prompts: one stream, 16 and 64 concurrent ~40-token
prompts, 128 greedy tokens each), two engines are built side by side, overlap scheduling
off and on, and timed in turns (off, on, off, on, ...) after a warm-up each, so drifts of
the machine hit both alike. Reported per engine: the median tokens per second, and from the
engine's own counters the share of its wall time with work that the model (forward passes
and LM head) sat idle: scheduling, step inputs, sampling, outputs, the loop. ``--tp 2``
runs both at tensor-parallel size 2 (one core a rank); ``--threads 1`` gives the model one
thread, leaving the helper a core of its own. Both engines' outputs are compared
token for token; a difference is reported (and fails the run).
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


def timed(llm, prompts: list[list[int]], max_new: int) -> tuple[dict, list]:  # noqa: ANN001
    from xllm import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    engine.scheduler.reset_prefix_cache()
    busy0, idle0 = engine.model_busy_seconds, engine.model_idle_seconds
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    busy = engine.model_busy_seconds - busy0
    idle = engine.model_idle_seconds - idle0
    return ({"tokens_per_s": _tokens_per_second(prompts, max_new, seconds),
             "idle": idle / (busy + idle)}, [o.outputs[0].token_ids for o in outs])


def run(scenario: str, fmt: str, tp: int, repeats: int, threads: int | None) -> list[dict]:
    from xllm import LLM, SamplingParams

    def build(overlap: bool) -> LLM:
        llm = LLM("demo", max_model_len=1024, tensor_parallel_size=tp,
                  overlap_scheduling=overlap, num_threads=threads, **FORMATS[fmt])
        warm = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        llm.generate(_prompts(llm.tokenizer, scenario)[0], warm, use_tqdm=False)
        return llm

    runs: dict[bool, list[dict]] = {False: [], True: []}
    tokens = {}
    engines: dict[bool, LLM] = {}
    try:
        # Side by side, unless under TP: an engine's rank 0 pins its thread, so two cannot
        # share a process; then each timed run gets an engine of its own.
        if tp == 1:
            engines = {overlap: build(overlap) for overlap in (False, True)}
        for _ in range(repeats):
            for overlap in (False, True):
                llm = engines.get(overlap) or build(overlap)
                try:
                    prompts, max_new = _prompts(llm.tokenizer, scenario)
                    row, tokens[overlap] = timed(llm, prompts, max_new)
                    runs[overlap].append(row)
                finally:
                    if overlap not in engines:
                        llm.engine.close()
    finally:
        for llm in engines.values():
            llm.engine.close()
    return [{"format": fmt, "scenario": scenario, "tp": tp, "threads": threads,
             "overlap": overlap,
             "tokens_per_s": statistics.median(r["tokens_per_s"] for r in measured),
             "idle": statistics.median(r["idle"] for r in measured),
             "runs": measured, "same_tokens": tokens[False] == tokens[True]}
            for overlap, measured in runs.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overlap", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default="single,batch16,batch64")
    parser.add_argument("--formats", default="default")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    print(f"CPU: {_cpu_name()}, {len(os.sched_getaffinity(0))} cores, TP={args.tp}, "
          f"model threads: {args.threads or 'all'}")
    print(f"{'format':<8} {'scenario':<10} {'overlap':>7} {'tok/s':>8} {'vs off':>7} "
          f"{'idle':>6}")
    rows, ok = [], True
    for fmt in args.formats.split(","):
        for scenario in args.scenarios.split(","):
            pair = run(scenario, fmt, args.tp, args.repeats, args.threads)
            base = pair[0]["tokens_per_s"]
            for row in pair:
                print(f"{fmt:<8} {scenario:<10} {'on' if row['overlap'] else 'off':>7} "
                      f"{row['tokens_per_s']:8.1f} {row['tokens_per_s'] / base:6.2f}x "
                      f"{100 * row['idle']:5.1f}%", flush=True)
            if not pair[1]["same_tokens"]:
                ok = False
                print(f"  outputs differ between overlap off and on ({scenario})")
            rows.extend(pair)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": _cpu_name(), "cores": len(os.sched_getaffinity(0)), "rows": rows},
                      f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
