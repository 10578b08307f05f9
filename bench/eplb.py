"""Expert-parallel load balance: max/mean expert load across ranks before and after EPLB, on
a skewed routing trace.

The trace is real routing, not drawn counts: tokens (random hidden states) pass through
softmax top-k routers (``xllm.layers.moe.route_native``, the CPU's router) whose logits carry
a per-layer popularity skew (a Zipf-like bias over the experts, shuffled per layer), the way
trained routers favour some experts. The first half of the trace is the window EPLB sees; the
imbalance is measured on the second half (held out), as a rebalance serves the traffic after
it. Rank loads split each expert's tokens evenly over its replicas (the engine's row-based
replica choice).

    python -m bench.eplb [--experts 128] [--top-k 8] [--layers 24] [--tokens 16384]
                         [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np
import torch

from xllm.layers.eplb import rank_loads, rebalance_experts, static_placement
from xllm.layers.moe import RouterSpec, route_native


def routing_trace(layers: int, experts: int, top_k: int, tokens: int, hidden: int,
                  skew: float, seed: int) -> np.ndarray:
    """[2, layers, experts]: tokens routed to each expert in each half of the trace."""
    gen = torch.Generator().manual_seed(seed)
    counts = np.zeros((2, layers, experts), dtype=np.int64)
    popularity = skew * np.log(1.0 / np.arange(1, experts + 1))  # Zipf-like logit offsets
    rng = np.random.default_rng(seed)
    for layer in range(layers):
        router = torch.randn(experts, hidden, generator=gen) / hidden**0.5
        bias = torch.tensor(rng.permutation(popularity), dtype=torch.float32)
        for half in range(2):
            x = torch.randn(tokens // 2, hidden, generator=gen)
            ids, _ = route_native(x @ router.t() + bias, RouterSpec(top_k))
            counts[half, layer] = np.bincount(ids.reshape(-1).numpy(), minlength=experts)
    return counts


def imbalance(load: np.ndarray, placement) -> float:  # noqa: ANN001
    ranks = rank_loads(load, placement)
    return float((ranks.max(1) / ranks.mean(1)).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.eplb", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--skew", type=float, default=1.0,
                        help="the popularity bias's scale (0: no skew)")
    parser.add_argument("--groups", type=int, default=8, help="expert groups (hierarchy)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    trace = routing_trace(args.layers, args.experts, args.top_k, args.tokens, args.hidden,
                          args.skew, seed=0)
    window, held_out = trace[0].astype(np.float64), trace[1].astype(np.float64)
    print(f"# {platform.processor() or platform.machine()}; trace: {args.layers} layers x "
          f"{args.experts} experts, top {args.top_k}, {args.tokens} tokens "
          f"({time.perf_counter() - t0:.1f} s); hottest expert {window.max(1).mean():.0f} "
          f"tokens, mean {window.mean():.0f}")
    rows = []
    print("| ranks | physical experts | static (max/mean) | EPLB, held-out half | EPLB, its window "
          "| rebalance time |")
    print("| --- | --- | --- | --- | --- | --- |")
    for ranks in (4, 8, 16):
        for redundant in (0, args.experts // 8, args.experts // 4):
            physical = args.experts + redundant
            if physical % ranks:
                continue
            static = static_placement(args.layers, args.experts, ranks, redundant)
            t1 = time.perf_counter()
            placement = rebalance_experts(window, physical, args.groups, 1, ranks)
            seconds = time.perf_counter() - t1
            row = {"ranks": ranks, "physical": physical,
                   "static": imbalance(held_out, static),
                   "static_window": imbalance(window, static),
                   "eplb_held_out": imbalance(held_out, placement),
                   "eplb_window": imbalance(window, placement), "rebalance_s": seconds}
            rows.append(row)
            print(f"| {ranks} | {physical} | {row['static']:.2f} | {row['eplb_held_out']:.2f} "
                  f"| {row['eplb_window']:.2f} | {seconds * 1e3:.0f} ms |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
