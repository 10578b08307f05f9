"""The dynamic PD controller the master runs: traffic metering, the moves that carry out a
split, and its decisions (with reasons) on synthetic load and speed models."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from xllm.engine.speed_model import SpeedModel
from xllm.service.pd import (
    PdController,
    TrafficMeter,
    assign_roles,
    current_split,
    load_speed_model,
    mean_speed_model,
)
from xllm.service.planner import Split
from xllm.service.registry import EmbeddedRegistry
from xllm.service.state import Capacity, InstanceInfo, InstanceLoad

MODEL = SpeedModel((0.0, 0.3, 0.0), (10.0, 0.2, 0.0))  # 1k-token prompt: 300 ms


def _views(roles: list[str], running: list[int] | None = None):  # noqa: ANN202
    reg = EmbeddedRegistry()
    views = []
    for i, role in enumerate(roles):
        v = reg.register(InstanceInfo(f"i{i}", f"127.0.0.1:{i + 1}", role=role,
                                      capacity=Capacity(8)))
        v.load = InstanceLoad(num_running=(running or [0] * len(roles))[i])
        views.append(v)
    return views


def test_the_meter_measures_rate_and_lengths_over_its_window() -> None:
    meter = TrafficMeter(window_s=10.0)
    assert meter.traffic(0.0) is None
    for i in range(20):
        meter.arrive(0.5 * i, 1000, 128)
    t = meter.traffic(10.0)
    assert t is not None and t.rate == pytest.approx(2.0) and t.prompt_len == 1000
    assert t.output_len == 128  # nothing finished yet: the asked-for lengths
    meter.finish(10.0, 40, 128)  # completions that stopped early: a third of their limit
    meter.finish(10.0, 45, 128)
    meter.finish(10.0, 43, 128)
    assert meter.traffic(10.0).output_len == pytest.approx(128 / 3)
    unlimited = TrafficMeter(window_s=10.0)
    unlimited.arrive(0.0, 10, None)
    assert unlimited.traffic(1.0).output_len == 128  # the default, until one finishes
    unlimited.finish(1.0, 40)
    unlimited.finish(1.0, 60)
    assert unlimited.traffic(1.0).output_len == 50  # then the finished outputs' mean
    later = meter.traffic(14.0)  # only the arrivals of the last 10 s remain: 4.0 .. 9.5
    assert later is not None and later.rate == pytest.approx(12 / 10)
    assert meter.traffic(20.0) is None  # none left


def test_current_split_and_the_fewest_moves() -> None:
    assert current_split(["mixed", "mixed"]) == Split(0, 0)
    assert current_split(["prefill", "decode", "mixed"]) == Split(1, 2)
    assert current_split(["prefill", "prefill"]) == Split(0, 0)  # no decode: whole requests
    views = _views(["mixed", "mixed", "mixed", "mixed"], running=[3, 0, 5, 1])
    moves = {v.instance_id: r for v, r in assign_roles(views, Split(1, 3))}
    assert len(moves) == 4 and sum(r == "prefill" for r in moves.values()) == 1
    assert moves["i1"] == "prefill"  # the idlest changes first
    views = _views(["prefill", "decode", "decode", "decode"], running=[1, 9, 2, 4])
    moves = [(v.instance_id, r) for v, r in assign_roles(views, Split(2, 2))]
    assert moves == [("i2", "prefill")]  # one move, the least busy decode instance
    assert assign_roles(views, Split(1, 3)) == []
    back = assign_roles(views, Split(0, 0))
    assert {r for _, r in back} == {"mixed"} and len(back) == 4


def test_speed_models_average_and_load_from_files(tmp_path: Path) -> None:
    other = SpeedModel((2.0, 0.5, 0.0), (20.0, 0.4, 0.002))
    mean = mean_speed_model([MODEL, other])
    assert mean is not None and mean.ttft_coef == (1.0, 0.4, 0.0)
    assert mean.ttft_ms(1000) == pytest.approx((MODEL.ttft_ms(1000) + other.ttft_ms(1000)) / 2)
    assert mean_speed_model([]) is None
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"model": {"ttft_coef": [1, 2, 3], "tpot_coef": [4, 5, 6]}}))
    assert load_speed_model(path) == SpeedModel((1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
    path.write_text(json.dumps({"ttft_coef": [1, 2]}))
    with pytest.raises(ValueError, match="speed model"):
        load_speed_model(path)


def _prefill_heavy(pd: PdController, now: float) -> None:
    for i in range(20):  # 2 req/s of 1k-token prompts, 128 tokens out
        pd.meter.arrive(now - 10 + 0.5 * i, 1000, 128)


def test_the_controller_switches_with_its_reasons_and_only_when_dynamic() -> None:
    views = _views(["mixed", "mixed"])
    static = PdController("static", slo_ttft_ms=2000, slo_tpot_ms=12, speed_model=MODEL)
    _prefill_heavy(static, 100.0)
    assert static.plan(100.0, views) == []
    dyn = PdController("dynamic", slo_ttft_ms=2000, slo_tpot_ms=12, min_dwell_s=30,
                       window_s=10)
    _prefill_heavy(dyn, 100.0)
    assert dyn.plan(100.0, views) == []
    assert dyn.last is not None and dyn.last.reason == "no speed model reported yet"
    for v in views:  # the instances' heartbeats carry their fitted models
        v.load.speed = MODEL
    moves = dyn.plan(100.0, views, wall=5000.0)
    assert sorted(r for _, r in moves) == ["decode", "prefill"]
    record = dyn.decisions[-1]
    assert record.switch and record.split == "all mixed" and record.target == "1P:1D"
    assert "attainment" in record.reason and record.traffic["prompt_len"] == 1000
    for v, role in moves:  # what the master does on the instances' answers
        v.info = replace(v.info, role=role)
    assert dyn.plan(101.0, views) == []  # in place: nothing to do
    assert "is best" in dyn.last.reason
    # The mix flips to short prompts at 8 req/s: one decode instance would hold about 9.5
    # sequences, and half its requests would miss the TPOT (10 at most meet it), so all
    # mixed is best again, but only after the dwell.
    for i in range(80):
        dyn.meter.arrive(101 + 0.125 * i, 10, 100)
    assert dyn.plan(111.0, views) == []
    assert "ago" in dyn.last.reason
    for i in range(80):
        dyn.meter.arrive(121 + 0.125 * i, 10, 100)
    later = dyn.plan(131.0, views)
    assert later and {r for _, r in later} == {"mixed"}
    assert len(dyn.decisions) == 2 and dyn.num_switches == 2
    assert json.dumps(dyn.view())  # what /cluster/pd serves


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="pd-policy"):
        PdController("adaptive")
    with pytest.raises(ValueError, match="slo_tpot_ms"):
        PdController("dynamic", slo_tpot_ms=0)
    with pytest.raises(ValueError, match="give slo_ttft_ms too"):
        PdController("static", overflow=True)


def test_heartbeats_carry_speed_models_and_bad_ones_are_dropped() -> None:
    from xllm.engine.speed_model import OnlineSpeedModel
    from xllm.service.proto import master_pb2
    from xllm.service.state import speed_to_proto

    online = OnlineSpeedModel()
    assert speed_to_proto(online) is None  # nothing fitted yet: nothing sent
    online.seed([(n, MODEL.ttft_ms(n)) for n in (64, 256, 1024)],
                [(b, 512, MODEL.tpot_ms(b, 512)) for b in (1, 4, 16)])
    msg = speed_to_proto(online)
    assert msg is not None and (msg.prefill_samples, msg.decode_samples) == (3, 3)
    load = InstanceLoad.from_proto(master_pb2.LoadReport(speed=msg))
    assert load.speed is not None
    assert load.speed.ttft_ms(1000) == pytest.approx(MODEL.ttft_ms(1000), rel=1e-6)
    assert load.speed.step is None and not msg.HasField("step")  # no step samples yet
    # With step samples the step cost travels too, and prices steps at the master as at
    # the instance.
    steps = [(b, b, b, 0.0, b * 512, MODEL.tpot_ms(b, 512)) for b in (1, 2, 4, 8, 16)]
    steps += [(n, 0, 1, n * (n + 1) / 2, 0, MODEL.ttft_ms(n)) for n in (64, 256, 512, 1024)]
    online.seed([(n, MODEL.ttft_ms(n)) for n in (64, 256, 1024)],
                [(b, 512, MODEL.tpot_ms(b, 512)) for b in (1, 4, 16)], steps)
    msg = speed_to_proto(online)
    assert msg is not None and msg.HasField("step") and msg.step_samples == len(steps)
    load = InstanceLoad.from_proto(master_pb2.LoadReport(speed=msg))
    assert load.speed == online.model and load.speed.step is not None
    assert load.speed.step_ms(3, 900, [(0, 500)], 4) == pytest.approx(
        online.model.step_ms(3, 900, [(0, 500)], 4))
    mean = mean_speed_model([load.speed, load.speed])
    assert mean is not None and mean.step == load.speed.step
    assert mean_speed_model([load.speed, MODEL]).step is None  # not every one has a step cost
    for bad in (master_pb2.SpeedModel(ttft_coef=[1, 2], tpot_coef=[1, 2, 3]),
                master_pb2.SpeedModel(ttft_coef=[1, 2, float("nan")], tpot_coef=[1, 2, 3]),
                master_pb2.SpeedModel(ttft_coef=[1, 2, 3], tpot_coef=[1, 2, 3],
                                      step=master_pb2.StepCost(knot_ms=[1.0, 2.0]))):
        assert InstanceLoad.from_proto(master_pb2.LoadReport(speed=bad)).speed is None
    assert InstanceLoad.from_proto(master_pb2.LoadReport()).speed is None
