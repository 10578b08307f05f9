"""Prompt logprobs (SamplingParams.prompt_logprobs, completions echo + logprobs) against
transformers' log_softmax(logits)[i - 1, token_i].

On a small random-weight Llama (module path and native decoder stack) and on the demo model
(native stack on GGUF blocks): chunked prefill with a tiny token budget, several requests with
different k in one batch, a prefix already in the prefix cache, preemption mid-prompt, n > 1;
then the OpenAI server's echo + logprobs (plain and streamed) and the prompt_logprobs extension
against the offline API.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from xllm import LLM, SamplingParams  # noqa: E402
from xllm.engine.outputs import RequestOutput  # noqa: E402

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

pytestmark = pytest.mark.timeout(180)

VOCAB = 384
TOL = 1e-4  # fp32: our logsumexp vs transformers' log_softmax, different summation orders


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest and immune to a busy machine
    yield
    torch.set_num_threads(before)


def _random_llama(intermediate: int) -> transformers.LlamaForCausalLM:
    """A 2-layer GQA Llama with O(1)-scale random weights (norms too), seeded."""
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        architectures=["LlamaForCausalLM"],
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(intermediate)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1 + 0.2 * noise)
            elif "embed" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[1]))
    return model


def _save(model: transformers.PreTrainedModel, out: Path, demo_dir: Path) -> Path:
    """A model directory xllm loads: the random weights plus the demo model's tokenizer (ids
    below VOCAB are ordinary tokens there; these tests feed token ids anyway)."""
    from test_models import save_with_tokenizer

    return save_with_tokenizer(model, out, demo_dir)


def _reference(hf: transformers.PreTrainedModel, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def _check(out: RequestOutput, hf: transformers.PreTrainedModel, k: int, tol: float) -> None:
    """out.prompt_logprobs equals transformers' log_softmax at i - 1 for every prompt token i:
    the token's value and rank, and the top-k alternatives (ids in order, and values)."""
    ids = out.prompt_token_ids
    ref = _reference(hf, ids)
    entries, ranks = out.prompt_logprobs, out.prompt_token_ranks
    assert entries is not None and ranks is not None
    assert len(entries) == len(ranks) == len(ids)
    assert entries[0] is None and ranks[0] is None
    for i in range(1, len(ids)):
        row, entry = ref[i - 1], entries[i]
        assert entry is not None
        assert entry[ids[i]] == pytest.approx(row[ids[i]].item(), abs=tol), i
        assert ranks[i] == 1 + int((row > row[ids[i]]).sum()), i
        top_values, top_ids = row.topk(k)
        alternatives = [t for t in entry if t != ids[i] or t in top_ids.tolist()]
        assert sorted(alternatives, key=lambda t: -entry[t]) == top_ids.tolist(), i
        assert len(entry) == k + (ids[i] not in top_ids.tolist())
        for t, v in zip(top_ids.tolist(), top_values.tolist(), strict=True):
            assert entry[t] == pytest.approx(v, abs=tol)


def _prompts(count: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (length,), generator=gen).tolist() for _ in range(count)]


def test_prompt_logprobs_is_validated() -> None:
    for bad in (-1, 21, True, 2.0, "3"):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)  # type: ignore[arg-type]
    assert SamplingParams(prompt_logprobs=0).prompt_logprobs == 0


