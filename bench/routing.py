"""Routing decision cost at the master: ``python -m bench.routing [--instances N]``.

Times ``Router.route`` per request -- hashing the prompt into chained block hashes (native)
plus the policy's decision and its booking -- for each policy, over a cluster whose
instances each report a large prefix cache. The issue's target: <= 1 ms p99.
"""

from __future__ import annotations

import argparse
import random
import time

from xllm.service.prefix_index import PrefixIndex, prompt_block_hashes
from xllm.service.routing import POLICIES, Router, RouteRequest
from xllm.service.state import Capacity, InstanceInfo, InstanceLoad, InstanceView

BLOCK = 16


def measure(
    policy: str, n_instances: int, prompt_len: int, n_requests: int, seed: int = 0
) -> list[float]:
    rng = random.Random(seed)
    index = PrefixIndex()
    views = [
        InstanceView(
            InstanceInfo(f"i{k}", f"127.0.0.1:{9000 + k}", capacity=Capacity(64, block_size=BLOCK)),
            index.add_instance(),
        )
        for k in range(n_instances)
    ]
    # 64 shared prefixes of half the prompt; each instance caches 8 of them plus 10k other
    # blocks (a large, realistic report), and carries some load and latency metrics.
    prefixes = [[rng.randrange(50_000) for _ in range(prompt_len // 2)] for _ in range(64)]
    prefix_hashes = [prompt_block_hashes(p + [0], BLOCK) for p in prefixes]
    for v in views:
        held = [h for p in rng.sample(prefix_hashes, 8) for h in p]
        held += [rng.getrandbits(64) for _ in range(10_000)]
        index.apply(v.slot, held, (), full=True)
        v.load = InstanceLoad(
            num_waiting=rng.randrange(8),
            num_running=rng.randrange(64),
            num_waiting_prefill_tokens=rng.randrange(20_000),
            kv_usage=rng.random(),
            ttft_ms=rng.uniform(50, 500),
            tpot_ms=rng.uniform(10, 60),
            prefill_tokens_per_s=rng.uniform(5_000, 20_000),
        )
    router = Router(policy, BLOCK)
    prompts = [
        rng.choice(prefixes) + [rng.randrange(50_000) for _ in range(prompt_len // 2)]
        for _ in range(256)
    ]
    times = []
    for k in range(n_requests):
        req = RouteRequest(prompts[k % len(prompts)], ttft_slo_ms=1000.0, tpot_slo_ms=50.0)
        t0 = time.perf_counter()
        router.route(req, views, index)
        times.append(time.perf_counter() - t0)
        if k % 64 == 63:  # heartbeats list the dispatches their load counts by now
            for v in views:
                v.drop_in_transit()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--instances", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--requests", type=int, default=5000)
    args = ap.parse_args()
    print(
        f"{args.instances} instances, {args.prompt_len}-token prompts, "
        f"block {BLOCK}, {args.requests} requests"
    )
    print(f"{'policy':<14}{'p50 us':>10}{'p99 us':>10}{'max us':>10}")
    for name in POLICIES:
        t = sorted(measure(name, args.instances, args.prompt_len, args.requests))
        p50, p99 = t[len(t) // 2], t[int(len(t) * 0.99)]
        print(f"{name:<14}{p50 * 1e6:>10.1f}{p99 * 1e6:>10.1f}{t[-1] * 1e6:>10.1f}")


if __name__ == "__main__":
    main()
