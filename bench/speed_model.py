"""The PD planner's speed model on the demo engine: fitted on a short profile, checked on
points it did not see.

    python -m bench.speed_model [--json PATH]

Profiles an idle engine in this CPU's default (prompts of 64/256/512/1024 tokens; decode at
batch 1/2/4/8/16/32 with contexts 128/512; every step the engine takes meanwhile, batched
prompts and a prompt beside decodes among them), fits ``SpeedModel`` and reports the mean
absolute percentage error of both its forms on the profile and on held-out points (prompts
of 128/768/1536 tokens, the longest past the profile; batch 3/6/12/24 at contexts 256/1024,
the longer past the profile; and that profile's own steps):

- xllm-service's per-request forms (TTFT quadratic in the prompt length, TPOT linear in
  batch and batch x context; a step priced as their sum);
- the step cost (piecewise linear in the step's tokens, plus sampled rows, prompt attention
  and decode context).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from bench.throughput import _cpu_name
from xllm import _C
from xllm.config import EngineConfig
from xllm.engine.llm_engine import LLMEngine
from xllm.engine.speed_model import SpeedModel, profile_engine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    engine = LLMEngine(EngineConfig(model="demo", num_kv_blocks=4096,
                                    max_num_batched_tokens=2048, max_num_seqs=64),
                       progress=False)
    t0 = time.perf_counter()
    prefill, decode, steps = profile_engine(engine)
    profile_s = time.perf_counter() - t0
    held = profile_engine(engine, prompt_lens=(128, 768, 1536), batches=(3, 6, 12, 24),
                          contexts=(256, 1024), seed=1)
    model = SpeedModel.fit(prefill, decode, steps)
    forms = model.per_request_forms()

    def mape(m: SpeedModel) -> dict:
        fit, out = m.errors(prefill, decode), m.errors(held.prefill, held.decode)
        return {"fit": {"ttft": fit[0], "tpot": fit[1], "step": m.step_error(steps)},
                "held_out": {"ttft": out[0], "tpot": out[1], "step": m.step_error(held.steps)}}

    report = {"cpu": _cpu_name(), "isa": _C.detected_isa(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "profile_seconds": profile_s, "model": model.to_dict(),
              "ttft_coef": model.ttft_coef, "tpot_coef": model.tpot_coef,
              "mape": {"step_cost": mape(model), "per_request_forms": mape(forms)},
              "samples": {"prefill": len(prefill), "decode": len(decode), "steps": len(steps)},
              "held_out": {"prefill": [(n, ms, model.ttft_ms(n), forms.ttft_ms(n))
                                       for n, ms in held.prefill],
                           "decode": [(b, c, ms, model.tpot_ms(b, c), forms.tpot_ms(b, c))
                                      for b, c, ms in held.decode],
                           "steps": [list(s) for s in held.steps]}}
    print(json.dumps({k: report[k] for k in ("cpu", "profile_seconds", "samples", "mape")},
                     indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
