"""DeepSeek-V2/V3 (multi-head latent attention, shared and group-routed experts, dense first
layers, yarn rope) against transformers on small random-weight configs: prefill logits (fp32)
and 32 greedy steps on several prompts, the MoE block, checkpoints as saved, the engine end
to end, and the latent cache's geometry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from test_models import (
    MAX_NEW,
    assert_engine_serves,
    assert_matches_transformers,
    hf_from_overrides,
    ours_from_hf,
    paged_greedy_generate,
    random_prompts,
)

from xllm.layers.mla import MLAttention
from xllm.loader import iter_weights
from xllm.models.config import ModelConfig
from xllm.models.registry import get_model_class

pytestmark = pytest.mark.timeout(300)

_MLA = dict(num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16)
_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
         "mscale": 0.707, "mscale_all_dim": 1.0, "rope_theta": 10000.0}
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # V3: q through the low-rank q_a/q_b, interleaved rope, sigmoid + bias, 4 groups of 2.
    "v3": ("DeepseekV3ForCausalLM", dict(
        _MLA, num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
        topk_group=2, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
        q_lora_rank=48, v_head_dim=24, routed_scaling_factor=2.5, norm_topk_prob=True)),
    # V3 without interleave, yarn-scaled rope (softmax scale times mscale^2), two dense layers.
    "v3-yarn": ("DeepseekV3ForCausalLM", dict(
        _MLA, num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=3, n_group=2,
        topk_group=1, moe_intermediate_size=32, n_shared_experts=2, first_k_dense_replace=2,
        q_lora_rank=32, v_head_dim=16, rope_interleave=False, rope_parameters=_YARN,
        norm_topk_prob=False)),
    # V2-Lite's shape: no q_lora_rank, greedy softmax routing, two shared experts.
    "v2-lite": ("DeepseekV2ForCausalLM", dict(
        _MLA, num_hidden_layers=2, n_routed_experts=6, num_experts_per_tok=2,
        moe_intermediate_size=32, n_shared_experts=2, first_k_dense_replace=1,
        q_lora_rank=None, v_head_dim=16, routed_scaling_factor=1.0)),
    # V2: group-limited greedy routing, scaled weights, every layer sparse.
    "v2": ("DeepseekV2ForCausalLM", dict(
        _MLA, num_hidden_layers=2, n_routed_experts=8, num_experts_per_tok=3,
        moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=0, q_lora_rank=24,
        v_head_dim=16, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        routed_scaling_factor=1.5)),
}


def _hf(name: str) -> Any:
    model = hf_from_overrides(*VARIANTS[name], name)
    gen = torch.Generator().manual_seed(len(name))
    with torch.no_grad():  # V3's correction bias is a buffer: make it matter
        for bname, buf in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):
                buf.copy_(0.3 * torch.randn(buf.shape, generator=gen))
    return model


_ours = ours_from_hf
_prompts = random_prompts


@pytest.mark.parametrize("name", list(VARIANTS))
def test_config_follows_transformers(name: str) -> None:
    hf = _hf(name)
    cfg = ModelConfig.from_hf_dict(hf.config.to_dict())
    sparse = tuple(i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts"))
    assert cfg.sparse_layers == sparse and sparse
    attn = hf.model.layers[0].self_attn
    assert cfg.mla and cfg.head_dim == attn.qk_head_dim and cfg.rope_dim == attn.qk_rope_head_dim
    assert cfg.kv_cache_geometry() == (1, cfg.kv_lora_rank + cfg.qk_rope_head_dim, 1)
    assert cfg.q_lora_rank == (hf.config.q_lora_rank or 0)
    layer = hf.model.layers[sparse[0]].mlp
    assert cfg.n_shared_experts * cfg.moe_intermediate_size == (
        layer.shared_experts.gate_proj.out_features)
    ours = _ours(hf)
    assert ours.model.layers[0].self_attn.attn.scale == pytest.approx(attn.scaling, rel=1e-12)
    assert ours.model.rotary_emb.attention_scaling == pytest.approx(
        hf.model.rotary_emb.attention_scaling, rel=1e-12)


@pytest.mark.parametrize("name", ["v3", "v2"])
def test_moe_block_matches_transformers(name: str) -> None:
    """Routed experts (grouped routing, V3's bias, scaling) plus the shared experts."""
    hf = _hf(name)
    ours = _ours(hf)
    i = ours.config.sparse_layers[0]
    x = torch.randn(41, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = hf.model.layers[i].mlp(x.unsqueeze(0))[0]
        got = ours.model.layers[i].mlp(x)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_and_greedy_tokens_match_transformers(name: str) -> None:
    hf = _hf(name)
    # 150 tokens: past the yarn variant's original 64 positions.
    prompts = _prompts([5, 13, 150 if name == "v3-yarn" else 29], sum(map(ord, name)))
    assert_matches_transformers(hf, _ours(hf), prompts)


def test_native_rows_give_transformers_tokens() -> None:
    """Every linear on native f32 rows and the experts on _C.MoeExperts: the same tokens."""
    hf = _hf("v3")
    ours = _ours(hf)
    assert ours.attach_rows("f32") > 0
    attn = ours.model.layers[0].self_attn
    assert attn.qkv_a_proj.blocks is not None and attn.o_proj.blocks is not None
    assert all(ours.model.layers[i].mlp.native is not None for i in ours.config.sparse_layers)
    assert not ours.use_native_stack()  # latent attention runs as modules
    prompts = _prompts([6, 19], 11)
    config = transformers.GenerationConfig(max_new_tokens=MAX_NEW, do_sample=False,
                                           eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        for p, tokens in zip(prompts, paged_greedy_generate(ours, prompts, MAX_NEW),
                             strict=True):
            ids = torch.tensor([p])
            want = hf.generate(ids, attention_mask=torch.ones_like(ids),
                               generation_config=config)[0, len(p):].tolist()
            assert tokens == want


def test_saved_checkpoints_load_and_skip_the_mtp_layers(tmp_path: Path) -> None:
    """save_pretrained writes one tensor per expert; V3 checkpoints also carry the multi-token
    prediction layer after the last (num_nextn_predict_layers), which decoding skips. A tensor
    of another layer past the last is still an error."""
    hf = _hf("v3")
    hf.save_pretrained(tmp_path)
    names = [n for n, _ in iter_weights(tmp_path)]
    assert any("mlp.experts.0.gate_proj" in n for n in names)
    assert any(n.endswith("mlp.gate.e_score_correction_bias") for n in names)
    ours = _ours(hf, iter_weights(tmp_path))
    fused = _ours(hf)
    for a, b in zip(ours.parameters(), fused.parameters(), strict=True):
        assert torch.equal(a, b)
    cfg = ModelConfig.from_hf_dict({**hf.config.to_dict(), "num_nextn_predict_layers": 1})
    mtp = [("model.layers.3.eh_proj.weight", torch.zeros(64, 128)),
           ("model.layers.3.self_attn.kv_b_proj.weight", torch.zeros(4, 4))]
    model = get_model_class(cfg.architecture)(cfg)
    model.load_weights([*hf.state_dict().items(), *mtp])
    for a, b in zip(model.parameters(), fused.parameters(), strict=True):
        assert torch.equal(a, b)
    model = get_model_class(cfg.architecture)(cfg)
    with pytest.raises(ValueError, match="model.layers.4.eh_proj.weight"):
        model.load_weights([*hf.state_dict().items(),
                            ("model.layers.4.eh_proj.weight", torch.zeros(64, 128))])


def test_bad_configs_and_tensor_parallelism_are_refused() -> None:
    from xllm.layers.parallel import TensorParallel

    hf = _hf("v3")
    base = hf.config.to_dict()
    with pytest.raises(ValueError, match="quantized checkpoints .*'fp8'"):
        ModelConfig.from_hf_dict({**base, "quantization_config": {"quant_method": "fp8"}})
    with pytest.raises(ValueError, match="must be a multiple of 8"):
        ModelConfig.from_hf_dict({**base, "kv_lora_rank": 30})
    with pytest.raises(ValueError, match="n_group .* must divide"):
        ModelConfig.from_hf_dict({**base, "n_group": 3})
    with pytest.raises(ValueError, match="topk_method 'noaux'"):
        ModelConfig.from_hf_dict({**_hf("v2").config.to_dict(), "topk_method": "noaux"})
    cfg = ModelConfig.from_hf_dict(base)

    class _Comm:
        native = None

    with pytest.raises(ValueError, match="tensor parallelism does not split"):
        get_model_class(cfg.architecture)(cfg, tp=TensorParallel(0, 2, _Comm()))


def test_strided_rope_heads_rotate_as_contiguous_ones() -> None:
    """MLA rotates the rope tail of each head's row in place: the native rotary takes heads
    with a stride, giving the bits a contiguous copy gets."""
    from xllm import _C
    from xllm.layers.rotary import RotaryEmbedding

    rope = RotaryEmbedding(16, 64, 10000.0)
    gen = torch.Generator().manual_seed(2)
    rows = torch.randn(9, 4, 48, generator=gen)
    positions = torch.randint(0, 64, (9,), generator=gen)
    tail = rows[:, :, 32:].contiguous()
    _C.rotary(rows[:, :, 32:], positions, rope.cos_cache, rope.sin_cache)
    _C.rotary(tail, positions, rope.cos_cache, rope.sin_cache)
    assert torch.equal(rows[:, :, 32:], tail)


def test_the_engine_serves_a_deepseek_checkpoint(tmp_path: Path, demo_model_dir: Path) -> None:
    """A saved V3 directory through the loader and the engine: one latent row per token in
    the KV store, and transformers' greedy tokens in fp32; in the CPU's default format most
    tokens agree."""

    def latent_rows(llm: Any) -> None:
        store = llm.engine.kv_store.config
        assert (store.num_kv_heads, store.head_size, store.tensors_per_layer) == (1, 48, 1)
        assert store.block_bytes == 3 * store.block_size * 48 * store.dtype_bytes

    assert_engine_serves(_hf("v3"), tmp_path, demo_model_dir, _prompts([9, 20, 33], 7),
                         latent_rows)
    from xllm import LLM

    with pytest.raises(ValueError, match="int8 is for K/V caches.*latent cache"):
        LLM(str(tmp_path), kv_cache_dtype="int8", max_model_len=128, kv_cache_memory_gb=0.05)


def test_latent_cache_is_smaller_than_the_heads_it_stands_for() -> None:
    """KV bytes per token: the latent row against the same model's expanded K and V."""
    hf = _hf("v3")
    cfg = ModelConfig.from_hf_dict(hf.config.to_dict())
    heads, size, tensors = cfg.kv_cache_geometry()
    latent = heads * size * tensors
    expanded = cfg.num_attention_heads * (cfg.head_dim + cfg.v_head_dim)
    assert (latent, expanded) == (48, 4 * (32 + 24))
    assert isinstance(_ours(hf).model.layers[0].self_attn, MLAttention)
