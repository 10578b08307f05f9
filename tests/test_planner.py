"""The PD planner's decisions on synthetic load: the split follows the traffic's mix, and
hysteresis and dwell time keep it from flapping."""

from __future__ import annotations

import math

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
    from xllm.service.planner import _mixed_tpot, _mixed_tpot_attainment

    traffic = Traffic(rate=4.0, prompt_len=1000, output_len=100)
    # The per-request forms: the mean is the decode step stretched by the prompts' share.
    rate = traffic.rate / 4
    forms = _mixed_tpot(MODEL, rate, 1000, 100, 1050)
    rho = rate * (MODEL.ttft_ms(1000) - MODEL.ttft_coef[0]) / 1000
    batch = max(1, round(rate * 100 * forms.tpot_ms / 1000))
    assert forms.tpot_ms == pytest.approx(MODEL.tpot_ms(batch, 1050) / (1 - rho), rel=1e-6)
    # A step cost where decodes beside a prompt cost next to nothing: the prompt-carrying
    # steps give every decode a token too, so TPOT is below the stretched decode step.
    step = StepCost(tuple(8.0 + 0.35 * (k - 1) for k in KNOTS), 0.0, 0.0, 0.0)
    cheap = SpeedModel(MODEL.ttft_coef, MODEL.tpot_coef, step)
    mixed = _mixed_tpot(cheap, rate, 1000, 100, 1050)
    s = cheap.ttft_ms(1000) / 1000
    assert mixed.tpot_ms < cheap.tpot_ms(1, 1050) / (1 - rate * s)
    # Scored per request: a request meets the SLO when few enough prompt steps (each adding
    # m - d over its 100 tokens) land in its decoding, a Poisson count.
    share = _mixed_tpot_attainment(mixed, 100, 12.0)
    hits = rate * 100 * mixed.decode_ms / 1000
    allowed = math.floor((12.0 - mixed.decode_ms) * 100 / (mixed.prompt_step_ms - mixed.decode_ms))
    assert allowed >= 0
    assert share == pytest.approx(sum(math.exp(-hits) * hits ** i / math.factorial(i)
                                      for i in range(allowed + 1)), rel=1e-9)
    assert _mixed_tpot_attainment(mixed, 100, 30.0) > share  # more prompt steps allowed
    assert _mixed_tpot_attainment(mixed, 100, None) == 1.0
    assert _mixed_tpot_attainment(mixed, 100, 4.0) == 0.0  # even a decode step misses it
    p = predict(Split(0, 0), 4, cheap, traffic, 3000, 12.0)
    assert p.tpot_ms == pytest.approx(mixed.tpot_ms) and p.score == pytest.approx(share)


def test_a_decode_split_is_scored_by_the_share_of_requests_whose_batch_meets_the_slo() -> None:
    from xllm.service.planner import _decode_tpot_attainment

    # MODEL's TPOT at context 1050: 8 + 0.6 B + 0.0015 B x 1050 = 8 + 2.175 B; a 30 ms SLO
    # holds up to B = 10, so a request meets it when at most 9 others decode beside it.
    limit = max(b for b in range(1, 50) if MODEL.tpot_ms(b, 1050) <= 30)
    assert limit == 10
    tpot = 25.0
    rate = 3.0  # per decode instance: a mean of rate x Lo x TPOT = 7.5 others
    share = _decode_tpot_attainment(MODEL, tpot, rate, 100, 1050, 30.0)
    mean = rate * 100 * tpot / 1000
    assert share == pytest.approx(sum(math.exp(-mean) * mean ** i / math.factorial(i)
                                      for i in range(limit)), rel=1e-9)
    assert 0.5 < share < 1.0  # the mean meets the SLO, not every request
    assert _decode_tpot_attainment(MODEL, tpot, rate, 100, 1050, 9.0) == 0.0  # none can
    assert _decode_tpot_attainment(MODEL, float("inf"), rate, 100, 1050, 30.0) == 0.0
