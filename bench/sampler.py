"""Micro-timing of the batch sampler: ``python -m bench.sampler [--rows 64] [--vocab 49152]``.

Each scenario times ``SamplingBatch.build`` and ``Sampler.__call__`` (median of repeated calls)
on "LLM-like" logits (N(0, 4^2): at T=0.7 the 0.9-nucleus has ~17 tokens, the top token ~40%),
next to a vLLM-style torch sampler (divide, one full sort for top-k/top-p, softmax, exponential
race) for context. Other processes share this machine: compare numbers from one run only.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from xllm.layers.sampler import Sampler, SamplingBatch
from xllm.sampling_params import SamplingParams as SP


def vllm_style(logits: torch.Tensor, params: list[SP]) -> torch.Tensor:
    """The usual torch sampler: greedy argmax, else sort-based top-k/top-p and a race."""
    temp = torch.tensor([p.temperature or 1.0 for p in params]).unsqueeze(1)
    greedy = torch.tensor([p.temperature == 0 for p in params])
    if bool(greedy.all()):
        return logits.argmax(-1)
    x = logits / temp
    k = torch.tensor([p.top_k if p.top_k > 0 else x.shape[1] for p in params])
    top_p = torch.tensor([p.top_p for p in params])
    if (k < x.shape[1]).any() or (top_p < 1).any():
        srt, idx = x.sort(dim=-1)
        srt.masked_fill_(srt < srt.gather(1, (x.shape[1] - k).unsqueeze(1)), -float("inf"))
        cum = srt.softmax(-1).cumsum(-1)
        mask = cum <= 1 - top_p.unsqueeze(1)
        mask[:, -1] = False
        x = srt.masked_fill_(mask, -float("inf")).scatter(1, idx, srt)
    probs = x.softmax(-1)
    sampled = probs.div_(torch.empty_like(probs).exponential_()).argmax(-1)
    return torch.where(greedy, logits.argmax(-1), sampled)


def scenarios(n: int) -> dict[str, list[SP]]:
    mixed = [
        SP(temperature=0.0),
        SP(temperature=0.8),
        SP(temperature=0.7, top_p=0.9),
        SP(temperature=1.0, top_k=50),
    ]
    return {
        "all greedy": [SP(temperature=0.0)] * n,
        "all greedy + logprobs=5": [SP(temperature=0.0, logprobs=5)] * n,
        "temperature 0.8 (full vocab)": [SP(temperature=0.8)] * n,
        "top-k 50": [SP(temperature=1.0, top_k=50)] * n,
        "top-p 0.9, T 0.7": [SP(temperature=0.7, top_p=0.9)] * n,
        "min-p 0.05": [SP(temperature=1.0, min_p=0.05)] * n,
        "mixed greedy/temp/top-p/top-k": [mixed[i % 4] for i in range(n)],
        "mixed, 1/8 seeded": [
            SP(**{**_fields(mixed[i % 4]), "seed": i}) if i % 8 == 0 else mixed[i % 4]
            for i in range(n)
        ],
        "repetition 1.1 (500+100 tokens)": [SP(temperature=0.7, repetition_penalty=1.1)] * n,
    }


def _fields(p: SP) -> dict:
    return {"temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k}


def median_ms(fn: Callable[[], object], reps: int, clock: Callable[[], float]) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--no-reference", action="store_true", help="skip the vLLM-style sampler")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with process CPU time (steadier on a busy machine; use with --threads 1)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    n, v = args.rows, args.vocab
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(n, v, generator=gen) * 4
    prompts = [torch.randint(0, v, (500,), generator=gen).tolist() for _ in range(n)]
    outputs = [torch.randint(0, v, (100,), generator=gen).tolist() for _ in range(n)]
    sampler = Sampler(seed=0)
    what = "process CPU time" if args.cpu_time else "wall time"
    print(f"{n} rows x vocab {v}, fp32, torch threads {torch.get_num_threads()}, {what}")
    print(f"{'scenario':34s} {'build ms':>9s} {'sample ms':>10s} {'vLLM-style ms':>14s}")
    for name, params in scenarios(n).items():
        batch = SamplingBatch.build(params, prompts, outputs, v)
        build = median_ms(
            lambda p=params: SamplingBatch.build(p, prompts, outputs, v), args.reps, clock
        )
        sample = median_ms(lambda b=batch: sampler(logits, b), args.reps, clock)
        ref = "-"
        if not args.no_reference and "repetition" not in name and "logprobs" not in name:
            ref_ms = median_ms(
                lambda p=params: vllm_style(logits, p), max(3, args.reps // 10), clock
            )
            ref = f"{ref_ms:.2f}"
        print(f"{name:34s} {build:9.3f} {sample:10.2f} {ref:>14s}")


if __name__ == "__main__":
    main()
