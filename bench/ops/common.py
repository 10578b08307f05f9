"""Shared pieces of the op microbenchmarks: a result row and a robust timer."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field


@dataclass
class Row:
    """One measurement: the native op against its reference, timed in the same run."""

    op: str
    shape: str
    native_s: float
    reference_s: float
    reference: str  # what the baseline is, e.g. "torch SDPA on gathered KV"
    target: str = ""  # e.g. ">= 2x"; empty where the issue sets none
    met: bool | None = None  # None where there is no target
    note: str = ""  # why a target was missed, or what the numbers mean
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.reference_s / self.native_s if self.native_s > 0 else float("inf")

    def as_json(self) -> dict:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d


def per_call_seconds(fn: Callable[[], object], min_time: float = 0.05, repeat: int = 5,
                     warmup: int = 2) -> float:
    """Median over `repeat` rounds of the mean time per call; each round lasts >= min_time."""
    for _ in range(warmup):
        fn()
    # Calibrate how many calls fill one round.
    n, elapsed = 1, 0.0
    while True:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time or n >= 1 << 20:
            break
        n *= 2 if elapsed <= 0 else max(2, min(10, int(min_time / elapsed) + 1))
    rounds = [elapsed / n]
    for _ in range(repeat - 1):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - start) / n)
    return statistics.median(rounds)


def compare(op: str, shape: str, native: Callable[[], object], reference: Callable[[], object],
            reference_name: str, min_ratio: float | None = None, note: str = "",
            **timer_kwargs) -> Row:
    """Times both in alternating rounds so machine noise hits them alike."""
    native_times, ref_times = [], []
    for _ in range(3):
        native_times.append(per_call_seconds(native, **timer_kwargs))
        ref_times.append(per_call_seconds(reference, **timer_kwargs))
    row = Row(op, shape, min(native_times), min(ref_times), reference_name, note=note)
    if min_ratio is not None:
        row.target = f">= {min_ratio:g}x"
        row.met = row.ratio >= min_ratio
    return row
