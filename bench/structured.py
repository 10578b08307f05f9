"""Structured outputs: the grammar engines side by side, then the engine's cost of a JSON
schema on every request, on the demo model.

    python -m bench.structured [--parts engines,throughput,ttft] [--repeats 3] [--json PATH]

- ``engines``: xgrammar and llguidance (when installed: ``pip install llguidance``) on the
  demo tokenizer, for a few schemas: the time to get a grammar ready for a new schema
  (xgrammar compiles; llguidance builds its matcher, computing masks lazily), and the time
  per token to fill the token mask while walking a valid JSON document of the schema
  token by token (what every constrained decode step pays per request).
- ``throughput``: 16 concurrent prompts, 128 greedy tokens each (batch-16 decode), without
  and with a JSON schema on every request (one that no 128-token output can complete, so
  every request runs its 128 tokens), timed in turns; the ratio of tokens per second.
- ``ttft``: the time from add_request to the first token of one request with a schema the
  engine has not seen (the compile included), against the same schema again (cached).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

from bench.throughput import _cpu_name, _prompts

SCHEMAS: dict[str, dict[str, Any]] = {
    "person": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                       "email": {"type": "string", "format": "email"},
                       "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["name", "age", "email", "tags"], "additionalProperties": False},
    "order": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{6}$"},
            "items": {"type": "array", "minItems": 1, "items": {
                "type": "object",
                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer",
                                                                  "minimum": 1},
                               "price": {"type": "number"}},
                "required": ["sku", "qty", "price"], "additionalProperties": False}},
            "status": {"enum": ["new", "paid", "shipped", "delivered", "cancelled"]},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
        "required": ["id", "items", "status", "note"], "additionalProperties": False},
    "wide": {
        "type": "object",
        "properties": {f"field_{i}": {"type": ["string", "integer", "boolean"]}
                       for i in range(40)},
        "required": [f"field_{i}" for i in range(40)], "additionalProperties": False},
}
DOCUMENTS: dict[str, Any] = {
    "person": {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org",
               "tags": ["maths", "poetry", "engines"]},
    "order": {"id": "ABC-123456", "items": [{"sku": "pen-blue", "qty": 3, "price": 1.25},
                                            {"sku": "paper-a4", "qty": 1, "price": 4.5}],
              "status": "paid", "note": None},
    "wide": {f"field_{i}": (i if i % 3 == 0 else f"v{i}" if i % 3 == 1 else True)
             for i in range(40)},
}
# Long outputs: 50+ entries cannot fit in 128 tokens, so every constrained request runs on.
LONG = {"type": "object", "properties": {"entries": {
    "type": "array", "minItems": 50, "items": {
        "type": "object", "properties": {"id": {"type": "integer"},
                                         "word": {"type": "string", "maxLength": 12}},
        "required": ["id", "word"], "additionalProperties": False}}},
    "required": ["entries"], "additionalProperties": False}


def _document_ids(tok, name: str) -> list[int]:  # noqa: ANN001
    text = json.dumps(DOCUMENTS[name], separators=(", ", ": "))
    return tok.encode(text, add_special_tokens=False)


def engines(repeats: int) -> list[dict]:
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    from xllm.loader.demo import demo_model_dir
    from xllm.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(demo_model_dir())
    hf = PreTrainedTokenizerFast(tokenizer_object=tok.backend)
    vocab = 49152
    stop = sorted(tok.eos_token_ids)
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=stop)
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch as llg_torch

        llg_tok = llguidance.hf.from_tokenizer(hf, n_vocab=vocab, eos_token=stop[0])
    except ImportError:
        llguidance = None
    rows = []
    for name, schema in SCHEMAS.items():
        ids = _document_ids(tok, name)
        row: dict[str, Any] = {"schema": name, "document_tokens": len(ids)}
        ready, per_token = [], []
        for _ in range(repeats):
            compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            t = time.perf_counter()
            compiled = compiler.compile_json_schema(schema, any_whitespace=False,
                                                    separators=(", ", ": "))
            ready.append(time.perf_counter() - t)
            m = xgr.GrammarMatcher(compiled)
            bitmask = xgr.allocate_token_bitmask(1, vocab)
            t = time.perf_counter()
            for token in ids:
                m.fill_next_token_bitmask(bitmask, 0)
                if not m.accept_token(token):
                    raise RuntimeError(f"xgrammar rejected the {name} document")
            per_token.append((time.perf_counter() - t) / len(ids))
        row["xgrammar"] = {"ready_ms": 1e3 * statistics.median(ready),
                           "mask_us_per_token": 1e6 * statistics.median(per_token)}
        if llguidance is not None:
            ready, per_token = [], []
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": False,
                                  "item_separator": ", ", "key_separator": ": "})
            for _ in range(repeats):
                t = time.perf_counter()
                m = llguidance.LLMatcher(llg_tok, grammar)
                ready.append(time.perf_counter() - t)
                if m.is_error():
                    raise RuntimeError(m.get_error())
                bitmask = llg_torch.allocate_token_bitmask(1, vocab)
                t = time.perf_counter()
                for token in ids:
                    llg_torch.fill_next_token_bitmask(m, bitmask, 0)
                    if not m.consume_token(token):
                        raise RuntimeError(f"llguidance rejected the {name} document: "
                                           f"{m.get_error()}")
                per_token.append((time.perf_counter() - t) / len(ids))
            row["llguidance"] = {"ready_ms": 1e3 * statistics.median(ready),
                                 "mask_us_per_token": 1e6 * statistics.median(per_token)}
        rows.append(row)
        line = f"{name:7s} {len(ids):3d} tokens  xgrammar compile {row['xgrammar']['ready_ms']:7.2f} ms, mask {row['xgrammar']['mask_us_per_token']:6.1f} us/token"  # noqa: E501
        if "llguidance" in row:
            g = row["llguidance"]
            line += f"  | llguidance ready {g['ready_ms']:7.2f} ms, mask {g['mask_us_per_token']:6.1f} us/token"  # noqa: E501
        print(line, flush=True)
    return rows


def throughput(repeats: int) -> dict:
    from xllm import LLM, SamplingParams
    from xllm.structured import GrammarSpec

    llm = LLM("demo", max_model_len=1024)
    prompts, max_new = _prompts(llm.tokenizer, "batch16")
    plain = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    constrained = SamplingParams(temperature=0.0, max_tokens=max_new,
                                 structured=GrammarSpec.json_schema(LONG))
    llm.generate(prompts, plain, use_tqdm=False)  # warm-up (and the grammar compiled)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=8,
                                             structured=constrained.structured), use_tqdm=False)
    rates: dict[str, list[float]] = {"plain": [], "schema": []}
    for _ in range(repeats):
        for label, params in (("plain", plain), ("schema", constrained)):
            llm.engine.scheduler.reset_prefix_cache()
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            if label == "schema" and tokens != len(prompts) * max_new:
                raise RuntimeError("a constrained request ended early; the comparison needs "
                                   f"{max_new} tokens each")
            rates[label].append(tokens / seconds)
    plain_rate = statistics.median(rates["plain"])
    schema_rate = statistics.median(rates["schema"])
    print(f"batch16 decode: plain {plain_rate:.1f} tok/s, JSON schema {schema_rate:.1f} tok/s "
          f"-> {schema_rate / plain_rate:.3f}x", flush=True)
    llm.engine.close()
    return {"plain_tokens_per_s": plain_rate, "schema_tokens_per_s": schema_rate,
            "ratio": schema_rate / plain_rate, "runs": rates}


def ttft(repeats: int) -> dict:
    from xllm import LLM, SamplingParams
    from xllm.structured import GrammarSpec

    llm = LLM("demo", max_model_len=1024)
    engine = llm.engine
    prompt = llm.tokenizer.encode("Describe an order as JSON.")
    llm.generate(prompt, SamplingParams(max_tokens=4), use_tqdm=False)

    def first_token(spec: GrammarSpec) -> float:
        engine.scheduler.reset_prefix_cache()
        rid = engine.new_request_id()
        start = time.perf_counter()
        engine.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=2,
                                                       structured=spec))
        while True:
            for out in engine.step():
                if out.request_id == rid and out.outputs[0].token_ids:
                    elapsed = time.perf_counter() - start
                    engine.abort_request(rid)
                    return elapsed

    new, cached = [], []
    for i in range(repeats):
        schema = json.loads(json.dumps(SCHEMAS["order"]))
        schema["properties"][f"extra_{i}"] = {"type": "string"}  # a schema not seen before
        spec = GrammarSpec.json_schema(schema)
        new.append(first_token(spec))
        cached.append(first_token(spec))
    result = {"new_schema_ms": 1e3 * statistics.median(new),
              "cached_schema_ms": 1e3 * statistics.median(cached)}
    print(f"TTFT with a new schema {result['new_schema_ms']:.1f} ms, cached "
          f"{result['cached_schema_ms']:.1f} ms", flush=True)
    engine.close()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="engines,throughput,ttft")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    report: dict[str, Any] = {"cpu": _cpu_name(), "cores": os.cpu_count(),
                              "command": "python -m bench.structured " + " ".join(argv or
                                                                                  sys.argv[1:])}
    if "engines" in parts:
        report["engines"] = engines(args.repeats)
    if "throughput" in parts:
        report["throughput"] = throughput(args.repeats)
    if "ttft" in parts:
        report["ttft"] = ttft(args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
