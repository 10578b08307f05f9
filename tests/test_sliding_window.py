"""Sliding-window attention (Mistral, Qwen2/Qwen3 with use_sliding_window, Qwen3-MoE, Mixtral):
which layers slide as transformers reads the config, outputs equal to transformers' past the
window (modules and the native decoder stack), and the blocks wholly before every window given
back to the pool while requests run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from test_models import (
    _SMALL,
    MAX_NEW,
    hf_from_overrides,
    paged_greedy_generate,
    prefill_logits,
    randomize,
    save_with_tokenizer,
)

from xllm.models.config import ModelConfig
from xllm.models.registry import get_model_class
from xllm.ops import block_pool as bp
from xllm.sampling_params import SamplingParams
from xllm.scheduler import KVCacheManager, Request

pytestmark = pytest.mark.timeout(300)

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # Every layer slides; intermediate 128 lets the native stack take the model.
    "mistral": ("MistralForCausalLM", dict(sliding_window=8, intermediate_size=128)),
    # Only layer 1 slides (max_window_layers 1): a full and a windowed layer in one model.
    "qwen2-mixed": ("Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=6,
                                             max_window_layers=1)),
    "qwen3-moe": ("Qwen3MoeForCausalLM", dict(
        use_sliding_window=True, sliding_window=5, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, head_dim=16)),
}


def _hf(name: str) -> Any:
    return hf_from_overrides(*VARIANTS[name], name)


def _parse(arch: str, **keys: Any) -> ModelConfig:
    return ModelConfig.from_hf_dict({**_SMALL, "num_hidden_layers": 4, "architectures": [arch],
                                     **keys})


def test_which_layers_slide_follows_transformers() -> None:
    mistral = _parse("MistralForCausalLM")
    assert mistral.sliding_window == 4096 and mistral.window_layers == (0, 1, 2, 3)
    assert mistral.windowed_everywhere and mistral.layer_window(2) == 4096
    assert _parse("MistralForCausalLM", sliding_window=None).sliding_window is None
    assert _parse("MixtralForCausalLM").sliding_window is None
    assert _parse("Qwen2ForCausalLM", sliding_window=64).sliding_window is None  # not used
    qwen2 = _parse("Qwen2ForCausalLM", use_sliding_window=True, sliding_window=64,
                   max_window_layers=2)
    assert qwen2.window_layers == (2, 3) and not qwen2.windowed_everywhere
    assert qwen2.layer_window(1) == 0 and qwen2.layer_window(3) == 64
    # max_window_layers defaults to 28: none of 4 layers slides.
    assert _parse("Qwen3ForCausalLM", use_sliding_window=True).sliding_window is None
    types = ["sliding_attention", "full_attention"] * 2
    qwen3 = _parse("Qwen3ForCausalLM", use_sliding_window=True, sliding_window=32,
                   layer_types=types)
    assert qwen3.window_layers == (0, 2)
    assert _parse("Qwen3MoeForCausalLM", use_sliding_window=True).window_layers == (0, 1, 2, 3)
    assert _parse("LlamaForCausalLM", sliding_window=16).sliding_window is None
    with pytest.raises(ValueError, match="layer_types lists 2 layers"):
        _parse("Qwen2ForCausalLM", use_sliding_window=True, layer_types=types[:2])
    with pytest.raises(ValueError, match="sliding_window must be an integer"):
        _parse("MistralForCausalLM", sliding_window="big")
    for name in VARIANTS:  # as transformers' own config objects say
        hf = _hf(name)
        cfg = ModelConfig.from_hf_dict(hf.config.to_dict())
        types = getattr(hf.config, "layer_types", None)
        if types is not None:
            assert cfg.window_layers == tuple(
                i for i, t in enumerate(types) if t == "sliding_attention")
        assert cfg.sliding_window == hf.config.sliding_window


@pytest.mark.parametrize("name", list(VARIANTS))
def test_outputs_equal_transformers_past_the_window(name: str) -> None:
    """Prompts several windows long: prefill logits, then 32 greedy steps in 7-token prefill
    chunks, on the modules and (Mistral) the native decoder stack."""
    hf = _hf(name)
    cfg = ModelConfig.from_hf_dict(hf.config.to_dict())
    ours = get_model_class(cfg.architecture)(cfg)
    ours.load_weights(hf.state_dict().items())
    prompts = [list(range(3, 40)), list(range(7, 20)), [5] * 3]
    config = transformers.GenerationConfig(max_new_tokens=MAX_NEW, do_sample=False,
                                           eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        for got, p in zip(prefill_logits(ours, prompts), prompts, strict=True):
            torch.testing.assert_close(got, hf(torch.tensor([p])).logits[0], atol=1e-4,
                                       rtol=1e-4)
        want = [hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=int),
                            generation_config=config)[0, len(p):].tolist() for p in prompts]
        assert paged_greedy_generate(ours, prompts, MAX_NEW, prefill_chunk=7) == want
        if name == "mistral":
            ours.attach_rows("f32")
            assert paged_greedy_generate(ours, prompts, MAX_NEW, prefill_chunk=7) == want
            assert ours._stack is not None


def test_blocks_before_the_window_go_back_to_the_pool() -> None:
    """release_outside_window frees the blocks no future query can see, marks them with the
    null block, and free() and hold() leave the null block alone."""
    kv = KVCacheManager(bp.make_block_pool(16), 4, True, window=10)
    r = Request("r", list(range(30)), SamplingParams(max_tokens=8))
    kv.allocate_slots(r, 30)
    r.num_computed_tokens = 30
    kv.cache_full_blocks([r])
    held = list(r.block_ids)
    free_before = kv.num_free_blocks
    # The next query is at 30 and sees (20, 30]: blocks 0-4 (tokens 0-19) are out of reach.
    assert kv.release_outside_window(r) == 5
    assert r.block_ids[:5] == [0] * 5 and r.block_ids[5:] == held[5:]
    assert kv.num_free_blocks == free_before + 5 and r.num_released_blocks == 5
    assert kv.release_outside_window(r) == 0  # nothing new
    r.num_computed_tokens = 33  # sees (23, 33]: block 5 (20-23) now too
    assert kv.release_outside_window(r) == 1
    kv.hold(r)
    assert not kv.holds and r.block_ids == []  # its prefix's head is gone: nothing held
    assert kv.num_free_blocks == 15
    # A request that never released keeps its hold; free() after a release frees the rest.
    s = Request("s", list(range(12)), SamplingParams(max_tokens=8))
    kv.allocate_slots(s, 12)
    s.num_computed_tokens = 12
    assert kv.release_outside_window(s) == 0  # sees (2, 12]: block 0 still needed
    s.num_computed_tokens = 16
    kv.allocate_slots(s, 4)
    assert kv.release_outside_window(s) == 1
    kv.free(s)
    assert kv.num_free_blocks == 15 and s.block_ids == [] and s.num_released_blocks == 0
    with pytest.raises(ValueError, match="window must be an integer >= 0"):
        KVCacheManager(bp.make_block_pool(4), 4, window=-1)


@pytest.mark.parametrize("overlap", [False, True])
def test_the_engine_serves_past_the_window_in_bounded_memory(
        tmp_path: Path, demo_model_dir: Path, overlap: bool) -> None:
    """A saved Mistral with a 16-token window through the engine: transformers' greedy tokens
    for contexts of several windows, while no running request holds more than the window's
    blocks plus the ones being written."""
    from xllm.config import EngineConfig
    from xllm.engine.llm_engine import LLMEngine

    config = transformers.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, sliding_window=16,
        architectures=["MistralForCausalLM"])
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(config).eval()
    randomize(hf, torch.Generator().manual_seed(9))
    save_with_tokenizer(hf, tmp_path, demo_model_dir)
    prompts = [list(range(5, 45)), list(range(100, 170)), list(range(7, 12))]
    gen = transformers.GenerationConfig(max_new_tokens=40, do_sample=False, eos_token_id=None,
                                        pad_token_id=0)
    with torch.no_grad():
        want = [hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=int),
                            generation_config=gen)[0, len(p):].tolist() for p in prompts]
    engine = LLMEngine(EngineConfig(model=str(tmp_path), dtype="float32", block_size=8,
                                    max_num_batched_tokens=32, kv_cache_memory_gb=0.01,
                                    overlap_scheduling=overlap))
    try:
        assert engine.max_model_len == 256  # no cap at the window any more
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        got: dict[str, list[int]] = {}
        most_held = released = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    got[out.request_id] = out.outputs[0].token_ids
            for r in engine.scheduler.requests.values():
                held = len(r.block_ids) - r.num_released_blocks
                most_held = max(most_held, held)
                released = max(released, r.num_released_blocks)
        assert [got[str(i)] for i in range(len(prompts))] == want
        # 16-token window in 8-token blocks, a 32-token chunk being written, overlap's extra.
        assert released > 0 and most_held <= 16 // 8 + 32 // 8 + 3, most_held
    finally:
        engine.close()
