"""The PD planner's speed model: its fit recovers known coefficients, its error is relative,
the step cost prices mixed and batched steps the per-request forms cannot, the online
window refits, and a profile of the real demo engine fits it closely."""

from __future__ import annotations

import random

import pytest

from xllm.engine.speed_model import (
    KNOTS,
    OnlineSpeedModel,
    SpeedModel,
    StepCost,
    chunk_attention,
    profile_engine,
)


def _synthetic(noise: float, seed: int = 0) -> tuple[list, list]:
    rng = random.Random(seed)
    true = SpeedModel((5.0, 0.2, 3e-5), (20.0, 1.5, 0.004))
    prefill = [(n, true.ttft_ms(n) * (1 + rng.uniform(-noise, noise)))
               for n in (32, 64, 128, 256, 512, 1024, 2048, 4096)]
    decode = [(b, c, true.tpot_ms(b, c) * (1 + rng.uniform(-noise, noise)))
              for b in (1, 2, 4, 8, 16, 32) for c in (128, 512, 2048)]
    return prefill, decode


def test_fit_recovers_the_coefficients_and_reports_relative_error() -> None:
    prefill, decode = _synthetic(noise=0.0)
    model = SpeedModel.fit(prefill, decode)
    assert model.ttft_coef == pytest.approx((5.0, 0.2, 3e-5), rel=1e-6)
    assert model.tpot_coef == pytest.approx((20.0, 1.5, 0.004), rel=1e-6)
    assert model.errors(prefill, decode) == pytest.approx((0.0, 0.0), abs=1e-9)
    noisy_p, noisy_d = _synthetic(noise=0.05, seed=1)
    err_ttft, err_tpot = SpeedModel.fit(noisy_p, noisy_d).errors(noisy_p, noisy_d)
    assert 0 < err_ttft < 0.05 and 0 < err_tpot < 0.05
    with pytest.raises(ValueError, match="at least 3"):
        SpeedModel.fit(prefill[:2], decode)


def test_online_model_refits_on_its_window() -> None:
    online = OnlineSpeedModel(window=64, refit_every=8, min_interval_s=0)
    prefill, decode = _synthetic(noise=0.0)
    for p in prefill:
        online.add_prefill(*p)
    assert online.model is None  # no decode samples yet
    for d in decode[:3]:
        online.add_decode(*d)
    first = online.model
    assert first is not None
    for d in decode[3:]:
        online.add_decode(*d)
    assert online.model is not first  # refitted as samples came
    assert online.model.tpot_coef == pytest.approx((20.0, 1.5, 0.004), rel=1e-6)
    # Adding a sample never fits (it runs after every engine step); a read refits, at most
    # once per min_interval_s.
    slow = OnlineSpeedModel(window=64, refit_every=8, min_interval_s=3600)
    for p in prefill:
        slow.add_prefill(*p)
    for d in decode[:3]:
        slow.add_decode(*d)
    first = slow.model
    assert first is not None and slow.model is first
    for d in decode[3:]:
        slow.add_decode(*d)
    assert slow.model is first  # the interval has not passed


def _true_step(tokens: int, sampled: int, attn: float, ctx: int) -> float:
    """A step cost shaped like this CPU's: flat while reading the weights dominates (up to
    8 rows), then linear in the rows; plus the LM head per sampled row and attention."""
    return 10.0 + 0.5 * max(0, tokens - 8) + 0.3 * sampled + 2.0 * attn / 1e6 + 0.5 * ctx / 1e3


