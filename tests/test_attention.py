"""The native CPU paged attention and KV cache write against the torch references.

Every cache slot that no sequence owns (the null block 0, unused blocks, the tail of a
sequence's last block) is NaN, so a kernel that reads one position too far fails loudly.
Both ISAs run every numeric test; the bf16 cases compare against the reference run on
the same bf16 cache, so the tolerance stays tight.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from xllm import _C
from xllm.ops import attention as ops
from xllm.ops import attention_ref as ref
from xllm.ops.kv_cache import dequantize_rows, kv_row_width, quantize_rows

ISAS = _C.cpu_isas()  # every level this CPU runs, lowest first
RTOL = ATOL = 1e-5
# Cache dtypes: fp32, bf16 and int8 rows with a per-row scale (xllm.ops.kv_cache).
DTYPES = [torch.float32, torch.bfloat16, torch.int8]
DTYPE_IDS = ["fp32", "bf16", "int8"]


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test draws the same inputs on every run: the bf16 paths' tolerances allow for
    a weight rounding to the other side of a bf16 boundary, not for an unlucky draw."""
    torch.manual_seed(0)


@pytest.fixture(params=ISAS)
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs the test under each ISA the CPU has, restoring the best one afterwards."""
    _C.set_cpu_isa(request.param)
    try:
        yield request.param
    finally:
        _C.set_cpu_isa(_C.detected_isa())


@dataclass
class Paged:
    key_cache: torch.Tensor  # [num_blocks, kv_heads, block_size, head_size]
    value_cache: torch.Tensor
    block_tables: torch.Tensor  # int32 [num_seqs, width]
    seq_lens: torch.Tensor  # int32 [num_seqs]


def _poison(dtype: torch.dtype) -> float:
    """What unowned cache slots hold: NaN, or for int8 rows bytes of -1, whose scale is a
    NaN (0xFFFFFFFF)."""
    return -1 if dtype == torch.int8 else float("nan")


def make_paged(
    lens: list[int],
    kv_heads: int,
    head_size: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    width: int | None = None,
    seed: int = 0,
) -> Paged:
    """Sequences of the given lengths in shuffled blocks; every unowned slot is NaN."""
    gen = torch.Generator().manual_seed(seed)
    used = [(n + block_size - 1) // block_size for n in lens]
    width = max(used + [1]) if width is None else width
    num_blocks = sum(used) + 3  # + the null block 0 and two never used
    shape = (num_blocks, kv_heads, block_size, kv_row_width(head_size, dtype))
    key_cache = torch.full(shape, _poison(dtype), dtype=dtype)
    value_cache = torch.full(shape, _poison(dtype), dtype=dtype)
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables = torch.zeros(len(lens), width, dtype=torch.int32)
    slots = []
    for i, n in enumerate(lens):
        blocks = [order.pop() for _ in range(used[i])]
        tables[i, : used[i]] = torch.tensor(blocks, dtype=torch.int32)
        slots += [blocks[pos // block_size] * block_size + pos % block_size for pos in range(n)]
    rows = (len(slots), kv_heads, head_size)
    ref.write_kv_cache_ref(
        torch.randn(rows, generator=gen),
        torch.randn(rows, generator=gen),
        key_cache,
        value_cache,
        torch.tensor(slots, dtype=torch.int64),
    )
    return Paged(key_cache, value_cache, tables, torch.tensor(lens, dtype=torch.int32))


def vnni_rows(isa: str, dtype: torch.dtype, head_size: int) -> bool:
    """Whether the kernels take int8 dot products (kernels_avx512.cpp): int8 rows at the
    avx512, avx512_bf16 and amx levels, head sizes that are a multiple of 32 up to 256."""
    return (isa in ("avx512", "avx512_bf16", "amx") and dtype == torch.int8 and head_size % 32 == 0
            and head_size <= 256)


def as_read(query: torch.Tensor, scale: float, isa: str, dtype: torch.dtype) -> torch.Tensor:
    """The query that the kernels attend with: where they take int8 dot products, each row
    of query * scale rounded to int8 with one scale for the row, as they do it in float32
    (then divided by scale again, for the reference to multiply back); else the query."""
    if not vnni_rows(isa, dtype, query.shape[-1]):
        return query
    x = query.float() * scale
    amax = x.abs().amax(dim=-1, keepdim=True)
    # 127 / amax divided as the kernels do it (a scalar's `127.0 / amax` is 127 * (1 / amax)).
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, 0.0)
    q8 = torch.round(x * inv)
    return (q8.double() * (amax / 127.0).double() / scale).float()


# Where the kernels take int8 dot products they also round each row's softmax weights
# (times V's row scales) to 16 bits against the largest of 16 tokens: an output moves by
# at most 2^-16 * 16 * max|v| per group of 16, much less in practice.
VNNI_ATOL = 4e-4


def tol(isa: str, dtype: torch.dtype, head_size: int) -> dict[str, float]:
    """assert_close's tolerance for an output of the kernels against the reference run on
    as_read's query."""
    atol = VNNI_ATOL if vnni_rows(isa, dtype, head_size) else ATOL
    return {"rtol": RTOL, "atol": atol}


