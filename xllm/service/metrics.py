"""The master's own Prometheus metrics, served on its ``/metrics`` beside the API's.

They measure the cluster tier itself, on the real request path: what choosing an instance
costs, when an instance was declared dead, and how long a resumed completion waited for
its first token from the next instance. ``python -m bench.cluster`` reads them back.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["MasterMetrics"]

# Routing costs tens to hundreds of microseconds; fine buckets up to the 1 ms target and
# beyond, so a p99 read back from the histogram is tight where it matters.
_ROUTING_BUCKETS = (
    1e-5,
    2e-5,
    3e-5,
    5e-5,
    7.5e-5,
    1e-4,
    1.5e-4,
    2e-4,
    3e-4,
    5e-4,
    7.5e-4,
    1e-3,
    1.5e-3,
    2e-3,
    3e-3,
    5e-3,
    1e-2,
    2e-2,
    5e-2,
    0.1,
)
_RESUME_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)


class MasterMetrics:
    """Built unregistered (several masters may live in one test process); :meth:`register`
    adds them to the registry the master's ``/metrics`` renders."""

    def __init__(self) -> None:
        self.routing_seconds = Histogram(
            "xllm_master_routing_seconds",
            "Time the master spends choosing an instance for one flight (live instances, "
            "prompt block hashes, the policy's decision and its booking)",
            buckets=_ROUTING_BUCKETS,
            registry=None,
        )
        self.instances_down = Counter(
            "xllm_master_instances_down",
            "Instances the registry declared dead or that left (missed heartbeat deadline, "
            "lost lease, replaced, deregistered)",
            registry=None,
        )
        self.last_instance_down = Gauge(
            "xllm_master_last_instance_down_timestamp_seconds",
            "Unix time at which the registry last declared an instance down (0: never)",
            registry=None,
        )
        self.resumed_flights = Counter(
            "xllm_master_resumed_flights",
            "Completions moved to another instance after theirs was lost",
            registry=None,
        )
        self.pd_handoffs = Counter(
            "xllm_master_pd_handoffs",
            "Completions a prefill instance began and a decode instance took on (its KV "
            "fetched from the prefill instance)",
            registry=None,
        )
        self.pd_overflows = Counter(
            "xllm_master_pd_overflows",
            "New completions a decode instance served whole because every prefill instance "
            "would have missed the TTFT SLO (xllm.service.master.pd_overflow)",
            registry=None,
        )
        self.migrated_flights = Counter(
            "xllm_master_migrated_flights",
            "Completions an instance switching to prefill handed off mid-decode (their KV "
            "fetched by the instance that went on)",
            registry=None,
        )
        self.role_switches = Counter(
            "xllm_master_role_switches",
            "Instances told to serve another role (prefill, decode, mixed)",
            registry=None,
        )
        self.resume_seconds = Histogram(
            "xllm_master_resume_seconds",
            "From giving up on an instance to the first token of the resumed completion from "
            "the next one",
            buckets=_RESUME_BUCKETS,
            registry=None,
        )

    def register(self, registry: CollectorRegistry) -> None:
        for metric in (
            self.routing_seconds,
            self.instances_down,
            self.last_instance_down,
            self.resumed_flights,
            self.pd_handoffs,
            self.pd_overflows,
            self.migrated_flights,
            self.role_switches,
            self.resume_seconds,
        ):
            registry.register(metric)

    def instance_down(self) -> None:
        self.instances_down.inc()
        self.last_instance_down.set(time.time())  # wall clock: other processes compare it
