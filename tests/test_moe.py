"""Mixture-of-experts models (Qwen3-MoE, Mixtral) against transformers on small random-weight
configs: the routing and experts against transformers' blocks, prefill logits (fp32) and 32
greedy steps, checkpoints in transformers' fused form and as saved per expert."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from test_models import (
    MAX_NEW,
    assert_engine_serves,
    assert_matches_transformers,
    greedy_of,
    hf_from_overrides,
    ours_from_hf,
    paged_greedy_generate,
    random_prompts,
)

from xllm.layers.moe import moe_reference, route
from xllm.loader import iter_weights
from xllm.models.config import ModelConfig
from xllm.models.registry import get_model_class

pytestmark = pytest.mark.timeout(300)

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # Sparse layers 1 and 3 (decoder_sparse_step 2), layer 2 dense too (mlp_only_layers).
    "qwen3-moe": ("Qwen3MoeForCausalLM", dict(
        num_hidden_layers=4, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
        head_dim=16, decoder_sparse_step=2, mlp_only_layers=[2], norm_topk_prob=False,
        intermediate_size=128)),
    "qwen3-moe-renorm": ("Qwen3MoeForCausalLM", dict(
        num_experts=6, num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=True)),
    "mixtral": ("MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2,
                                           intermediate_size=64)),
}


def _hf(name: str) -> Any:
    return hf_from_overrides(*VARIANTS[name], name)


_ours = ours_from_hf
_prompts = random_prompts


@pytest.mark.parametrize("name", list(VARIANTS))
def test_config_and_layers_follow_transformers(name: str) -> None:
    hf = _hf(name)
    cfg = ModelConfig.from_hf_dict(hf.config.to_dict())
    sparse = tuple(i for i, layer in enumerate(hf.model.layers)
                   if hasattr(layer.mlp, "experts"))
    assert cfg.sparse_layers == sparse and sparse
    if name == "qwen3-moe":
        assert sparse == (1, 3) and cfg.head_dim == 16 and cfg.qk_norm
    assert cfg.num_experts == hf.model.layers[sparse[0]].mlp.experts.num_experts


@pytest.mark.parametrize("name", list(VARIANTS))
def test_moe_block_matches_transformers(name: str) -> None:
    hf = _hf(name)
    ours = _ours(hf)
    i = ours.config.sparse_layers[0]
    x = torch.randn(37, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = hf.model.layers[i].mlp(x.unsqueeze(0))
        want = (want[0] if isinstance(want, tuple) else want)[0]
        got = ours.model.layers[i].mlp(x)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    # The reference over no tokens, and with every expert chosen.
    moe = ours.model.layers[i].mlp
    assert moe_reference(x[:0], *route(x[:0] @ moe.router.t(), 2, False), moe.w13,
                         moe.w2).shape == (0, 64)
    ids, w = route(x @ moe.router.t(), moe.num_experts, True)
    assert torch.allclose(w.sum(-1), torch.ones(37))
    assert sorted(ids[0].tolist()) == list(range(moe.num_experts))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_and_greedy_tokens_match_transformers(name: str) -> None:
    hf = _hf(name)
    assert_matches_transformers(hf, _ours(hf), _prompts([5, 11, 23], sum(map(ord, name))))


@pytest.mark.parametrize("name", ["qwen3-moe", "mixtral"])
def test_saved_checkpoints_load_per_expert(name: str, tmp_path: Path) -> None:
    """save_pretrained writes one tensor per expert (Mixtral: block_sparse_moe, w1/w3/w2): the
    model loads those as it loads transformers' fused in-memory names."""
    hf = _hf(name)
    hf.save_pretrained(tmp_path)
    names = [n for n, _ in iter_weights(tmp_path)]
    expert = "block_sparse_moe.experts.0.w1" if name == "mixtral" else "mlp.experts.0.gate_proj"
    assert any(expert in n for n in names)
    ours = _ours(hf, iter_weights(tmp_path))
    fused = _ours(hf)
    for a, b in zip(ours.parameters(), fused.parameters(), strict=True):
        assert torch.equal(a, b)