def decode(p: Paged, query: torch.Tensor, scale: float) -> torch.Tensor:
    out = torch.full(query.shape, float("nan"))
    _C.paged_attention_decode(
        out, query, p.key_cache, p.value_cache, p.block_tables, p.seq_lens, scale
    )
    return out


def starts_of(q_lens: list[int]) -> torch.Tensor:
    return torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32)


def prefill(p: Paged, query: torch.Tensor, starts: torch.Tensor, scale: float) -> torch.Tensor:
    out = torch.full(query.shape, float("nan"))
    _C.paged_attention_prefill(
        out, query, p.key_cache, p.value_cache, p.block_tables, starts, p.seq_lens, scale
    )
    return out


# (num_heads, num_kv_heads, head_size, block_size): GQA ratios 1, 3, 4, 8 and MQA; head sizes
# 64, 80, 96, 128, 256; block sizes 1, 5, 16, 32 (256 below).
SHAPES = [
    (4, 4, 64, 16),
    (9, 3, 64, 16),
    (12, 4, 80, 1),
    (8, 1, 96, 32),
    (16, 2, 128, 16),
    (32, 8, 128, 5),
    (6, 2, 256, 32),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("heads,kv_heads,head_size,block_size", SHAPES)
def test_decode_matches_reference(
    isa: str, dtype: torch.dtype, heads: int, kv_heads: int, head_size: int, block_size: int
) -> None:
    rng = random.Random(heads * 1000 + head_size + block_size)
    bs = block_size
    # Empty, one token, ending on and just past block boundaries, plus random lengths.
    lens = [0, 1, bs, bs + 1, 2 * bs - 1, 3 * bs] + [rng.randint(1, 200) for _ in range(3)]
    p = make_paged(lens, kv_heads, head_size, bs, dtype, seed=len(lens) + heads)
    query = torch.randn(len(lens), heads, head_size)
    scale = rng.uniform(0.05, 0.3)
    out = decode(p, query, scale)
    expected = ref.paged_attention_decode_ref(
        as_read(query, scale, isa, dtype), p.key_cache, p.value_cache, p.block_tables,
        p.seq_lens, scale
    )
    torch.testing.assert_close(out, expected, **tol(isa, dtype, head_size))
    assert torch.all(out[0] == 0), "seq_len 0 must give zeros"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_decode_long_context_partitions(isa: str, dtype: torch.dtype) -> None:
    # A batch of one with a long context is split across threads and merged. 3008 is
    # the most a 188-block table row holds; 2999 ends mid-block.
    p = make_paged([3008, 2999], 2, 64, 16, dtype, width=188)
    query = torch.randn(2, 8, 64)
    # The kernels share torch's OpenMP runtime: make sure there are threads to split for.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, 2))
    try:
        for lens in ([3008, 2999], [3008, 0], [2999, 17]):
            check_split_decode(p, query, lens, as_read(query, 0.125, isa, dtype),
                               tol(isa, dtype, 64))
    finally:
        torch.set_num_threads(threads)


def check_split_decode(p: Paged, query: torch.Tensor, lens: list[int], read: torch.Tensor,
                       close: dict[str, float]) -> None:
    """Decode of the whole batch and of its first sequence alone, against the reference
    (on `read`, the query as the kernels read it)."""
    p.seq_lens = torch.tensor(lens, dtype=torch.int32)
    out = decode(p, query, 0.125)
    expected = ref.paged_attention_decode_ref(
        read, p.key_cache, p.value_cache, p.block_tables, p.seq_lens, 0.125
    )
    torch.testing.assert_close(out, expected, **close)
    alone = Paged(p.key_cache, p.value_cache, p.block_tables[:1], p.seq_lens[:1])
    torch.testing.assert_close(decode(alone, query[:1], 0.125), expected[:1], **close)


def test_decode_full_block_table(isa: str) -> None:
    # seq_len == max_blocks_per_seq * block_size: the last block completely full.
    p = make_paged([64, 17], 3, 64, 16, width=4)
    query = torch.randn(2, 9, 64)
    out = decode(p, query, 0.2)
    expected = ref.paged_attention_decode_ref(
        query, p.key_cache, p.value_cache, p.block_tables, p.seq_lens, 0.2
    )
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL)


def test_decode_empty_batch() -> None:
    p = make_paged([], 2, 64, 16)
    out = torch.empty(0, 4, 64)
    _C.paged_attention_decode(
        out, torch.empty(0, 4, 64), p.key_cache, p.value_cache, p.block_tables, p.seq_lens, 0.1
    )


