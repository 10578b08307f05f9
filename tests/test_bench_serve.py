"""The serving benchmark: seeded synthetic lengths, statistics, and a short real run."""

from __future__ import annotations

import asyncio
import math

import pytest
from live_server import LiveServer

from xllm.api.app import build_app
from xllm.api.settings import ServerSettings
from xllm.benchmarks.serve import (
    Client,
    RequestResult,
    regoodput,
    run_load,
    summarize,
    synthetic_requests,
)

pytestmark = pytest.mark.timeout(120)


def test_synthetic_lengths_are_seeded_and_follow_the_means() -> None:
    a = synthetic_requests(2000, 3, 100, 50, 10_000, 10_000, 0.8)
    assert a == synthetic_requests(2000, 3, 100, 50, 10_000, 10_000, 0.8)
    assert a != synthetic_requests(2000, 4, 100, 50, 10_000, 10_000, 0.8)
    assert 90 < sum(s.prompt_words for s in a) / len(a) < 110
    assert 45 < sum(s.output_len for s in a) / len(a) < 55
    clipped = synthetic_requests(500, 3, 100, 50, 120, 60, 0.8)
    assert max(s.prompt_words for s in clipped) <= 120 and max(s.output_len for s in clipped) <= 60
    assert len({s.prompt.split(":")[0] for s in a}) == len(a)  # distinct heads
    # Another tag: the same lengths, but no prompt shares its head with the untagged ones.
    tagged = synthetic_requests(2000, 3, 100, 50, 10_000, 10_000, 0.8, tag="L1-")
    assert [(t.prompt_words, t.output_len) for t in tagged] == [
        (s.prompt_words, s.output_len) for s in a]
    assert not {t.prompt.split(":")[0] for t in tagged} & {s.prompt.split(":")[0] for s in a}


def test_summary_statistics() -> None:
    results = [RequestResult(ok=True, prompt_tokens=10, output_tokens=5, ttft=0.1 * i,
                             e2e=0.1 * i + 0.4, itl=[0.1] * 4) for i in range(1, 11)]
    results.append(RequestResult(ok=False, prompt_tokens=10, error="HTTPError: 503"))
    s = summarize(results, 10.0, slo_ttft=0.5, slo_tpot=0.2)
    assert (s["completed"], s["failed"]) == (10, 1)
    assert s["ttft_ms"]["p50"] == pytest.approx(550.0)
    assert s["tpot_ms"]["p99"] == pytest.approx(100.0)
    assert s["goodput"] == pytest.approx(0.5)  # TTFT 0.1..0.5 s meet the 0.5 s SLO
    assert s["output_throughput"] == pytest.approx(5.0) and s["errors"] == ["HTTPError: 503"]
    # Recomputed later from the requests kept: the same SLO gives the same goodput, others
    # count the requests within them (the failed one counts in the share's total).
    assert regoodput(s, 500.0, 200.0) == pytest.approx((0.5, 5 / 11))
    assert regoodput(s, None, None) == pytest.approx((1.0, 10 / 11))
    assert regoodput(s, 250.0, 50.0) == pytest.approx((0.0, 0.0))  # TPOT is 100 ms


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_short_run_against_the_server(served_engine, endpoint: str) -> None:  # noqa: ANN001
    app = build_app(served_engine, ServerSettings(served_model_names=["demo"]),
                    shutdown_engine=False)
    specs = synthetic_requests(4, 0, 8, 3, 16, 4, 0.3)
    with LiveServer(app) as srv:
        client = Client(srv.url, "demo", endpoint, None, ignore_eos=True)
        results, seconds = asyncio.run(run_load(client, specs, math.inf, None, 0))
    assert all(r.ok for r in results), [r.error for r in results]
    assert [r.output_tokens for r in results] == [s.output_len for s in specs]
    # One gap between consecutive events; an event may carry several tokens (coalesced).
    assert all(len(r.itl) <= r.output_tokens - 1 for r in results)
    s = summarize(results, seconds, None, None)
    assert s["completed"] == 4 and s["ttft_ms"]["p99"] > 0
