"""Cluster benchmark: ``python -m bench.cluster [--instances 2] [--json PATH] [--plot PATH]``.

For each routing policy, a fresh ``xllm-master --spawn N --policy P`` (instances with one
torch/OpenMP thread each) serves the same seeded shared-prefix workload: groups of
requests, each group sharing a long document followed by a distinct question, groups
interleaved, at a fixed concurrency (or Poisson arrivals). Per policy it reports request
throughput, output tok/s, TTFT and TPOT p50/p99 (client side, ``xllm.benchmarks.serve``),
the cluster prefix-cache hit rate (prompt tokens served from cache / prompt tokens looked
up, summed over the instances' own ``xllm_prefix_cache_*`` counters, as deltas over the
run), and the master's routing cost per request (its ``xllm_master_routing_seconds``
histogram, measured inside the master on the request path). ``bench.routing``'s
in-process microbenchmark runs too (``--micro-requests 0`` skips it).

Then, on the last policy's cluster, failure recovery: ``--kill-streams`` streams start,
the instance running the most requests is SIGKILLed once every stream has tokens, and it
reports the time from the kill to the master declaring the instance dead (its
``xllm_master_last_instance_down_timestamp_seconds``), that minus the heartbeat timeout,
the time from the kill to the first resumed token at the client of every stream the
master resumed (named in its "resuming" log lines), and whether every stream completed.

Issue targets: prefix_aware >= 1.5x round_robin's hit rate; routing p99 <= 1 ms;
detection <= 1 s after the heartbeat deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.cluster_failure import kill_phase
from xllm.benchmarks import prometheus as prom
from xllm.benchmarks.cluster import LocalCluster
from xllm.benchmarks.http_client import get_json
from xllm.benchmarks.serve import (
    Client,
    RequestSpec,
    run_load,
    shared_prefix_requests,
    summarize,
    synthetic_requests,
)
from xllm.service.routing import POLICIES


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else 1e6 * seconds


def _routing_row(hist: list[tuple[float, float]], sum_s: float) -> dict[str, Any]:
    count = hist[-1][1] if hist else 0.0
    return {
        "count": int(count),
        "mean_us": _us(sum_s / count) if count else None,
        "p50_us": _us(prom.histogram_quantile(0.5, hist)),
        "p99_us": _us(prom.histogram_quantile(0.99, hist)),
        "p99_at_most_us": _us(prom.bucket_bound(0.99, hist)),
    }


async def _scrape_all(cluster: LocalCluster) -> tuple[prom.Samples, list[prom.Samples]]:
    master = await prom.scrape(cluster.url)
    return master, [await prom.scrape(u) for u in cluster.instance_urls]


async def measure_policy(
    cluster: LocalCluster, client: Client, specs: list[RequestSpec], args: argparse.Namespace
) -> tuple[dict[str, Any], int]:
    """One policy's run on its fresh cluster: (report row, completions sent to the master)."""
    warm = synthetic_requests(args.warmup, args.seed + 999, 16, 4, 32, 4, 0.1)
    if warm:  # all at once, so the policies' bookings spread them over the instances
        await run_load(client, warm, math.inf, None, args.seed)
    m0, i0 = await _scrape_all(cluster)
    load_before = os.getloadavg()[0]
    results, duration = await asyncio.wait_for(
        run_load(client, specs, args.request_rate, args.concurrency, args.seed), args.run_timeout
    )
    m1, i1 = await _scrape_all(cluster)
    summary = summarize(results, duration, None, None)
    per_instance = []
    for before, after in zip(i0, i1, strict=True):
        d = prom.delta(after, before)
        per_instance.append(
            {
                "hit_tokens": prom.value(d, "xllm_prefix_cache_hits_total"),
                "queried_tokens": prom.value(d, "xllm_prefix_cache_queries_total"),
                "preemptions": prom.value(d, "xllm_num_preemptions_total"),
                "engine_steps": prom.value(d, "xllm_engine_steps_total"),
            }
        )
    hits = sum(p["hit_tokens"] for p in per_instance)
    queried = sum(p["queried_tokens"] for p in per_instance)
    dm = prom.delta(m1, m0)
    row = {
        "summary": summary,
        "prefix_cache": {
            "hit_rate": hits / queried if queried else 0.0,
            "hit_tokens": hits,
            "queried_tokens": queried,
            # Equal to queried_tokens when every request was admitted once (no preemption,
            # no resume): the instances' counters cover exactly this run's prompts.
            "client_prompt_tokens": sum(r.prompt_tokens for r in results if r.ok),
            "per_instance": per_instance,
        },
        "preemptions": sum(p["preemptions"] for p in per_instance),
        # Live instances the registry declared dead anyway (late heartbeats on a starved
        # machine): each restarts the requests it held elsewhere.
        "instances_declared_dead": prom.value(dm, "xllm_master_instances_down_total"),
        "resumed_flights": prom.value(dm, "xllm_master_resumed_flights_total"),
        "routing": _routing_row(
            prom.buckets(dm, "xllm_master_routing_seconds"),
            prom.value(dm, "xllm_master_routing_seconds_sum"),
        ),
        "load_average": [load_before, os.getloadavg()[0]],
    }
    return row, len(warm) + len(specs)


