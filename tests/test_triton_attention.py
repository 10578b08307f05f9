"""Triton paged attention and KV cache write against the plain-torch references.

Without a GPU the kernels run on CPU tensors in Triton's interpreter. Triton picks compiled
or interpreted when `triton` itself (its standard library is made of jit functions) and
then each kernel is first imported, so this module sets TRITON_INTERPRET=1 before either
happens on a machine without CUDA, and leaves it set (some of triton's helpers read it at
call time). If another test module imported triton first, that is too late: the same cases
then run in a child pytest with the flag set (test_interpreter_cases_in_subprocess). With
CUDA, the cases run compiled in the tests marked `gpu`.

Cache slots that no sequence owns (the null block 0 and the tail of each last block) are
filled with NaN: a kernel that reads or weights anything past a sequence's length fails.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

import pytest
import torch
from triton_interpreter import run_interpreter_cases

CUDA = torch.cuda.is_available()
if not CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton", reason="triton is not installed; the kernels need it")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from xllm.ops import attention as dispatch  # noqa: E402
from xllm.ops import attention_ref as ref  # noqa: E402
from xllm.ops.triton import attention as tri  # noqa: E402

# Interpreted kernels need an interpreted standard library (tl.zeros, tl.sum, ...) too.
IN_PROCESS = tri.kernels_interpreted() and isinstance(triton.language.zeros, InterpretedFunction)

# Output tolerance by cache dtype: 16-bit dots round the softmax weights and the output.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(scope="module")
def interp() -> ModuleType:
    """xllm.ops.triton.attention with interpreted kernels (CPU tensors)."""
    if not IN_PROCESS:
        pytest.skip(
            "CUDA is present: the same cases run compiled in the gpu-marked tests"
            if CUDA
            else "triton was imported before TRITON_INTERPRET=1 could be "
            "set; test_interpreter_cases_in_subprocess runs these cases"
        )
    return tri


@pytest.fixture(scope="module")
def gpu() -> ModuleType:
    if not CUDA:
        pytest.skip("no CUDA device")
    if tri.kernels_interpreted():
        pytest.skip("the kernels were imported under TRITON_INTERPRET=1 in this process")
    return tri


@pytest.mark.skipif(IN_PROCESS or CUDA, reason="the interpreter cases run in this process")
def test_interpreter_cases_in_subprocess() -> None:
    run_interpreter_cases(__file__)


# ------------------------------------------------------------------ builders


def _paged(
    lens: list[int],
    kv_heads: int,
    head: int,
    block_size: int,
    dtype: torch.dtype,
    device: str,
    gen: torch.Generator,
    extra_cols: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(key_cache, value_cache, block_tables, seq_lens) for contexts of the given lengths.

    Contexts sit in shuffled blocks; every slot no sequence owns is NaN.
    """
    per_seq = [(n + block_size - 1) // block_size for n in lens]
    num_blocks = 1 + sum(per_seq)  # block 0 stays the null block
    shape = (num_blocks, kv_heads, block_size, head)
    key_cache = torch.full(shape, float("nan"), dtype=dtype)
    value_cache = torch.full(shape, float("nan"), dtype=dtype)
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    table = torch.zeros(len(lens), max(per_seq, default=0) + extra_cols, dtype=torch.int32)
    for i, n in enumerate(lens):
        blocks = [ids.pop() for _ in range(per_seq[i])]
        table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        for j, b in enumerate(blocks):
            used = min(block_size, n - j * block_size)
            for cache in (key_cache, value_cache):
                cache[b, :, :used] = torch.randn(kv_heads, used, head, generator=gen).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    return (key_cache.to(device), value_cache.to(device), table.to(device), seq_lens.to(device))


def _strided_query(
    tokens: int, heads: int, head: int, dtype: torch.dtype, device: str, gen: torch.Generator
) -> torch.Tensor:
    """Query as the leading slice of a fused QKV row, so dim 0 carries a row stride."""
    qkv = torch.randn(tokens, heads * head + 2 * head, generator=gen).to(dtype).to(device)
    return qkv[:, : heads * head].view(tokens, heads, head)


def _close(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOL[dtype]
    torch.testing.assert_close(out.float().cpu(), expected.float().cpu(), atol=tol, rtol=tol)


# ------------------------------------------------------------------ shared checks

# (num_heads, num_kv_heads, head_size, block_size, seq_lens, cache dtype, partition_size)
DECODE_CASES = [
    (4, 4, 64, 16, [1, 16, 33], torch.float32, None),  # MHA, on and off block boundaries
    (4, 2, 128, 32, [32, 65], torch.float16, 32),  # GQA 2, three-way split
    (8, 2, 80, 16, [0, 47], torch.float32, 16),  # GQA 4, head 80, empty context, split
    (8, 1, 64, 16, [31, 128], torch.bfloat16, 48),  # MQA, partitions not a tile multiple
    (4, 2, 64, 24, [50, 24], torch.float32, 0),  # block size 24, forced single pass
]

# (num_heads, num_kv_heads, head_size, block_size, q_lens, seq_lens, cache dtype)
PREFILL_CASES = [
    (4, 4, 64, 16, [17, 32], [17, 32], torch.float32),  # whole prompts, several q tiles
    (4, 2, 128, 32, [5, 40], [37, 40], torch.float16),  # GQA 2, cached prefix and none
    (8, 2, 80, 16, [0, 20, 1], [16, 52, 9], torch.float32),  # GQA 4, head 80, empty chunk
    (4, 1, 64, 16, [33], [97], torch.bfloat16),  # MQA, long prefix
    (6, 2, 64, 16, [30, 7], [30, 50], torch.float32),  # group of 3: ragged rows per tile
]


def check_decode(tri: ModuleType, device: str, case: tuple, seed: int, window: int = 0) -> None:
    """With a window, the table entries of blocks wholly before it point at the null block
    (NaN here): the kernel must not read them."""
    heads, kv_heads, head, bs, lens, dtype, part = case
    gen = torch.Generator().manual_seed(seed)
    kc, vc, table, seq_lens = _paged(lens, kv_heads, head, bs, dtype, device, gen)
    query = _strided_query(len(lens), heads, head, dtype, device, gen)
    scale = head**-0.5
    expected = ref.paged_attention_decode_ref(query, kc, vc, table, seq_lens, scale, window)
    if window:
        table = table.clone()
        for i, n in enumerate(lens):
            table[i, : max(0, n - window) // bs] = 0
    out = torch.full(query.shape, float("nan"), dtype=dtype, device=device)
    tri.paged_attention_decode(out, query, kc, vc, table, seq_lens, scale, window,
                               partition_size=part)
    _close(out, expected, dtype)


def check_prefill(tri: ModuleType, device: str, case: tuple, seed: int, window: int = 0) -> None:
    heads, kv_heads, head, bs, q_lens, lens, dtype = case
    gen = torch.Generator().manual_seed(seed)
    kc, vc, table, seq_lens = _paged(lens, kv_heads, head, bs, dtype, device, gen)
    starts = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0).to(torch.int32)
    query = _strided_query(sum(q_lens), heads, head, dtype, device, gen)
    scale = 0.7 * head**-0.5
    expected = ref.paged_attention_prefill_ref(
        query, kc, vc, table, starts.to(device), seq_lens, scale, window
    )
    if window:  # blocks before the first query's window: the null block (NaN)
        table = table.clone()
        for i, (q, n) in enumerate(zip(q_lens, lens, strict=True)):
            table[i, : max(0, n - q - window + 1) // bs] = 0
    out = torch.full(query.shape, float("nan"), dtype=dtype, device=device)
    tri.paged_attention_prefill(out, query, kc, vc, table, starts.to(device), seq_lens, scale,
                                window)
    _close(out, expected, dtype)


def check_write(
    tri: ModuleType, device: str, cache_dtype: torch.dtype, slot_dtype: torch.dtype, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    kv_heads, head, bs, num_blocks, tokens = 3, 80, 16, 5, 23
    slots = torch.randperm(num_blocks * bs, generator=gen)[:tokens]
    slots[::4] = -1  # padding rows
    slots[1] = num_blocks * bs  # past the cache: skipped, never written
    fused = torch.randn(tokens, 2 * kv_heads * head + 7, generator=gen)
    key = fused[:, : kv_heads * head].view(tokens, kv_heads, head).to(device)
    value = fused.to(device)[:, kv_heads * head : 2 * kv_heads * head].view(tokens, kv_heads, head)
    base = torch.randn(num_blocks, kv_heads, bs, head, generator=gen).to(cache_dtype)
    kc, vc = base.clone().to(device), (base * 2).to(device)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    keep = (slots < num_blocks * bs).to(device)
    ref.write_kv_cache_ref(key[keep], value[keep], kc_ref, vc_ref, slots.to(device)[keep])
    tri.write_kv_cache(key, value, kc, vc, slots.to(slot_dtype).to(device))
    if device == "cpu" and cache_dtype == torch.bfloat16:
        # The interpreter narrows fp32 to bf16 by truncation, the GPU rounds to nearest
        # even (torch's rule too): allow one bf16 ulp here, exact elsewhere.
        for got, want in ((kc, kc_ref), (vc, vc_ref)):
            torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=0)
    else:
        assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


# ------------------------------------------------------------------ interpreter (CPU)


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"h{c[0]}kv{c[1]}d{c[2]}bs{c[3]}")
def test_decode_matches_reference(interp: ModuleType, case: tuple) -> None:
    check_decode(interp, "cpu", case, seed=len(DECODE_CASES) + DECODE_CASES.index(case))


@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: f"h{c[0]}kv{c[1]}d{c[2]}bs{c[3]}")
def test_prefill_matches_reference(interp: ModuleType, case: tuple) -> None:
    check_prefill(interp, "cpu", case, seed=PREFILL_CASES.index(case))


@pytest.mark.parametrize("window", [1, 20, 70])
def test_sliding_window_matches_reference(interp: ModuleType, window: int) -> None:
    """A query at position p sees keys (p - window, p]; split and single-pass decode."""
    check_decode(interp, "cpu", DECODE_CASES[1], seed=window, window=window)
    check_decode(interp, "cpu", DECODE_CASES[3], seed=window, window=window)
    check_prefill(interp, "cpu", PREFILL_CASES[1], seed=window, window=window)
    check_prefill(interp, "cpu", PREFILL_CASES[3], seed=window, window=window)


def test_decode_auto_split_for_small_batch(interp: ModuleType) -> None:
    # One sequence x one KV head cannot fill a GPU: the heuristic must split its context.
    assert interp._decode_partition_size(1, 1, 1024, torch.device("cpu"), 64) is not None
    check_decode(interp, "cpu", (2, 1, 64, 16, [1000], torch.float16, None), seed=7)


def test_mixed_query_and_cache_dtypes(interp: ModuleType) -> None:
    gen = torch.Generator().manual_seed(3)
    kc, vc, table, seq_lens = _paged([40, 9], 2, 64, 16, torch.float32, "cpu", gen)
    query = torch.randn(2, 4, 64, generator=gen).to(torch.bfloat16)
    out = dispatch.paged_attention_decode(query, kc, vc, table, seq_lens, 0.125, backend="triton")
    assert out.dtype == torch.bfloat16
    expected = ref.paged_attention_decode_ref(query, kc, vc, table, seq_lens, 0.125)
    _close(out, expected, torch.bfloat16)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_write_kv_cache(interp: ModuleType, cache_dtype: torch.dtype) -> None:
    check_write(interp, "cpu", cache_dtype, torch.int64, seed=11)


def test_write_then_attend_through_dispatcher(interp: ModuleType) -> None:
    """A whole prompt written with write_kv_cache, then prefill and decode over it."""
    gen = torch.Generator().manual_seed(5)
    heads, kv_heads, head, bs, n = 4, 2, 64, 16, 21
    kc = torch.zeros(4, kv_heads, bs, head)
    vc = torch.zeros_like(kc)
    table = torch.tensor([[2, 3, 0]], dtype=torch.int32)
    slots = torch.tensor([table[0, p // bs] * bs + p % bs for p in range(n)], dtype=torch.int32)
    k, v = (
        torch.randn(n, kv_heads, head, generator=gen),
        torch.randn(n, kv_heads, head, generator=gen),
    )
    dispatch.write_kv_cache(k, v, kc, vc, slots, backend="triton")
    q = torch.randn(n, heads, head, generator=gen)
    starts = torch.tensor([0, n], dtype=torch.int32)
    lens = torch.tensor([n], dtype=torch.int32)
    out = dispatch.paged_attention_prefill(q, kc, vc, table, starts, lens, 0.125, backend="triton")
    # Direct causal attention on the unpaged K/V, as an independent oracle.
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.repeat_interleave(2, 1).transpose(0, 1),
        v.repeat_interleave(2, 1).transpose(0, 1),
        is_causal=True,
        scale=0.125,
    ).transpose(0, 1)
    _close(out, expected, torch.float32)
    last = dispatch.paged_attention_decode(
        q[-1:].contiguous(), kc, vc, table, lens, 0.125, backend="triton"
    )
    _close(last, expected[-1:], torch.float32)


# ------------------------------------------------------------------ bad input


def _good_args() -> dict:
    gen = torch.Generator().manual_seed(0)
    kc, vc, table, lens = _paged([20, 5], 2, 64, 16, torch.float32, "cpu", gen)
    query = torch.randn(2, 4, 64)
    return dict(
        out=torch.empty_like(query),
        query=query,
        key_cache=kc,
        value_cache=vc,
        block_tables=table,
        seq_lens=lens,
        scale=0.125,
    )


BAD_DECODE = [
    ("query", lambda a: a.update(query=a["query"].to(torch.int32))),
    ("query", lambda a: a.update(query=a["query"].transpose(1, 2).contiguous().transpose(1, 2))),
    ("out", lambda a: a.update(out=a["out"][:1])),
    ("out", lambda a: a.update(out=torch.empty(2, 64, 4).transpose(1, 2))),
    (
        "key_cache",
        lambda a: a.update(key_cache=a["key_cache"].transpose(2, 3).contiguous().transpose(2, 3)),
    ),
    ("value_cache", lambda a: a.update(value_cache=a["value_cache"][:, :, :8].contiguous())),
    ("value_cache", lambda a: a.update(value_cache=a["value_cache"].half())),
    (
        "head_size",
        lambda a: a.update(
            query=a["query"][..., :32].contiguous(), out=a["out"][..., :32].contiguous()
        ),
    ),
    (
        "num_kv_heads",
        lambda a: a.update(query=a["query"][:, :3].contiguous(), out=a["out"][:, :3].contiguous()),
    ),
    ("block_tables", lambda a: a.update(block_tables=a["block_tables"].long())),
    ("block_tables", lambda a: a.update(block_tables=a["block_tables"].t().contiguous().t())),
    ("block_tables", lambda a: a.update(block_tables=a["block_tables"].to("meta"))),
    ("seq_lens", lambda a: a.update(seq_lens=a["seq_lens"][:1])),
    ("scale", lambda a: a.update(scale=float("nan"))),
    ("scale", lambda a: a.update(scale=0.0)),
]


@pytest.mark.parametrize(
    "name,mutate", BAD_DECODE, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_DECODE)]
)
def test_decode_rejects_bad_input(interp: ModuleType, name: str, mutate) -> None:
    args = _good_args()
    mutate(args)
    with pytest.raises(ValueError, match=name):
        interp.paged_attention_decode(**args)


def test_prefill_rejects_bad_query_start_loc(interp: ModuleType) -> None:
    args = _good_args()
    for bad in (
        torch.tensor([0, 1], dtype=torch.int32),
        torch.tensor([0, 1, 2]),
        torch.tensor([0, 1, 2], dtype=torch.int32).to("meta"),
    ):
        with pytest.raises(ValueError, match="query_start_loc"):
            interp.paged_attention_prefill(
                args["out"],
                args["query"],
                args["key_cache"],
                args["value_cache"],
                args["block_tables"],
                bad,
                args["seq_lens"],
                0.125,
            )


def test_write_rejects_bad_input(interp: ModuleType) -> None:
    kc, vc = torch.zeros(4, 2, 16, 64), torch.zeros(4, 2, 16, 64)
    key, slots = torch.randn(3, 2, 64), torch.tensor([0, -1, 5])
    cases = [
        ("key", dict(key=torch.randn(3, 2, 32))),
        ("value", dict(value=torch.randn(2, 2, 64))),
        ("value", dict(value=torch.randn(3, 64, 2).transpose(1, 2))),
        ("slot_mapping", dict(slot_mapping=slots.float())),
        ("slot_mapping", dict(slot_mapping=slots[:2])),
        ("key_cache", dict(key_cache=kc[:, :, ::2])),
        ("value_cache", dict(value_cache=vc.to(torch.int8))),
    ]
    for name, change in cases:
        args = dict(key=key, value=key.clone(), key_cache=kc, value_cache=vc, slot_mapping=slots)
        args.update(change)
        with pytest.raises(ValueError, match=name):
            interp.write_kv_cache(**args)


# ------------------------------------------------------------------ compiled, on CUDA


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case",
    DECODE_CASES
    + [
        (32, 8, 128, 16, [4097, 1, 900, 2048], torch.bfloat16, None),  # auto split, long
        (64, 8, 128, 16, [300] * 96, torch.float16, None),  # batch large enough not to split
        (16, 2, 256, 16, [777, 64], torch.float16, None),
    ],
    ids=lambda c: f"h{c[0]}kv{c[1]}d{c[2]}bs{c[3]}",
)
def test_gpu_decode(gpu: ModuleType, case: tuple) -> None:
    check_decode(gpu, "cuda", case, seed=1)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case",
    PREFILL_CASES
    + [
        (32, 8, 128, 16, [1000, 3, 257], [1000, 700, 1024], torch.bfloat16),
        (16, 16, 64, 32, [513], [513], torch.float16),
        (8, 2, 256, 16, [130, 1], [200, 2], torch.float16),
    ],
    ids=lambda c: f"h{c[0]}kv{c[1]}d{c[2]}bs{c[3]}",
)
def test_gpu_prefill(gpu: ModuleType, case: tuple) -> None:
    check_prefill(gpu, "cuda", case, seed=2)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [1, 100, 4096])
