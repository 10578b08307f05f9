"""The PD planner's speed model: its fit recovers known coefficients, its error is relative,
the online window refits, and a profile of the real demo engine fits it closely."""

from __future__ import annotations

import random

import pytest

from xllm.engine.speed_model import OnlineSpeedModel, SpeedModel, profile_engine


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
    online = OnlineSpeedModel(window=64, refit_every=8)
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


def test_profile_of_the_demo_engine_fits(demo_model_dir) -> None:  # noqa: ANN001
    from xllm.config import EngineConfig
    from xllm.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(demo_model_dir), dtype="float32",
                                    num_kv_blocks=400, max_num_batched_tokens=1024),
                       progress=False)
    prefill, decode = profile_engine(engine, prompt_lens=(32, 128, 256, 512),
                                     batches=(1, 4, 8), contexts=(64, 256), decode_steps=4)
    assert [n for n, _ in prefill] == [32, 128, 256, 512]
    assert len(decode) == 6 and all(ms > 0 for *_, ms in decode)
    assert prefill[-1][1] > prefill[0][1]  # longer prompts take longer
    model = SpeedModel.fit(prefill, decode)
    err_ttft, err_tpot = model.errors(prefill, decode)
    assert err_ttft < 0.5 and err_tpot < 0.5  # a loose bound: a shared CI machine is noisy
    # The engine's own steps fed its online model meanwhile: each prompt alone was a prefill
    # sample of its length, each decode step a (batch, context) sample.
    online = engine.speed
    assert online.model is not None
    assert {n for n, _ in online.prefill} >= {32, 128, 256, 512}
    assert {b for b, _, _ in online.decode} >= {1, 4, 8}
    online.seed(prefill, decode)  # what --profile-speed does: kept in every later fit
    assert online.num_samples == (len(online.prefill) + 4, len(online.decode) + 6)