def _master_args(args: argparse.Namespace) -> list[str]:
    return [
        "--model",
        args.model,
        "--num-threads",
        "1",
        "--num-kv-blocks",
        str(args.num_kv_blocks),
        "--max-model-len",
        str(args.max_model_len),
        "--heartbeat-timeout",
        str(args.heartbeat_timeout),
        *shlex.split(args.engine_args),
    ]


def _measured(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(p, r) for p, r in report["policies"].items() if "error" not in r]


async def _policy_and_kill(
    report: dict[str, Any],
    policy: str,
    specs: list[RequestSpec],
    kill: bool,
    log_dir: Path,
    args: argparse.Namespace,
) -> None:
    """One policy on a fresh cluster (into ``report["policies"]``), then, with ``kill``,
    the failure test on that cluster (into ``report["failure"]``)."""
    async with LocalCluster(
        args.instances,
        policy,
        _master_args(args),
        log_dir / f"{policy}.log",
        start_timeout_s=args.phase_timeout,
    ) as cluster:
        model = (await get_json(cluster.url + "/v1/models"))["data"][0]["id"]
        client = Client(cluster.url, model, "completions", None, ignore_eos=True)
        row, sent = await measure_policy(cluster, client, specs, args)
        report["policies"][policy] = row
        s = row["summary"]
        print(
            f"{_HEADER}   (latencies in ms)\n{_row_line(policy, row)}   ({s['completed']} ok, "
            f"{s['failed']} failed, load {row['load_average'][1]:.1f})",
            flush=True,
        )
        if kill:
            # As many prefix groups as instances: every stream must fit in the KV caches at
            # once (before the kill, and on the survivors after it) to be under way.
            groups = min(args.groups, args.instances)
            kill_specs = shared_prefix_requests(
                groups,
                math.ceil(args.kill_streams / groups),
                args.prefix_len,
                args.question_len,
                args.kill_output_len,
                args.seed + 7,
            )[: args.kill_streams]
            # A void trial (a stream ended before the last one streamed) is repeated with
            # longer outputs, within the context: prompts take at most 2 tokens per word.
            longest = max(s.prompt_words for s in kill_specs)
            report["failure"] = await kill_phase(
                cluster,
                client,
                kill_specs,
                sent,
                args.heartbeat_timeout,
                args.phase_timeout,
                max_output_len=args.max_model_len - 2 * longest - 8,
            )
            report["failure"]["policy"] = policy


