"""The engine on a CUDA device, end to end (marked ``gpu``: skipped without one).

No session of this project has had a GPU for the engine yet; ``bench/device_check.sh``
runs this file with the Triton kernels' GPU tests on a lent machine, in one call. Each test
compares with what the CPU computes:

- greedy tokens of the random-weight variants of each architecture (dense, MoE, MLA) equal
  transformers' (fp32, on the CPU), through the whole engine (scheduler, runner, Triton
  attention and KV writes, the fused-MoE kernels, the sampler);
- in bf16, the logprob-closeness check of tests/test_reduced_precision.py against fp32;
- the KV pool's memory mapped on demand through the driver's VMM API
  (:class:`xllm.ops.cuda_vmm.CudaVmmPool`): pages read as zeros when mapped, go back to the
  device when unmapped, and an engine on it gives the outputs of one allocation up front
  (``XLLM_CUDA_VMM=0``) and gives memory back when idle;
- tensor parallelism on CUDA: TP=2 over NCCL where there are two devices, else over gloo
  with both ranks on one device, gives TP=1's greedy tokens (or differs at a near tie);
- the KV tiers and peer blocks of a pool in device memory (``KVStore.attach_device``): a
  prefix evicted to the CPU or disk tier comes back with the outputs of no prefix caching,
  and blocks move between a CUDA engine and a CPU one either way.

The tokenizer is the demo model's: ``XLLM_TOKENIZER_DIR`` names a folder with its files
(the device machine cannot download the demo; the script carries them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# Every architecture's random-weight variants: (kind, name).
ALL: list[tuple[str, str]] = []
if torch.cuda.is_available():  # (the helpers import transformers: only where this runs)
    import test_deepseek
    import test_moe
    from test_models import VARIANTS, greedy_of, hf_model, random_prompts, save_with_tokenizer
    from test_reduced_precision import TOP, assert_logprobs_close

    ALL = ([("dense", n) for n in VARIANTS] + [("moe", n) for n in test_moe.VARIANTS]
           + [("mla", n) for n in test_deepseek.VARIANTS])

MAX_NEW = 12


@pytest.fixture(scope="module")
def tokenizer_dir(request: pytest.FixtureRequest) -> Path:
    where = os.environ.get("XLLM_TOKENIZER_DIR")
    return Path(where) if where else request.getfixturevalue("demo_model_dir")


def _llm(model_dir: Path, **options: Any) -> Any:
    from xllm import LLM

    opts = dict(device="cuda", max_model_len=256, kv_cache_memory_gb=0.05)
    return LLM(str(model_dir), **{**opts, **options})


def _greedy(llm: Any, prompts: list[list[int]], max_new: int = MAX_NEW) -> list[list[int]]:
    from xllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _gap(hf: Any, prompt: list[int], tokens: list[int]) -> str:
    """Where two greedy continuations part: the reference's top-2 logit gap there (a near
    tie that fp32 rounding may flip says so rather than hiding it)."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:]
    top = logits.topk(2, dim=-1).values
    return f"top-2 gaps along the reference: {(top[:, 0] - top[:, 1]).tolist()}"


def _assert_greedy_equal(hf: Any, llm: Any, prompts: list[list[int]]) -> None:
    got = _greedy(llm, prompts)
    want = greedy_of(hf, prompts, MAX_NEW)
    for p, g, w in zip(prompts, got, want, strict=True):
        assert g == w, f"ours {g} != transformers {w}; {_gap(hf, p, w)}"


def _hf(kind: str, name: str) -> Any:
    if kind == "dense":
        return hf_model(name)
    return (test_moe if kind == "moe" else test_deepseek)._hf(name)


@pytest.mark.parametrize(("kind", "name"), ALL, ids=[f"{k}-{n}" for k, n in ALL])
def test_engine_greedy_equals_transformers_fp32(kind: str, name: str, tmp_path: Path,
                                                tokenizer_dir: Path) -> None:
    hf = _hf(kind, name)
    llm = _llm(save_with_tokenizer(hf, tmp_path, tokenizer_dir), dtype="float32")
    try:
        layer = llm.engine.runner.model.model.layers[0]
        assert next(layer.parameters()).is_cuda
        _assert_greedy_equal(hf, llm, random_prompts([5, 23, 40], seed=7))
    finally:
        llm.engine.close()


