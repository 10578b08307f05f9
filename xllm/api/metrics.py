"""Prometheus metrics of one server: request latencies and token counts recorded by the API
layer, engine gauges read from the engine thread's latest snapshot at scrape time.

Each server owns its registry (not prometheus-client's global one), so several servers in
one process (tests) do not collide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from xllm.engine.async_engine import EngineStats
from xllm.kvcache.store import LOAD_BUCKETS, KVStoreStats

__all__ = ["CONTENT_TYPE", "ServerMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                    1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        yield GaugeMetricFamily("xllm_num_requests_running", "Requests in the running batch",
                                value=s.num_running)
        yield GaugeMetricFamily("xllm_num_requests_waiting",
                                "Requests queued in the scheduler (including preempted ones)",
                                value=s.num_waiting)
        yield CounterMetricFamily("xllm_num_preemptions", "Preemptions since start",
                                  value=s.num_preemptions)
        yield GaugeMetricFamily("xllm_kv_cache_usage_ratio",
                                "Share of KV cache blocks held by requests (0..1)",
                                value=s.kv_cache_usage)
        yield GaugeMetricFamily("xllm_prefix_cache_hit_rate",
                                "Prompt tokens served from the prefix cache / tokens looked up",
                                value=s.prefix_cache_hit_rate)
        yield CounterMetricFamily("xllm_prefix_cache_queries",
                                  "Prompt tokens looked up in the prefix cache",
                                  value=s.prefix_cache_queried_tokens)
        yield CounterMetricFamily("xllm_prefix_cache_hits",
                                  "Prompt tokens served from the prefix cache",
                                  value=s.prefix_cache_hit_tokens)
        yield CounterMetricFamily("xllm_engine_steps", "Model steps run", value=s.num_steps)
        yield CounterMetricFamily("xllm_model_busy_seconds",
                                  "Seconds the model spent in steps (forward, LM head, sampler)",
                                  value=s.model_busy_seconds)
        yield CounterMetricFamily("xllm_model_idle_seconds",
                                  "Seconds the model waited between back-to-back steps (the "
                                  "engine's outputs, scheduling and inputs, less what overlap "
                                  "scheduling hides)",
                                  value=s.model_idle_seconds)
        total = s.model_busy_seconds + s.model_idle_seconds
        yield GaugeMetricFamily("xllm_model_idle_ratio",
                                "Share of busy time the model waited between steps, since start",
                                value=s.model_idle_seconds / total if total else 0.0)
        yield CounterMetricFamily("xllm_tp_allreduce_seconds",
                                  "Tensor parallelism: seconds rank 0 spent in sums and gathers "
                                  "with the other ranks", value=s.tp_reduce_seconds)
        yield CounterMetricFamily("xllm_tp_message_seconds",
                                  "Tensor parallelism: seconds rank 0 spent sending step "
                                  "messages", value=s.tp_message_seconds)
        yield CounterMetricFamily("xllm_tp_wait_seconds",
                                  "Tensor parallelism: of the sums, gathers and messages, "
                                  "seconds rank 0 waited for ranks not there yet (their work's "
                                  "skew, not the transfer)",
                                  value=s.tp_wait_seconds)
        steps = max(1, s.num_steps)
        yield GaugeMetricFamily("xllm_tp_allreduce_seconds_per_step",
                                "Tensor parallelism: sums, gathers and step messages per model "
                                "step, since start",
                                value=(s.tp_reduce_seconds + s.tp_message_seconds) / steps)
        yield from _kv_store_metrics(s.kv_store)
        if s.expert_counts:
            family = CounterMetricFamily("xllm_moe_expert_tokens",
                                         "Mixture of experts: tokens routed to each expert, per "
                                         "MoE layer", labels=["layer", "expert"])
            for layer, counts in zip(s.moe_layers, s.expert_counts, strict=True):
                for expert, n in enumerate(counts):
                    family.add_metric([str(layer), str(expert)], n)
            yield family
            yield CounterMetricFamily("xllm_eplb_rebalances",
                                      "Expert parallelism: placements recomputed and applied",
                                      value=s.num_rebalances)
        yield GaugeMetricFamily("xllm_engine_ready", "1 while the engine serves, else 0",
                                value=1.0 if s.state == "ready" else 0.0)


def _labelled(name: str, documentation: str, label: str, values: dict[str, float]
              ) -> CounterMetricFamily:
    """A counter family with one label, one sample per value."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


