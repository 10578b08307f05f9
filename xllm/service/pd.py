"""Dynamic PD: the master's loop that measures the traffic, plans the prefill/decode split
with :class:`~xllm.service.planner.Planner` and says which instances switch role (issue 12).

- :class:`TrafficMeter`: the arrival rate and the mean prompt and output lengths over a
  sliding window (arrivals as the master admits them; output lengths as completions end).
- :class:`PdController`: every ``interval_s`` (the caller's clock), the planner's decision
  for that traffic and the cluster's speed model, and the role moves that carry it out.
  The speed model is the one given (``--speed-model FILE``) or, by default, the mean of the
  models the instances report in their heartbeats (their coefficients averaged: the model
  of an average instance). Its recent decisions, with their reasons, are kept for
  ``/cluster/instances``.
- :func:`assign_roles`: the fewest role changes that reach a split, taking instances that
  hold the least work first.

The master (xllm.service.master) and the simulator (bench.simulate) run these same classes;
only the clock and the instances differ.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from xllm.engine.speed_model import SpeedModel, StepCost
from xllm.service.planner import Planner, Split, Traffic
from xllm.service.state import InstanceView

__all__ = ["PD_POLICIES", "PdController", "PlanRecord", "TrafficMeter", "assign_roles",
           "current_split", "load_speed_model", "mean_speed_model"]

PD_POLICIES = ("static", "dynamic")


class TrafficMeter:
    """Arrivals and finished outputs over the last ``window_s`` seconds.

    The mean output length is estimated from the arrivals' ``max_tokens`` scaled by the
    share of it that finished completions used (1 when they run to their limit; less when
    they stop early): a shift in the asked-for lengths shows at once, where the mean of
    the finished outputs would lag (long outputs finish last) and underestimate decode
    work just when it grows. Without limits, the finished outputs' mean serves."""

    def __init__(self, window_s: float = 30.0, default_output_len: float = 128.0) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self.default_output_len = default_output_len
        self._arrivals: deque[tuple[float, int, int]] = deque()  # (time, prompt, max_tokens)
        self._finishes: deque[tuple[float, int, int]] = deque()  # (time, output, max_tokens)
        self._start: float | None = None

    def arrive(self, now: float, prompt_len: int, max_tokens: int | None) -> None:
        if self._start is None:
            self._start = now
        self._arrivals.append((now, prompt_len, max_tokens or 0))

    def finish(self, now: float, output_len: int, max_tokens: int | None = None) -> None:
        self._finishes.append((now, output_len, max_tokens or 0))

    def traffic(self, now: float) -> Traffic | None:
        """The window's traffic (None before any arrival)."""
        cut = now - self.window_s
        while self._arrivals and self._arrivals[0][0] < cut:
            self._arrivals.popleft()
        while self._finishes and self._finishes[0][0] < cut:
            self._finishes.popleft()
        if not self._arrivals or self._start is None:
            return None
        span = min(self.window_s, max(now - self._start, 1e-3))
        n = len(self._arrivals)
        prompt = sum(a[1] for a in self._arrivals) / n
        limits = [a[2] for a in self._arrivals if a[2]]
        used = [(f[1], f[2]) for f in self._finishes if f[2]]
        if limits:
            share = (sum(o for o, _ in used) / sum(m for _, m in used)) if used else 1.0
            output = share * sum(limits) / len(limits)
        elif self._finishes:
            output = sum(f[1] for f in self._finishes) / len(self._finishes)
        else:
            output = self.default_output_len
        return Traffic(rate=n / span, prompt_len=prompt, output_len=max(output, 1.0))


def current_split(roles: Sequence[str]) -> Split:
    """The split that instances of these roles run: with a prefill and a decode instance
    among them, the prefill ones and the rest (the master sends mixed ones nothing new in
    PD mode, so they count with decode, which they become); otherwise all mixed."""
    prefill = sum(r == "prefill" for r in roles)
    decode = sum(r == "decode" for r in roles)
    if prefill and decode:
        return Split(prefill, len(roles) - prefill)
    return Split(0, 0)


def assign_roles(views: Sequence[InstanceView], target: Split) -> list[tuple[InstanceView, str]]:
    """The role changes that bring ``views`` to ``target``: instances already in a wanted
    role keep it; of the others, those holding the least work change first."""
    if target.mixed:
        return [(v, "mixed") for v in views if v.info.role != "mixed"]
    want = {"prefill": target.prefill, "decode": target.decode}
    keep: set[str] = set()
    for role in ("prefill", "decode"):
        mine = [v for v in views if v.info.role == role]
        mine.sort(key=lambda v: -(v.load.num_running + v.load.num_waiting))  # busiest stay
        keep.update(v.instance_id for v in mine[:want[role]])
        want[role] -= min(len(mine), want[role])
    movers = sorted((v for v in views if v.instance_id not in keep),
                    key=lambda v: (v.load.num_running + v.load.num_waiting, v.instance_id))
    moves = []
    for v in movers:
        role = "prefill" if want["prefill"] > 0 else "decode"
        want[role] -= 1
        if v.info.role != role:
            moves.append((v, role))
    return moves


