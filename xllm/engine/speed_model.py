"""The speed model a PD planner and the cluster simulator need: what a step of an instance
costs, per instance (issue 12).

Two forms, both fitted from the same measurements:

- **xllm-service's forms**, per request:

      TTFT(L)      = a0 + a1 * L + a2 * L**2                 (ms; a prompt of L tokens alone)
      TPOT(B, ctx) = b0 + b1 * B + b2 * B * ctx              (ms; B sequences of ~ctx tokens)

  (quadratic prefill: attention is quadratic in the prompt; decode: a fixed step cost, a
  per-sequence cost, and KV reads growing with batch x context).
- **the step cost** (:class:`StepCost`), per engine step of any mix of prompt chunks and
  decodes:

      step(T, S, A, C) = base(T) + s * S + p * A + c * C     (ms)

  ``T`` the step's tokens (every prompt chunk's and one per decode), ``S`` the rows it
  samples (the LM head and the sampler), ``A`` the prompt chunks' attention pairs
  (``n * start + n * (n + 1) / 2`` for a chunk of ``n`` tokens after ``start``), ``C`` the
  context tokens the decodes read. ``base`` is piecewise linear in ``T`` with knots at the
  powers of two: the linears' cost is not linear in the rows (on an AMX CPU a few rows take
  the VNNI or VDPBF16PS kernels, from 3 or 8 rows the AMX tiles; small steps are bound by reading
  the weights, large ones by compute), which is where the linear TPOT form fails (it was
  up to 1.9x off at batch 8 under load). One model covers what the per-request forms
  cannot: a step that carries a prompt chunk beside decodes, and several prompts batched
  into one step. Knots without samples are tied to their neighbours (a small penalty on
  the curvature), so a sparse profile still gives a usable curve.

With a step cost, ``ttft_ms`` and ``tpot_ms`` are computed from it and ``step_ms`` prices
any step; without one (too few samples, or a model built from the per-request forms alone)
they fall back to the per-request forms. :meth:`SpeedModel.fit` is least squares over the
samples, weighted by 1 / time so the error is relative (short steps matter as much as long
ones); :meth:`SpeedModel.errors` reports the mean absolute percentage error.
:class:`OnlineSpeedModel` keeps a window of recent samples (a registration profile's stay
for good) and refits.

:func:`profile_engine` measures the samples on a real engine (a short profile: prompts of a
few lengths, decode steps at a few batch sizes and contexts, batched prompts and a prompt
chunk beside decodes).

The engine keeps an :class:`OnlineSpeedModel` (``LLMEngine.speed``) fed from its own
steps. Every step is a step sample, timed over its whole cycle (scheduling, the model,
outputs, and the gap before it when the engine had work then: what the next step waits
for); a step that is one whole prompt alone is also a prefill sample, a step of decodes
alone a decode sample. ``xllm-server --profile-speed`` seeds it with a profile before the
instance registers (the samples stay in the fit, so the model covers lengths the traffic has
not shown yet); instances report the fitted model in every heartbeat, the master's PD
planner (xllm.service.pd) plans with it and bench.simulate steps its instances with it.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

__all__ = ["KNOTS", "OnlineSpeedModel", "Profile", "SpeedModel", "StepCost", "profile_engine",
           "chunk_attention"]

PrefillSample = tuple[int, float]  # (prompt tokens, ms to the first token)
DecodeSample = tuple[int, int, float]  # (batch size, mean context tokens, ms per step)
# (tokens, decodes, sampled rows, prompt attention pairs, decode context tokens, ms)
StepSample = tuple[int, int, int, float, int, float]

KNOTS: tuple[int, ...] = tuple(2 ** i for i in range(16))  # step tokens: 1 .. 32768
_ATTN_UNIT = 1e6  # the step cost's prompt-attention coefficient: ms per 1e6 pairs
_CTX_UNIT = 1e3  # its decode-context coefficient: ms per 1e3 context tokens read
_CURVATURE_PENALTY = 0.3  # weight of a knot's departure from its neighbours' line
_HUBER = 0.1  # relative residual past which a step sample's weight falls (1 / residual)
_BASE_FADE = 32  # a profile's step samples weigh 1 / (1 + own samples of the kind / this)
MIN_STEP_SAMPLES = 3  # of each kind (with a prompt chunk, decodes only) for a step fit


def _lstsq_relative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares of x @ c ~ y in relative error (rows scaled by 1 / y)."""
    w = 1.0 / np.maximum(y, 1e-9)
    coef, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
    return coef