def test_moe_refuses_tensor_parallelism_without_expert_parallelism() -> None:
    from xllm.layers.parallel import TensorParallel

    hf = _hf("mixtral")
    cfg = ModelConfig.from_hf_dict(hf.config.to_dict())

    class _Comm:
        native = None

    with pytest.raises(ValueError, match="tensor parallelism does not split"):
        get_model_class(cfg.architecture)(cfg, tp=TensorParallel(0, 2, _Comm()))


def test_the_engine_serves_a_moe_checkpoint(tmp_path: Path, demo_model_dir: Path) -> None:
    """A saved Qwen3-MoE directory through the loader and the engine: transformers' greedy
    tokens, in fp32 and in the CPU's default format."""
    assert_engine_serves(_hf("qwen3-moe"), tmp_path, demo_model_dir, _prompts([9, 20], 7))


@pytest.mark.parametrize("fmt", ["f32", "bf16_gemm"])
def test_native_experts_match_the_reference(isa: str, fmt: str) -> None:
    """_C.MoeExperts against moe_reference: token counts 0 to 300, experts without tokens,
    every expert chosen, each ISA level; f32 rows to fp32 rounding, bf16 arithmetic close."""
    from xllm.layers.moe import SparseMoE

    hf = _hf("qwen3-moe-renorm")
    cfg = ModelConfig.from_hf_dict({**hf.config.to_dict(), "moe_intermediate_size": 64})
    gen = torch.Generator().manual_seed(3)
    moe = SparseMoE(cfg, torch.float32)
    with torch.no_grad():
        for p in (moe.router, moe.w13, moe.w2):
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    w13, w2 = moe.w13.detach().clone(), moe.w2.detach().clone()
    assert moe.use_rows(fmt) and moe.native.num_experts == 6
    tol = dict(atol=2e-5, rtol=1e-5) if fmt == "f32" else dict(atol=3e-2, rtol=3e-2)
    for t, k in ((0, 3), (1, 3), (3, 1), (17, 3), (300, 3), (5, 6)):
        x = torch.randn(t, 64, generator=gen)
        logits = torch.randn(t, 6, generator=gen)
        if t == 17:
            logits[:, 4:] = -1e9  # experts 4 and 5 get no tokens
        ids, w = route(logits, k, True)
        want = moe_reference(x, ids, w, w13, w2)
        out = torch.empty(t, 64)
        moe.native.forward(x, ids, w, out)
        torch.testing.assert_close(out, want, **tol)
    with pytest.raises(ValueError, match="expert ids must be in"):
        moe.native.forward(torch.zeros(1, 64), torch.tensor([[6, 0, 1]]), torch.ones(1, 3),
                           torch.empty(1, 64))


@pytest.mark.parametrize("name", ["qwen3-moe", "mixtral"])
def test_native_experts_give_transformers_tokens(name: str) -> None:
    """The experts on native rows, the whole model in the native decoder stack (routing and
    experts inside it; Qwen3-MoE's dense layers beside them): transformers' tokens, and the
    stack's expert counts are the routing's."""
    hf = _hf(name)
    ours = _ours(hf)
    ours.attach_rows("f32")
    assert all(ours.model.layers[i].mlp.native is not None for i in ours.config.sparse_layers)
    prompts = _prompts([6, 19], 11)
    with torch.no_grad():
        got = paged_greedy_generate(ours, prompts, MAX_NEW)
    assert ours._stack is not None  # bound its caches: the whole model runs natively
    assert got == greedy_of(hf, prompts, MAX_NEW)
    counts = ours.expert_counts()  # each token routed once per step and layer, to top k
    k = ours.config.num_experts_per_tok
    assert (counts.sum(1) == counts.sum(1)[0]).all() and counts.sum(1)[0] % k == 0
    steps_tokens = sum(len(p) for p in prompts) + len(prompts) * (MAX_NEW - 1)
    assert counts.sum(1)[0] == k * steps_tokens