def test_decode_strided_and_bf16_query(isa: str) -> None:
    p = make_paged([37, 5, 16], 2, 64, 16)
    # query as a view of a fused QKV projection: [tokens, 3 * heads, head_size] sliced.
    qkv = torch.randn(3, 3 * 6, 64)
    query = qkv[:, :6]
    assert not query.is_contiguous()
    expected = ref.paged_attention_decode_ref(
        query, p.key_cache, p.value_cache, p.block_tables, p.seq_lens, 0.3
    )
    torch.testing.assert_close(decode(p, query, 0.3), expected, rtol=RTOL, atol=ATOL)
    q16 = query.to(torch.bfloat16)
    expected16 = ref.paged_attention_decode_ref(
        q16, p.key_cache, p.value_cache, p.block_tables, p.seq_lens, 0.3
    )
    torch.testing.assert_close(decode(p, q16, 0.3), expected16, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("heads,kv_heads,head_size,block_size", SHAPES)
def test_prefill_matches_reference(
    isa: str, dtype: torch.dtype, heads: int, kv_heads: int, head_size: int, block_size: int
) -> None:
    rng = random.Random(heads + head_size * 7 + block_size)
    bs = block_size
    # (seq_len, q_len): whole prompts, chunks after a cached prefix (prefix-cache hits,
    # chunked prefill), a decode-like single token, an empty sequence, block edges.
    pairs = [
        (1, 1),
        (bs, bs),
        (bs + 1, 1),
        (3 * bs + 2, 2 * bs),
        (0, 0),
        (70, 33),
        (rng.randint(40, 120), rng.randint(1, 40)),
        (2 * bs, 0),
    ]
    lens, q_lens = [n for n, _ in pairs], [q for _, q in pairs]
    p = make_paged(lens, kv_heads, head_size, bs, dtype, seed=heads + bs)
    starts = starts_of(q_lens)
    query = torch.randn(int(starts[-1]), heads, head_size)
    out = prefill(p, query, starts, 0.15)
    if uses_amx_prefill(isa, dtype, heads // kv_heads, head_size):
        expected = amx_prefill_ref(p, query, starts, 0.15)
        torch.testing.assert_close(out, expected, rtol=AMX_TOL, atol=AMX_TOL)
        return
    expected = ref.paged_attention_prefill_ref(
        as_read(query, 0.15, isa, dtype), p.key_cache, p.value_cache, p.block_tables, starts,
        p.seq_lens, 0.15
    )
    torch.testing.assert_close(out, expected, **tol(isa, dtype, head_size))


# The AMX prefill path rounds q * scale and the softmax weights to bf16 (bf16 products,
# fp32 sums); its reference does the same in float64. A weight whose bf16 rounding differs
# by the last bit between the kernel's exp and torch's moves an output by ~2^-9 of it.
AMX_TOL = 4e-3


def uses_amx_prefill(isa: str, dtype: torch.dtype, group: int, head_size: int) -> bool:
    return (isa == "amx" and dtype in (torch.bfloat16, torch.int8) and head_size % 32 == 0
            and head_size <= 128 and group <= 16)


def amx_prefill_ref(p: Paged, query: torch.Tensor, starts: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """What the AMX prefill computes, in float64: softmax(bf16(q * scale) K^T) V with the
    weights exp(s - max) rounded to bf16 and normalised by their rounded sum."""
    heads = query.shape[1]
    kv_heads, bs = p.key_cache.shape[1], p.key_cache.shape[2]
    group = heads // kv_heads
    out = torch.zeros(query.shape, dtype=torch.float64)
    for i, n in enumerate(p.seq_lens.tolist()):
        q0, q1 = int(starts[i]), int(starts[i + 1])
        if q1 == q0:
            continue
        blocks = p.block_tables[i, : (n + bs - 1) // bs].long()
        keys, values = (_as_bf16(c[blocks].transpose(1, 2).reshape(-1, kv_heads, c.shape[-1])[:n])
                        for c in (p.key_cache, p.value_cache))
        q = (query[q0:q1].float() * scale).bfloat16().double()  # [t, heads, hs]
        past = n - (q1 - q0)
        visible = torch.arange(n)[None, :] <= (past + torch.arange(q1 - q0))[:, None]
        for h in range(heads):
            s = q[:, h] @ keys[:, h // group].T
            s = s.masked_fill(~visible, float("-inf"))
            w = torch.exp(s - s.max(dim=1, keepdim=True).values).bfloat16().double()
            out[q0:q1, h] = (w @ values[:, h // group]) / w.sum(dim=1, keepdim=True)
    return out.float()


def _as_bf16(rows: torch.Tensor) -> torch.Tensor:
    """Cache rows as the AMX path reads them, in float64: bf16 as they are; int8 rows
    dequantized and rounded to bf16."""
    if rows.dtype == torch.int8:
        return dequantize_rows(rows).bfloat16().double()
    return rows.double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8], ids=["bf16", "int8"])
def test_amx_prefill_long_prompts_and_head_sizes(dtype: torch.dtype) -> None:
    """The AMX path on prompt-sized inputs: GQA groups 1, 3, 4, 8 and 16, head sizes 32-128,
    chunks after a cached prefix, unused cache slots NaN; close to its rounding-aware
    reference and, within bf16's resolution, to the fp32 reference. Head sizes up to 64 take
    two query tiles an item (a group of 3 splits a token's heads between them; 16, one
    token a tile), larger ones one."""
    if "amx" not in ISAS:
        pytest.skip("this CPU has no AMX")
    for heads, kv_heads, hs, bs in [(9, 3, 64, 16), (8, 8, 32, 16), (16, 2, 128, 16),
                                    (16, 1, 96, 8), (32, 8, 64, 16), (16, 1, 64, 16)]:
        p = make_paged([509, 200, 77], kv_heads, hs, bs, dtype, seed=hs)
        starts = starts_of([509, 60, 77])
        query = torch.randn(int(starts[-1]), heads, hs)
        out = prefill(p, query, starts, hs**-0.5)
        assert out.isfinite().all()
        torch.testing.assert_close(out, amx_prefill_ref(p, query, starts, hs**-0.5),
                                   rtol=AMX_TOL, atol=AMX_TOL)
        fp32 = ref.paged_attention_prefill_ref(
            query, p.key_cache, p.value_cache, p.block_tables, starts, p.seq_lens, hs**-0.5)
        torch.testing.assert_close(out, fp32, rtol=3e-2, atol=3e-2)


def test_large_group_and_blocks_longer_than_a_chunk(isa: str) -> None:
    # MQA with 48 query heads (row tiles of 4 and the PV grouping's remainders), and
    # 256-token blocks: one block is longer than a softmax chunk of either op.
    p = make_paged([300, 256, 1, 0], 1, 64, 256)
    query = torch.randn(4, 48, 64)
    expected = ref.paged_attention_decode_ref(
        query, p.key_cache, p.value_cache, p.block_tables, p.seq_lens, 0.125
    )
    torch.testing.assert_close(decode(p, query, 0.125), expected, rtol=RTOL, atol=ATOL)
    starts = starts_of([30, 20, 1, 0])
    query = torch.randn(51, 48, 64)
    expected = ref.paged_attention_prefill_ref(
        query, p.key_cache, p.value_cache, p.block_tables, starts, p.seq_lens, 0.125
    )
    torch.testing.assert_close(prefill(p, query, starts, 0.125), expected, rtol=RTOL, atol=ATOL)


def test_prefill_long_prompt_with_prefix(isa: str) -> None:
    # Many query tiles over several KV heads, all scheduled at once.
    p = make_paged([300, 260], 2, 64, 16)
    starts = starts_of([300, 100])
    qkv = torch.randn(400, 3 * 8, 64)
    query = qkv[:, 8:16]  # a strided view
    out = prefill(p, query, starts, 0.125)
    expected = ref.paged_attention_prefill_ref(
        query, p.key_cache, p.value_cache, p.block_tables, starts, p.seq_lens, 0.125
    )
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL)


def test_prefill_empty() -> None:
    p = make_paged([], 2, 64, 16)
    out = torch.empty(0, 4, 64)
    _C.paged_attention_prefill(
        out,
        torch.empty(0, 4, 64),
        p.key_cache,
        p.value_cache,
        p.block_tables,
        starts_of([]),
        p.seq_lens,
        0.1,
    )
    # Sequences with no new tokens at all.
    p = make_paged([5, 0], 2, 64, 16)
    _C.paged_attention_prefill(
        out,
        torch.empty(0, 4, 64),
        p.key_cache,
        p.value_cache,
        p.block_tables,
        starts_of([0, 0]),
        p.seq_lens,
        0.1,
    )


def test_prefill_equals_decode_for_one_token(isa: str) -> None:
    p = make_paged([50, 7, 33], 4, 128, 16)
    query = torch.randn(3, 8, 128)
    out = prefill(p, query, starts_of([1, 1, 1]), 0.1)
    torch.testing.assert_close(out, decode(p, query, 0.1), rtol=RTOL, atol=ATOL)


# ---- write_kv_cache -----------------------------------------------------------------


@pytest.mark.parametrize("cache_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16], ids=["src32", "src16"])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("num_tokens", [1, 37, 700])
def test_write_matches_reference(
    isa: str,
    cache_dtype: torch.dtype,
    src_dtype: torch.dtype,
    slot_dtype: torch.dtype,
    num_tokens: int,
) -> None:
    num_blocks, kv_heads, bs, hs = 64, 3, 16, 72
    gen = torch.Generator().manual_seed(num_tokens)
    # Strided views of a fused QKV output; a quarter of the tokens are padding (-1).
    qkv = torch.randn(num_tokens, 3, kv_heads, hs, generator=gen).to(src_dtype)
    key, value = qkv[:, 1], qkv[:, 2]
    slots = torch.randperm(num_blocks * bs, generator=gen)[:num_tokens]
    slots[torch.rand(num_tokens, generator=gen) < 0.25] = -1
    slots = slots.to(slot_dtype)
    caches = [
        torch.randn(num_blocks, kv_heads, bs, hs, generator=gen).to(cache_dtype) for _ in range(2)
    ]
    if cache_dtype == torch.int8:  # rows of int8 and their scale; the native write must
        caches = [quantize_rows(c) for c in caches]  # round exactly as the reference
    expected = [c.clone() for c in caches]
    ref.write_kv_cache_ref(key, value, expected[0], expected[1], slots.long())
    _C.write_kv_cache(key, value, caches[0], caches[1], slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])


def test_write_bf16_rounding_matches_torch(isa: str) -> None:
    # Ties to even both ways, values that round up into the next binade or to inf,
    # NaN, infinities, signed zeros and subnormals.
    bits = [
        0x3F808000,
        0x3F818000,
        0x3F80FFFF,
        0x3F807FFF,
        0x7F7FFFFF,
        0x7F7F8000,
        0x7FC00001,
        0xFFC12345,
        0x7F800001,
        0x7F800000,
        0xFF800000,
        0x80000000,
        0x00000001,
        0x00018000,
        0x80008000,
        0xBF808001,
    ]
    values = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)
    values = torch.cat([values, torch.randn(48) * 1e3])  # also through the 8-wide path
    key = values.view(4, 1, 16)
    cache = torch.zeros(1, 1, 4, 16, dtype=torch.bfloat16)
    _C.write_kv_cache(key, key.clone(), cache, cache.clone(), torch.arange(4))
    expected = key.view(-1).to(torch.bfloat16).view(torch.int16)
    got = cache.view(-1).view(torch.int16)
    nan = torch.isnan(key.view(-1))
    assert torch.equal(got[~nan], expected[~nan])
    assert torch.all(torch.isnan(cache.view(-1)[nan]))


def test_write_empty_and_all_padding() -> None:
    caches = [torch.zeros(4, 2, 16, 64) for _ in range(2)]
    empty = torch.empty(0, 2, 64)
    _C.write_kv_cache(empty, empty, caches[0], caches[1], torch.empty(0, dtype=torch.int64))
    rows = torch.randn(3, 2, 64)
    _C.write_kv_cache(rows, rows, caches[0], caches[1], torch.full((3,), -1))
    assert not caches[0].any() and not caches[1].any()


# ---- the public dispatcher --------------------------------------------------------


def test_dispatcher_picks_native_on_cpu() -> None:
    p = make_paged([20, 3], 2, 64, 16)
    key, value = torch.randn(2, 2, 64), torch.randn(2, 2, 64)
    slots = torch.tensor([int(p.block_tables[0, 1]) * 16 + 4, int(p.block_tables[1, 0]) * 16 + 3])
    ops.write_kv_cache(key, value, p.key_cache, p.value_cache, slots)  # backend=None
    assert torch.equal(p.key_cache[p.block_tables[0, 1], :, 4], key[0])
    query = torch.randn(2, 4, 64)
    got = ops.paged_attention_decode(
        query, p.key_cache, p.value_cache, p.block_tables, p.seq_lens, 0.1
    )
    want = ops.paged_attention_decode(
        query, p.key_cache, p.value_cache, p.block_tables, p.seq_lens, 0.1, backend="torch"
    )
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    starts = starts_of([5, 2])
    query = torch.randn(7, 4, 64)
    got = ops.paged_attention_prefill(
        query, p.key_cache, p.value_cache, p.block_tables, starts, p.seq_lens, 0.1
    )
    want = ops.paged_attention_prefill(
        query, p.key_cache, p.value_cache, p.block_tables, starts, p.seq_lens, 0.1, backend="torch"
    )
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def test_kernels_release_the_gil() -> None:
    # While one long decode call runs in a thread, this thread must keep running Python.
    # Every sequence of the batch reads the same blocks, so the call is long but the
    # cache small.
    p = make_paged([2048], 4, 128, 64, seed=1)
    batch = 48
    tables = p.block_tables.expand(batch, -1).contiguous()
    lens = p.seq_lens.expand(batch).contiguous()
    query = torch.randn(batch, 8, 128)
    out = torch.empty_like(query)
    window: list[float] = []

    def work() -> None:
        window.append(time.monotonic())
        _C.paged_attention_decode(out, query, p.key_cache, p.value_cache, tables, lens, 0.1)
        window.append(time.monotonic())

    ticks: list[float] = []
    thread = threading.Thread(target=work)
    thread.start()
    deadline = time.monotonic() + 30
    while thread.is_alive() and time.monotonic() < deadline:
        ticks.append(time.monotonic())
        time.sleep(0.0005)
    thread.join(timeout=30)
    assert len(window) == 2, "the decode call did not finish"
    during = [t for t in ticks if window[0] < t < window[1]]
    # With the GIL held for the call, this loop could not tick inside the window.
    assert len(during) >= 3, (
        f"{len(during)} ticks in {window[1] - window[0]:.3f} s of kernel time: is the GIL held?"
    )


# ---- bad input: ValueError naming the argument, raised before anything is written ----


def _raises(match: str, fn, *watched: torch.Tensor) -> None:
    """fn() raises ValueError matching `match` and leaves every watched tensor unchanged."""
    before = [t.clone() for t in watched]
    with pytest.raises(ValueError, match=match):
        fn()
    for old, new in zip(before, watched, strict=True):
        assert torch.equal(old.view(torch.uint8), new.view(torch.uint8)), "written before failing"


def test_write_rejects_bad_input() -> None:
    kc, vc = torch.zeros(4, 2, 16, 64), torch.zeros(4, 2, 16, 64)
    key, value = torch.randn(3, 2, 64), torch.randn(3, 2, 64)
    slots = torch.tensor([0, 17, 63])

    def call(**kw):
        args = {
            "key": key,
            "value": value,
            "key_cache": kc,
            "value_cache": vc,
            "slot_mapping": slots,
        } | kw
        return lambda: _C.write_kv_cache(*args.values())

    bad = [
        ("'key' must be float32 or bfloat16", call(key=key.double())),
        ("'key' must have 3 dimensions", call(key=key.view(3, 128))),
        ("'key' has size 3 in dimension 1", call(key=torch.randn(3, 3, 64))),
        ("'key' has size 32 in dimension 2", call(key=torch.randn(3, 2, 32))),
        ("'key' must have contiguous last two", call(key=torch.randn(3, 64, 2).transpose(1, 2))),
        ("'value' has size 2 in dimension 0", call(value=torch.randn(2, 2, 64))),
        ("'value' must have key's dtype", call(value=value.bfloat16())),
        ("'key' must be a torch.Tensor", call(key=[1.0])),
        ("'value' must be a CPU tensor", call(value=torch.empty(3, 2, 64, device="meta"))),
        ("'key_cache' must have 4 dimensions", call(key_cache=kc.view(64, 2, 64))),
        ("'key_cache' must be float32 or bfloat16", call(key_cache=kc.half())),
        ("'value_cache' must have key_cache's dtype", call(value_cache=vc.bfloat16())),
        ("'value_cache' has size 5 in dimension 0", call(value_cache=torch.zeros(5, 2, 16, 64))),
        (
            "'key_cache' must be contiguous",
            call(key_cache=torch.zeros(4, 16, 2, 64).transpose(1, 2)),
        ),
        ("'slot_mapping' must be int64 or int32", call(slot_mapping=slots.float())),
        ("'slot_mapping' has size 2 in dimension 0", call(slot_mapping=slots[:2])),
        ("'slot_mapping' must be contiguous", call(slot_mapping=torch.arange(6)[::2])),
        (
            r"'slot_mapping' has slot_mapping\[2\] = 64 outside",
            call(slot_mapping=torch.tensor([0, 1, 64])),
        ),
        (
            r"'slot_mapping' has slot_mapping\[1\] = -2 outside",
            call(slot_mapping=torch.tensor([0, -2, 1])),
        ),
    ]
    for match, fn in bad:
        _raises(match, fn, kc, vc)


def _decode_args(p: Paged, query: torch.Tensor, out: torch.Tensor, overrides: dict) -> dict:
    return {
        "out": out,
        "query": query,
        "key_cache": p.key_cache,
        "value_cache": p.value_cache,
        "block_tables": p.block_tables,
        "seq_lens": p.seq_lens,
        "scale": 0.1,
    } | overrides


def test_decode_rejects_bad_input() -> None:
    p = make_paged([20, 33, 5], 2, 64, 16)
    query, out = torch.randn(3, 4, 64), torch.zeros(3, 4, 64)
    nb = p.key_cache.shape[0]

    def call(**kw):
        return lambda: _C.paged_attention_decode(*_decode_args(p, query, out, kw).values())

    bad_table = p.block_tables.clone()
    bad_table[2, 0] = nb  # the last sequence's only block: checked before seq 0 is computed
    neg_table = p.block_tables.clone()
    neg_table[1, 2] = -1
    bad = [
        ("'out' must be float32", call(out=out.double())),
        ("'out' has size 2 in dimension 0", call(out=torch.zeros(2, 4, 64))),
        ("'out' must be contiguous", call(out=torch.zeros(4, 3, 64).transpose(0, 1))),
        (
            "'query' has 3 heads, not a multiple",
            call(query=torch.randn(3, 3, 64), out=torch.zeros(3, 3, 64)),
        ),
        ("'query' has size 32 in dimension 2", call(query=torch.randn(3, 4, 32))),
        (
            "'query' must have contiguous last two",
            call(query=torch.randn(3, 64, 4).transpose(1, 2)),
        ),
        (
            "'query' has size 3 in dimension 0 but seq_lens",
            call(seq_lens=p.seq_lens[:2], block_tables=p.block_tables[:2]),
        ),
        ("'block_tables' must be int32", call(block_tables=p.block_tables.long())),
        ("'block_tables' has size 2 in dimension 0", call(block_tables=p.block_tables[:2])),
        ("'block_tables' must have 2 dimensions", call(block_tables=p.block_tables.flatten())),
        ("'seq_lens' must be int32", call(seq_lens=p.seq_lens.long())),
        (
            r"'seq_lens' has seq_lens\[1\] = 49 outside \[0, 48\]",
            call(seq_lens=torch.tensor([20, 49, 5], dtype=torch.int32)),
        ),
        (
            r"'seq_lens' has seq_lens\[0\] = -1",
            call(seq_lens=torch.tensor([-1, 3, 5], dtype=torch.int32)),
        ),
        (rf"'block_tables' has block_tables\[2, 0\] = {nb} outside", call(block_tables=bad_table)),
        (r"'block_tables' has block_tables\[1, 2\] = -1", call(block_tables=neg_table)),
        ("'scale' must be finite", call(scale=float("nan"))),
        (
            "'key_cache' has head_size 12; the CPU attention kernels need a multiple of 8",
            call(
                key_cache=torch.zeros(4, 2, 16, 12),
                value_cache=torch.zeros(4, 2, 16, 12),
                query=torch.randn(3, 4, 12),
                out=torch.zeros(3, 4, 12),
            ),
        ),
    ]
    for match, fn in bad:
        _raises(match, fn, out)
    # Ids past a sequence's used blocks are padding and never read.
    padded = p.block_tables.clone()
    padded[2, 1:] = -7
    call(block_tables=padded)()


def test_prefill_rejects_bad_input() -> None:
    p = make_paged([20, 33], 2, 64, 16)
    query, out = torch.randn(7, 4, 64), torch.zeros(7, 4, 64)

    def call(starts: list[int], **kw):
        args = _decode_args(p, query, out, kw)
        return lambda: _C.paged_attention_prefill(
            args["out"],
            args["query"],
            args["key_cache"],
            args["value_cache"],
            args["block_tables"],
            torch.tensor(starts, dtype=torch.int32),
            args["seq_lens"],
            args["scale"],
        )

    bad = [
        ("'query_start_loc' has size 2 in dimension 0", call([0, 7])),
        ("'query_start_loc' must start at 0", call([1, 3, 7])),
        ("'query_start_loc' must be non-decreasing", call([0, 8, 7])),
        ("'query_start_loc' ends at 6 but query has 7 tokens", call([0, 3, 6])),
        (
            "'query_start_loc' gives sequence 0 21 query tokens, more than its seq_lens",
            call([0, 21, 21], query=torch.randn(21, 4, 64), out=torch.zeros(21, 4, 64)),
        ),
        (
            "'out' has size 6 in dimension 0 but query's size is 7",
            call([0, 3, 7], out=torch.zeros(6, 4, 64)),
        ),
        ("'seq_lens' must be int32", call([0, 3, 7], seq_lens=p.seq_lens.long())),
    ]
    for match, fn in bad:
        _raises(match, fn, out)
    with pytest.raises(ValueError, match="'query_start_loc' must be int32"):
        _C.paged_attention_prefill(
            out,
            query,
            p.key_cache,
            p.value_cache,
            p.block_tables,
            torch.tensor([0, 3, 7]),
            p.seq_lens,
            0.1,
        )


def _nan_block(p: Paged) -> int:
    """Appends a block of NaNs to both caches; returns its id."""
    nan = torch.full((1, *p.key_cache.shape[1:]), _poison(p.key_cache.dtype),
                     dtype=p.key_cache.dtype)
    p.key_cache = torch.cat([p.key_cache, nan])
    p.value_cache = torch.cat([p.value_cache, nan])
    return p.key_cache.shape[0] - 1


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("window", [1, 5, 16, 37, 1000])
@pytest.mark.parametrize("heads,kv_heads,head_size,block_size", [(8, 2, 64, 16), (12, 4, 80, 1)])
def test_sliding_window_matches_reference(isa: str, dtype: torch.dtype, window: int, heads: int,
                                          kv_heads: int, head_size: int, block_size: int) -> None:
    """A query at position p sees keys (p - window, p] (transformers' sliding window), decode
    and prefill, and never reads a block wholly before its window: those table entries point
    at a block of NaNs here, as freed blocks point at the null block in the engine."""
    bs = block_size
    lens = [1, 15, 16, 17, 70, 300]
    p = make_paged(lens, kv_heads, head_size, bs, dtype, seed=window)
    nan = _nan_block(p)
    query = torch.randn(len(lens), heads, head_size)
    want = ref.paged_attention_decode_ref(as_read(query, 0.125, isa, dtype), p.key_cache,
                                          p.value_cache, p.block_tables, p.seq_lens, 0.125,
                                          window)
    tables = p.block_tables.clone()
    for i, n in enumerate(lens):
        tables[i, : max(0, n - window) // bs] = nan
    out = torch.full(query.shape, float("nan"))
    _C.paged_attention_decode(out, query, p.key_cache, p.value_cache, tables, p.seq_lens, 0.125,
                              window)
    torch.testing.assert_close(out, want, **tol(isa, dtype, head_size))

    # Prefill: whole prompts, a chunk after a cached prefix, one token, nothing.
    pairs = [(70, 70), (300, 45), (17, 1), (16, 0), (1, 1)]
    lens, q_lens = [n for n, _ in pairs], [q for _, q in pairs]
    p = make_paged(lens, kv_heads, head_size, bs, dtype, seed=window + 1)
    nan = _nan_block(p)
    starts = starts_of(q_lens)
    query = torch.randn(int(starts[-1]), heads, head_size)
    want = ref.paged_attention_prefill_ref(as_read(query, 0.15, isa, dtype), p.key_cache,
                                           p.value_cache, p.block_tables, starts, p.seq_lens,
                                           0.15, window)
    tables = p.block_tables.clone()
    for i, (n, q) in enumerate(pairs):
        tables[i, : max(0, n - q - window + 1) // bs] = nan  # before the first query's window
    out = torch.full(query.shape, float("nan"))
    _C.paged_attention_prefill(out, query, p.key_cache, p.value_cache, tables, starts,
                               p.seq_lens, 0.15, window)
    torch.testing.assert_close(out, want, **tol(isa, dtype, head_size))
    # A window as long as the context is no window.
    if window == 1000:
        full = ref.paged_attention_prefill_ref(as_read(query, 0.15, isa, dtype), p.key_cache,
                                               p.value_cache, p.block_tables, starts,
                                               p.seq_lens, 0.15)
        torch.testing.assert_close(want, full)


def test_window_must_not_be_negative() -> None:
    p = make_paged([4], 1, 64, 16)
    with pytest.raises(ValueError, match="'window' must be >= 0"):
        _C.paged_attention_decode(torch.empty(1, 1, 64), torch.randn(1, 1, 64), p.key_cache,
                                  p.value_cache, p.block_tables, p.seq_lens, 0.1, -1)


def test_int8_rows_need_room_for_their_scale() -> None:
    """An int8 cache's rows are head_size values and a 4-byte scale: a last dimension of 4
    holds no values, and a query must match head_size, not the row width."""
    cache = torch.zeros(4, 1, 16, 4, dtype=torch.int8)
    with pytest.raises(ValueError, match="int8 with rows of 4 bytes"):
        _C.paged_attention_decode(torch.zeros(1, 2, 8), torch.zeros(1, 2, 8), cache, cache,
                                  torch.zeros(1, 1, dtype=torch.int32),
                                  torch.ones(1, dtype=torch.int32), 0.1, 0)
    cache = torch.zeros(4, 1, 16, 68, dtype=torch.int8)
    with pytest.raises(ValueError, match="head_size"):
        _C.paged_attention_decode(torch.zeros(1, 2, 68), torch.zeros(1, 2, 68), cache, cache,
                                  torch.zeros(1, 1, dtype=torch.int32),
                                  torch.ones(1, dtype=torch.int32), 0.1, 0)


@pytest.mark.parametrize("hs", [64, 128, 80])
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16], ids=["src32", "src16"])
def test_int8_write_rounds_as_the_reference(isa: str, hs: int, src_dtype: torch.dtype) -> None:
    """The vector quantizer (head sizes that are multiples of 16) and the scalar one give
    quantize_rows' bits: the same division, ties to even, zero rows with scale 0."""
    gen = torch.Generator().manual_seed(hs)
    rows = torch.randn(40, 2, hs, generator=gen) * torch.logspace(-3, 3, 40)[:, None, None]
    rows[3] = 0
    rows[5, 0, :] = torch.arange(hs) - hs / 2 + 0.5  # many exact halves after scaling
    rows = rows.to(src_dtype)
    slots = torch.randperm(4 * 16, generator=gen)[:40]
    caches = [torch.zeros(4, 2, 16, hs + 4, dtype=torch.int8) for _ in range(2)]
    expected = [c.clone() for c in caches]
    ref.write_kv_cache_ref(rows, rows.flip(0), expected[0], expected[1], slots)
    _C.write_kv_cache(rows, rows.flip(0), caches[0], caches[1], slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])