def test_gpu_sliding_window(gpu: ModuleType, window: int) -> None:
    check_decode(gpu, "cuda", (32, 8, 128, 16, [4097, 1, 900, 2048], torch.bfloat16, None),
                 seed=2, window=window)
    check_prefill(gpu, "cuda", (32, 8, 128, 16, [1000, 3, 257], [1000, 700, 1024],
                                torch.bfloat16), seed=2, window=window)


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_gpu_write_kv_cache(
    gpu: ModuleType, cache_dtype: torch.dtype, slot_dtype: torch.dtype
) -> None:
    check_write(gpu, "cuda", cache_dtype, slot_dtype, seed=4)


@pytest.mark.gpu
def test_gpu_decode_captures_in_cuda_graph(gpu: ModuleType) -> None:
    """The split-KV decode reads nothing back to the host, so it can be graph-captured."""
    gen = torch.Generator().manual_seed(9)
    kc, vc, table, lens = _paged([3000, 17], 2, 128, 16, torch.float16, "cuda", gen)
    query = torch.randn(2, 8, 128, generator=gen).half().cuda()
    out = torch.empty_like(query)
    gpu.paged_attention_decode(out, query, kc, vc, table, lens, 0.088)  # compile first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gpu.paged_attention_decode(out, query, kc, vc, table, lens, 0.088)
    query.copy_(torch.randn(2, 8, 128, generator=gen).half().cuda())
    graph.replay()
    torch.cuda.synchronize()
    expected = ref.paged_attention_decode_ref(query, kc, vc, table, lens, 0.088)
    _close(out, expected, torch.float16)


