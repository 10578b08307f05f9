"""Time one offline vLLM (CPU build) generate over token-id prompts; print one JSON line.

Runs in the vLLM venv made by ``bench/peers/setup.sh vllm`` and must not import xllm.
Input is a JSON object, from the file named by the first argument or from stdin:

    {"model": "/path/to/hf_dir", "prompts": [[1, 2, ...], ...], "max_tokens": 128,
     "dtype": "float32", "max_model_len": 1024}

It generates once as a warm-up (vLLM's first start also compiles its CPU kernels, which
takes minutes and is not timed), clears the prefix cache so the timed run prefills again,
then times ``LLM.generate`` greedily with ``ignore_eos``. The last stdout line is the result:

    {"engine": "vllm", "seconds": ..., "prompt_tokens": ..., "generated_tokens": ...,
     "startup_seconds": ..., "warmup_seconds": ..., "version": ..., "notes": [...]}

Threads: vLLM's CPU backend binds its OpenMP threads to the cores named by
VLLM_CPU_OMP_THREADS_BIND (e.g. ``0-1``); with VLLM_CPU_NUM_OF_RESERVED_CPU=0 it uses all
of them. The caller sets both; unset, vLLM picks one core here.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time


def _read_spec(argv: list[str]) -> dict:
    if len(argv) > 1 and argv[1] != "-":
        with open(argv[1]) as f:
            return json.load(f)
    return json.load(sys.stdin)


def _kv_cache_bytes(model_dir: str, tokens: int) -> int:
    """Room for `tokens` fp32 KV entries with a quarter to spare, at least 512 MiB."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    per_token = cfg["num_hidden_layers"] * 2 * kv_heads * head_dim * 4
    return max(512 << 20, tokens * per_token * 5 // 4)


def main(argv: list[str]) -> int:
    spec = _read_spec(argv)
    prompts: list[list[int]] = spec["prompts"]
    max_tokens = int(spec["max_tokens"])
    notes: list[str] = []

    import vllm
    from vllm import LLM, SamplingParams

    longest = max(len(p) for p in prompts) + max_tokens
    max_model_len = int(spec.get("max_model_len") or max(256, -(-longest // 256) * 256))
    kv_bytes = _kv_cache_bytes(spec["model"], len(prompts) * max_model_len)
    start = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        dtype=spec.get("dtype", "float32"),
        max_model_len=max_model_len,
        max_num_seqs=max(len(prompts), 1),
        # Without an explicit size the CPU backend reserves 92% of the machine's memory
        # (gpu_memory_utilization) and refuses to start when less is free.
        kv_cache_memory_bytes=kv_bytes,
        seed=0,
    )
    startup = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens,
                            ignore_eos=True)
    inputs = [{"prompt_token_ids": p} for p in prompts]

    start = time.perf_counter()
    llm.generate(inputs, params, use_tqdm=False)
    warmup = time.perf_counter() - start
    if hasattr(llm, "reset_prefix_cache"):
        llm.reset_prefix_cache()
    else:
        notes.append("prefix cache not reset between warm-up and timed run")

    # The median of `repeats` timed runs (bench.throughput --repeats), the prefix cache reset
    # before each.
    runs = []
    for i in range(int(spec.get("repeats", 1))):
        if i and hasattr(llm, "reset_prefix_cache"):
            llm.reset_prefix_cache()
        start = time.perf_counter()
        outputs = llm.generate(inputs, params, use_tqdm=False)
        runs.append(time.perf_counter() - start)
    seconds = statistics.median(runs)

    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    if generated != len(prompts) * max_tokens:
        notes.append(f"generated {generated} tokens, expected {len(prompts) * max_tokens}")
    result = {
        "engine": "vllm",
        "version": vllm.__version__,
        "seconds": seconds,
        "runs_seconds": runs,
        "prompt_tokens": sum(len(p) for p in prompts),
        "generated_tokens": generated,
        "startup_seconds": startup,
        "warmup_seconds": warmup,
        "dtype": spec.get("dtype", "float32"),
        "omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
        "kv_cache_bytes": kv_bytes,
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "first_output_ids": list(outputs[0].outputs[0].token_ids[:16]),
        "notes": notes,
    }
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
