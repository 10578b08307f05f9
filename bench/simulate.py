"""A discrete-event cluster simulator: the master's real routing and PD planning against
simulated instances whose step times come from a fitted speed model (issue 12).

    python -m bench.simulate --instances 32 --trace shift --policy dynamic [--seed 0]
        [--speed-model docs/results/speed_model_amx.json] [--slo-ttft-ms MS]
        [--slo-tpot-ms MS] [--png roles.png] [--json out.json]
    python -m bench.simulate --instances 32 --trace shift --compare   # every static split,
        all mixed and dynamic, on one trace
    python -m bench.simulate --instances 2 --trace serve:RUN.json --policy mixed  # replay a
        recorded bench.serve run (its arrival times and lengths)

What is real and what is simulated:

- **Real (the same classes the master runs):** the registry's instance views and their
  booking of dispatches in transit, the :class:`~xllm.service.routing.Router` and its
  policy, :func:`~xllm.service.master.pd_candidates` (where a request goes by phase and
  role), and :class:`~xllm.service.pd.PdController` with its traffic meter, planner and
  role assignment. Heartbeats update the views every ``--beat`` seconds as the instances'
  agents do (load, role, admitted dispatches settled).
- **Simulated:** each instance's engine, a continuous-batching scheduler like xllm's
  (decodes first, then prompt chunks up to ``max_num_batched_tokens``, FCFS, at most
  ``max_num_seqs`` running). A step of ``B`` decodes at mean context ``c`` plus prompt
  chunks takes ``TPOT(B, c) + sum(TTFT(end) - TTFT(start))`` per chunk (the speed model's
  fixed prefill cost ``TTFT(0)`` replaces ``TPOT``'s when there are no decodes). A PD
  handoff costs ``--kv-ms-per-token`` per prompt token before the decode instance takes the
  request (46 ms for 1k tokens on one host: bench.pd). A role switch takes effect at once
  for new work (as ``SetRole`` does) while the instance finishes what it holds; one
  turning prefill hands its decoding requests to decode instances after its current step
  (they pay the transfer of their prompt and tokens so far). Not
  simulated: KV capacity and preemption, prefix caching, failures.

Traces (``--trace``): ``poisson`` (``--rate``, ``--prompt-len``, ``--output-len``, lengths
log-normal with ``--length-sigma``), ``bursty`` (gamma inter-arrivals, ``--burstiness`` the
coefficient of variation), ``shift`` (three phases of equal length: long prompts and short
outputs, short prompts and long outputs, long prompts again), or ``serve:PATH`` (a
``bench.serve`` JSON's per-request log). Deterministic for a given ``--seed``.

Goodput: requests per second that finished meeting both SLOs, over the run (first arrival
to last completion), as bench.serve counts it.

``--validate PD_JSON`` checks the simulator against a real cluster: for each layout a
``python -m bench.pd`` run recorded (two instances: mixed+mixed, prefill+decode, dynamic),
it replays that run's request log (send times and lengths), each simulated instance at
the speed model its real counterpart reported at the end of the run (its start-up profile
refined by its steps) and with its step budget, and compares TTFT p50, TPOT p50 and
goodput with what was measured.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from xllm.engine.speed_model import SpeedModel
from xllm.service.master import pd_candidates
from xllm.service.pd import PdController, load_speed_model
from xllm.service.registry import EmbeddedRegistry
from xllm.service.routing import Router, RouteRequest
from xllm.service.state import Capacity, InstanceInfo, InstanceLoad, InstanceView

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "docs/results/speed_model_amx.json"


# ---- traces --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival: float  # seconds from the trace's start
    prompt: int  # tokens
    output: int  # tokens (max_tokens; the simulated request generates exactly this many)


def _lognormal(rng: random.Random, mean: float, sigma: float, lo: int, hi: int) -> int:
    if sigma <= 0:
        return max(lo, min(hi, round(mean)))
    mu = math.log(mean) - sigma * sigma / 2
    return max(lo, min(hi, round(rng.lognormvariate(mu, sigma))))


def synthetic_trace(kind: str, duration: float, rate: float, prompt_len: float,
                    output_len: float, sigma: float, seed: int, burstiness: float = 2.0,
                    phases: Sequence[tuple[float, float]] | None = None,
                    max_len: int = 8192) -> list[TraceRequest]:
    """``poisson`` / ``bursty`` at a constant mix; ``shift``: ``phases`` ((prompt, output)
    means, default long/short, short/long, long/short) for equal shares of ``duration``."""
    rng = random.Random(seed)
    if kind == "shift":
        phases = phases or ((2048.0, 32.0), (128.0, 512.0), (2048.0, 32.0))
    else:
        phases = ((prompt_len, output_len),)
    out: list[TraceRequest] = []
    t = 0.0
    while True:
        if kind == "bursty":  # gamma inter-arrivals: mean 1/rate, CV = burstiness
            shape = 1.0 / (burstiness * burstiness)
            t += rng.gammavariate(shape, 1.0 / (rate * shape))
        else:
            t += rng.expovariate(rate)
        if t >= duration:
            return out
        p_mean, o_mean = phases[min(int(t / duration * len(phases)), len(phases) - 1)]
        out.append(TraceRequest(t, _lognormal(rng, p_mean, sigma, 4, max_len),
                                _lognormal(rng, o_mean, sigma, 2, max_len)))


def serve_trace(path: str | Path) -> list[TraceRequest]:
    """The per-request log of a bench.serve JSON (its first run): send times and lengths."""
    run = json.loads(Path(path).read_text())["runs"][0]
    rows = [r for r in run["requests"] if "start_s" in r]
    if not rows:
        raise ValueError(f"{path}: no per-request log with start times (rerun bench.serve)")
    return sorted((TraceRequest(r["start_s"], int(r["prompt_tokens"]),
                                max(int(r["output_tokens"]), 1)) for r in rows),
                  key=lambda r: r.arrival)


# ---- the simulation ------------------------------------------------------------------------

@dataclass(slots=True)
class SimRequest:
    rid: int
    trace: TraceRequest
    first_token: float | None = None
    finish: float | None = None


@dataclass(slots=True)
class Job:
    """A request's stay on one instance. ``mode``: whole (prompt and decode), prefill (the
    prompt and first token, then handed on) or decode (the KV arrives from a prefill)."""

    req: SimRequest
    mode: str
    dispatch_id: int
    computed: int = 0  # prompt tokens computed here
    generated: int = 0  # tokens of the request generated so far (all instances)
    done_at_step: int = 0  # decoding: the instance step at which its last token comes


@dataclass
class SimConfig:
    instances: int = 32
    policy: str = "dynamic"  # dynamic | mixed | static:P (P prefill, the rest decode)
    routing: str = "least_load"
    slo_ttft_ms: float = 3000.0
    slo_tpot_ms: float = 50.0
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    prefill_max_num_batched_tokens: int | None = None  # instances started as prefill
    kv_ms_per_token: float = 0.046
    beat_s: float = 0.25
    pd_interval_s: float = 5.0
    pd_min_dwell_s: float = 30.0
    pd_window_s: float = 15.0
    pd_margin: float = 0.05
    sample_s: float = 10.0  # timeline resolution
    drain_s: float = 600.0  # simulated time after the last arrival before giving up


class SimInstance:
    def __init__(self, sim: Simulation, view: InstanceView, model: SpeedModel) -> None:
        self.sim = sim
        self.view = view
        self.model = model
        self.waiting: deque[Job] = deque()  # prompts to compute, in arrival order
        self.ready: deque[Job] = deque()  # decodes whose KV is here, waiting for a seat
        self.waiting_prefill = 0  # prompt tokens of ``waiting`` not computed yet
        self.running: list[Job] = []  # decoding
        self.finish_heap: list[tuple[int, int, Job]] = []  # (done_at_step, seq, job)
        self.steps = 0
        self.ctx_sum = 0  # the running jobs' context lengths, summed
        self.busy = False
        self.admitted: list[int] = []
        cfg = sim.cfg
        self.budget = (cfg.prefill_max_num_batched_tokens or cfg.max_num_batched_tokens
                       if view.info.role == "prefill" else cfg.max_num_batched_tokens)
        self.draining: set[int] | None = None  # jobs held when a switch began (by id)
        self.drain_since = 0.0
        self.migrate_pending = False  # turning prefill: hand decodes off after this step
        self._seq = itertools.count()

    def submit(self, job: Job, now: float) -> None:
        self.admitted.append(job.dispatch_id)
        if job.mode == "decode":
            self.ready.append(job)
        else:
            self.waiting.append(job)
            self.waiting_prefill += job.req.trace.prompt
        if not self.busy:
            self._start_step(now)

    def _admit_decode(self, job: Job) -> None:
        job.done_at_step = self.steps + (job.req.trace.output - job.generated)
        self.running.append(job)
        self.ctx_sum += job.req.trace.prompt + job.generated
        heapq.heappush(self.finish_heap, (job.done_at_step, next(self._seq), job))

    def _start_step(self, now: float) -> None:
        cfg = self.sim.cfg
        model = self.model
        seats = cfg.max_num_seqs - len(self.running)
        while self.ready and seats > 0:  # their KV is here: they only need a seat
            self._admit_decode(self.ready.popleft())
            seats -= 1
        chunks: list[tuple[Job, int, int]] = []
        budget = self.budget - len(self.running)
        for job in self.waiting:
            if budget <= 0 or (job.computed == 0 and seats <= 0):
                break
            n = min(job.req.trace.prompt - job.computed, budget)
            chunks.append((job, job.computed, n))
            budget -= n
            if job.computed == 0:
                seats -= 1
        b = len(self.running)
        if not b and not chunks:
            self.busy = False
            return
        spans = [(start, n) for _, start, n in chunks]
        sampled = b + sum(1 for job, start, n in chunks if start + n >= job.req.trace.prompt)
        ms = model.step_ms(b, self.ctx_sum, spans, sampled)
        self.busy = True
        self.sim.at(now + ms / 1000.0, lambda t: self._end_step(t, b, chunks))

    def _end_step(self, now: float, b: int, chunks: list[tuple[Job, int, int]]) -> None:
        self.steps += 1
        self.ctx_sum += b  # each running job's context grew by its new token
        while self.finish_heap and self.finish_heap[0][0] <= self.steps:
            _, _, job = heapq.heappop(self.finish_heap)
            self.running.remove(job)
            self.ctx_sum -= job.req.trace.prompt + job.req.trace.output
            job.generated = job.req.trace.output
            self._leave(job, now)
            self.sim.finished(job, now)
        for job, start, n in chunks:
            job.computed = start + n
            self.waiting_prefill -= n
            if job.computed < job.req.trace.prompt:
                continue
            self.waiting.remove(job)  # at the head: chunks are taken in order
            req = job.req
            if req.first_token is None:
                req.first_token = now
            job.generated = max(job.generated, 1)
            if job.generated >= req.trace.output:
                self._leave(job, now)
                self.sim.finished(job, now)
            elif job.mode == "prefill" or self.view.info.role == "prefill":
                self._leave(job, now)  # (a prompt begun before a switch to prefill too)
                self.sim.handoff(job, now)
            else:
                self._admit_decode(job)
                self._leave(job, now)  # a switch to decode waited for its prompt only
        if self.migrate_pending:
            self._migrate_out(now)
        self._start_step(now)

    def _migrate_out(self, now: float) -> None:
        """SetRole to prefill with migrate, between two steps: every decoding request goes
        to a decode instance, which fetches its KV (prompt and tokens so far)."""
        self.migrate_pending = False
        moved = list(self.ready)
        for job in self.running:
            job.generated = job.req.trace.output - (job.done_at_step - self.steps)
            moved.append(job)
        self.ready.clear()
        self.running = []
        self.finish_heap = []
        self.ctx_sum = 0
        self.sim.migrated += len(moved)
        for job in moved:
            self._leave(job, now)
            self.sim.handoff(job, now)

    def _leave(self, job: Job, now: float) -> None:
        if self.draining is not None:
            self.draining.discard(id(job))
            if not self.draining:
                self.sim.switch_done(now - self.drain_since)
                self.draining = None

    def switch(self, role: str, now: float) -> None:
        """SetRole: new-role work is taken at once; what it holds finishes here."""
        self.view.info = replace(self.view.info, role=role)
        # As SetRole: nothing to see through to become mixed, the prompts in progress to
        # become decode, everything to become prefill (decodes handed off).
        if role == "mixed":
            held: set[int] = set()
        elif role == "decode":
            held = {id(j) for j in self.waiting}
        else:
            held = {id(j) for j in (*self.running, *self.waiting, *self.ready)}
        if held:
            self.draining, self.drain_since = held, now
        else:
            self.sim.switch_done(0.0)
        if role == "prefill" and (self.running or self.ready):
            if self.busy:
                self.migrate_pending = True  # the engine hands off between steps
            else:
                self._migrate_out(now)

    def beat(self) -> None:
        """The agent's heartbeat: load, and the dispatches admitted since the last one."""
        self.view.load = InstanceLoad(
            num_waiting=len(self.waiting) + len(self.ready), num_running=len(self.running),
            num_waiting_prefill_tokens=self.waiting_prefill, role=self.view.info.role,
            speed=self.model)
        for d in self.admitted:
            self.view.settle(d)
        self.admitted.clear()


