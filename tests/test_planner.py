"""The PD planner's decisions on synthetic load: the split follows the traffic's mix, and
hysteresis and dwell time keep it from flapping."""

from __future__ import annotations

import pytest

from xllm.engine.speed_model import SpeedModel
from xllm.service.planner import Planner, Split, Traffic, predict

# About the demo model on one core: 1k-token prompts in ~0.6 s, decode steps of 10-40 ms.
MODEL = SpeedModel((8.0, 0.35, 1e-4), (8.0, 0.6, 0.0015))


def test_predictions_follow_the_queueing_model() -> None:
    light = Traffic(rate=0.2, prompt_len=512, output_len=64)
    p = predict(Split(1, 1), 2, MODEL, light, None, None)
    s = MODEL.ttft_ms(512)
    rho = 0.2 * s / 1000
    assert p.ttft_ms == pytest.approx(s + rho * s / (2 * (1 - rho)))
    assert p.tpot_ms >= MODEL.tpot_ms(1, 544) and p.score == 1.0
    over = predict(Split(1, 3), 4, MODEL, Traffic(10.0, 4096, 16), 2000, 100)
    assert over.ttft_ms == float("inf") and over.score == 0.0  # one prefill cannot keep up


def test_the_split_follows_the_mix() -> None:
    planner = Planner(8, MODEL, slo_ttft_ms=3000, slo_tpot_ms=60, min_dwell_s=0,
                      allow_mixed=False)
    long_prompts = planner.decide(Traffic(rate=4.0, prompt_len=2000, output_len=32), now=0)
    assert long_prompts.switch and long_prompts.split.prefill >= 5
    long_outputs = planner.decide(Traffic(rate=4.0, prompt_len=100, output_len=1000), now=1)
    assert long_outputs.switch and long_outputs.split.decode >= 5
    assert "->" in long_outputs.reason


def test_hysteresis_and_dwell_time() -> None:
    planner = Planner(4, MODEL, slo_ttft_ms=3000, slo_tpot_ms=60, min_dwell_s=30,
                      allow_mixed=False)
    first = planner.decide(Traffic(1.5, 2000, 32), now=0)
    assert first.switch and first.split == Split(3, 1)
    # the mix turns right away: better elsewhere, but the last switch is too recent
    turned = planner.decide(Traffic(1.5, 100, 1000), now=10)
    assert not turned.switch and "ago" in turned.reason and turned.split == first.split
    later = planner.decide(Traffic(1.5, 100, 1000), now=40)
    assert later.switch and later.split == Split(1, 3)
    # the same traffic again: it stays (the current split is still best)
    again = planner.decide(Traffic(1.5, 100, 1000), now=100)
    assert not again.switch and "best" in again.reason


def test_a_margin_keeps_a_near_tie_where_it_is() -> None:
    planner = Planner(4, MODEL, slo_ttft_ms=None, slo_tpot_ms=None, min_dwell_s=0)
    d = planner.decide(Traffic(0.1, 128, 16), now=0)  # every split meets no-SLO: all 1.0
    assert not d.switch and d.split == Split(0, 0)
    with pytest.raises(ValueError, match="num_instances"):
        Planner(0, MODEL, slo_ttft_ms=1, slo_tpot_ms=1)


def test_mixed_prediction_prices_decodes_riding_the_prompt_steps() -> None:
    from xllm.engine.speed_model import KNOTS, StepCost
    from xllm.service.planner import _mixed_tpot

    traffic = Traffic(rate=4.0, prompt_len=1000, output_len=100)
    # The per-request forms: the decode step stretched by the prompts' share of the time.
    rate = traffic.rate / 4
    forms = _mixed_tpot(MODEL, rate, 1000, 100, 1050)
    rho = rate * (MODEL.ttft_ms(1000) - MODEL.ttft_coef[0]) / 1000
    batch = max(1, round(rate * 100 * forms / 1000))
    assert forms == pytest.approx(MODEL.tpot_ms(batch, 1050) / (1 - rho), rel=1e-6)
    # A step cost where decodes beside a prompt cost next to nothing: the prompt-carrying
    # steps give every decode a token too, so TPOT is below the stretched decode step.
    step = StepCost(tuple(8.0 + 0.35 * (k - 1) for k in KNOTS), 0.0, 0.0, 0.0)
    cheap = SpeedModel(MODEL.ttft_coef, MODEL.tpot_coef, step)
    tpot = _mixed_tpot(cheap, rate, 1000, 100, 1050)
    s = cheap.ttft_ms(1000) / 1000
    assert tpot < cheap.tpot_ms(1, 1050) / (1 - rate * s)
    p = predict(Split(0, 0), 4, cheap, traffic, 3000, 50)
    assert p.tpot_ms == pytest.approx(tpot)