def _hats(tokens: np.ndarray) -> np.ndarray:
    """Piecewise-linear basis over KNOTS (one column per knot; linear beyond the last)."""
    knots = np.asarray(KNOTS, dtype=np.float64)
    t = np.clip(tokens.astype(np.float64), knots[0], None)
    i = np.clip(np.searchsorted(knots, t, side="right") - 1, 0, len(knots) - 2)
    f = (t - knots[i]) / (knots[i + 1] - knots[i])
    out = np.zeros((len(t), len(knots)))
    rows = np.arange(len(t))
    out[rows, i] = 1.0 - f
    out[rows, i + 1] = f
    return out


def chunk_attention(chunks: Sequence[tuple[int, int]]) -> tuple[int, float]:
    """Prompt chunks given as (start, tokens): their tokens and attention pairs, summed."""
    tokens = 0
    attn = 0.0
    for start, n in chunks:
        tokens += n
        attn += n * start + n * (n + 1) / 2
    return tokens, attn


@dataclass(frozen=True)
class StepCost:
    """ms of one step: ``base(T) + sample_ms * S + attn_ms * A / 1e6 + ctx_ms * C / 1e3``,
    ``base`` linear between ``knot_ms`` at the token counts of ``KNOTS``."""

    knot_ms: tuple[float, ...]
    sample_ms: float  # per sampled row
    attn_ms: float  # per 1e6 prompt attention pairs
    ctx_ms: float  # per 1e3 context tokens read by decodes

    def __post_init__(self) -> None:
        values = (*self.knot_ms, self.sample_ms, self.attn_ms, self.ctx_ms)
        if len(self.knot_ms) != len(KNOTS) or not all(math.isfinite(v) for v in values):
            raise ValueError(f"a step cost needs {len(KNOTS)} finite knot values and finite "
                             f"coefficients, got {len(self.knot_ms)} knots: {values}")

    def ms(self, tokens: int, sampled: int, attn: float, ctx: int) -> float:
        k = len(KNOTS) - 2
        for i in range(len(KNOTS) - 1):  # 16 knots: a scan beats numpy for one point
            if tokens < KNOTS[i + 1]:
                k = i
                break
        f = (max(tokens, 1) - KNOTS[k]) / (KNOTS[k + 1] - KNOTS[k])
        base = self.knot_ms[k] + f * (self.knot_ms[k + 1] - self.knot_ms[k])
        value = (base + self.sample_ms * sampled + self.attn_ms * attn / _ATTN_UNIT
                 + self.ctx_ms * ctx / _CTX_UNIT)
        return max(value, 0.01)

    @classmethod
    def fit(cls, samples: Sequence[StepSample], weights: Sequence[float] | None = None
            ) -> StepCost:
        """``weights``: each sample's (default 1; relative error is weighted by them)."""
        data = np.asarray(samples, dtype=np.float64).reshape(-1, 6)
        tokens, y = data[:, 0], data[:, 5]
        extra = np.stack([data[:, 2], data[:, 3] / _ATTN_UNIT, data[:, 4] / _CTX_UNIT], 1)
        x = np.concatenate([_hats(tokens), extra], 1)
        w = 1.0 / np.maximum(y, 1e-9)
        if weights is not None:
            w = w * np.asarray(weights, dtype=np.float64)
        # Penalty rows: each inner knot near the line through its neighbours, in the scale a
        # straight fit of ms on tokens gives there (relative, like the data rows).
        c0, c1 = _lstsq_relative(np.stack([np.ones_like(tokens), tokens], 1), y)
        knots = np.asarray(KNOTS, dtype=np.float64)
        scale = np.maximum(c0 + c1 * knots, max(float(y.min()), 1e-3))
        pen = np.zeros((len(KNOTS) - 2, x.shape[1]))
        for k in range(1, len(KNOTS) - 1):
            lo, mid, hi = knots[k - 1], knots[k], knots[k + 1]
            pen[k - 1, k - 1] = -(hi - mid) / (hi - lo)
            pen[k - 1, k] = 1.0
            pen[k - 1, k + 1] = -(mid - lo) / (hi - lo)
            pen[k - 1] *= _CURVATURE_PENALTY / scale[k]
        free = [True, True, True]  # sample, attention, context: refit without a negative one
        robust = np.ones_like(y)  # Huber weights: a step slowed by a neighbour counts less
        for _ in range(6):
            cols = list(range(len(KNOTS))) + [len(KNOTS) + j for j in range(3) if free[j]]
            rw = w * robust
            a = np.concatenate([x[:, cols] * rw[:, None], pen[:, cols]], 0)
            b = np.concatenate([y * rw, np.zeros(len(pen))])
            coef, *_ = np.linalg.lstsq(a, b, rcond=None)
            full = np.zeros(x.shape[1])
            full[cols] = coef
            negative = [j for j in range(3) if free[j] and full[len(KNOTS) + j] < 0]
            for j in negative:
                free[j] = False
            residual = np.abs(x @ full - y) / np.maximum(y, 1e-9)
            robust = np.minimum(1.0, _HUBER / np.maximum(residual, 1e-12))
        return cls(tuple(float(v) for v in full[:len(KNOTS)]), float(full[-3]),
                   float(full[-2]), float(full[-1]))

    def to_dict(self) -> dict[str, Any]:
        return {"knots": list(KNOTS), "knot_ms": list(self.knot_ms),
                "sample_ms": self.sample_ms, "attn_ms": self.attn_ms, "ctx_ms": self.ctx_ms}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepCost:
        if list(data.get("knots", KNOTS)) != list(KNOTS):
            raise ValueError(f"step cost knots must be {list(KNOTS)}")
        return cls(tuple(float(v) for v in data["knot_ms"]), float(data["sample_ms"]),
                   float(data["attn_ms"]), float(data["ctx_ms"]))