@pytest.mark.parametrize("name", ["llama-gqa", "qwen3-qknorm-headdim"])
def test_engine_bf16_close_to_transformers_fp32(name: str, tmp_path: Path,
                                                tokenizer_dir: Path) -> None:
    from xllm import SamplingParams

    hf = hf_model(name)
    llm = _llm(save_with_tokenizer(hf, tmp_path, tokenizer_dir), dtype="bfloat16")
    try:
        prompts = random_prompts([9, 30], seed=11)
        agreed = 0
        for prompt, ours in zip(prompts, _greedy(llm, prompts, 24), strict=True):
            seq = prompt + ours
            with torch.no_grad():
                ref = hf(torch.tensor([seq])).logits[0, len(prompt) - 1:-1].float()
            scored = llm.generate([seq], SamplingParams(max_tokens=1, prompt_logprobs=TOP),
                                  use_tqdm=False)[0]
            tops = [scored.prompt_logprobs[len(prompt) + i] for i in range(len(ours))]
            agreed += assert_logprobs_close(ours, tops, ref, name)
        assert agreed >= 8
    finally:
        llm.engine.close()


@pytest.mark.parametrize("tiers", ["cpu", "disk"])
def test_device_pool_tiers_give_the_outputs_of_recomputing(tiers: str, tmp_path: Path,
                                                           tokenizer_dir: Path) -> None:
    """A prefix evicted from the device pool comes back from a tier (gathered to pinned
    staging, landed with index_copy_) with the outputs of an engine without prefix caching."""
    hf = hf_model("llama-gqa")
    model_dir = save_with_tokenizer(hf, tmp_path / "model", tokenizer_dir)
    doc = random_prompts([112], seed=3)[0]
    prompts = [doc + q for q in random_prompts([6, 9], seed=4)]
    flood = random_prompts([120] * 4, seed=5)
    opts = dict(dtype="bfloat16", num_kv_blocks=24, block_size=16)
    plain = _llm(model_dir, enable_prefix_caching=False, **opts)
    want = _greedy(plain, prompts)
    plain.engine.close()
    tier = (dict(kv_offload_cpu_gb=0.01) if tiers == "cpu"
            else dict(kv_offload_disk=str(tmp_path / "kv"), kv_offload_disk_gb=0.01))
    llm = _llm(model_dir, **opts, **tier)
    store = llm.engine.kv_store
    try:
        assert store.device_part is not None and store.device_part[0].is_cuda
        assert _greedy(llm, prompts[:1]) == want[:1]
        for prompt, ref in zip(prompts, want, strict=True):
            for f in flood:  # the document's blocks leave the pool
                _greedy(llm, [f], 1)
            store.flush()
            from xllm import SamplingParams

            out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=MAX_NEW,
                                                        ignore_eos=True), use_tqdm=False)[0]
            assert out.outputs[0].token_ids == ref
            assert out.num_cached_tokens >= 96
        assert store.tiers[0].hit_blocks > 0
    finally:
        llm.engine.close()


@pytest.mark.parametrize("which", ["peer", "client"])
def test_blocks_move_between_a_cuda_and_a_cpu_engine(which: str, tmp_path: Path,
                                                     tokenizer_dir: Path) -> None:
    """The streamed peer path between a device pool and a host pool, either way: the same
    bytes and checksums, so the fetched prefix gives the outputs of computing it."""
    from test_kv_transfer import _transfer

    hf = hf_model("llama-gqa")
    model_dir = save_with_tokenizer(hf, tmp_path, tokenizer_dir)
    opts = dict(dtype="float32", kv_cache_dtype="bfloat16", num_kv_blocks=48, block_size=16)
    gpu = _llm(model_dir, **opts)
    cpu = _llm(model_dir, **{**opts, "device": "cpu"})
    peer, client = (gpu, cpu) if which == "peer" else (cpu, gpu)
    try:
        prompt = random_prompts([150], seed=9)[0]
        want = _greedy(peer, [prompt])[0]
        n = _transfer(peer, client, prompt, same_host=False)
        assert n == (len(prompt) - 1) // 16
        from xllm import SamplingParams

        out = client.generate([prompt], SamplingParams(temperature=0.0, max_tokens=MAX_NEW,
                                                       ignore_eos=True), use_tqdm=False)[0]
        assert out.num_cached_tokens == n * 16
        # fp32 on two devices: the same tokens unless a near tie flips (the gap says)
        assert out.outputs[0].token_ids == want, _gap(hf, prompt, want)
    finally:
        gpu.engine.close()
        cpu.engine.close()


