"""The PD planner's decision: how many of N instances should prefill and how many decode,
for the traffic now, predicted from each role's speed model (issue 12).

For a split of ``p`` prefill and ``d`` decode instances (and for all ``N`` mixed) it
predicts TTFT and TPOT:

- **prefill**: a request's prefill takes ``S = TTFT(Lp)`` on one instance; ``p`` instances
  at arrival rate ``lam`` are busy ``rho = lam * S / p``; the wait is the M/D/1 mean,
  ``rho * S / (2 (1 - rho))``, so ``TTFT = S + wait``;
- **decode**: by Little's law each decode instance holds ``B = lam * Lo * TPOT / d``
  sequences, and ``TPOT = TPOT(B, ctx)`` with ``ctx = Lp + Lo / 2``: the fixed point of
  the two;
- **mixed**: each instance takes ``lam / N``; its prefills take the share ``rho`` of its
  time. Its decodes ride every step, the prompt-carrying ones too, at the step cost's price
  of a prompt beside them (``_mixed_tpot``); with the per-request forms alone the mean is
  the decode step stretched by ``1 / (1 - rho)``.

A split's score is its predicted SLO attainment, the smaller of TTFT's and TPOT's (0 when
a side cannot keep up). TTFT's is ``min(1, slo / predicted)`` on the mean. TPOT's is the
share of requests predicted to meet it, since a request's TPOT is its own and the mean
hides how it spreads: on a decode instance, the share whose batch (Poisson about its mean)
is small enough (``_decode_tpot_attainment``); on a mixed one, the share that sit through
few enough prompt steps (``_mixed_tpot_attainment``). :class:`Planner` moves to
the best split only when it beats the current one by ``margin`` and the last move is at
least ``min_dwell_s`` old (hysteresis), and says why; among splits of equal attainment it
prefers the most headroom under the SLOs.

The master's :class:`~xllm.service.pd.PdController` feeds it measured traffic and the
instances' reported speed models and carries out its decisions (``--pd-policy dynamic``);
bench.simulate runs the same code against simulated instances.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from xllm.engine.speed_model import SpeedModel

__all__ = ["Decision", "Planner", "Split", "Traffic", "predict"]


@dataclass(frozen=True)
class Traffic:
    rate: float  # requests per second
    prompt_len: float  # mean prompt tokens
    output_len: float  # mean output tokens


@dataclass(frozen=True)
class Split:
    """``prefill`` and ``decode`` instances; both 0 means every instance is mixed."""

    prefill: int
    decode: int

    @property
    def mixed(self) -> bool:
        return self.prefill == 0 and self.decode == 0

    def __str__(self) -> str:
        return "all mixed" if self.mixed else f"{self.prefill}P:{self.decode}D"


@dataclass(frozen=True)
class Prediction:
    split: Split
    ttft_ms: float  # inf: the prefill side cannot keep up
    tpot_ms: float  # inf: the decode side cannot keep up
    score: float  # predicted SLO attainment, 0..1


def _decode_tpot(model: SpeedModel, rate_per_instance: float, output_len: float,
                 context: float, stretch: float = 1.0, max_batch: int = 1024) -> float:
    """The fixed point of B = rate * Lo * TPOT and TPOT = stretch * model(B, ctx)."""
    batch = 1.0
    tpot = stretch * model.tpot_ms(1, int(context))
    for _ in range(100):
        batch = max(1.0, rate_per_instance * output_len * tpot / 1000.0)
        if batch > max_batch:
            return float("inf")
        new = stretch * model.tpot_ms(max(1, round(batch)), int(context))
        if abs(new - tpot) < 1e-6 * max(tpot, 1.0):
            return new
        tpot = new
    return tpot


@dataclass(frozen=True)
class _MixedDecode:
    tpot_ms: float  # the mean over decode steps and prompt-carrying steps (inf: too much)
    decode_ms: float  # a step of the decodes alone
    prompt_step_ms: float  # a step carrying a prompt beside them
    prompt_steps_per_s: float


def _mixed_tpot(model: SpeedModel, rate_per_instance: float, prompt_len: float,
                output_len: float, context: float, max_batch: int = 1024) -> _MixedDecode:
    """A mixed instance's decoding: its B decodes ride every step, and ``k = rate`` steps a
    second also carry a prompt (one chunk: the default budget holds a whole prompt),
    costing ``m = step(B decodes + Lp)``; the rest are decode steps of ``d = TPOT(B,
    ctx)``. Steps a second: ``k + (1 - k m) / d``, one token each per decode, so the mean
    TPOT is its inverse, at the fixed point with B = rate * Lo * TPOT. With the
    per-request forms (``m = d + prefill``) this is about ``d / (1 - rho)``, rho the
    prompts' share of the time."""
    n = max(1, int(prompt_len))
    k = rate_per_instance
    batch = 1
    tpot = float("inf")
    d = m = 0.0
    for _ in range(100):
        d = model.tpot_ms(batch, int(context)) / 1000.0
        m = model.step_ms(batch, int(batch * context), [(0, n)], batch + 1) / 1000.0
        if k * m >= 1:
            return _MixedDecode(float("inf"), 1000 * d, 1000 * m, k)
        new = 1000.0 / (k + (1 - k * m) / d)
        nxt = max(1, round(rate_per_instance * output_len * new / 1000.0))
        if nxt > max_batch:
            return _MixedDecode(float("inf"), 1000 * d, 1000 * m, k)
        if nxt == batch and abs(new - tpot) < 1e-6 * max(new, 1.0):
            break
        batch, tpot = nxt, new
    return _MixedDecode(new, 1000 * d, 1000 * m, k)


