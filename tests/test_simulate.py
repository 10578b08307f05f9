"""bench.simulate: the cluster simulator runs the master's routing and PD planner against
simulated instances; it is deterministic for a seed and its timings follow the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.simulate import (
    SimConfig,
    TraceRequest,
    main,
    serve_trace,
    simulate,
    synthetic_trace,
)
from xllm.engine.speed_model import KNOTS, SpeedModel, StepCost

MODEL = SpeedModel((7.0, 0.17, 4e-5), (5.0, 0.3, 0.0006))


def _strip(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("sim_wall_s",)}


def test_the_simulator_is_deterministic_for_a_seed() -> None:
    cfg = SimConfig(instances=6, policy="dynamic", slo_ttft_ms=3000, slo_tpot_ms=20)

    def run(seed: int) -> dict:
        trace = synthetic_trace("shift", 120, 8.0, 0, 0, 0.3, seed)
        return _strip(simulate(cfg, MODEL, trace))

    first, again, other = run(1), run(1), run(2)
    assert first == again
    assert first != other
    assert first["completed"] == first["requests"] > 500


def test_an_idle_instance_serves_a_request_in_the_models_time() -> None:
    trace = [TraceRequest(1.0, 1000, 11), TraceRequest(30.0, 500, 2)]
    report = simulate(SimConfig(instances=1, policy="mixed"), MODEL, trace)
    assert report["completed"] == 2
    ttft = sorted([MODEL.ttft_ms(1000), MODEL.ttft_ms(500)])
    assert report["ttft_ms"]["p50"] == pytest.approx(ttft[1], rel=1e-6)  # upper median
    # one sequence decoding: a step is TPOT(1, context)
    assert MODEL.tpot_ms(1, 1000) <= report["tpot_ms"]["p50"] <= MODEL.tpot_ms(1, 1012)


def test_with_a_step_cost_a_prompt_beside_decodes_costs_what_it_prices() -> None:
    # A step cost whose mixed step costs far more than the per-request forms' sum would.
    step = StepCost(tuple(5.0 + 0.8 * k for k in KNOTS), 0.5, 3.0, 0.4)
    model = SpeedModel(MODEL.ttft_coef, MODEL.tpot_coef, step)
    trace = [TraceRequest(1.0, 1000, 1000), TraceRequest(5.0, 500, 2)]
    report = simulate(SimConfig(instances=1, policy="mixed"), model, trace)
    assert report["completed"] == 2
    # the first prompt alone: one step of 1000 tokens sampling one row (the upper median)
    first = step.ms(1000, 1, 1000 * 1001 / 2, 0)
    assert report["ttft_ms"]["p50"] == pytest.approx(first)
    # the second arrives while the first decodes (context 1000-2000): one step of 501
    # tokens sampling 2 rows, after at most the decode step in progress
    second = 2 * report["ttft_ms"]["mean"] - first
    assert model.step_ms(1, 1000, [(0, 500)], 2) <= second + 1e-6
    assert second <= model.step_ms(1, 2000, [(0, 500)], 2) + step.ms(1, 1, 0, 2000) + 1e-6
    # the per-request forms would have priced it at far less
    assert second > 2 * MODEL.step_ms(1, 2000, [(0, 500)], 2)


def test_pd_handoffs_pay_the_transfer_and_dynamic_switches_with_the_mix() -> None:
    trace = [TraceRequest(1.0, 1000, 20)]
    pd = simulate(SimConfig(instances=2, policy="static:1", kv_ms_per_token=0.1), MODEL, trace)
    mixed = simulate(SimConfig(instances=2, policy="mixed"), MODEL, trace)
    # the same first token; the decode starts 100 ms later on the other instance
    assert pd["ttft_ms"]["p50"] == pytest.approx(mixed["ttft_ms"]["p50"])
    assert pd["tpot_ms"]["p50"] > mixed["tpot_ms"]["p50"]
    long_prompts = synthetic_trace("poisson", 120, 12.0, 2048, 32, 0.2, 0)
    dyn = simulate(SimConfig(instances=8, policy="dynamic", slo_ttft_ms=3000,
                             slo_tpot_ms=20), MODEL, long_prompts)
    assert dyn["switches"] >= 1
    assert "->" in dyn["decisions"][0]["reason"]
    last = dyn["timeline"][-1]
    assert last["prefill"] > last["decode"] > 0  # prefill-heavy traffic: mostly prefill


def test_a_recorded_serve_run_replays_as_a_trace(tmp_path: Path) -> None:
    log = {"runs": [{"requests": [
        {"ttft_ms": 5, "tpot_ms": 1, "output_tokens": 8, "prompt_tokens": 100, "start_s": 0.5},
        {"ttft_ms": 5, "tpot_ms": 1, "output_tokens": 4, "prompt_tokens": 50, "start_s": 0.1}]}]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(log))
    assert serve_trace(path) == [TraceRequest(0.1, 50, 4), TraceRequest(0.5, 100, 8)]
    out = tmp_path / "sim.json"
    model = tmp_path / "model.json"
    model.write_text(json.dumps({"ttft_coef": MODEL.ttft_coef, "tpot_coef": MODEL.tpot_coef}))
    assert main(["--instances", "2", "--policy", "mixed", "--trace", f"serve:{path}",
                 "--speed-model", str(model), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["results"][0]["completed"] == 2
    assert main(["--trace", "nope", "--speed-model", str(model)]) == 2


def test_a_simulated_instance_turning_prefill_hands_its_decodes_on() -> None:
    from bench.simulate import Simulation

    trace = [TraceRequest(0.1 * i, 300, 400) for i in range(6)]
    sim = Simulation(SimConfig(instances=3, policy="static:1"), MODEL, trace)
    decode = [i for i in sim.instances.values() if i.view.info.role == "decode"]
    sim.at(2.0, lambda t: decode[0].switch("prefill", t))
    report = sim.run()
    assert report["completed"] == 6 and sim.migrated >= 1
    assert not decode[0].running and decode[1].steps > decode[0].steps


def test_validate_replays_a_recorded_run_per_instance(tmp_path: Path) -> None:
    """--validate: a bench.pd record's request log replayed with each instance's own
    model; a record whose numbers are the simulation's own validates with no error."""
    from bench.simulate import validate

    fast = SpeedModel((5.0, 0.1, 1e-5), (4.0, 0.2, 0.0003))
    rows = [{"start_s": 0.4 * i, "prompt_tokens": 600, "output_tokens": 40, "ttft_ms": 0,
             "tpot_ms": 0} for i in range(30)]
    trace = [TraceRequest(r["start_s"], 600, 40) for r in rows]
    sim = simulate(SimConfig(instances=2, policy="static:1", slo_ttft_ms=4000,
                             slo_tpot_ms=60, prefill_max_num_batched_tokens=1024),
                   [MODEL, fast], trace)  # the prefill instance first
    models = [{"role": "decode", "ttft_coef": fast.ttft_coef, "tpot_coef": fast.tpot_coef},
              {"role": "prefill", "ttft_coef": MODEL.ttft_coef, "tpot_coef": MODEL.tpot_coef}]
    record = {"args": {"slo_ttft_ms": 4000, "slo_tpot_ms": 60,
                       "prefill_args": "--max-num-batched-tokens 1024"},
              "prefill+decode": {"speed_models_after": models, "serve": {
                  "requests": rows, "ttft_ms": sim["ttft_ms"], "tpot_ms": sim["tpot_ms"],
                  "goodput": sim["goodput"]}}}
    path = tmp_path / "pd.json"
    path.write_text(json.dumps(record))
    report = validate(path)
    assert [r["layout"] for r in report["layouts"]] == ["prefill+decode"]
    assert report["worst_error"] == pytest.approx(0.0, abs=1e-9)
    record["prefill+decode"]["speed_models_after"] = models[::-1][:1]
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="by role"):
        validate(path)