def _mape(pairs: Sequence[tuple[float, float]]) -> float:
    return float(np.mean([abs(p - y) / y for p, y in pairs])) if pairs else 0.0


@dataclass(frozen=True)
class SpeedModel:
    ttft_coef: tuple[float, float, float]
    tpot_coef: tuple[float, float, float]
    step: StepCost | None = None

    def ttft_ms(self, prompt_len: int) -> float:
        if self.step is not None:
            return self.step.ms(prompt_len, 1, prompt_len * (prompt_len + 1) / 2, 0)
        a0, a1, a2 = self.ttft_coef
        return a0 + a1 * prompt_len + a2 * prompt_len * prompt_len

    def tpot_ms(self, batch: int, context: int) -> float:
        if self.step is not None:
            return self.step.ms(batch, batch, 0.0, batch * context)
        b0, b1, b2 = self.tpot_coef
        return b0 + b1 * batch + b2 * batch * context

    def step_ms(self, num_decodes: int, decode_contexts: int,
                chunks: Sequence[tuple[int, int]], sampled: int) -> float:
        """One step: ``num_decodes`` decodes reading ``decode_contexts`` context tokens in
        all, prompt chunks as (start, tokens), ``sampled`` rows sampled. Without a step
        cost: the per-request forms added (a decode step, plus each chunk's share of its
        prompt's TTFT)."""
        if self.step is not None:
            tokens, attn = chunk_attention(chunks)
            return self.step.ms(num_decodes + tokens, sampled, attn, decode_contexts)
        b0, b1, b2 = self.tpot_coef
        ms = (b0 + b1 * num_decodes + b2 * decode_contexts) if num_decodes else self.ttft_coef[0]
        a0, a1, a2 = self.ttft_coef
        for start, n in chunks:
            ms += a1 * n + a2 * ((start + n) ** 2 - start * start)
        return max(ms, 0.01)

    @classmethod
    def fit(cls, prefill: Sequence[PrefillSample], decode: Sequence[DecodeSample],
            steps: Sequence[StepSample] = (), step_weights: Sequence[float] | None = None
            ) -> SpeedModel:
        """Needs at least 3 prefill and 3 decode samples (distinct enough to fit 3 terms);
        the step cost is fitted (``step_weights``: each step sample's weight) when
        ``steps`` holds at least 3 with a prompt chunk and 3 of decodes only."""
        if len(prefill) < 3 or len(decode) < 3:
            raise ValueError("fitting needs at least 3 prefill and 3 decode samples, got "
                             f"{len(prefill)} and {len(decode)}")
        lens = np.array([p[0] for p in prefill], dtype=np.float64)
        ttft = np.array([p[1] for p in prefill], dtype=np.float64)
        a = _lstsq_relative(np.stack([np.ones_like(lens), lens, lens * lens], 1), ttft)
        b_size = np.array([d[0] for d in decode], dtype=np.float64)
        ctx = np.array([d[1] for d in decode], dtype=np.float64)
        tpot = np.array([d[2] for d in decode], dtype=np.float64)
        b = _lstsq_relative(np.stack([np.ones_like(b_size), b_size, b_size * ctx], 1), tpot)
        with_prompt = sum(1 for s in steps if s[3] > 0)
        step = (StepCost.fit(steps, step_weights) if min(with_prompt, len(steps) - with_prompt)
                >= MIN_STEP_SAMPLES else None)
        return cls(tuple(float(v) for v in a), tuple(float(v) for v in b), step)  # type: ignore[arg-type]

    def per_request_forms(self) -> SpeedModel:
        """xllm-service's forms alone (what the fit's comparison reports)."""
        return SpeedModel(self.ttft_coef, self.tpot_coef)

    def errors(self, prefill: Sequence[PrefillSample], decode: Sequence[DecodeSample]
               ) -> tuple[float, float]:
        """Mean absolute percentage error of TTFT and of TPOT on these samples."""
        return (_mape([(self.ttft_ms(n), y) for n, y in prefill]),
                _mape([(self.tpot_ms(b, c), y) for b, c, y in decode]))

    def step_error(self, steps: Sequence[StepSample]) -> float:
        """Mean absolute percentage error of ``step_ms`` on step samples (the per-request
        forms price a step as :meth:`step_ms` does without a step cost)."""
        pairs = []
        for tokens, decodes, sampled, attn, ctx, ms in steps:
            if self.step is not None:
                pairs.append((self.step.ms(tokens, sampled, attn, ctx), ms))
                continue
            # A sample does not list its chunks: priced as one chunk of the same tokens and
            # attention pairs (exact for a step with one prompt chunk).
            n = tokens - decodes
            start = max(0.0, attn / n - (n + 1) / 2) if n > 0 else 0.0
            pairs.append((self.step_ms(decodes, ctx, [(round(start), n)] if n > 0 else [],
                                       sampled), ms))
        return _mape(pairs)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ttft_coef": list(self.ttft_coef),
                               "tpot_coef": list(self.tpot_coef)}
        if self.step is not None:
            out["step"] = self.step.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SpeedModel:
        """From :meth:`to_dict`'s JSON (``step`` optional). Raises ValueError, saying what
        is wrong, on anything else."""
        try:
            ttft = tuple(float(v) for v in data["ttft_coef"])
            tpot = tuple(float(v) for v in data["tpot_coef"])
            step = StepCost.from_dict(data["step"]) if data.get("step") else None
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError("not a speed model (want ttft_coef and tpot_coef, 3 numbers "
                             f"each, and optionally a step cost): {e}") from None
        if len(ttft) != 3 or len(tpot) != 3:
            raise ValueError("ttft_coef and tpot_coef need 3 numbers each")
        if not all(math.isfinite(v) for v in (*ttft, *tpot)):
            raise ValueError("speed model coefficients must be finite")
        return cls(ttft, tpot, step)  # type: ignore[arg-type]


