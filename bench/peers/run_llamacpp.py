"""Time llama.cpp (through llama-cpp-python) generating over token-id prompts; print one JSON line.

Runs in the venv made by ``bench/peers/setup.sh llamacpp`` and must not import xllm.
Input is a JSON object, from the file named by the first argument or from stdin:

    {"gguf": "/path/model.Q4_1.gguf", "prompts": [[1, 2, ...], ...], "max_tokens": 128,
     "n_threads": 2}

All prompts run together as llama.cpp's own parallel decoding does (examples/parallel):
one sequence id per prompt in a single context, prompts prefilled in ``n_batch``-token
llama_decode calls, then one llama_decode per step carrying every sequence's next token,
greedy argmax over the step's logits, no end-of-sequence check (ignore_eos). A single
prompt is the plain single-stream case. Weights stay in the GGUF's own quantisation.
One untimed warm-up pass, the KV memory cleared, then the timed pass. The last stdout
line is the result:

    {"engine": "llamacpp", "seconds": ..., "prompt_tokens": ..., "generated_tokens": ...,
     "warmup_seconds": ..., "version": ..., "notes": [...]}
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np

MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ


def _read_spec(argv: list[str]) -> dict:
    if len(argv) > 1 and argv[1] != "-":
        with open(argv[1]) as f:
            return json.load(f)
    return json.load(sys.stdin)


class _Batch:
    """A llama_batch of up to `capacity` tokens, one sequence id per token."""

    def __init__(self, lib, capacity: int) -> None:  # noqa: ANN001
        self.lib = lib
        self.raw = lib.llama_batch_init(capacity, 0, 1)
        self.capacity = capacity

    def fill(self, tokens: list[int], positions: list[int], seqs: list[int],
             want_logits: list[bool]) -> None:
        b = self.raw
        for i, (tok, pos, seq, logit) in enumerate(zip(tokens, positions, seqs, want_logits,
                                                           strict=True)):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if logit else 0
        b.n_tokens = len(tokens)

    def free(self) -> None:
        self.lib.llama_batch_free(self.raw)


def _generate(lib, ctx, batch: _Batch, n_vocab: int, prompts: list[list[int]],  # noqa: ANN001
              max_tokens: int) -> list[list[int]]:
    """Prefill every prompt, then decode all sequences in lockstep; returns generated ids."""
    n_seq = len(prompts)
    # Prefill: the prompts' tokens packed into n_batch-sized decode calls; the logits of
    # each prompt's last token give its first generated token.
    flat = [(tok, pos, seq, pos == len(p) - 1)
            for seq, p in enumerate(prompts) for pos, tok in enumerate(p)]
    next_tokens = [0] * n_seq
    for lo in range(0, len(flat), batch.capacity):
        chunk = flat[lo:lo + batch.capacity]
        batch.fill(*map(list, zip(*chunk, strict=True)))
        if lib.llama_decode(ctx, batch.raw) != 0:
            raise RuntimeError("llama_decode failed during prefill")
        ends = [seq for _, _, seq, last in chunk if last]
        if ends:
            logits = np.ctypeslib.as_array(lib.llama_get_logits(ctx), shape=(len(ends), n_vocab))
            for seq, tok in zip(ends, logits.argmax(axis=1).tolist(), strict=True):
                next_tokens[seq] = tok
    out = [[t] for t in next_tokens]
    positions = [len(p) for p in prompts]
    seqs = list(range(n_seq))
    everything = [True] * n_seq
    for _ in range(max_tokens - 1):
        batch.fill(next_tokens, positions, seqs, everything)
        if lib.llama_decode(ctx, batch.raw) != 0:
            raise RuntimeError("llama_decode failed during decode")
        logits = np.ctypeslib.as_array(lib.llama_get_logits(ctx), shape=(n_seq, n_vocab))
        next_tokens = logits.argmax(axis=1).tolist()
        for seq, tok in enumerate(next_tokens):
            out[seq].append(tok)
            positions[seq] += 1
    return out


def main(argv: list[str]) -> int:
    spec = _read_spec(argv)
    prompts: list[list[int]] = spec["prompts"]
    max_tokens = int(spec["max_tokens"])
    n_threads = int(spec.get("n_threads") or 1)
    if not 1 <= len(prompts) <= MAX_SEQUENCES:
        raise SystemExit(f"llama.cpp runs 1 to {MAX_SEQUENCES} sequences, not {len(prompts)}")
    notes: list[str] = []

    import llama_cpp as lib

    lib.llama_backend_init()
    mparams = lib.llama_model_default_params()
    model = lib.llama_model_load_from_file(spec["gguf"].encode(), mparams)
    if not model:
        raise SystemExit(f"llama.cpp could not load {spec['gguf']}")
    n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))

    per_seq = max(len(p) for p in prompts) + max_tokens
    per_seq = -(-per_seq // 256) * 256
    cparams = lib.llama_context_default_params()
    cparams.n_ctx = per_seq * len(prompts)
    cparams.n_seq_max = len(prompts)
    cparams.n_batch = min(2048, max(512, len(prompts)))
    cparams.n_ubatch = cparams.n_batch
    cparams.n_threads = n_threads
    cparams.n_threads_batch = n_threads
    ctx = lib.llama_init_from_model(model, cparams)
    if not ctx:
        raise SystemExit("llama.cpp could not create a context")
    batch = _Batch(lib, cparams.n_batch)
    memory = lib.llama_get_memory(ctx)

    start = time.perf_counter()
    _generate(lib, ctx, batch, n_vocab, prompts, max_tokens)
    warmup = time.perf_counter() - start
    lib.llama_memory_clear(memory, True)

    # The median of `repeats` timed runs (bench.throughput --repeats), the cache cleared
    # before each.
    runs = []
    for i in range(int(spec.get("repeats", 1))):
        if i:
            lib.llama_memory_clear(memory, True)
        start = time.perf_counter()
        out = _generate(lib, ctx, batch, n_vocab, prompts, max_tokens)
        runs.append(time.perf_counter() - start)
    seconds = statistics.median(runs)

    result = {
        "engine": "llamacpp",
        "version": lib.__version__,
        "seconds": seconds,
        "runs_seconds": runs,
        "prompt_tokens": sum(len(p) for p in prompts),
        "generated_tokens": sum(len(o) for o in out),
        "warmup_seconds": warmup,
        "n_threads": n_threads,
        "n_ctx": cparams.n_ctx,
        "n_batch": cparams.n_batch,
        "kv_unified": bool(cparams.kv_unified),
        "flash_attn_type": int(cparams.flash_attn_type),
        "weights": spec["gguf"].rsplit("/", 1)[-1],
        "first_output_ids": out[0][:16],
        "system_info": lib.llama_print_system_info().decode(),
        "notes": notes,
    }
    batch.free()
    lib.llama_free(ctx)
    lib.llama_model_free(model)
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
