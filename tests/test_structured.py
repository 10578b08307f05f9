"""Structured outputs: the native bitmask op against torch, the sampler's mask, the grammar
compiler's cache and errors, and the engine end to end on the demo model (every output
parses into its schema, regex or choice; a resumed request continues its grammar)."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import jsonschema
import pytest
import torch

from xllm import _C
from xllm.layers.sampler import Sampler, SamplingBatch
from xllm.sampling_params import SamplingParams
from xllm.structured import GrammarSpec
from xllm.structured.grammar import GrammarCompiler, check, new_bitmask

pytestmark = pytest.mark.timeout(300)


def _reference_mask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    v = logits.shape[1]
    for i, r in enumerate(rows.tolist()):
        for j in range(v):
            if not (int(bitmask[i, j // 32]) >> (j % 32)) & 1:
                logits[r, j] = float("-inf")


@pytest.mark.parametrize("v", [1, 31, 32, 33, 100, 1000])
def test_apply_token_bitmask_matches_torch(isa: str, v: int) -> None:
    g = torch.Generator().manual_seed(v)
    logits = torch.randn(5, v, generator=g)
    words = -(-v // 32) + 1  # wider than needed, as an allocated buffer may be
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, words), dtype=torch.int32, generator=g)
    bitmask[1] = -1  # a row with every token allowed
    bitmask[2, 0] = 0  # none of the first 32
    rows = torch.tensor([4, 0, 2])
    got, want = logits.clone(), logits.clone()
    _C.apply_token_bitmask(got, bitmask, rows)
    _reference_mask(want, bitmask, rows)
    assert torch.equal(got, want)


def test_apply_token_bitmask_checks_arguments() -> None:
    logits = torch.zeros(2, 64)
    with pytest.raises(ValueError, match="words per row"):
        _C.apply_token_bitmask(logits, torch.zeros(1, 1, dtype=torch.int32), torch.tensor([0]))
    with pytest.raises(ValueError, match="rows must be in"):
        _C.apply_token_bitmask(logits, torch.zeros(1, 2, dtype=torch.int32), torch.tensor([2]))
    with pytest.raises(ValueError, match="int32"):
        _C.apply_token_bitmask(logits, torch.zeros(1, 2), torch.tensor([0]))


def test_sampler_samples_only_allowed_tokens() -> None:
    v, n = 300, 6
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, v, generator=g) * 3
    allowed = [set(torch.randperm(v, generator=g)[:k].tolist()) for k in (1, 2, 5, 9)]
    bitmask = torch.zeros(4, -(-v // 32), dtype=torch.int32)
    for i, tokens in enumerate(allowed):
        for t in tokens:
            bitmask[i, t // 32] |= torch.tensor(1 << (t % 32), dtype=torch.int64).to(torch.int32)
    mask_rows = [0, 2, 3, 5]
    params = [SamplingParams(temperature=0.0), SamplingParams(), SamplingParams(top_k=3),
              SamplingParams(top_p=0.5, seed=7), SamplingParams(temperature=0.0),
              SamplingParams(min_p=0.2, logprobs=2)]
    sampler = Sampler(seed=1)
    for _ in range(20):
        batch = SamplingBatch.build(params, [[1]] * n, [[]] * n, v, mask_rows=mask_rows,
                                    bitmask=bitmask)
        out = sampler(logits, batch)
        for i, row in enumerate(mask_rows):
            assert int(out.token_ids[row]) in allowed[i]
    # the unmasked greedy row picks the plain argmax; the logits were not modified
    assert int(out.token_ids[4]) == int(logits[4].argmax())
    assert torch.isfinite(logits).all()


def test_sampling_batch_checks_the_mask() -> None:
    with pytest.raises(ValueError, match="go together"):
        SamplingBatch.build([SamplingParams()], [[1]], [[]], 64, mask_rows=[0])
    with pytest.raises(ValueError, match="int32"):
        SamplingBatch.build([SamplingParams()], [[1]], [[]], 64, mask_rows=[0],
                            bitmask=torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="rows of the batch"):
        SamplingBatch.build([SamplingParams()], [[1]], [[]], 64, mask_rows=[1],
                            bitmask=torch.zeros(1, 2, dtype=torch.int32))


@pytest.mark.parametrize(("spec", "message"), [
    (GrammarSpec("json", '{"type": "objekt"}'), "invalid JSON schema"),
    (GrammarSpec("json", '{"type": "object", "properties": {"a": {"minLength": -1}}}'),
     "invalid JSON schema at properties/a/minLength"),
    (GrammarSpec("regex", "(ab"), "invalid regex"),
    (GrammarSpec("grammar", "root ::= undefined_rule"), "invalid grammar"),
])
def test_bad_specs_say_what_is_wrong(spec: GrammarSpec, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        check(spec)


def test_spec_forms() -> None:
    a = GrammarSpec.json_schema({"b": 1, "a": {"type": "string"}})
    b = GrammarSpec.json_schema('{"b":  1,\n "a": {"type": "string"}}')
    assert a == b and a.key == b.key  # compact: one cache entry
    assert a != GrammarSpec.json_schema({"a": {"type": "string"}, "b": 1})  # order is kept
    assert GrammarSpec.choice(["x", "y"]).choices == ["x", "y"]
    with pytest.raises(ValueError, match="not valid JSON"):
        GrammarSpec.json_schema("{")
    with pytest.raises(ValueError, match="one of"):
        GrammarSpec("yaml", "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        GrammarSpec("regex", "")
    with pytest.raises(ValueError, match="non-empty list"):
        GrammarSpec.choice([])


@pytest.fixture(scope="module")
def compiler(demo_model_dir: Path) -> GrammarCompiler:
    from xllm.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(demo_model_dir)
    c = GrammarCompiler(tok, 49152, tok.eos_token_ids, cache_size=2)
    yield c
    c.close()


def test_compiler_caches_and_shares(compiler: GrammarCompiler) -> None:
    spec = GrammarSpec("regex", "[a-z]{3}")
    futures = []
    threads = [threading.Thread(target=lambda: futures.append(compiler.submit(spec)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(f) for f in futures}) == 1  # one compile for concurrent askers
    compiled = futures[0].result(60)
    assert compiler.compile(spec) is compiled
    compiler.compile(GrammarSpec("regex", "x"))
    compiler.compile(GrammarSpec("regex", "y"))  # cache_size 2: the first is evicted
    assert compiler.compile(spec) is not compiled
    bad = GrammarSpec("grammar", "root ::= nope")
    with pytest.raises(ValueError, match="invalid grammar"):
        compiler.compile(bad)
    assert compiler.submit(bad) is not compiler.submit(GrammarSpec("regex", "z"))


def test_matcher_masks_and_resumes(compiler: GrammarCompiler, demo_model_dir: Path) -> None:
    from xllm.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(demo_model_dir)
    compiled = compiler.compile(GrammarSpec.choice(["yes", "no"]))
    m = compiler.matcher(compiled)
    bitmask = new_bitmask(1, 49152)
    m.fill_next_token_bitmask(bitmask, 0)
    allowed = [t for t in range(49152) if (int(bitmask[0, t // 32]) >> (t % 32)) & 1]
    texts = {tok.decode([t]) for t in allowed}
    assert texts and all("yes".startswith(x) or "no".startswith(x) for x in texts)
    ids = tok.encode("yes", add_special_tokens=False)
    resumed = compiler.matcher(compiled, ids)
    resumed.fill_next_token_bitmask(bitmask, 0)
    allowed = [t for t in range(49152) if (int(bitmask[0, t // 32]) >> (t % 32)) & 1]
    assert set(allowed) <= tok.eos_token_ids | {0, 1, 2}  # only the end
    with pytest.raises(ValueError, match="does not fit"):
        compiler.matcher(compiled, tok.encode("maybe", add_special_tokens=False))


# ---- the engine on the demo model ---------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "London", "Tokyo"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(demo_model_dir: Path):  # noqa: ANN201
    from xllm import LLM

    engine = LLM(str(demo_model_dir), dtype="float32", max_model_len=256,
                 kv_cache_memory_gb=0.25, num_threads=1)
    yield engine
    engine.engine.close()


def test_engine_outputs_match_their_specs(llm) -> None:  # noqa: ANN001
    prompts = ["Describe a person as JSON.", "Who lives in Tokyo?", "Give me an example user.",
               "My friend is 31."]
    specs = [GrammarSpec.json_schema(PERSON), GrammarSpec("regex", r"[0-9]{3}-[0-9]{4}"),
             GrammarSpec.choice(["positive", "negative", "neutral"]), GrammarSpec("json_object")]
    params = [SamplingParams(temperature=t, seed=s, max_tokens=120, structured=spec)
              for spec in specs for t, s in ((0.0, None), (1.0, 3))]
    outs = llm.generate([p for p in prompts for _ in range(2)], params, use_tqdm=False)
    for out, p in zip(outs, params, strict=True):
        text, spec = out.outputs[0].text, p.structured
        assert out.outputs[0].finish_reason == "stop", (spec, text)
        if spec.kind == "json":
            jsonschema.validate(json.loads(text), PERSON)
            assert list(json.loads(text)) == ["name", "age", "city"]  # the schema's order
        elif spec.kind == "regex":
            assert re.fullmatch(spec.value, text), text
        elif spec.kind == "choice":
            assert text in spec.choices
        else:
            assert isinstance(json.loads(text), dict)


def _greedy(spec: GrammarSpec, **kw) -> SamplingParams:  # noqa: ANN003
    return SamplingParams(temperature=0.0, max_tokens=80, structured=spec, **kw)


def test_resumed_request_rebuilds_its_grammar_state(llm) -> None:  # noqa: ANN001
    """A request resumed with the tokens another engine sent (the master's failover) goes on
    exactly as the uninterrupted one: its matcher is advanced over them first."""
    prompt = "Describe a person as JSON."
    spec = GrammarSpec.json_schema(PERSON)
    full = llm.generate(prompt, _greedy(spec), use_tqdm=False)[0].outputs[0]
    engine = llm.engine
    for cut in (1, len(full.token_ids) // 2):
        rid = engine.new_request_id()
        engine.add_request(rid, prompt, _greedy(spec), generated_token_ids=full.token_ids[:cut])
        out = llm._run([rid], use_tqdm=False)[0].outputs[0]
        assert out.token_ids == full.token_ids and out.text == full.text
    with pytest.raises(ValueError, match="does not fit"):
        engine.add_request(engine.new_request_id(), prompt, _greedy(spec),
                           generated_token_ids=llm.tokenizer.encode("nope",
                                                                    add_special_tokens=False))


def test_overlap_scheduling_gives_the_same_constrained_outputs(llm, demo_model_dir) -> None:  # noqa: ANN001
    from xllm import LLM

    prompts = ["Describe a person as JSON.", "Pick one.", "A phone number:"]
    params = [_greedy(GrammarSpec.json_schema(PERSON)), _greedy(GrammarSpec.choice(["a", "b"])),
              SamplingParams(temperature=1.0, seed=5, max_tokens=40,
                             structured=GrammarSpec("regex", r"\+[0-9]{2} [0-9]{6,9}"))]
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    overlapped = LLM(str(demo_model_dir), dtype="float32", max_model_len=256,
                     kv_cache_memory_gb=0.25, num_threads=1, overlap_scheduling=True)
    try:
        got = [o.outputs[0].token_ids
               for o in overlapped.generate(prompts, params, use_tqdm=False)]
    finally:
        overlapped.engine.close()
    assert got == want
