"""The speed model a PD planner needs: TTFT as a function of prompt length, TPOT as a
function of batch size and context, per instance (issue 12).

    TTFT(L)      = a0 + a1 * L + a2 * L**2                      (ms; a prompt of L tokens)
    TPOT(B, ctx) = b0 + b1 * B + b2 * B * ctx                   (ms; B sequences of ~ctx tokens)

the forms xllm-service fits (quadratic prefill: attention is quadratic in the prompt;
decode: a fixed step cost, a per-sequence cost, and KV reads growing with batch x context).
:meth:`SpeedModel.fit` is ordinary least squares over samples, weighted by 1 / time so the
error is relative (short prompts matter as much as long ones); :meth:`SpeedModel.errors`
reports the mean absolute percentage error on any samples. :class:`OnlineSpeedModel` keeps
a window of recent samples (a registration profile, then step metrics) and refits.

:func:`profile_engine` measures the samples on a real engine (a short profile: prompts of a
few lengths, decode steps at a few batch sizes and contexts).

The engine keeps an :class:`OnlineSpeedModel` (``LLMEngine.speed``) fed from its own
steps: a step that is one whole prompt alone is a prefill sample, a step of decodes alone a
decode sample. ``xllm-server --profile-speed`` seeds it with a profile before the instance
registers (the samples stay in the fit, so the model covers lengths the traffic has not
shown yet); instances report the fitted coefficients in every heartbeat and the master's
PD planner (xllm.service.pd) plans with them.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["OnlineSpeedModel", "SpeedModel", "profile_engine"]

PrefillSample = tuple[int, float]  # (prompt tokens, ms to the first token)
DecodeSample = tuple[int, int, float]  # (batch size, mean context tokens, ms per step)


def _lstsq_relative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares of x @ c ~ y in relative error (rows scaled by 1 / y)."""
    w = 1.0 / np.maximum(y, 1e-9)
    coef, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
    return coef


@dataclass(frozen=True)
class SpeedModel:
    ttft_coef: tuple[float, float, float]
    tpot_coef: tuple[float, float, float]

    def ttft_ms(self, prompt_len: int) -> float:
        a0, a1, a2 = self.ttft_coef
        return a0 + a1 * prompt_len + a2 * prompt_len * prompt_len

    def tpot_ms(self, batch: int, context: int) -> float:
        b0, b1, b2 = self.tpot_coef
        return b0 + b1 * batch + b2 * batch * context

    @classmethod
    def fit(cls, prefill: Sequence[PrefillSample], decode: Sequence[DecodeSample]
            ) -> SpeedModel:
        """Needs at least 3 prefill and 3 decode samples (distinct enough to fit 3 terms)."""
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
        return cls(tuple(float(v) for v in a), tuple(float(v) for v in b))  # type: ignore[arg-type]

    def errors(self, prefill: Sequence[PrefillSample], decode: Sequence[DecodeSample]
               ) -> tuple[float, float]:
        """Mean absolute percentage error of TTFT and of TPOT on these samples."""
        def mape(pairs: list[tuple[float, float]]) -> float:
            return float(np.mean([abs(p - y) / y for p, y in pairs])) if pairs else 0.0

        return (mape([(self.ttft_ms(n), y) for n, y in prefill]),
                mape([(self.tpot_ms(b, c), y) for b, c, y in decode]))


class OnlineSpeedModel:
    """A window of recent samples, plus the profile's (kept for good), and the model fitted
    to them all (refitted every ``refit_every`` new samples once both kinds have enough)."""

    def __init__(self, window: int = 512, refit_every: int = 32) -> None:
        self.prefill: deque[PrefillSample] = deque(maxlen=window)
        self.decode: deque[DecodeSample] = deque(maxlen=window)
        self.base_prefill: list[PrefillSample] = []
        self.base_decode: list[DecodeSample] = []
        self.refit_every = refit_every
        self.model: SpeedModel | None = None
        self._since = 0

    def seed(self, prefill: Sequence[PrefillSample], decode: Sequence[DecodeSample]) -> None:
        """A profile's samples: always part of the fit (refitted now)."""
        self.base_prefill, self.base_decode = list(prefill), list(decode)
        self._since = self.refit_every
        self._tick(0)

    @property
    def num_samples(self) -> tuple[int, int]:
        return (len(self.base_prefill) + len(self.prefill),
                len(self.base_decode) + len(self.decode))

    def add_prefill(self, prompt_len: int, ms: float) -> None:
        self.prefill.append((prompt_len, ms))
        self._tick()

    def add_decode(self, batch: int, context: int, ms: float) -> None:
        self.decode.append((batch, context, ms))
        self._tick()

    def _tick(self, new: int = 1) -> None:
        self._since += new
        due = self.model is None or self._since >= self.refit_every
        n_prefill, n_decode = self.num_samples
        if due and n_prefill >= 3 and n_decode >= 3:
            self.model = SpeedModel.fit(self.base_prefill + list(self.prefill),
                                        self.base_decode + list(self.decode))
            self._since = 0


def profile_engine(engine: Any, prompt_lens: Sequence[int] = (64, 256, 512, 1024),
                   batches: Sequence[int] = (1, 4, 16, 32), contexts: Sequence[int] = (128, 512),
                   decode_steps: int = 8, seed: int = 0
                   ) -> tuple[list[PrefillSample], list[DecodeSample]]:
    """Measures an idle ``LLMEngine``: each prompt length's time to the first token alone
    (best of 2), and each (batch, context)'s decode step time (mean of ``decode_steps``
    steps after the prompts are in). Random token ids; nothing else may run meanwhile."""
    from xllm.sampling_params import SamplingParams

    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    room = engine.max_model_len - decode_steps - 2  # a profile request's prompt, at most
    prompt_lens = sorted({min(n, room) for n in prompt_lens})
    contexts = sorted({min(c, room) for c in contexts})
    ids = iter(range(10**9))

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(n)]

    def drain() -> None:
        while engine.has_unfinished_requests():
            engine.step()

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
    decode: list[DecodeSample] = []
    for ctx in contexts:
        for b in batches:
            params = SamplingParams(temperature=0.0, max_tokens=decode_steps + 2,
                                    ignore_eos=True)
            for _ in range(b):
                engine.add_request(f"profile-{next(ids)}", prompt(ctx), params)
            while any(r.num_computed_tokens < r.num_tokens - 1
                      for r in engine.scheduler.requests.values()):
                engine.step()  # the prompts, untimed
            engine.step()
            t0 = time.perf_counter()
            for _ in range(decode_steps):
                engine.step()
            decode.append((b, ctx + 1 + decode_steps // 2,
                           1e3 * (time.perf_counter() - t0) / decode_steps))
            drain()
    return prefill, decode