def _poisson_cdf(k: int, mean: float) -> float:
    """P(X <= k) for X ~ Poisson(mean)."""
    if k < 0:
        return 0.0
    if k > mean + 12 * math.sqrt(mean) + 12:
        return 1.0
    term = total = math.exp(-mean)
    for i in range(1, k + 1):
        term *= mean / i
        total += term
    return min(1.0, total)


def _mixed_tpot_attainment(mixed: _MixedDecode, output_len: float,
                           slo: float | None) -> float:
    """The share of a mixed instance's requests whose TPOT meets the SLO. A request's TPOT
    is its own: one that no prompt step interrupts decodes at ``d``; each prompt step it
    sits through adds ``m - d`` over its Lo tokens. Prompt steps land as a Poisson stream
    of ``k`` a second over its decoding (Lo x d: the requests that meet a tight SLO are
    the ones few steps interrupt, so theirs is about that long), so the share is the
    Poisson CDF at the most interruptions the SLO allows (none when even ``d`` misses it).
    The mean alone would count every request late when a few interruptions raise it (with
    short outputs, most requests see none)."""
    if mixed.tpot_ms == float("inf"):
        return 0.0
    if slo is None:
        return 1.0
    if mixed.decode_ms > slo:
        return 0.0
    extra = max(mixed.prompt_step_ms - mixed.decode_ms, 1e-9)
    allowed = math.floor((slo - mixed.decode_ms) * output_len / extra)
    hits = mixed.prompt_steps_per_s * output_len * mixed.decode_ms / 1000.0
    return _poisson_cdf(min(allowed, 10**6), hits)


def _decode_tpot_attainment(model: SpeedModel, tpot_ms: float, rate_per_instance: float,
                            output_len: float, context: float, slo: float | None) -> float:
    """The share of a decode instance's requests whose TPOT meets the SLO: the instance
    holds B ~ Poisson(rate x Lo x TPOT) other sequences (Poisson arrivals, each decoding a
    while), and a request meets the SLO when TPOT(B + 1) does."""
    if tpot_ms == float("inf"):
        return 0.0
    if slo is None:
        return 1.0
    mean = rate_per_instance * output_len * tpot_ms / 1000.0
    limit = int(mean + 12 * math.sqrt(mean) + 12)
    others = -1
    while others < limit and model.tpot_ms(others + 2, int(context)) <= slo:
        others += 1
    return _poisson_cdf(others, mean)


def _attainment(predicted: float, slo: float | None) -> float:
    if predicted == float("inf"):
        return 0.0
    if slo is None or predicted <= slo:
        return 1.0
    return slo / predicted