def test_cuda_vmm_pool_maps_zeroed_pages_and_gives_them_back() -> None:
    from xllm.ops.cuda_vmm import CudaVmmPool, granularity, supported

    assert supported(0)
    unit = granularity(0)
    pages = max(1, (64 << 20) // unit)  # 64 MiB a page: visible in the device's free memory
    pool = CudaVmmPool(4 * pages * unit, pages * unit, 0)
    page = pool.page_bytes
    view = pool.tensor(torch.float32)
    assert view.is_cuda and view.data_ptr() == pool.address
    assert view.numel() * 4 == pool.reserved_bytes
    torch.cuda.synchronize()
    free0 = torch.cuda.mem_get_info()[0]
    pool.map_pages([page, 3 * page])
    torch.cuda.synchronize()
    assert free0 - torch.cuda.mem_get_info()[0] >= 2 * page
    assert pool.physical_bytes == 2 * page and pool.mapped_offsets() == [page, 3 * page]
    first = view[page // 4:2 * page // 4]
    assert torch.count_nonzero(first) == 0  # zeroed when mapped
    data = torch.randn(first.numel(), device="cuda")
    first.copy_(data)
    assert torch.equal(first, data) and torch.count_nonzero(view[3 * page // 4:]) == 0
    with pytest.raises(ValueError, match="already mapped"):
        pool.map_pages([page])
    pool.unmap_pages([page])
    torch.cuda.synchronize()
    assert torch.cuda.mem_get_info()[0] - free0 >= -page - (16 << 20)  # one page's worth back
    pool.map_pages([page])
    assert torch.count_nonzero(view[page // 4:2 * page // 4]) == 0  # zeros again, not old data
    bf16 = pool.tensor(torch.bfloat16, (2, page // 2), offset=page)
    bf16[1].fill_(1.5)
    assert float(bf16[1].float().mean()) == 1.5
    with pytest.raises(ValueError, match="multiple"):
        CudaVmmPool(4 * unit, unit + 1, 0)
    del view, first, bf16
    pool.release()
    assert pool.physical_bytes == 0


def test_engine_kv_memory_on_demand_on_cuda(tmp_path: Path, tokenizer_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's pool over cuMemMap: the outputs of one allocation up front; mapped
    memory grows with a burst and falls once idle, and the engine serves again after."""
    hf = hf_model("llama-gqa")
    model_dir = save_with_tokenizer(hf, tmp_path, tokenizer_dir)
    # A page group is 2 MiB of each region (the device's granularity): 256 of these 8 KiB
    # block segments. 128 requests of 4 blocks each, all running at once, need ~3 groups.
    prompts = random_prompts([180] * 128, seed=13)
    opts = dict(dtype="float32", kv_cache_memory_gb=0.5, kv_idle_release_s=0.0,
                block_size=64, max_num_seqs=128, max_num_batched_tokens=8192)
    monkeypatch.setenv("XLLM_CUDA_VMM", "0")
    whole = _llm(model_dir, **opts)
    assert whole.engine.kv_store.memory is None
    want = _greedy(whole, prompts, 40)
    whole.engine.close()
    monkeypatch.delenv("XLLM_CUDA_VMM")
    llm = _llm(model_dir, **opts)
    store = llm.engine.kv_store
    try:
        assert store.memory is not None and store.memory.cuda_device == 0
        assert store.device_part is not None and store.device_part[0].is_cuda
        idle = store.mapped_bytes
        assert idle < store.stats().reserved_bytes
        assert _greedy(llm, prompts, 40) == want
        burst = store.mapped_bytes
        assert burst >= idle + 2 * store.memory.page_bytes * store.memory.num_regions
        store.maintain()
        store.maintain()
        assert store.mapped_bytes < burst
        assert _greedy(llm, prompts[:2], 40) == want[:2]
    finally:
        llm.engine.close()


@pytest.mark.parametrize("vmm", ["1", "0"])
def test_tp2_on_cuda_matches_tp1(vmm: str, tmp_path: Path, tokenizer_dir: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rank on its device (rank r on device r; with one device both share it over
    gloo), its KV share on that device (mapped on demand, or whole with XLLM_CUDA_VMM=0)."""
    from test_tp import _assert_same_or_near_tie
    from test_tp import _greedy as greedy_with_logprobs

    monkeypatch.setenv("XLLM_CUDA_VMM", vmm)
    hf = hf_model("llama-gqa")
    model_dir = save_with_tokenizer(hf, tmp_path, tokenizer_dir)
    prompts = random_prompts([5, 23, 40], seed=21)
    opts = dict(dtype="float32", num_kv_blocks=64, block_size=16)
    one = _llm(model_dir, **opts)
    ref = greedy_with_logprobs(one, prompts, MAX_NEW)
    one.engine.close()
    backend = "auto" if torch.cuda.device_count() >= 2 else "gloo"
    two = _llm(model_dir, tensor_parallel_size=2, tp_backend=backend, **opts)
    try:
        got = greedy_with_logprobs(two, prompts, MAX_NEW)
        plain = _greedy(two, prompts)
    finally:
        two.engine.close()
    assert plain == [g.token_ids for g in got]  # each rank's best token = the logits' argmax
    _assert_same_or_near_tie(ref, got)