class OnlineSpeedModel:
    """A window of recent samples, plus the profile's (kept for good), and the model fitted
    to them all. Step samples keep two windows, steps with a prompt chunk and decode-only
    steps, so a decode-heavy stretch does not push every prompt out of the fit.

    The fit runs when the model is read (the instance's heartbeat reads it), once both
    kinds have 3 samples, and again once ``refit_every`` new samples have come and
    ``min_interval_s`` has passed since the last fit: a fit takes a few ms, which adding a
    sample after every step must not cost."""

    def __init__(self, window: int = 512, refit_every: int = 32,
                 min_interval_s: float = 2.0) -> None:
        self.prefill: deque[PrefillSample] = deque(maxlen=window)
        self.decode: deque[DecodeSample] = deque(maxlen=window)
        self.prompt_steps: deque[StepSample] = deque(maxlen=window)
        self.decode_steps: deque[StepSample] = deque(maxlen=window)
        self.base_prefill: list[PrefillSample] = []
        self.base_decode: list[DecodeSample] = []
        self.base_steps: list[StepSample] = []
        self.refit_every = refit_every
        self.min_interval_s = min_interval_s
        self.tap: list[StepSample] | None = None  # set: every step sample is copied here too
        self._model: SpeedModel | None = None
        self._since = 0
        self._fitted_at = float("-inf")

    def seed(self, prefill: Sequence[PrefillSample], decode: Sequence[DecodeSample],
             steps: Sequence[StepSample] = ()) -> None:
        """A profile's samples: always part of the fit (refitted at the next read)."""
        self.base_prefill, self.base_decode = list(prefill), list(decode)
        self.base_steps = list(steps)
        self._model = None

    @property
    def model(self) -> SpeedModel | None:
        n_prefill, n_decode = self.num_samples
        if n_prefill < 3 or n_decode < 3:
            return self._model
        if self._model is None or (self._since >= self.refit_every and time.monotonic()
                                   - self._fitted_at >= self.min_interval_s):
            self._refit()
        return self._model

    @property
    def num_samples(self) -> tuple[int, int]:
        return (len(self.base_prefill) + len(self.prefill),
                len(self.base_decode) + len(self.decode))

    @property
    def num_step_samples(self) -> int:
        return len(self.base_steps) + len(self.prompt_steps) + len(self.decode_steps)

    def add_prefill(self, prompt_len: int, ms: float) -> None:
        self.prefill.append((prompt_len, ms))
        self._since += 1

    def add_decode(self, batch: int, context: int, ms: float) -> None:
        self.decode.append((batch, context, ms))
        self._since += 1

    def add_step(self, tokens: int, decodes: int, sampled: int, attn: float, ctx: int,
                 ms: float) -> None:
        sample = (tokens, decodes, sampled, attn, ctx, ms)
        (self.prompt_steps if attn > 0 else self.decode_steps).append(sample)
        if self.tap is not None:
            self.tap.append(sample)
        self._since += 1

    def _refit(self) -> None:
        # The profile's step samples weigh less as the instance's own steps of the same kind
        # come in: the machine's speed now is what the planner needs (this one's drifts by
        # tens of percent within minutes), the profile covers the shapes the traffic has
        # not shown.
        fade = {True: 1.0 / (1.0 + len(self.prompt_steps) / _BASE_FADE),
                False: 1.0 / (1.0 + len(self.decode_steps) / _BASE_FADE)}
        weights = [fade[s[3] > 0] for s in self.base_steps]
        weights += [1.0] * (len(self.prompt_steps) + len(self.decode_steps))
        self._model = SpeedModel.fit(
            self.base_prefill + list(self.prefill), self.base_decode + list(self.decode),
            self.base_steps + list(self.prompt_steps) + list(self.decode_steps), weights)
        self._since = 0
        self._fitted_at = time.monotonic()