class Simulation:
    """``model``: every instance's speed model, or one per instance (in the order of their
    initial roles: prefill ones first); the planner sees the models in the heartbeats, as
    the master does."""

    def __init__(self, cfg: SimConfig, model: SpeedModel | Sequence[SpeedModel],
                 trace: Sequence[TraceRequest]) -> None:
        self.cfg = cfg
        models = [model] * cfg.instances if isinstance(model, SpeedModel) else list(model)
        if len(models) != cfg.instances:
            raise ValueError(f"{len(models)} speed models for {cfg.instances} instances")
        self.trace = trace
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[float], None]]] = []
        self._seq = itertools.count()
        self.registry = EmbeddedRegistry()
        self.router = Router(cfg.routing, 16)
        self.router._dispatch_ids = itertools.count(1)  # deterministic ids
        roles = _initial_roles(cfg.policy, cfg.instances)
        cap = Capacity(cfg.max_num_seqs, cfg.max_num_batched_tokens, 1 << 20, 16)
        self.instances: dict[str, SimInstance] = {}
        for i, role in enumerate(roles):
            view = self.registry.register(InstanceInfo(f"sim-{i}", f"sim:{i}", role=role,
                                                       capacity=cap))
            self.instances[view.instance_id] = SimInstance(self, view, models[i])
        self.pd = PdController(
            "dynamic" if cfg.policy == "dynamic" else "static",
            slo_ttft_ms=cfg.slo_ttft_ms, slo_tpot_ms=cfg.slo_tpot_ms,
            interval_s=cfg.pd_interval_s, min_dwell_s=cfg.pd_min_dwell_s,
            margin=cfg.pd_margin, window_s=cfg.pd_window_s)
        self.requests: list[SimRequest] = []
        self.timeline: list[dict[str, Any]] = []
        self.switch_seconds: list[float] = []
        self.migrated = 0  # requests handed off by instances turning prefill
        self.decisions: list[dict[str, Any]] = []
        self._unfinished = 0

    def at(self, t: float, fn: Callable[[float], None]) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn))

    # ---- the master's side -----------------------------------------------------------------

    def _dispatch(self, req: SimRequest, now: float, started: bool, generated: int) -> None:
        views = self.registry.routable()
        phase, candidates = pd_candidates(views, started, req.trace.output)
        route = RouteRequest(range(req.trace.prompt), block_hashes=[])
        decision = self.router.route(route, candidates, self.registry.index)
        inst = self.instances[decision.instance.instance_id]
        if started:  # the KV comes from the instance it left first
            job = Job(req, "decode", decision.dispatch_id, req.trace.prompt, generated)
            delay = self.cfg.kv_ms_per_token * (req.trace.prompt + generated) / 1000.0
            self.at(now + delay, lambda t: inst.submit(job, t))
        else:
            mode = "prefill" if phase == "prefill" else "whole"
            inst.submit(Job(req, mode, decision.dispatch_id), now)

    def arrive(self, req: SimRequest, now: float) -> None:
        self.pd.meter.arrive(now, req.trace.prompt, req.trace.output)
        self._dispatch(req, now, False, 0)

    def handoff(self, job: Job, now: float) -> None:
        """The request goes on elsewhere (a PD handoff, or an instance turning prefill)."""
        self._dispatch(job.req, now, True, job.generated)

    def finished(self, job: Job, now: float) -> None:
        job.req.finish = now
        self.pd.meter.finish(now, job.req.trace.output, job.req.trace.output)
        self._unfinished -= 1

    def switch_done(self, seconds: float) -> None:
        self.switch_seconds.append(seconds)

    def _plan(self, now: float) -> None:
        views = self.registry.routable()
        moves = self.pd.plan(now, views, wall=now)
        if moves:
            record = self.pd.decisions[-1]
            self.decisions.append({"time": round(now, 1), "from": record.split,
                                   "to": record.target, "reason": record.reason})
            for view, role in moves:
                self.instances[view.instance_id].switch(role, now)

    def _sample(self, now: float) -> None:
        roles = [v.info.role for v in self.registry.routable()]
        self.timeline.append({"time": now, "prefill": roles.count("prefill"),
                              "decode": roles.count("decode"), "mixed": roles.count("mixed")})

    def _periodic(self, every: float, fn: Callable[[float], None], end: float) -> None:
        def tick(t: float) -> None:
            fn(t)
            if t + every <= end and self._unfinished > 0:
                self.at(t + every, tick)
        self.at(every, tick)

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        for i, tr in enumerate(self.trace):
            req = SimRequest(i, tr)
            self.requests.append(req)
            self.at(tr.arrival, lambda t, r=req: self.arrive(r, t))
        self._unfinished = len(self.requests)
        span = self.trace[-1].arrival if self.trace else 0.0
        end = span + cfg.drain_s
        self._periodic(cfg.beat_s, lambda t: [i.beat() for i in self.instances.values()], end)
        self._periodic(cfg.pd_interval_s, self._plan, end)
        self._periodic(cfg.sample_s, self._sample, end)
        t0 = time.perf_counter()
        events = 0
        while self._events:
            t, _, fn = heapq.heappop(self._events)
            if t > end:
                break
            self.now = t
            fn(t)
            events += 1
        return self.report(span, time.perf_counter() - t0, events)

    # ---- results ---------------------------------------------------------------------------

    def _met(self, r: SimRequest) -> bool:
        if r.finish is None or r.first_token is None:
            return False
        ttft = 1e3 * (r.first_token - r.trace.arrival)
        out = r.trace.output
        tpot = 1e3 * (r.finish - r.first_token) / (out - 1) if out > 1 else 0.0
        return ttft <= self.cfg.slo_ttft_ms and tpot <= self.cfg.slo_tpot_ms

    def report(self, span: float, wall: float, events: int) -> dict[str, Any]:
        done = [r for r in self.requests if r.finish is not None]
        ttft = sorted(1e3 * (r.first_token - r.trace.arrival) for r in done)  # type: ignore[operator]
        tpot = sorted(1e3 * (r.finish - r.first_token) / (r.trace.output - 1)  # type: ignore[operator]
                      for r in done if r.trace.output > 1)
        good = sum(self._met(r) for r in self.requests)
        bins: dict[int, list[bool]] = {}
        for r in self.requests:
            bins.setdefault(int(r.trace.arrival // self.cfg.sample_s), []).append(self._met(r))
        for row in self.timeline:
            k = int(row["time"] // self.cfg.sample_s) - 1
            met = bins.get(k, [])
            row["attainment"] = sum(met) / len(met) if met else None
        # As bench.serve counts it: over the run, first arrival to last completion (or to the
        # end of the simulation when some never finished).
        duration = (max(r.finish for r in done) if len(done) == len(self.requests) and done
                    else self.now)  # type: ignore[type-var]
        return {
            "policy": self.cfg.policy, "instances": self.cfg.instances,
            "requests": len(self.requests), "completed": len(done),
            "span_s": span, "duration_s": duration,
            "goodput": good / duration if duration else 0.0,
            "goodput_share": good / len(self.requests) if self.requests else 0.0,
            "ttft_ms": _percentiles(ttft), "tpot_ms": _percentiles(tpot),
            "switches": self.pd.num_switches, "switch_seconds": _percentiles(
                sorted(self.switch_seconds)), "migrated": self.migrated,
            "decisions": self.decisions, "timeline": self.timeline,
            "sim_wall_s": wall, "events": events,
        }


def _percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}

    def pick(q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))]

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99),
            "mean": sum(values) / len(values)}