def _step_samples(noise: float, seed: int = 0) -> list:
    rng = random.Random(seed)
    samples = []

    def add(decodes: int, ctx: int, chunks: list[tuple[int, int]], sampled: int) -> None:
        tokens, attn = chunk_attention(chunks)
        ms = _true_step(decodes + tokens, sampled, attn, ctx) * (1 + rng.uniform(-noise, noise))
        samples.append((decodes + tokens, decodes, sampled, attn, ctx, ms))

    for b in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48):  # decodes alone
        for c in (128, 512, 1024):
            add(b, b * c, [], b)
    for n in (16, 64, 256, 512, 1024, 2048):  # a prompt alone, and in two chunks
        add(0, 0, [(0, n)], 1)
        add(0, 0, [(0, n // 2)], 0)
        add(0, 0, [(n // 2, n - n // 2)], 1)
    add(0, 0, [(0, 1000), (0, 1000)], 2)  # two prompts in one step
    for b in (2, 8, 16):  # a prompt chunk beside decodes
        add(b, b * 600, [(0, 900)], b + 1)
    return samples


def test_step_cost_recovers_a_kinked_cost_and_prices_mixed_steps() -> None:
    samples = _step_samples(noise=0.0)
    step = StepCost.fit(samples)
    for tokens, _decodes, sampled, attn, ctx, ms in samples:
        assert step.ms(tokens, sampled, attn, ctx) == pytest.approx(ms, rel=0.02)
    # The kink at 8 rows, which no line in the batch catches: batch 4 and 8 cost the same.
    assert step.ms(4, 4, 0, 4000) == pytest.approx(_true_step(4, 4, 0, 4000), rel=0.02)
    assert step.ms(24, 24, 0, 24000) == pytest.approx(_true_step(24, 24, 0, 24000), rel=0.02)
    assert step.sample_ms == pytest.approx(0.3, rel=0.1) and step.attn_ms > 0
    # The per-request forms price the same steps much worse (mixed and batched steps, and the
    # kink); with the step cost the model prices them as measured.
    prefill = [(n, _true_step(n, 1, n * (n + 1) / 2, 0)) for n in (16, 64, 256, 512, 1024, 2048)]
    decode = [(b, c, _true_step(b, b, 0, b * c)) for b in (1, 2, 4, 8, 16, 32) for c in (128, 512)]
    model = SpeedModel.fit(prefill, decode, samples)
    assert model.step is not None
    assert model.step_error(samples) < 0.02 < model.per_request_forms().step_error(samples)
    assert model.tpot_ms(8, 512) == pytest.approx(_true_step(8, 8, 0, 8 * 512), rel=0.02)
    assert model.ttft_ms(1000) == pytest.approx(_true_step(1000, 1, 500500, 0), rel=0.02)
    mixed = model.step_ms(8, 8 * 600, [(0, 900)], 9)
    assert mixed == pytest.approx(_true_step(908, 9, 900 * 901 / 2, 4800), rel=0.02)
    # Noisy samples: still close, and the noise shows as error.
    noisy = _step_samples(noise=0.05, seed=1)
    err = SpeedModel.fit(prefill, decode, noisy).step_error(noisy)
    assert 0 < err < 0.05
    # A round trip through its JSON form; bad ones are refused with the reason.
    assert SpeedModel.from_dict(model.to_dict()) == model
    with pytest.raises(ValueError, match="knot"):
        StepCost(step.knot_ms[:3], 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="speed model"):
        SpeedModel.from_dict({"ttft_coef": [1, 2, 3], "tpot_coef": [1, 2, 3],
                              "step": {"knot_ms": [1.0] * len(KNOTS)}})


def test_sparse_samples_fall_back_or_interpolate() -> None:
    samples = _step_samples(noise=0.0)
    prompts = [s for s in samples if s[3] > 0]
    decodes = [s for s in samples if s[3] == 0]
    prefill = [(n, 1.0 + n) for n in (16, 64, 256)]
    decode = [(b, 128, 10.0 + b) for b in (1, 4, 16)]
    # Too few steps of either kind: no step cost, the per-request forms price everything.
    model = SpeedModel.fit(prefill, decode, prompts[:2] + decodes)
    assert model.step is None
    assert model.step_ms(4, 512, [], 4) == pytest.approx(model.tpot_ms(4, 128))
    # Decodes at batch 1 and 32 only: the knots between follow the line through them.
    ends = [s for s in decodes if s[0] in (1, 32)] + prompts
    step = StepCost.fit(ends)
    lo, hi = step.ms(1, 1, 0, 128), step.ms(32, 32, 0, 32 * 128)
    assert lo < step.ms(8, 8, 0, 8 * 128) < hi


def test_profile_of_the_demo_engine_fits(demo_model_dir) -> None:  # noqa: ANN001
    from xllm.config import EngineConfig
    from xllm.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(demo_model_dir), dtype="float32",
                                    num_kv_blocks=400, max_num_batched_tokens=1024),
                       progress=False)
    prefill, decode, steps = profile_engine(engine, prompt_lens=(32, 128, 256, 512),
                                            batches=(1, 4, 8), contexts=(64, 256),
                                            decode_steps=4)
    assert [n for n, _ in prefill] == [32, 128, 256, 512]
    # 3 batch sizes at each of the 2 contexts, and 4 and 1 at a long context (1024 here)
    assert len(decode) == 8 and all(ms > 0 for *_, ms in decode)
    assert sorted(b for b, c, _ in decode if c > 1000) == [1, 4]
    assert prefill[-1][1] > prefill[0][1]  # longer prompts take longer
    # Every step was a step sample: among them the prompts alone, the decodes, batched
    # prompts (4 and 8 prompts of 256 tokens need more than one 1024-token step) and a prompt
    # beside decodes after each decode point.
    assert all(ms > 0 for *_, ms in steps)
    assert any(tokens == 1024 and decodes == 0 for tokens, decodes, *_ in steps)
    assert sum(1 for tokens, decodes, *_ in steps if decodes and tokens > decodes) >= 6
    model = SpeedModel.fit(prefill, decode, steps)
    assert model.step is not None
    err_ttft, err_tpot = model.errors(prefill, decode)
    assert err_ttft < 0.5 and err_tpot < 0.5  # a loose bound: a shared CI machine is noisy
    assert model.step_error(steps) < 0.5
    # The engine's own steps fed its online model meanwhile: each prompt alone was a prefill
    # sample of its length, each decode step a (batch, context) sample.
    online = engine.speed
    assert online.model is not None
    assert {n for n, _ in online.prefill} >= {32, 128, 256, 512}
    assert {b for b, _, _ in online.decode} >= {1, 4, 8}
    assert len(online.prompt_steps) + len(online.decode_steps) >= len(steps)
    online.seed(prefill, decode, steps)  # what --profile-speed does: kept in every later fit
    assert online.num_samples == (len(online.prefill) + 4, len(online.decode) + len(decode))
    assert online.model is not None and online.model.step is not None


def test_the_instances_own_steps_outweigh_its_profile_as_they_come() -> None:
    # A profile taken while the machine ran fast; then every step is 30% slower (this CPU's
    # speed drifts by that much within minutes). The step cost follows the steps.
    profile = _step_samples(noise=0.0)
    prefill = [(n, _true_step(n, 1, n * (n + 1) / 2, 0)) for n in (64, 256, 1024)]
    decode = [(b, 512, _true_step(b, b, 0, b * 512)) for b in (1, 4, 16)]
    online = OnlineSpeedModel(refit_every=8, min_interval_s=0)
    online.seed(prefill, decode, profile)
    assert online.model is not None and online.model.step is not None
    assert online.model.ttft_ms(1000) == pytest.approx(_true_step(1000, 1, 500500, 0), rel=0.03)
    for _ in range(8):
        for sample in _step_samples(noise=0.0):
            online.add_step(*sample[:5], 1.3 * sample[5])
    slow = online.model.ttft_ms(1000) / _true_step(1000, 1, 500500, 0)
    assert 1.2 < slow < 1.31
    assert 1.2 < online.model.tpot_ms(8, 512) / _true_step(8, 8, 0, 4096) < 1.31
