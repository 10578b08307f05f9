"""Expert parallelism and its load balancer: the placement algorithm (DeepSeek's EPLB
method) on its own, then a Qwen3-MoE model under TP=2 with experts placed on the ranks --
greedy tokens equal to one rank's, with redundant experts, and unchanged by rebalancing in
the middle of a run; per-expert token counts on the engine and /metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import test_deepseek
import test_moe
import torch
from test_models import save_with_tokenizer
from test_tp import _assert_same_or_near_tie, _greedy, needs_two

from xllm import LLM, SamplingParams
from xllm.layers.eplb import (
    Placement,
    balanced_packing,
    rank_loads,
    rebalance_experts,
    replicate_experts,
    static_placement,
)

pytestmark = pytest.mark.timeout(600)


def test_packing_and_replication() -> None:
    w = np.array([[5.0, 1.0, 4.0, 2.0, 3.0, 3.0]])
    pack, rank = balanced_packing(w, 3)
    assert sorted(np.bincount(pack[0]).tolist()) == [2, 2, 2]  # two items a pack
    loads = np.bincount(pack[0], weights=w[0])
    assert loads.max() - loads.min() <= 1.0  # 6, 6, 6 here: 5+1, 4+2, 3+3
    assert sorted(zip(pack[0], rank[0], strict=True)) == sorted(
        {(p, r) for p, r in zip(pack[0], rank[0], strict=True)})  # (pack, rank) unique
    phy2log, replica, count = replicate_experts(np.array([[8.0, 1.0, 2.0]]), 6)
    # Replicas go where the load per replica is highest: expert 0 gets three more.
    assert phy2log[0].tolist()[:3] == [0, 1, 2] and count[0].tolist() == [4, 1, 1]
    assert sorted(replica[0][phy2log[0] == 0].tolist()) == [0, 1, 2, 3]


def test_rebalance_reproduces_deepseeks_published_example() -> None:
    """The example in DeepSeek's EPLB README (12 experts in 4 groups, 16 physical experts,
    2 nodes of 4 GPUs), whose printed output the hierarchical method must give."""
    weight = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                       [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
    placement = rebalance_experts(weight, 16, 4, 2, 8)
    assert placement.phy2log.tolist() == [
        [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
        [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


@pytest.mark.parametrize("layers,experts,physical,groups,ranks",
                         [(3, 64, 64, 8, 4), (2, 64, 72, 8, 8), (4, 12, 16, 1, 2)])
def test_rebalancing_a_skewed_load_evens_the_ranks(layers: int, experts: int, physical: int,
                                                   groups: int, ranks: int) -> None:
    rng = np.random.default_rng(experts + ranks)
    load = rng.zipf(1.4, size=(layers, experts)) * rng.uniform(0.9, 1.1, (layers, experts))
    before = rank_loads(load, static_placement(layers, experts, ranks, physical - experts))
    placement = rebalance_experts(load, physical, groups, 1, ranks)
    after = rank_loads(load, placement)
    np.testing.assert_allclose(after.sum(1), load.sum(1))  # every token still goes somewhere
    assert (after.max(1) <= before.max(1) + 1e-9).all()
    assert after.max(1).mean() < before.max(1).mean()
    for layer in range(layers):  # every expert placed, P / N slots a rank
        assert set(placement.phy2log[layer].tolist()) == set(range(experts))
        table, count = placement.replicas(layer)
        assert count.sum() == physical and (table[np.arange(experts), 0] >= 0).all()


def test_bad_placements_are_refused() -> None:
    with pytest.raises(ValueError, match="split evenly over 4 ranks"):
        static_placement(1, 6, 4)
    with pytest.raises(ValueError, match="at least one physical replica"):
        Placement(np.array([[0, 0, 1, 1]]), 3, 2)
    with pytest.raises(ValueError, match="name experts in"):
        Placement(np.array([[0, 1, 2, 3]]), 3, 2)


def _model_dir(tmp_path: Path, demo_model_dir: Path, name: str = "qwen3-moe") -> Path:
    """qwen3-moe: 4 layers, experts on layers 1 and 3, 8 experts, top 2; deepseek-v3: latent
    attention split by heads, layers 1-2 with 8 grouped experts and a shared one;
    deepseek-v2-lite: q without a low rank, one MoE layer of 6 experts."""
    if name == "qwen3-moe":
        hf = test_moe._hf(name)
    else:
        hf = test_deepseek._hf(name.removeprefix("deepseek-"))
    return save_with_tokenizer(hf, tmp_path, demo_model_dir)


def test_expert_parallel_needs_tensor_parallel_and_experts(tmp_path: Path,
                                                           demo_model_dir: Path) -> None:
    from xllm.config import EngineConfig

    with pytest.raises(ValueError, match="needs tensor_parallel_size >= 2"):
        EngineConfig(enable_expert_parallel=True)
    with pytest.raises(ValueError, match="need enable_expert_parallel"):
        EngineConfig(tensor_parallel_size=2, enable_eplb=True)
    with pytest.raises(ValueError, match="has no mixture-of-experts layers"):
        LLM(str(demo_model_dir), tensor_parallel_size=2, enable_expert_parallel=True)


@needs_two
@pytest.mark.parametrize("name,fmt", [("qwen3-moe", "dense"), ("qwen3-moe", "f32"),
                                      ("deepseek-v3", "f32"), ("deepseek-v2-lite", "dense")])
def test_ep2_equals_one_rank_and_rebalancing_mid_run_changes_nothing(
        name: str, fmt: str, tmp_path: Path, demo_model_dir: Path) -> None:
    model_dir = _model_dir(tmp_path, demo_model_dir, name)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 23, 40)]
    options = dict(dtype="float32", weight_format=fmt, max_model_len=128, num_kv_blocks=64,
                   block_size=8)
    ref = _greedy(LLM(str(model_dir), **options), prompts, 32)
    llm = LLM(str(model_dir), tensor_parallel_size=2, enable_expert_parallel=True,
              num_redundant_experts=2, **options)
    engine = llm.engine
    try:
        before = engine.placement
        if name.startswith("deepseek"):  # the latent attention's 4 heads split, 2 a rank
            assert engine.runner.model.model.layers[0].self_attn.num_heads == 2
        layers, experts = engine.expert_counts().shape
        assert before is not None and before.phy2log.shape == (layers, experts + 2)
        _assert_same_or_near_tie(ref, _greedy(llm, prompts, 32))
        counts = engine.expert_counts()  # every token of every step routed to its top k
        k = engine.model_config.num_experts_per_tok
        assert (counts.sum(1) == counts.sum(1)[0]).all()
        assert counts.sum() > 0 and counts.sum(1)[0] % k == 0

        # Mid-run: a few steps, a rebalance for a skewed load (experts move between the
        # ranks and hot ones gain replicas), then the rest of the run.
        params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True, logprobs=2)
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        outputs: dict[str, object] = {}
        steps = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = out.outputs[0]
            steps += 1
            if steps == 6:  # two hot experts a layer (the last two in the second layer)
                load = np.ones((layers, experts))
                load[:, 3], load[:, -2], load[-1, -1] = 50, 40, 60
                after = engine.rebalance_experts(load)
                assert not np.array_equal(after.phy2log, before.phy2log)
                assert (after.phy2log[0] == 3).sum() > 1  # the hot ones got the replicas
        assert engine.num_rebalances == 1
        _assert_same_or_near_tie(ref, [outputs[str(i)] for i in range(len(prompts))])
    finally:
        engine.close()


@needs_two
def test_eplb_runs_on_its_own_and_counts_reach_metrics(tmp_path: Path,
                                                       demo_model_dir: Path) -> None:
    """With enable_eplb the engine rebalances every eplb_step_interval steps by itself; the
    per-expert counts and rebalances are on /metrics."""
    from prometheus_client import generate_latest

    from xllm.api.metrics import ServerMetrics
    from xllm.config import EngineConfig
    from xllm.engine.async_engine import AsyncEngine

    model_dir = _model_dir(tmp_path, demo_model_dir)
    config = EngineConfig(model=str(model_dir), dtype="float32", weight_format="f32",
                          max_model_len=128, num_kv_blocks=64, block_size=8,
                          tensor_parallel_size=2, enable_expert_parallel=True, enable_eplb=True,
                          eplb_step_interval=5)
    engine = AsyncEngine(config)
    engine.start()
    try:
        assert engine.wait_ready(300), engine.error

        async def run() -> None:
            params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
            streams = [engine.generate(list(range(3, 3 + n)), params) for n in (7, 19)]
            for stream in streams:
                async for _ in stream:
                    pass

        import asyncio

        asyncio.run(run())
        text = generate_latest(ServerMetrics(engine.stats).registry).decode()
        stats = engine.stats()
        assert stats.num_rebalances >= 3 and stats.moe_layers == (1, 3)
        total = sum(sum(row) for row in stats.expert_counts)
        assert total > 0
        assert 'xllm_moe_expert_tokens_total{expert="0",layer="1"}' in text
        assert f"xllm_eplb_rebalances_total {float(stats.num_rebalances)}" in text
    finally:
        engine.shutdown()


def test_eplb_bench_measures_a_skewed_trace(tmp_path: Path) -> None:
    """bench.eplb end to end on a small trace: on the window it saw, EPLB leaves the ranks
    more even than the static placement."""
    import json

    from bench.eplb import main

    out = tmp_path / "eplb.json"
    assert main(["--experts", "16", "--layers", "2", "--tokens", "512", "--top-k", "2",
                 "--groups", "4", "--hidden", "32", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows
    assert np.mean([r["eplb_window"] for r in rows]) < np.mean([r["static_window"] for r in rows])