@pytest.mark.parametrize("kind", ["v2-greedy", "v2-grouped", "v3"])
def test_grouped_routing_matches_deepseek_routers(kind: str) -> None:
    """route_grouped reproduces transformers' DeepSeek-V2 (greedy, group-limited: max score
    per group, masked with 0) and V3 routers (sigmoid, correction bias for the choice only,
    groups by their top-2 sum masked with -inf, renormalized + 1e-20, scaled)."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    from xllm.layers.moe import RouterSpec, route_grouped

    gen = torch.Generator().manual_seed(len(kind))
    common = dict(hidden_size=32, n_routed_experts=16, num_experts_per_tok=3, n_group=4,
                  topk_group=2, routed_scaling_factor=1.7)
    bias = None
    if kind.startswith("v2"):
        method = "greedy" if kind == "v2-greedy" else "group_limited_greedy"
        router = DeepseekV2TopkRouter(transformers.DeepseekV2Config(**common,
                                                                     topk_method=method))
        spec = RouterSpec(3, "softmax", False, n_group=4 if method != "greedy" else 1,
                          topk_group=2 if method != "greedy" else 1, scale=1.7)
    else:
        router = DeepseekV3TopkRouter(transformers.DeepseekV3Config(**common,
                                                                     norm_topk_prob=True))
        bias = torch.randn(16, generator=gen) * 0.3
        router.e_score_correction_bias.copy_(bias)
        spec = RouterSpec(3, "sigmoid", True, 1e-20, 4, 2, "top2sum", float("-inf"), 1.7)
    with torch.no_grad():
        router.weight.copy_(torch.randn(16, 32, generator=gen))
        x = torch.randn(50, 32, generator=gen)
        _, want_w, want_ids = router(x)
        ids, w = route_grouped(x @ router.weight.t(), spec, bias)
    order, want_order = ids.argsort(-1), want_ids.argsort(-1)
    assert torch.equal(ids.gather(1, order), want_ids.gather(1, want_order))
    torch.testing.assert_close(w.gather(1, order), want_w.gather(1, want_order),
                               atol=1e-6, rtol=1e-6)
    # The defaults are route()'s choice.
    plain_ids, plain_w = route(x @ router.weight.t(), 3, True)
    ids, w = route_grouped(x @ router.weight.t(), RouterSpec(3, renormalize=True))
    assert torch.equal(ids, plain_ids) and torch.allclose(w, plain_w)


@pytest.mark.parametrize("kind", ["plain", "renorm", "v2-grouped", "v3"])
def test_native_router_matches_torch(kind: str) -> None:
    """_C.moe_route (the CPU's router) chooses the experts route_grouped chooses, with the
    same weights to fp32 rounding, over 0 to 300 tokens; DeepSeek's grouped forms too."""
    from xllm.layers.moe import RouterSpec, route_grouped, route_native

    spec, experts = {
        "plain": (RouterSpec(8), 64),
        "renorm": (RouterSpec(2, renormalize=True), 8),
        "v2-grouped": (RouterSpec(3, "softmax", False, 1e-20, 4, 2, "max", 0.0, 1.7), 16),
        "v3": (RouterSpec(8, "sigmoid", True, 1e-20, 8, 4, "top2sum", float("-inf"), 2.5),
               256),
    }[kind]
    gen = torch.Generator().manual_seed(len(kind))
    bias = 0.3 * torch.randn(experts, generator=gen) if kind == "v3" else None
    for t in (0, 1, 7, 300):
        logits = 2 * torch.randn(t, experts, generator=gen)
        want_ids, want_w = route_grouped(logits, spec, bias)
        ids, w = route_native(logits, spec, bias)
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(w, want_w, atol=1e-6, rtol=1e-6)
    # Ties go to the lower expert id, largest first.
    ids, w = route_native(torch.tensor([[1.0, 3.0, 3.0, 0.0]]), RouterSpec(2))
    assert ids.tolist() == [[1, 2]]


def test_native_router_rejects_bad_input() -> None:
    from xllm import _C

    ids, w = torch.empty(2, 2, dtype=torch.int64), torch.empty(2, 2)
    with pytest.raises(ValueError, match="top_k must be in \\[1, num_experts = 4\\]"):
        _C.moe_route(torch.zeros(2, 4), torch.empty(2, 5, dtype=torch.int64),
                     torch.empty(2, 5), 5)
    with pytest.raises(ValueError, match="n_group \\(3\\) must divide"):
        _C.moe_route(torch.zeros(2, 4), ids, w, 2, n_group=3)
    with pytest.raises(ValueError, match="'scoring' must be 'softmax' or 'sigmoid'"):
        _C.moe_route(torch.zeros(2, 4), ids, w, 2, scoring="relu")
    with pytest.raises(ValueError, match="bias"):
        _C.moe_route(torch.zeros(2, 4), ids, w, 2, bias=torch.zeros(3))
