"""Reading Prometheus ``/metrics`` pages back in benchmarks: samples, deltas between two
scrapes, and histogram quantiles computed the way Prometheus' ``histogram_quantile`` does.
"""

from __future__ import annotations

import math

from prometheus_client.parser import text_string_to_metric_families

from xllm.benchmarks.http_client import get_text

__all__ = [
    "Samples",
    "bucket_bound",
    "buckets",
    "delta",
    "histogram_quantile",
    "scrape",
    "parse",
    "value",
]

Samples = dict[str, float]  # 'name{label="v",...}' (labels sorted) or 'name' -> value


def _key(name: str, labels: dict[str, str]) -> str:
    if not labels:
        return name
    inner = ",".join(f'{k}="{labels[k]}"' for k in sorted(labels))
    return f"{name}{{{inner}}}"


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text page (counters under their ``_total`` names)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[_key(s.name, s.labels)] = float(s.value)
    return out


async def scrape(base_url: str) -> Samples:
    return parse(await get_text(base_url.rstrip("/") + "/metrics"))


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample; KeyError naming it (and the server's similar names) when absent."""
    key = _key(name, labels)
    if key not in samples:
        similar = sorted(k for k in samples if k.startswith(name.split("_total")[0]))[:8]
        raise KeyError(f"metric {key} is not on the page (similar: {similar})")
    return samples[key]


def delta(after: Samples, before: Samples) -> Samples:
    """after - before, sample by sample (a sample new in ``after`` counts from 0)."""
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def buckets(samples: Samples, name: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of histogram ``name``, by bound; +Inf last."""
    prefix = f'{name}_bucket{{le="'
    out = [(float(k[len(prefix) : -2]), v) for k, v in samples.items() if k.startswith(prefix)]
    if not out:
        raise KeyError(f"histogram {name} is not on the page")
    return sorted(out)


def histogram_quantile(q: float, hist: list[tuple[float, float]]) -> float | None:
    """Prometheus' estimate: linear interpolation inside the bucket holding rank q * count
    (the lowest bucket interpolates from 0). None without observations; the highest finite
    bound when the rank falls in the +Inf bucket."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    total = hist[-1][1] if hist else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in hist:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


def bucket_bound(q: float, hist: list[tuple[float, float]]) -> float | None:
    """The upper bound of the bucket holding rank q * count: the quantile is at most this
    (inf when it falls in the +Inf bucket). None without observations."""
    total = hist[-1][1] if hist else 0.0
    if total <= 0:
        return None
    rank = q * total
    for bound, count in hist:
        if count >= rank:
            return bound
    return math.inf