async def run(args: argparse.Namespace) -> dict[str, Any]:
    specs = shared_prefix_requests(
        args.groups, args.per_group, args.prefix_len, args.question_len, args.output_len, args.seed
    )
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="bench-cluster-"))
    report: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "plot")},
        "machine": {
            "cpus": os.cpu_count(),
            "nice": os.nice(0),
            "load_average_start": os.getloadavg()[0],
        },
        "policies": {},
        "log_dir": str(log_dir),
    }
    for i, policy in enumerate(args.policies):
        kill = i == len(args.policies) - 1 and args.kill_streams > 0
        try:
            await _policy_and_kill(report, policy, specs, kill, log_dir, args)
        except (RuntimeError, TimeoutError, OSError) as e:  # recorded; the others still run
            error = f"{type(e).__name__}: {e}"[:3000]
            if policy in report["policies"]:  # measured: the kill test failed
                report["failure"] = {"policy": policy, "error": error}
            else:
                report["policies"][policy] = {"error": error}
            print(f"bench.cluster: {policy}: {error}", file=sys.stderr, flush=True)
    rates = {p: r["prefix_cache"]["hit_rate"] for p, r in _measured(report)}
    if rates.get("round_robin") and "prefix_aware" in rates:
        report["prefix_aware_over_round_robin_hit_rate"] = (
            rates["prefix_aware"] / rates["round_robin"]
        )
    if args.micro_requests > 0:
        from bench.routing import measure

        report["routing_micro"] = {}
        for name in POLICIES:
            t = sorted(measure(name, 16, 2048, args.micro_requests))
            report["routing_micro"][name] = {
                "p50_us": 1e6 * t[len(t) // 2],
                "p99_us": 1e6 * t[int(len(t) * 0.99)],
            }
    report["machine"]["load_average_end"] = os.getloadavg()[0]
    return report


_HEADER = (
    f"{'policy':<13}{'req/s':>7}{'out tok/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}"
    f"{'TPOT p50':>10}{'TPOT p99':>10}{'hit rate':>9}{'preempt':>8}{'route p50/p99 us':>18}"
)


def _row_line(policy: str, row: dict[str, Any]) -> str:
    s, r = row["summary"], row["routing"]
    lat = (s["ttft_ms"]["p50"], s["ttft_ms"]["p99"], s["tpot_ms"]["p50"], s["tpot_ms"]["p99"])
    return (
        f"{policy:<13}{s['request_throughput']:>7.2f}{s['output_throughput']:>10.1f}"
        + "".join(f"{v:10.0f}" if v is not None else f"{'-':>10}" for v in lat)
        + f"{row['prefix_cache']['hit_rate']:>9.3f}{row['preemptions']:>8.0f}"
        + (f"{r['p50_us']:>11.0f}/{r['p99_us']:<6.0f}" if r["count"] else f"{'-':>18}")
    )


def print_report(report: dict[str, Any]) -> None:
    print("\n" + _HEADER + "   (latencies in ms)")
    for policy, row in report["policies"].items():
        print(_row_line(policy, row) if "error" not in row else f"{policy:<13}{row['error']}")
    if "prefix_aware_over_round_robin_hit_rate" in report:
        x = report["prefix_aware_over_round_robin_hit_rate"]
        print(
            f"prefix_aware / round_robin hit rate: {x:.2f}x (target >= 1.5x: "
            f"{'met' if x >= 1.5 else 'MISSED'})"
        )
    for name, m in report.get("routing_micro", {}).items():
        print(f"bench.routing {name:<13} p50 {m['p50_us']:7.1f} us  p99 {m['p99_us']:7.1f} us")
    f = report.get("failure")
    if f and "error" in f:
        print(f"kill on {f['policy']}: {f['error']}")
    elif f:
        k = f["kill_to_first_resumed_token_s"]
        worst = f"{k['max']:.3f} s" if k["max"] is not None else "-"
        print(
            f"kill on {f['policy']} ({f['streams']} streams, {f['output_len']} tokens each): "
            f"dead after {f['detection_s']:.3f} s = heartbeat timeout "
            f"{f['detection_after_deadline_s']:+.3f} s (target <= +1 s); "
            f"{len(f['affected_streams'])} streams resumed, kill -> first resumed token at "
            f"the client: max {worst}; all streams completed: {f['all_completed']}"
            + (f"; after {len(f['void_trials'])} void trial(s)" if f.get("void_trials") else "")
        )
    print(
        f"load average {report['machine']['load_average_start']:.1f} at the start, "
        f"{report['machine']['load_average_end']:.1f} at the end; nice "
        f"{report['machine']['nice']}"
    )


def plot(report: dict[str, Any], path: Path) -> bool:
    """Bars per policy: hit rate, output tok/s, TTFT p50/p99. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "bench.cluster: matplotlib is not installed (pip install 'xllm[bench]'); "
            "no plot written"
        )
        return False
    measured = _measured(report)
    if not measured:
        return False
    names = [p for p, _ in measured]
    rows = [r for _, r in measured]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].bar(names, [r["prefix_cache"]["hit_rate"] for r in rows])
    axes[0].set_title("cluster prefix-cache hit rate")
    axes[1].bar(names, [r["summary"]["output_throughput"] for r in rows])
    axes[1].set_title("output tokens/s")
    xs = range(len(names))
    for k, (q, w) in enumerate((("p50", -0.2), ("p99", 0.2))):
        axes[2].bar(
            [x + w for x in xs],
            [r["summary"]["ttft_ms"][q] or 0 for r in rows],
            width=0.4,
            label=f"TTFT {q}",
            color=f"C{k}",
        )
    axes[2].set_xticks(list(xs), names)
    axes[2].set_title("TTFT (ms)")
    axes[2].legend()
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=20)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(
        f"{report['config']['instances']} instances, {report['config']['groups']} prefix groups"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _policies(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in POLICIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"policies must be a comma-separated subset of {sorted(POLICIES)}, got {text!r}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--instances", type=int, default=2, help="instances per cluster (--spawn)")
    p.add_argument(
        "--policies",
        type=_policies,
        default=list(POLICIES),
        help="comma-separated routing policies, each on a fresh cluster",
    )
    p.add_argument("--model", default="demo")
    p.add_argument(
        "--num-kv-blocks",
        type=int,
        default=128,
        help="KV blocks per instance: smaller than every group's prefix together, "
        "so where a group goes decides whether its prefix stays cached",
    )
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--engine-args", default="", help="more options for the master/instances")
    p.add_argument("--heartbeat-timeout", type=float, default=1.0)
    p.add_argument(
        "--groups",
        type=int,
        default=12,
        help="prefix groups (the default 12 documents of ~21 blocks fill the default two "
        "instances' caches together, so each instance can keep only half of them: the "
        "regime where routing decides the hit rate)",
    )
    p.add_argument("--per-group", type=int, default=8, help="requests per group")
    p.add_argument("--prefix-len", type=int, default=320, help="shared prefix (words ~ tokens)")
    p.add_argument("--question-len", type=int, default=16, help="distinct suffix (words)")
    p.add_argument("--output-len", type=int, default=16, help="tokens generated per request")
    load = p.add_mutually_exclusive_group()
    load.add_argument(
        "--concurrency",
        type=int,
        default=4,
        help="closed loop with this many requests in flight (the default: the running "
        "requests' share of the KV cache, hence the hit rates, then do not depend on how "
        "fast the machine is)",
    )
    load.add_argument(
        "--request-rate",
        type=float,
        help="open loop instead: Poisson arrivals per second (inf: all at once)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, help="requests before measuring (default: instances)")
    p.add_argument(
        "--kill-streams",
        type=int,
        default=8,
        help="streams running when an instance is killed (0: no failure test)",
    )
    p.add_argument("--kill-output-len", type=int, default=48)
    p.add_argument(
        "--micro-requests",
        type=int,
        default=2000,
        help="requests per policy in bench.routing's microbenchmark (0: skip)",
    )
    p.add_argument("--run-timeout", type=float, default=1800.0, help="seconds per policy run")
    p.add_argument(
        "--phase-timeout",
        type=float,
        default=300.0,
        help="seconds for a cluster to start, and for the kill phase",
    )
    p.add_argument("--log-dir", help="keep the clusters' logs here (default: a temp dir)")
    p.add_argument("--json", metavar="PATH", help="write the report here")
    p.add_argument("--plot", metavar="PATH", help="write a PNG here (needs matplotlib)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.request_rate is not None:
        args.concurrency = None  # the open loop replaces the default closed one
    if args.warmup is None:
        args.warmup = args.instances
    for name in ("instances", "num_kv_blocks", "groups", "per_group", "prefix_len"):
        if getattr(args, name) < 1:
            print(f"bench.cluster: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.concurrency is not None and args.concurrency < 1:
        print("bench.cluster: --concurrency must be >= 1", file=sys.stderr)
        return 2
    if args.kill_streams > 0 and args.instances < 2:
        print(
            "bench.cluster: the kill test needs --instances >= 2 (or --kill-streams 0)",
            file=sys.stderr,
        )
        return 2
    report = asyncio.run(run(args))
    print_report(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot and plot(report, Path(args.plot)):
        print(f"wrote {args.plot}")
    ok = all("error" not in r and r["summary"]["failed"] == 0 for r in report["policies"].values())
    return 0 if ok and report.get("failure", {}).get("all_completed", True) else 1


if __name__ == "__main__":
    sys.exit(main())