class Profile(NamedTuple):
    prefill: list[PrefillSample]
    decode: list[DecodeSample]
    steps: list[StepSample]


def profile_engine(engine: Any, prompt_lens: Sequence[int] = (64, 256, 512, 1024),
                   batches: Sequence[int] = (1, 2, 4, 8, 16, 32),
                   contexts: Sequence[int] = (128, 512), decode_steps: int = 8,
                   seed: int = 0) -> Profile:
    """Measures an idle ``LLMEngine``: each prompt length's time to the first token alone
    (best of 2); then, for each context, the largest batch of prompts of that length, whose
    requests end in turns so the same batch decodes at each of ``batches`` for about
    ``decode_steps`` steps (each a decode sample: the mean of those steps), with a prompt
    beside the decodes as each batch size begins; and batches of up to 4 at a context of
    1024 (or twice the longest, within the model's length). Every step the engine takes is a step
    sample (the batched prompts, prompts behind a cached head, prompts beside decodes among
    them). Random token ids; nothing else may run meanwhile."""
    from xllm.sampling_params import SamplingParams

    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    sizes = sorted(set(batches), reverse=True)
    phase = decode_steps + 2  # decode steps per batch size (one spare at each end)
    room = engine.max_model_len - phase * len(sizes) - 2  # a profile prompt, at most
    if room < 16:
        raise ValueError(f"max_model_len {engine.max_model_len} leaves no room for a speed "
                         f"profile of {len(sizes)} batch sizes x {phase} steps")
    prompt_lens = sorted({min(n, room) for n in prompt_lens})
    contexts = sorted({min(c, room) for c in contexts})
    ids = iter(range(10**9))

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(n)]

    def drain() -> None:
        while engine.has_unfinished_requests():
            engine.step()

    tap: list[StepSample] = []
    engine.speed.tap = tap
    try:
        prefill: list[PrefillSample] = []
        one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        for n in prompt_lens:
            best = float("inf")
            for _ in range(2):
                engine.add_request(f"profile-{next(ids)}", prompt(n), one)
                t0 = time.perf_counter()
                drain()
                best = min(best, time.perf_counter() - t0)
            prefill.append((n, 1e3 * best))
        # Prompts whose head is cached (with prefix caching): the tail's step has the tokens
        # of a short prompt and the attention of a long one, which tells the two apart.
        head = prompt(min(prompt_lens[-1], room // 2))
        engine.add_request(f"profile-{next(ids)}", head, one)
        drain()
        for tail in (len(head) // 4, len(head) // 2):
            engine.add_request(f"profile-{next(ids)}", head + prompt(max(tail, 1)), one)
            drain()
        decode: list[DecodeSample] = []
        # A long context at small batches too: serving decodes at contexts the short ones do
        # not reach, where context and batch move together (their costs then look alike).
        long_ctx = min(max(2 * contexts[-1], 1024), room)
        passes = [(ctx, sizes) for ctx in contexts]
        if long_ctx > contexts[-1]:
            passes.append((long_ctx, [b for b in sizes if b <= 4] or sizes[-1:]))
        for ctx, pass_sizes in passes:
            # Request r lasts through every batch size larger than r: the batch shrinks
            # through ``pass_sizes`` by itself, one prefill of the largest batch serving all.
            for r in range(pass_sizes[0]):
                last = max(i for i, b in enumerate(pass_sizes) if b > r)
                params = SamplingParams(temperature=0.0, max_tokens=1 + phase * (last + 1),
                                        ignore_eos=True)
                engine.add_request(f"profile-{next(ids)}", prompt(ctx), params)
            start = len(tap)
            seen: set[int] = set()
            while engine.has_unfinished_requests():
                running = sum(1 for r in engine.scheduler.requests.values()
                              if r.num_computed_tokens >= r.num_tokens - 1)
                if running in pass_sizes and running not in seen and running == len(
                        engine.scheduler.requests):
                    seen.add(running)  # a batch size begins: a prompt beside its decodes
                    engine.add_request(f"profile-{next(ids)}", prompt(min(ctx, 256)), one)
                engine.step()
            by_size: dict[int, list[StepSample]] = {}
            for sample in tap[start:]:
                if sample[3] == 0 and sample[1] in pass_sizes:  # decodes alone
                    by_size.setdefault(sample[1], []).append(sample)
            for b in sorted(by_size):
                steps = by_size[b][1:-1] or by_size[b]  # not a size's first and last step
                decode.append((b, round(sum(s[4] for s in steps) / (b * len(steps))),
                               sum(s[5] for s in steps) / len(steps)))
    finally:
        engine.speed.tap = None
    return Profile(prefill, decode, tap)