@pytest.mark.parametrize("path", ["modules", "native"])
def test_random_llama_matches_transformers(
    path: str, demo_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunked prefill (8-token budget), three requests with k = 0 / 4 / none in one batch, a
    prefix served first (in the prefix cache), preemption mid-prompt, n = 2; LM-head slabs of
    3 rows, so a step's rows span several."""
    from xllm.runtime import prompt_logprobs

    monkeypatch.setattr(prompt_logprobs, "_LOGITS_BYTES", 3 * 4 * VOCAB)
    native = path == "native"
    hf = _random_llama(128 if native else 112)
    model_dir = _save(hf, tmp_path / "model", demo_model_dir)
    llm = LLM(
        dtype="float32",
        model=str(model_dir),
        weight_format="f32" if native else "dense",
        max_num_batched_tokens=8,
        block_size=4,
        num_kv_blocks=64,
        num_threads=1,
    )
    assert (llm.engine.runner.model._stack is not None) == native
    greedy = dict(temperature=0.0, max_tokens=3, ignore_eos=True)

    a, b, c = _prompts(3, 29, seed=1)
    outs = llm.generate(
        [a, b, c],
        [
            SamplingParams(prompt_logprobs=0, **greedy),
            SamplingParams(prompt_logprobs=4, **greedy),
            SamplingParams(**greedy),
        ],
        use_tqdm=False,
    )
    _check(outs[0], hf, 0, TOL)
    _check(outs[1], hf, 4, TOL)
    assert outs[2].prompt_logprobs is None and outs[2].prompt_token_ranks is None
    # Generation itself is unchanged by scoring the prompt.
    assert (
        outs[1].outputs[0].token_ids
        == llm.generate(b, SamplingParams(**greedy), use_tqdm=False)[0].outputs[0].token_ids
    )

    # A prefix already cached by another request: a plain request takes the hit, one with
    # prompt_logprobs computes (and scores) every position.
    prefix = _prompts(1, 20, seed=2)[0]
    llm.generate(prefix + [5, 6, 7], SamplingParams(**greedy), use_tqdm=False)
    plain = llm.generate(prefix + [8, 9], SamplingParams(**greedy), use_tqdm=False)[0]
    assert plain.num_cached_tokens >= 16
    scored = llm.generate(
        prefix + [10, 11, 12], SamplingParams(prompt_logprobs=3, **greedy), use_tqdm=False
    )[0]
    assert scored.num_cached_tokens == 0
    _check(scored, hf, 3, TOL)

    # n = 2: the prompt is scored once and both completions' output carries it.
    two = llm.generate(
        a,
        SamplingParams(
            n=2, temperature=1.0, seed=3, max_tokens=2, ignore_eos=True, prompt_logprobs=2
        ),
        use_tqdm=False,
    )[0]
    assert len(two.outputs) == 2
    _check(two, hf, 2, TOL)

    # Too few KV blocks for three 40-token prompts at once: prompts are preempted (some
    # mid-way) and recomputed; every prompt is still scored once and exactly.
    tight = LLM(
        dtype="float32",
        model=str(model_dir),
        weight_format="f32" if native else "dense",
        max_num_batched_tokens=8,
        block_size=4,
        num_kv_blocks=24,
        num_threads=1,
    )
    long_prompts = _prompts(3, 40, seed=4)
    outs = tight.generate(
        long_prompts,
        SamplingParams(prompt_logprobs=1, temperature=0.0, max_tokens=16, ignore_eos=True),
        use_tqdm=False,
    )
    assert tight.engine.scheduler.num_preempted > 0
    for out in outs:
        _check(out, hf, 1, TOL)


def test_prompt_of_one_token(demo_model_dir: Path, tmp_path: Path) -> None:
    hf = _random_llama(112)
    llm = LLM(
        dtype="float32",
        model=str(_save(hf, tmp_path / "model", demo_model_dir)),
        weight_format="dense",
        num_kv_blocks=16,
        num_threads=1,
    )
    out = llm.generate([7], SamplingParams(prompt_logprobs=5, max_tokens=1), use_tqdm=False)[0]
    assert out.prompt_logprobs == [None] and out.prompt_token_ranks == [None]


# ---- the demo model, offline and through the server ---------------------------------------

TEXT = "The numbers from one to ten are: one, two, three, four, five, six, seven"


@pytest.fixture(scope="module")
def demo_llm(demo_model_dir: Path) -> LLM:
    return LLM(
        dtype="float32",
        model=str(demo_model_dir), max_num_batched_tokens=16, kv_cache_memory_gb=0.1, num_threads=1
    )


@pytest.fixture(scope="module")
def demo_hf(demo_model_dir: Path) -> transformers.PreTrainedModel:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(demo_model_dir), dtype=torch.float32
    )
    return model.eval()


def test_demo_model_matches_transformers(demo_llm: LLM, demo_hf) -> None:  # noqa: ANN001
    assert demo_llm.engine.runner.model._stack is not None  # the native stack on blocks
    greedy = dict(temperature=0.0, max_tokens=2, ignore_eos=True)
    # Served first, so its blocks are in the prefix cache.
    demo_llm.generate(TEXT + ", eight", SamplingParams(**greedy), use_tqdm=False)
    out = demo_llm.generate(TEXT, SamplingParams(prompt_logprobs=5, **greedy), use_tqdm=False)[0]
    assert out.num_cached_tokens == 0
    # Blocks decode to exactly the fp32 weights transformers holds; what remains is
    # summation order over 30 layers.
    _check(out, demo_hf, 5, 5e-4)