def predict(split: Split, n: int, model: SpeedModel, traffic: Traffic,
            slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> Prediction:
    """TTFT, TPOT and score of one split of ``n`` instances alike (one speed model)."""
    lam, lp, lo = traffic.rate, traffic.prompt_len, traffic.output_len
    s = model.ttft_ms(int(lp)) / 1000.0
    context = lp + lo / 2
    if split.mixed:
        rho = lam / n * s
        if rho >= 1:
            return Prediction(split, float("inf"), float("inf"), 0.0)
        ttft = 1000 * (s + rho * s / (2 * (1 - rho)))
        mixed = _mixed_tpot(model, lam / n, lp, lo, context)
        tpot = mixed.tpot_ms
        score = min(_attainment(ttft, slo_ttft_ms),
                    _mixed_tpot_attainment(mixed, lo, slo_tpot_ms))
        return Prediction(split, ttft, tpot, score)
    rho = lam * s / split.prefill
    ttft = float("inf") if rho >= 1 else 1000 * (s + rho * s / (2 * (1 - rho)))
    tpot = _decode_tpot(model, lam / split.decode, lo, context)
    score = min(_attainment(ttft, slo_ttft_ms), _decode_tpot_attainment(
        model, tpot, lam / split.decode, lo, context, slo_tpot_ms))
    return Prediction(split, ttft, tpot, score)


@dataclass(frozen=True)
class Decision:
    split: Split  # the split to run now (the current one when staying)
    switch: bool
    reason: str
    predictions: tuple[Prediction, ...]


class Planner:
    def __init__(self, num_instances: int, model: SpeedModel, *,
                 slo_ttft_ms: float | None, slo_tpot_ms: float | None,
                 margin: float = 0.05, min_dwell_s: float = 30.0,
                 allow_mixed: bool = True) -> None:
        if num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {num_instances}")
        self.n = num_instances
        self.model = model
        self.slo_ttft_ms = slo_ttft_ms
        self.slo_tpot_ms = slo_tpot_ms
        self.margin = margin
        self.min_dwell_s = min_dwell_s
        self.allow_mixed = allow_mixed
        self.current = Split(0, 0) if allow_mixed or num_instances < 2 else Split(
            num_instances // 2, num_instances - num_instances // 2)
        self.last_switch: float | None = None

    def candidates(self) -> list[Split]:
        splits = [Split(p, self.n - p) for p in range(1, self.n)]
        if self.allow_mixed or self.n < 2:
            splits.append(Split(0, 0))
        return splits

    def _headroom(self, p: Prediction) -> float:
        """How far under its SLOs a split is predicted to run: the smaller of SLO/TTFT and
        SLO/TPOT (0 when a side cannot keep up), capped at 4."""
        if p.ttft_ms == float("inf") or p.tpot_ms == float("inf"):
            return 0.0
        ratios = [slo / max(v, 1e-9) for slo, v in ((self.slo_ttft_ms, p.ttft_ms),
                                                      (self.slo_tpot_ms, p.tpot_ms)) if slo]
        return min(4.0, min(ratios)) if ratios else 0.0

    def decide(self, traffic: Traffic, now: float) -> Decision:
        """The split for ``traffic``: the best predicted, if it beats the current one by the
        margin and the last switch is old enough; else the current one."""
        preds = tuple(predict(s, self.n, self.model, traffic, self.slo_ttft_ms,
                              self.slo_tpot_ms) for s in self.candidates())
        by_split = {p.split: p for p in preds}
        current = by_split[self.current]
        # Among equally good splits, the one with the most headroom under its SLOs (a split
        # that only just meets them falls behind at the first burst, and the traffic it is
        # planned for is a window's mean); then the nearest to the current one.
        best = max(preds, key=lambda p: (round(p.score, 3), self._headroom(p),
                                         -abs(p.split.prefill - self.current.prefill)))
        if best.split == self.current:
            return Decision(self.current, False, f"{self.current} is best "
                            f"(predicted attainment {current.score:.2f})", preds)
        if best.score < current.score + self.margin:
            return Decision(self.current, False, f"{best.split} would reach {best.score:.2f} "
                            f"against {current.score:.2f}: under the margin", preds)
        if self.last_switch is not None and now - self.last_switch < self.min_dwell_s:
            return Decision(self.current, False, f"{best.split} is better ({best.score:.2f} "
                            f"against {current.score:.2f}) but the last switch was "
                            f"{now - self.last_switch:.0f} s ago", preds)
        reason = (f"{self.current} -> {best.split}: predicted attainment {current.score:.2f} "
                  f"-> {best.score:.2f} (TTFT {best.ttft_ms:.0f} ms, TPOT {best.tpot_ms:.1f} ms)")
        self.current = best.split
        self.last_switch = now
        return Decision(best.split, True, reason, preds)