# ------------------------------------------------------------------ the engine on them

ENGINE_CASES = [("dense", "llama-gqa"), ("dense", "qwen3-qknorm-headdim"),
                ("dense", "llama-mqa-yarn"), ("mla", "v2-lite"), ("moe", "mixtral")]


@pytest.mark.parametrize(("kind", "name"), ENGINE_CASES, ids=[n for _, n in ENGINE_CASES])
def test_the_engine_on_the_triton_kernels_matches_transformers(
        interp: ModuleType, kind: str, name: str, tmp_path, demo_model_dir,  # noqa: ANN001
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA engine's attention path end to end, here interpreted on CPU tensors: every
    paged-attention call and KV write of the engine goes to these kernels (the native ones
    are never called), with its real step metadata -- prompts prefilled in 7-token chunks
    beside other sequences' decodes, then a prefix-cache hit -- and the greedy tokens equal
    transformers' (random-weight variants of the dense, latent-attention and MoE models)."""
    import test_deepseek
    import test_moe
    from test_models import greedy_of, hf_model, random_prompts, save_with_tokenizer

    from xllm import LLM, SamplingParams

    hf = hf_model(name) if kind == "dense" else (test_moe if kind == "moe"
                                                 else test_deepseek)._hf(name)
    save_with_tokenizer(hf, tmp_path, demo_model_dir)
    calls: list[str] = []
    real = dispatch._pick

    def to_triton(backend: str | None, tensor: torch.Tensor) -> str:
        chosen = real(backend, tensor) if backend is not None else "triton"
        calls.append(chosen)
        return chosen

    monkeypatch.setattr(dispatch, "_pick", to_triton)
    prompts = random_prompts([5, 23, 40], seed=7)
    llm = LLM(str(tmp_path), dtype="float32", weight_format="dense", max_model_len=128,
              kv_cache_memory_gb=0.01, max_num_batched_tokens=16, block_size=8)
    try:
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        again = llm.generate(prompts[2:], params, use_tqdm=False)[0]
    finally:
        llm.engine.close()
    assert calls and set(calls) == {"triton"}
    assert got == greedy_of(hf, prompts, 8)
    assert again.num_cached_tokens >= 32 and again.outputs[0].token_ids == got[2]
