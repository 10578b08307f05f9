"""Embeddings: the engine's pooled final hidden states against transformers' (fp32, last
and mean pooling, prompts chunked and batched with generation), and /v1/embeddings through
the official openai client (floats, base64, token ids, 400s)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
from live_server import openai_client

from xllm.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(240)

TEXTS = ["The quick brown fox jumps over the lazy dog near the river bank, again and again.",
         "Hello", "Embeddings pool the final hidden states of the prompt."]


def _reference(demo_hf, ids: list[int], pooling: str) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        hidden = demo_hf.model(torch.tensor([ids])).last_hidden_state[0]
    return torch.nn.functional.normalize(hidden[-1] if pooling == "last" else hidden.mean(0),
                                         dim=0)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_engine_embeddings_match_transformers(demo_model_dir: Path, demo_hf,  # noqa: ANN001
                                              pooling: str) -> None:
    from xllm import LLM

    # 8-token chunks: the long prompt's hidden states arrive over several steps, beside a
    # request that generates.
    llm = LLM(str(demo_model_dir), dtype="float32", max_model_len=256, kv_cache_memory_gb=0.25,
              num_threads=1, max_num_batched_tokens=8)
    try:
        params = [SamplingParams(max_tokens=1, pooling=pooling)] * len(TEXTS)
        outs = llm.generate(TEXTS + ["Tell me a story."], params + [
            SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)], use_tqdm=False)
        assert outs[-1].embedding is None and len(outs[-1].outputs[0].token_ids) == 6
        for text, out in zip(TEXTS, outs, strict=False):
            want = _reference(demo_hf, llm.tokenizer.encode(text), pooling)
            got = torch.tensor(out.embedding)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
        # The prefix cache holds the first prompt now: last pooling may use it, mean may not.
        again = llm.generate(TEXTS[0], SamplingParams(max_tokens=1, pooling=pooling),
                             use_tqdm=False)[0]
        assert (again.num_cached_tokens > 0) == (pooling == "last")
        torch.testing.assert_close(torch.tensor(again.embedding), torch.tensor(outs[0].embedding),
                                   atol=2e-6, rtol=1e-5)
    finally:
        llm.engine.close()


def test_pooling_params_are_checked() -> None:
    with pytest.raises(ValueError, match="pooling must be"):
        SamplingParams(max_tokens=1, pooling="max")
    with pytest.raises(ValueError, match="max_tokens = 1"):
        SamplingParams(max_tokens=2, pooling="last")
    with pytest.raises(ValueError, match="n = 1"):
        SamplingParams(max_tokens=1, n=2, pooling="mean")


@pytest.fixture(scope="module")
def client(served_engine) -> Iterator[openai.OpenAI]:  # noqa: ANN001
    with openai_client(served_engine, timeout=60) as c:
        yield c


def test_embeddings_endpoint(client: openai.OpenAI, served_engine, demo_hf) -> None:  # noqa: ANN001
    tok = served_engine.engine.tokenizer
    r = client.embeddings.create(model="demo", input=TEXTS)
    assert [d.index for d in r.data] == [0, 1, 2] and r.object == "list"
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(len(tok.encode(t))
                                                                for t in TEXTS)
    for text, d in zip(TEXTS, r.data, strict=True):
        want = _reference(demo_hf, tok.encode(text), "last")
        torch.testing.assert_close(torch.tensor(d.embedding), want, atol=2e-6, rtol=1e-5)
    raw = client.with_raw_response.embeddings.create(model="demo", input=TEXTS[0],
                                                     encoding_format="base64").http_response
    values = np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(values, r.data[0].embedding, atol=1e-6)
    assert len(values) == 576
    ids = client.embeddings.create(model="demo", input=[tok.encode(TEXTS[1])])
    assert np.allclose(ids.data[0].embedding, r.data[1].embedding, atol=1e-6)
    same = client.embeddings.create(model="demo", input=TEXTS[0], dimensions=576)
    assert np.allclose(same.data[0].embedding, r.data[0].embedding, atol=1e-6)


@pytest.mark.parametrize(("kw", "param", "message"), [
    ({"input": "hi", "dimensions": 64}, "dimensions", "not shortened"),
    ({"input": "word " * 400}, "input", "maximum context length"),
    ({"input": [10**9]}, "input", "outside the vocabulary"),
    ({"input": []}, None, "input"),
])
def test_bad_embedding_requests_are_400s(client: openai.OpenAI, kw: dict, param: str | None,
                                         message: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="demo", **kw)
    error = info.value.body
    assert message in error["message"], error
    if param is not None:
        assert error["param"] == param, error


def test_both_engines_are_engine_clients(served_engine) -> None:  # noqa: ANN001
    """The OpenAI layer talks only to EngineClient: xllm-server's AsyncEngine and
    xllm-master's ClusterEngine both implement it (the facts the API reads included)."""
    from xllm.engine.protocol import EngineClient
    from xllm.service.master import ClusterEngine, ModelFacts
    from xllm.service.registry import EmbeddedRegistry
    from xllm.service.routing import Router

    assert isinstance(served_engine, EngineClient)
    assert served_engine.hidden_size == 576 and served_engine.vocab_size == 49152
    assert served_engine.tokenizer is served_engine.engine.tokenizer
    engine = served_engine.engine
    registry = EmbeddedRegistry()
    cluster = ClusterEngine(engine.config, ModelFacts(engine.tokenizer, engine.model_config,
                                                      256, registry),
                            registry, Router("round_robin", 16))
    assert isinstance(cluster, EngineClient)
    assert (cluster.hidden_size, cluster.vocab_size, cluster.max_model_len) == (576, 49152, 256)
    assert cluster.tokenizer is engine.tokenizer and not cluster.supports_prompt_logprobs
