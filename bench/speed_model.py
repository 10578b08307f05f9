"""The PD planner's speed model on the demo engine: fitted on a short profile, checked on
points it did not see.

    python -m bench.speed_model [--json PATH]

Profiles an idle engine in this CPU's default (prompts of 64/256/512/1024 tokens; decode at
batch 1/4/16/32 with contexts 128/512), fits ``SpeedModel`` (TTFT quadratic in the prompt
length, TPOT linear in batch and batch x context: xllm-service's forms), and reports its
mean absolute percentage error on the profile and on held-out points (prompts of 128/768/
1536 tokens, the longest past the profile; batch 2/8/24 at contexts 256/1024, the longer
past the profile).
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
    prefill, decode = profile_engine(engine)
    profile_s = time.perf_counter() - t0
    held_p, held_d = profile_engine(engine, prompt_lens=(128, 768, 1536), batches=(2, 8, 24),
                                    contexts=(256, 1024), seed=1)
    model = SpeedModel.fit(prefill, decode)
    fit_err = model.errors(prefill, decode)
    held_err = model.errors(held_p, held_d)
    report = {"cpu": _cpu_name(), "isa": _C.detected_isa(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "profile_seconds": profile_s, "ttft_coef": model.ttft_coef,
              "tpot_coef": model.tpot_coef,
              "fit_mape": {"ttft": fit_err[0], "tpot": fit_err[1]},
              "held_out_mape": {"ttft": held_err[0], "tpot": held_err[1]},
              "held_out": {"prefill": [(n, ms, model.ttft_ms(n)) for n, ms in held_p],
                           "decode": [(b, c, ms, model.tpot_ms(b, c)) for b, c, ms in held_d]}}
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