def test_server_echo_logprobs_match_offline(served_engine, demo_llm: LLM) -> None:  # noqa: ANN001
    openai = pytest.importorskip("openai")
    from live_server import LiveServer

    from xllm.api.app import build_app
    from xllm.api.settings import ServerSettings

    offline = demo_llm.generate(
        TEXT,
        SamplingParams(
            prompt_logprobs=3, logprobs=3, temperature=0.0, max_tokens=4, ignore_eos=True
        ),
        use_tqdm=False,
    )[0]
    ids = offline.prompt_token_ids
    tok = demo_llm.tokenizer
    settings = ServerSettings(served_model_names=["demo"])
    with LiveServer(build_app(served_engine, settings, shutdown_engine=False)) as srv:
        client = openai.OpenAI(
            base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60
        )
        kwargs = dict(
            model="demo",
            prompt=TEXT,
            max_tokens=4,
            temperature=0,
            echo=True,
            logprobs=3,
            extra_body={"ignore_eos": True},
        )
        full = client.completions.create(**kwargs).choices[0]
        lp = full.logprobs
        n = len(ids)
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n + 4
        assert lp.tokens[:n] == [tok.decode([t], skip_special_tokens=False) for t in ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for i in range(1, n):
            entry = offline.prompt_logprobs[i]
            assert lp.token_logprobs[i] == pytest.approx(entry[ids[i]], abs=1e-4)
            best = sorted(entry.values(), reverse=True)[:3]
            assert sorted(lp.top_logprobs[i].values(), reverse=True) == pytest.approx(
                best, abs=1e-4
            )
        # The generated tokens follow, as without echo; offsets index the returned text.
        assert "".join(lp.tokens[n:]) == full.text[len(TEXT) :]
        assert lp.token_logprobs[n:] == pytest.approx(
            [
                e[t]
                for e, t in zip(
                    offline.outputs[0].logprobs, offline.outputs[0].token_ids, strict=True
                )
            ],
            abs=1e-4,
        )
        for token, offset in zip(lp.tokens, lp.text_offset, strict=True):
            assert full.text[offset : offset + len(token)] == token

        # Streamed: the echoed prompt and its logprobs ride on the first chunk.
        chunks = [
            c.choices[0] for c in client.completions.create(stream=True, **kwargs) if c.choices
        ]
        assert chunks[0].text.startswith(TEXT)
        assert chunks[0].logprobs.tokens[:n] == lp.tokens[:n]
        streamed = [t for c in chunks for t in c.logprobs.token_logprobs]
        assert streamed[0] is None and streamed[1:] == pytest.approx(lp.token_logprobs[1:])
        assert "".join(c.text for c in chunks) == full.text

        # The vLLM extension, on both endpoints.
        ext = client.completions.create(
            model="demo", prompt=TEXT, max_tokens=1, extra_body={"prompt_logprobs": 2}
        ).choices[0]
        body = ext.model_extra["prompt_logprobs"]
        assert body[0] is None and len(body) == n
        for i in range(1, n):
            mine = body[i][str(ids[i])]
            assert mine["logprob"] == pytest.approx(offline.prompt_logprobs[i][ids[i]], abs=1e-4)
            assert mine["rank"] == offline.prompt_token_ranks[i]
            assert len(body[i]) in (2, 3)
        chat = client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=1,
            extra_body={"prompt_logprobs": 0},
        )
        assert chat.model_extra["prompt_logprobs"][0] is None
        assert len(chat.model_extra["prompt_logprobs"]) == chat.usage.prompt_tokens


def test_echo_logprobs_refused_where_prompts_are_not_scored() -> None:
    from xllm.api.errors import APIError
    from xllm.api.protocol import CompletionRequest
    from xllm.api.sampling import to_sampling_params

    req = CompletionRequest(model="m", prompt="x", echo=True, logprobs=2)
    params = to_sampling_params(req, num_prompt_tokens=3, max_model_len=64)
    assert params.prompt_logprobs == 2 and params.logprobs == 2
    with pytest.raises(APIError) as e:
        to_sampling_params(req, num_prompt_tokens=3, max_model_len=64, scores_prompts=False)
    assert e.value.status == 400 and e.value.param == "echo"
    ext = CompletionRequest(model="m", prompt="x", prompt_logprobs=1)
    with pytest.raises(APIError) as e:
        to_sampling_params(ext, num_prompt_tokens=3, max_model_len=64, scores_prompts=False)
    assert e.value.param == "prompt_logprobs"