def _kv_store_metrics(kv: KVStoreStats) -> Iterator[Metric]:
    yield GaugeMetricFamily("xllm_kv_mapped_bytes",
                            "KV cache memory mapped now (on CPU it grows and shrinks with use)",
                            value=kv.mapped_bytes)
    yield GaugeMetricFamily("xllm_kv_reserved_bytes", "The KV pool's ceiling",
                            value=kv.reserved_bytes)
    families = {
        "blocks": GaugeMetricFamily("xllm_kv_tier_blocks", "KV blocks a tier holds",
                                    labels=["tier"]),
        "capacity_blocks": GaugeMetricFamily("xllm_kv_tier_capacity_blocks",
                                             "KV blocks a tier can hold", labels=["tier"]),
        "hit_blocks": CounterMetricFamily("xllm_kv_tier_hit_blocks",
                                          "Prefix blocks loaded from a tier instead of "
                                          "recomputed", labels=["tier"]),
        "bytes_written": CounterMetricFamily("xllm_kv_tier_written_bytes",
                                             "Bytes written down to a tier", labels=["tier"]),
        "bytes_read": CounterMetricFamily("xllm_kv_tier_read_bytes",
                                          "Bytes loaded from a tier", labels=["tier"]),
        "corrupt_blocks": CounterMetricFamily("xllm_kv_tier_corrupt_blocks",
                                              "Blocks that failed their checksum (recomputed)",
                                              labels=["tier"]),
    }
    for tier in kv.tiers:
        for field_name, family in families.items():
            family.add_metric([tier.name], getattr(tier, field_name))
    yield from families.values()
    yield _labelled("xllm_kv_preemptions",
                    "Preemptions by what became of the request's KV blocks", "kv",
                    {"swapped": kv.preemptions_swapped,
                     "recomputed": kv.preemptions_recomputed})
    yield _labelled("xllm_kv_peer_blocks", "KV blocks moved between instances, by direction",
                    "direction", {"fetched": kv.peer_blocks_fetched,
                                  "served": kv.peer_blocks_served})
    yield _labelled("xllm_kv_peer_bytes", "KV bytes moved between instances (PD handoffs, "
                    "peer prefix hits), by direction", "direction",
                    {"fetched": kv.peer_blocks_fetched * kv.block_bytes,
                     "served": kv.peer_blocks_served * kv.block_bytes})
    by_path = dict(kv.peer_blocks_by_path)
    yield _labelled("xllm_kv_peer_path_blocks", "KV blocks fetched from peers, by the path "
                    "they took (shm: same host; grpc: streamed; mooncake)", "path",
                    {p: by_path.get(p, 0) for p in ("shm", "grpc", "mooncake")})
    yield CounterMetricFamily("xllm_kv_peer_fetches", "Fetches of a prefix from a peer",
                              value=kv.peer_fetches)
    yield CounterMetricFamily("xllm_kv_peer_fetch_seconds",
                              "Time spent fetching prefixes from peers (plan to adoption)",
                              value=kv.peer_fetch_seconds)
    if kv.load_buckets:
        bounds = [str(b) for b in LOAD_BUCKETS] + ["+Inf"]
        yield HistogramMetricFamily(
            "xllm_kv_load_seconds", "Time to load a prefix's blocks from the tiers",
            buckets=list(zip(bounds, kv.load_buckets, strict=True)), sum_value=kv.load_sum)


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("xllm_time_to_first_token_seconds",
                              "Time from request arrival to its first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("xllm_time_per_output_token_seconds",
                              "Mean time between output tokens after the first, per request",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("xllm_e2e_request_latency_seconds",
                             "Time from request arrival to its last token",
                             buckets=_E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("xllm_prompt_tokens", "Prompt tokens processed",
                                     registry=r)
        self.generation_tokens = Counter("xllm_generation_tokens", "Tokens generated",
                                         registry=r)
        self.requests = Counter("xllm_request_success", "Finished completions by finish reason",
                                ["finished_reason"], registry=r)
        r.register(_EngineCollector(stats))

    def record(self, *, arrival: float, first_token: float | None, finished: float,
               num_prompt_tokens: int, num_output_tokens: int,
               finish_reasons: list[str]) -> None:
        """One request (all its completions) that ran to the end."""
        self.prompt_tokens.inc(num_prompt_tokens)
        self.generation_tokens.inc(num_output_tokens)
        for reason in finish_reasons:
            self.requests.labels(finished_reason=reason).inc()
        self.e2e.observe(finished - arrival)
        if first_token is not None:
            self.ttft.observe(first_token - arrival)
            per_completion = num_output_tokens / max(1, len(finish_reasons))
            if per_completion > 1:
                self.tpot.observe((finished - first_token) / (per_completion - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
