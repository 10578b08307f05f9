"""bench.cluster end to end, tiny: a 2-instance cluster under prefix_aware, 6 requests in 2
prefix groups, then one instance SIGKILLed under 4 streams. Checks that the JSON holds real,
self-consistent numbers read back from the master's and the instances' /metrics, and that
every process the benchmark started is gone afterwards."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bench.cluster import main
from bench.cluster_failure import _start_streams, _VoidTrial
from xllm.benchmarks import prometheus as prom
from xllm.benchmarks.cluster import children
from xllm.benchmarks.serve import RequestResult, RequestSpec, shared_prefix_requests

pytestmark = pytest.mark.timeout(240)


def test_shared_prefix_workload_is_seeded_grouped_and_interleaved() -> None:
    a = shared_prefix_requests(4, 5, 50, 6, 8, seed=1)
    assert a == shared_prefix_requests(4, 5, 50, 6, 8, seed=1)
    assert a != shared_prefix_requests(4, 5, 50, 6, 8, seed=2)
    docs = [s.prompt.split("\nQuestion")[0] for s in a]
    assert len(set(docs)) == 4 and all(docs.count(d) == 5 for d in set(docs))
    assert all(len(d.split()) == 52 for d in docs)  # "Document g:" + 50 words
    assert len({s.prompt for s in a}) == 20  # every question distinct
    assert docs[:5] != [docs[0]] * 5  # groups interleave
    with pytest.raises(ValueError, match="per_group"):
        shared_prefix_requests(2, 0, 50, 6, 8, seed=1)


def test_histogram_quantile_matches_prometheus() -> None:
    hist = [(0.001, 50.0), (0.002, 90.0), (0.005, 99.0), (float("inf"), 100.0)]
    assert prom.histogram_quantile(0.5, hist) == pytest.approx(0.001)
    assert prom.histogram_quantile(0.7, hist) == pytest.approx(0.0015)
    assert prom.histogram_quantile(0.99, hist) == pytest.approx(0.005)
    assert prom.histogram_quantile(1.0, hist) == pytest.approx(0.005)  # in +Inf: last bound
    assert prom.bucket_bound(0.95, hist) == 0.005
    assert prom.histogram_quantile(0.5, [(1.0, 0.0), (float("inf"), 0.0)]) is None


class _FakeClient:
    """Streams whose k-th spec gets its first token after ``delays[k]`` s, then one token
    every 10 ms until ``output_len``; records which streams were cancelled."""

    def __init__(self, delays: list[float]) -> None:
        self.delays = delays
        self.started = 0
        self.cancelled: list[int] = []

    async def run(self, spec: RequestSpec, *, on_accept: Any, on_event: Any) -> RequestResult:
        k = self.started
        self.started += 1
        on_accept(time.perf_counter())
        try:
            await asyncio.sleep(self.delays[k])
            for _ in range(spec.output_len):
                on_event(time.perf_counter())
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            self.cancelled.append(k)
            raise
        return RequestResult(ok=True, prompt_tokens=1, output_tokens=spec.output_len)


def test_kill_phase_streams_void_when_one_ends_before_all_streamed() -> None:
    specs = [RequestSpec("p", 1, 4) for _ in range(3)]

    async def run(delays: list[float], length: int) -> tuple[_FakeClient, int]:
        client = _FakeClient(delays)
        tasks, times = await _start_streams(  # type: ignore[arg-type]
            client, [replace(s, output_len=length) for s in specs], time.monotonic() + 10
        )
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return client, min(len(t) for t in times)

    # The third stream starts after the first ended (4 tokens in ~40 ms): void, and no
    # stream outlives the trial.
    with pytest.raises(_VoidTrial, match="stream 0: 4 tokens"):
        asyncio.run(run([0.0, 0.0, 0.3], 4))
    # With outputs long enough, every stream is under way together.
    client, least = asyncio.run(run([0.0, 0.0, 0.3], 64))
    assert least >= 2 and sorted(client.cancelled) == [0, 1, 2]


def _leftovers() -> list[int]:
    return [
        pid
        for pid in children(os.getpid())
        if b"master_server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def test_tiny_cluster_run_and_kill(demo_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cluster.json"
    argv = [
        "--model",
        str(demo_model_dir),
        "--instances",
        "2",
        "--policies",
        # The kill phase runs on this cluster too: prefix_aware may queue 3 of the 4
        # streams on one instance, whose prefill step can outlast a whole 32-token stream
        # on the other on a starved machine; the phase then repeats with longer outputs.
        # (16-token streams could all end on the victim between the last stream's second
        # event and the kill: nothing to resume.)
        "prefix_aware",
        "--groups",
        "2",
        "--per-group",
        "3",
        "--prefix-len",
        "64",
        "--question-len",
        "8",
        "--output-len",
        "4",
        "--concurrency",
        "1",
        "--kill-streams",
        "4",
        "--kill-output-len",
        "32",
        "--micro-requests",
        "50",
        "--phase-timeout",
        "150",
        "--run-timeout",
        "150",
        "--log-dir",
        str(tmp_path / "logs"),
        "--json",
        str(out),
    ]
    try:
        status = main(argv)
    finally:
        for pid in _leftovers():  # only if the benchmark failed to stop its cluster
            os.killpg(pid, signal.SIGKILL)
    report = json.loads(out.read_text())
    assert status == 0, report
    assert not _leftovers()

    row = report["policies"]["prefix_aware"]
    s = row["summary"]
    assert (s["completed"], s["failed"]) == (6, 0), s["errors"]
    assert s["request_throughput"] > 0 and s["output_throughput"] > 0
    assert 0 < s["ttft_ms"]["p50"] <= s["ttft_ms"]["p99"]
    assert 0 < s["tpot_ms"]["p50"] <= s["tpot_ms"]["p99"]

    pc = row["prefix_cache"]
    # The instances' counters saw every prompt of the run (more only if one was admitted
    # twice: a preemption, or a restart after a spurious death on a starved machine).
    assert pc["queried_tokens"] >= pc["client_prompt_tokens"] > 6 * 64
    if row["preemptions"] == 0 and row["resumed_flights"] == 0:
        assert pc["queried_tokens"] == pc["client_prompt_tokens"]
    assert pc["hit_tokens"] == sum(p["hit_tokens"] for p in pc["per_instance"])
    # One at a time, each group's later requests find its 64-token document cached: 4 of 6.
    assert 0.25 < pc["hit_rate"] < 1.0, pc

    r = row["routing"]
    assert r["count"] >= 6 and 0 < r["p50_us"] <= r["p99_us"] <= r["p99_at_most_us"] < 1e5
    assert set(report["routing_micro"]) == {
        "round_robin",
        "least_load",
        "prefix_aware",
        "slo_aware",
    }

    f = report["failure"]
    assert f["policy"] == "prefix_aware"
    assert f["all_completed"] and f["completed"] == 4, f["errors"]
    # Each void trial doubled the outputs (72-word prompts: far within the context).
    assert len(f["void_trials"]) < 3 and f["output_len"] == 32 * 2 ** len(f["void_trials"])
    assert f["affected_streams"] and not f["unmatched_resumes"], f
    assert f["resumed_flights"] >= len(f["affected_streams"])
    assert "missed its heartbeat deadline" in f["down_reason"]
    # Declared dead after the silence it had been allowed, give or take a beat (0.25 s)
    # and a loaded machine; never before the kill.
    assert 0 < f["detection_s"] < f["heartbeat_timeout_s"] + 5
    k = f["kill_to_first_resumed_token_s"]
    assert 0 < k["median"] <= k["max"] < 120
    assert all(n >= 2 for n in f["events_before_kill"])