def mean_speed_model(models: Sequence[SpeedModel]) -> SpeedModel | None:
    """The instances' models averaged, coefficient by coefficient (the step cost too, when
    every model has one; else the per-request forms alone)."""
    if not models:
        return None
    n = len(models)
    ttft = tuple(sum(m.ttft_coef[i] for m in models) / n for i in range(3))
    tpot = tuple(sum(m.tpot_coef[i] for m in models) / n for i in range(3))
    step = None
    if all(m.step is not None for m in models):
        steps = [m.step for m in models if m.step is not None]
        step = StepCost(tuple(sum(s.knot_ms[i] for s in steps) / n
                              for i in range(len(steps[0].knot_ms))),
                        sum(s.sample_ms for s in steps) / n, sum(s.attn_ms for s in steps) / n,
                        sum(s.ctx_ms for s in steps) / n)
    return SpeedModel(ttft, tpot, step)  # type: ignore[arg-type]


def load_speed_model(path: str | Path) -> SpeedModel:
    """A speed model from JSON (``SpeedModel.to_dict``: ``{"ttft_coef": [3], "tpot_coef":
    [3], "step": {...}}``, the step cost optional), at the top level or under ``"model"``
    (what ``python -m bench.speed_model`` writes)."""
    data = json.loads(Path(path).read_text())
    data = data.get("model", data)
    try:
        return SpeedModel.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


@dataclass
class PlanRecord:
    """One planning round that moved instances, or the latest one that did not."""

    time: float  # wall clock (unix seconds)
    split: str  # the split running before
    target: str
    switch: bool
    reason: str
    traffic: dict[str, float] = field(default_factory=dict)
    moves: list[dict[str, str]] = field(default_factory=list)  # instance, from, to
    switch_seconds: float | None = None  # decision to every move confirmed
    migrated: int = 0  # requests the switched instances moved to others
    errors: list[str] = field(default_factory=list)


class PdController:
    """See the module docstring. ``policy``: "static" (roles as started; the controller only
    meters) or "dynamic". ``clock``/``wall``: time sources (the simulator passes its own)."""

    def __init__(self, policy: str = "static", *, slo_ttft_ms: float | None = None,
                 slo_tpot_ms: float | None = None, interval_s: float = 5.0,
                 min_dwell_s: float = 30.0, margin: float = 0.05, window_s: float = 15.0,
                 speed_model: SpeedModel | None = None, history: int = 32,
                 overflow: bool = False) -> None:
        if policy not in PD_POLICIES:
            raise ValueError(f"pd-policy must be one of {PD_POLICIES}, got {policy!r}")
        for name, value in (("slo_ttft_ms", slo_ttft_ms), ("slo_tpot_ms", slo_tpot_ms)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        if overflow and slo_ttft_ms is None:
            raise ValueError("PD overflow sends a prompt to a decode instance when the prefill "
                             "instances would miss the TTFT SLO: give slo_ttft_ms too")
        self.policy = policy
        self.overflow = overflow  # xllm.service.master.pd_overflow, by the master's routing
        self.slo_ttft_ms = slo_ttft_ms
        self.slo_tpot_ms = slo_tpot_ms
        self.interval_s = interval_s
        self.min_dwell_s = min_dwell_s
        self.margin = margin
        self.fixed_model = speed_model
        self.meter = TrafficMeter(window_s)
        self.planner: Planner | None = None
        self.decisions: deque[PlanRecord] = deque(maxlen=history)
        self.last: PlanRecord | None = None  # the latest round, switch or not
        self.num_switches = 0

    def model(self, views: Sequence[InstanceView]) -> SpeedModel | None:
        if self.fixed_model is not None:
            return self.fixed_model
        return mean_speed_model([v.load.speed for v in views if v.load.speed is not None])

    def plan(self, now: float, views: Sequence[InstanceView], wall: float | None = None
             ) -> list[tuple[InstanceView, str]]:
        """One planning round: the role moves to make now (none: stay)."""
        wall = time.time() if wall is None else wall
        if self.policy != "dynamic" or len(views) < 2:
            return []
        split = current_split([v.info.role for v in views])
        traffic = self.meter.traffic(now)
        model = self.model(views)
        if traffic is None or model is None:
            why = "no traffic yet" if traffic is None else "no speed model reported yet"
            self.last = PlanRecord(wall, str(split), str(split), False, why)
            return []
        planner = self.planner
        if planner is None or planner.n != len(views):
            planner = self.planner = Planner(
                len(views), model, slo_ttft_ms=self.slo_ttft_ms, slo_tpot_ms=self.slo_tpot_ms,
                margin=self.margin, min_dwell_s=self.min_dwell_s)
            if self.decisions:  # a change of membership keeps the dwell of the last switch
                planner.last_switch = now - (wall - self.decisions[-1].time)
        planner.model = model
        planner.current = split
        decision = planner.decide(traffic, now)
        moves = assign_roles(views, decision.split) if decision.switch else []
        record = PlanRecord(
            wall, str(split), str(decision.split), bool(moves), decision.reason,
            {"rate": round(traffic.rate, 3), "prompt_len": round(traffic.prompt_len, 1),
             "output_len": round(traffic.output_len, 1)},
            [{"instance": v.instance_id, "from": v.info.role, "to": role} for v, role in moves])
        self.last = record
        if moves:
            self.decisions.append(record)
            self.num_switches += 1
        return moves

    def view(self) -> dict[str, object]:
        """What /cluster/instances shows of the planner."""
        return {"policy": self.policy, "overflow": self.overflow,
                "slo_ttft_ms": self.slo_ttft_ms, "slo_tpot_ms": self.slo_tpot_ms,
                "last": None if self.last is None else self.last.__dict__,
                "decisions": [r.__dict__ for r in self.decisions]}