def _initial_roles(policy: str, n: int) -> list[str]:
    if policy in ("mixed", "dynamic"):
        return ["mixed"] * n
    if policy.startswith("static:"):
        p = int(policy.split(":", 1)[1])
        if not 0 < p < n:
            raise ValueError(f"static:P needs 0 < P < {n}, got {p}")
        return ["prefill"] * p + ["decode"] * (n - p)
    raise ValueError(f"policy must be dynamic, mixed or static:P, got {policy!r}")


def simulate(cfg: SimConfig, model: SpeedModel | Sequence[SpeedModel],
             trace: Sequence[TraceRequest]) -> dict[str, Any]:
    return Simulation(cfg, model, trace).run()


# ---- the command ---------------------------------------------------------------------------

def plot(results: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    dyn = next((r for r in results if r["policy"] == "dynamic"), results[0])
    t = [row["time"] for row in dyn["timeline"]]
    ax1.stackplot(t, [row["prefill"] for row in dyn["timeline"]],
                  [row["decode"] for row in dyn["timeline"]],
                  [row["mixed"] for row in dyn["timeline"]],
                  labels=["prefill", "decode", "mixed"], step="post")
    ax1.set_ylabel(f"instances ({dyn['policy']})")
    ax1.legend(loc="upper right", fontsize=8)
    for r in results:
        xs = [row["time"] for row in r["timeline"] if row["attainment"] is not None]
        ys = [row["attainment"] for row in r["timeline"] if row["attainment"] is not None]
        ax2.plot(xs, ys, label=f"{r['policy']} (goodput {r['goodput']:.2f}/s)",
                 linewidth=2 if r["policy"] == "dynamic" else 1)
    ax2.set_ylabel("SLO attainment (by arrival)")
    ax2.set_xlabel("simulated seconds")
    ax2.set_ylim(-0.02, 1.02)
    ax2.legend(loc="lower left", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _budget(flags: str) -> int | None:
    """--max-num-batched-tokens N among an instance's extra flags (bench.pd's)."""
    words = flags.replace("=", " ").split()
    if "--max-num-batched-tokens" in words:
        return int(words[words.index("--max-num-batched-tokens") + 1])
    return None


def _replay(cfg: SimConfig, models: list[SpeedModel], trace: list[TraceRequest],
            real: dict[str, float]) -> tuple[dict, dict, dict]:
    """A recorded run simulated (each instance its own measured model): the report, its
    p50s and goodput, and their relative errors against ``real``."""
    sim = simulate(cfg, models, trace)
    simulated = {"ttft_p50_ms": sim["ttft_ms"]["p50"], "tpot_p50_ms": sim["tpot_ms"]["p50"],
                 "goodput": sim["goodput"]}
    return sim, simulated, {k: abs(simulated[k] - v) / v if v else None
                            for k, v in real.items()}


def validate(path: str | Path, out: str | None = None) -> dict[str, Any]:
    """Replays each layout of a bench.pd JSON in simulation; relative errors per metric."""
    data = json.loads(Path(path).read_text())
    args = data["args"]
    policies = {"mixed+mixed": "mixed", "prefill+decode": "static:1", "dynamic": "dynamic"}
    rows = []
    for layout, policy in policies.items():
        run = data.get(layout)
        if run is None:
            continue
        reported = [m for m in run.get("speed_models_after") or [] if m and m.get("role")]
        if len(reported) != 2:
            raise ValueError(f"{path}: layout {layout} lacks the instances' speed models by "
                             "role (rerun bench.pd with --profile-speed)")
        reported.sort(key=lambda m: m["role"] != "prefill")  # the simulation's order
        models = [SpeedModel.from_dict(m) for m in reported]
        serve = run["serve"]
        trace = sorted((TraceRequest(r["start_s"], int(r["prompt_tokens"]),
                                     max(int(r["output_tokens"]), 1))
                        for r in serve["requests"]), key=lambda r: r.arrival)
        cfg = SimConfig(instances=2, policy=policy, slo_ttft_ms=args["slo_ttft_ms"],
                        slo_tpot_ms=args["slo_tpot_ms"], pd_interval_s=2.0,
                        pd_min_dwell_s=10.0, pd_window_s=10.0,
                        prefill_max_num_batched_tokens=_budget(args.get("prefill_args", "")))
        pd_run = data.get("prefill+decode") or {}
        if pd_run.get("mean_fetch_ms"):  # the measured KV transfer, per prompt token
            cfg.kv_ms_per_token = pd_run["mean_fetch_ms"] / (
                sum(t.prompt for t in trace) / len(trace))
        real = {"ttft_p50_ms": serve["ttft_ms"]["p50"], "tpot_p50_ms": serve["tpot_ms"]["p50"],
                "goodput": serve["goodput"]}
        sim, simulated, errors = _replay(cfg, models, trace, real)
        row = {"layout": layout, "policy": policy, "real": real, "simulated": simulated,
               "error": errors, "speed_models": [m.to_dict() for m in models],
               "kv_ms_per_token": cfg.kv_ms_per_token, "switches": sim["switches"]}
        if any(m.step is not None for m in models):  # beside it, xllm-service's forms alone
            _, row["simulated_per_request_forms"], row["error_per_request_forms"] = _replay(
                cfg, [m.per_request_forms() for m in models], trace, real)
        rows.append(row)
        print(f"{layout:>15}: " + "  ".join(
            f"{k} real {real[k]:.3g} sim {simulated[k]:.3g} ({100 * (errors[k] or 0):.0f}%"
            + (f"; forms {100 * (row['error_per_request_forms'][k] or 0):.0f}%)"
               if "error_per_request_forms" in row else ")")
            for k in real), flush=True)
    worst = max((e for r in rows for e in r["error"].values() if e is not None), default=None)
    report = {"source": str(path), "cpu": data.get("cpu"), "layouts": rows,
              "worst_error": worst}
    print(json.dumps({"worst_error": worst}))
    if out:
        Path(out).write_text(json.dumps(report, indent=1))
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.simulate",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, default=32)
    p.add_argument("--policy", default="dynamic",
                   help="dynamic, mixed, or static:P (P prefill, the rest decode)")
    p.add_argument("--compare", action="store_true",
                   help="run every static split, all mixed and dynamic on the trace")
    p.add_argument("--trace", default="shift", help="poisson | bursty | shift | serve:PATH")
    p.add_argument("--duration", type=float, default=900.0, help="seconds of arrivals")
    p.add_argument("--rate", type=float, default=30.0, help="requests per second")
    p.add_argument("--prompt-len", type=float, default=1024)
    p.add_argument("--output-len", type=float, default=128)
    p.add_argument("--length-sigma", type=float, default=0.3)
    p.add_argument("--burstiness", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speed-model", default=str(DEFAULT_MODEL))
    p.add_argument("--routing", default="least_load")
    d = SimConfig()
    p.add_argument("--slo-ttft-ms", type=float, default=d.slo_ttft_ms)
    p.add_argument("--slo-tpot-ms", type=float, default=d.slo_tpot_ms)
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    p.add_argument("--kv-ms-per-token", type=float, default=d.kv_ms_per_token)
    p.add_argument("--pd-interval", type=float, default=d.pd_interval_s)
    p.add_argument("--pd-min-dwell", type=float, default=d.pd_min_dwell_s)
    p.add_argument("--pd-window", type=float, default=d.pd_window_s)
    p.add_argument("--validate", metavar="PD_JSON",
                   help="replay a bench.pd run's layouts and report the simulator's error")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--png", metavar="PATH")
    return p


def config_from_args(args: argparse.Namespace, policy: str) -> SimConfig:
    return SimConfig(instances=args.instances, policy=policy, routing=args.routing,
                     slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms,
                     max_num_seqs=args.max_num_seqs,
                     max_num_batched_tokens=args.max_num_batched_tokens,
                     kv_ms_per_token=args.kv_ms_per_token, pd_interval_s=args.pd_interval,
                     pd_min_dwell_s=args.pd_min_dwell, pd_window_s=args.pd_window)


def trace_from_args(args: argparse.Namespace) -> list[TraceRequest]:
    if args.trace.startswith("serve:"):
        return serve_trace(args.trace[len("serve:"):])
    if args.trace not in ("poisson", "bursty", "shift"):
        raise ValueError(f"--trace must be poisson, bursty, shift or serve:PATH, got "
                         f"{args.trace!r}")
    return synthetic_trace(args.trace, args.duration, args.rate, args.prompt_len,
                           args.output_len, args.length_sigma, args.seed, args.burstiness)


def _line(r: dict[str, Any]) -> str:
    return (f"{r['policy']:>10}: goodput {r['goodput']:7.3f}/s ({100 * r['goodput_share']:5.1f}%)"
            f"  TTFT p50 {r['ttft_ms']['p50'] or 0:8.0f} ms  TPOT p50 "
            f"{r['tpot_ms']['p50'] or 0:6.1f} ms  switches {r['switches']}"
            f"  [{r['sim_wall_s']:.1f} s, {r['events']} events]")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.instances <= 4096:
        print("bench.simulate: --instances must be in [1, 4096]", file=sys.stderr)
        return 2
    if args.validate:
        try:
            validate(args.validate, args.json)
        except (ValueError, KeyError, OSError) as e:
            print(f"bench.simulate: error: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        model = load_speed_model(args.speed_model)
        trace = trace_from_args(args)
        policies = ([f"static:{p}" for p in range(1, args.instances)] + ["mixed", "dynamic"]
                    if args.compare else [args.policy])
        results = []
        for policy in policies:
            results.append(simulate(config_from_args(args, policy), model, trace))
            print(_line(results[-1]), flush=True)
    except ValueError as e:
        print(f"bench.simulate: error: {e}", file=sys.stderr)
        return 2
    summary: dict[str, Any] = {"args": vars(args), "speed_model": model.to_dict(),
                               "trace_requests": len(trace)}
    if args.compare:
        statics = [r for r in results if r["policy"].startswith("static:")]
        best = max(statics, key=lambda r: r["goodput"]) if statics else None
        dyn = results[-1]
        mixed = results[-2]
        summary["best_static"] = best["policy"] if best else None
        summary["dynamic_over_best_static"] = (dyn["goodput"] / best["goodput"]
                                               if best and best["goodput"] else None)
        summary["dynamic_over_mixed"] = (dyn["goodput"] / mixed["goodput"]
                                         if mixed["goodput"] else None)
        print(json.dumps({k: summary[k] for k in ("best_static", "dynamic_over_best_static",
                                                   "dynamic_over_mixed")}))
        shown = [r for r in results if r is dyn or r is mixed or r is best]
    else:
        shown = results
    if args.png:
        plot(shown, Path(args.png), f"{args.instances} instances, trace {args.trace}")
    if args.json:
        summary["results"] = [
            r if r in shown else {k: v for k, v in r.items() if k not in ("timeline",
                                                                          "decisions")}
            for r in results]
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
