"""Decode steps and prompt time of the demo model with each KV cache dtype, side by side.

    python -m bench.kv_dtype [--dtypes auto,int8,int8@16] [--context 1100] [--batches 8,16]
                             [--rounds 10] [--threads 1] [--json PATH]

One engine per dtype (``int8@16``: with 16-token KV blocks), all loaded at once. For each
batch size every engine holds that many requests decoding at ``--context`` tokens of
context, and the engines take turns of six steps each, ``--rounds`` times (the machine's
speed drifts; turns make the drift hit them alike): the median step of each turn, and the
median over turns of the paired ratio to the first dtype. Then the time of one
fresh ``--context``-token prompt (median of three), in turns too. Pin with ``taskset``
to measure on one core.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kv_dtype", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="auto,int8")
    parser.add_argument("--context", type=int, default=1100)
    parser.add_argument("--batches", default="8,16")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)

    from xllm import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    def engine(label: str) -> LLM:  # "int8" or "int8@16": a dtype, and a block size
        dtype, _, block = label.partition("@")
        extra = {"block_size": int(block)} if block else {}
        return LLM(model="demo", kv_cache_dtype=dtype, num_threads=args.threads, **extra)

    llms = {d: engine(d) for d in dtypes}
    vocab = next(iter(llms.values())).engine.model_config.vocab_size
    greedy = SamplingParams(temperature=0.0, max_tokens=10**6, ignore_eos=True)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(n)]

    result: dict = {"context": args.context, "threads": args.threads, "decode": {},
                    "prompt_s": {}}
    for batch in (int(b) for b in args.batches.split(",")):
        turns: dict[str, list[float]] = {d: [] for d in dtypes}
        ids = [f"b{batch}-{i}" for i in range(batch)]
        for llm in llms.values():
            for rid in ids:
                llm.engine.add_request(rid, tokens(args.context), greedy)
            while True:  # until every request is decoding
                outs = llm.engine.step()
                if len(outs) == batch and all(o.outputs[0].token_ids for o in outs):
                    break
        for _ in range(args.rounds):
            for d, llm in llms.items():
                steps = []
                for _ in range(6):
                    start = time.perf_counter()
                    llm.engine.step()
                    steps.append(time.perf_counter() - start)
                turns[d].append(1000 * statistics.median(steps))
        for llm in llms.values():
            llm.engine.abort_request(ids)
            while llm.engine.has_unfinished_requests():
                llm.engine.step()
        base = turns[dtypes[0]]
        row = {d: {"step_ms": statistics.median(t), "turns_ms": t,
                   "speedup_vs_first": statistics.median(b / x for b, x in zip(base, t,
                                                                              strict=True))}
               for d, t in turns.items()}
        result["decode"][str(batch)] = row
        print(f"batch {batch}, context {args.context}: " + ", ".join(
            f"{d} {r['step_ms']:.1f} ms a step ({r['speedup_vs_first']:.2f}x)"
            for d, r in row.items()), flush=True)
    prompt: dict[str, list[float]] = {d: [] for d in dtypes}
    for i in range(3):
        for d, llm in llms.items():
            llm.engine.add_request(f"p{i}", tokens(args.context),
                                   SamplingParams(max_tokens=1))
            start = time.perf_counter()
            while llm.engine.has_unfinished_requests():
                llm.engine.step()
            prompt[d].append(time.perf_counter() - start)
    result["prompt_s"] = {d: statistics.median(t) for d, t in prompt.items()}
    print(f"one {args.context}-token prompt: " + ", ".join(
        f"{d} {s:.3f} s" for d, s in result["prompt_s"].items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
