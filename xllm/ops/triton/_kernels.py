"""The Triton kernels behind ``xllm.ops.triton.attention`` (launch and validation live there).

Cache layout (``xllm.ops.kv_cache``): key/value cache [num_blocks, num_kv_heads, block_size,
head_size], contiguous, so a token's row of one head starts at
``block * (num_kv_heads * block_size * head_size) + head * (block_size * head_size)
+ offset * head_size``. Every kernel walks the context in tiles of TILE_N token positions
and maps each position to its physical block through the block table, so a tile may span
several small blocks or part of a large one: any block size works with one code path.

Scores are kept in the log2 domain (``scale * log2(e)`` is folded into the scale) so the
online softmax uses exp2. All accumulation is fp32. Offsets into the caches and the query
are widened to int64 because a large cache exceeds 2**31 elements.

Whether these are compiled or interpreted is fixed when this module is imported (Triton
reads TRITON_INTERPRET at decoration time); ``INTERPRETED`` records which.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _write_kv_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_size], row stride stride_key
    value_ptr,  # [num_tokens, num_kv_heads, head_size], row stride stride_value
    key_cache_ptr,  # [num_blocks, num_kv_heads, block_size, head_size], contiguous
    value_cache_ptr,  # same shape and dtype as key_cache
    slot_ptr,  # [num_tokens] int32/int64, -1 = padding
    stride_key,
    stride_value,
    num_slots,  # num_blocks * block_size: slots at or past it are skipped, never written
    NUM_KV_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEADS_CHUNK: tl.constexpr,  # heads copied per step (power of two)
    HEAD_PAD: tl.constexpr,  # head_size rounded up to a power of two
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if (slot < 0) | (slot >= num_slots):
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    d = tl.arange(0, HEAD_PAD)
    d_mask = d < HEAD_SIZE
    dst_base = block * (NUM_KV_HEADS * BLOCK_SIZE * HEAD_SIZE) + offset * HEAD_SIZE
    key_base = token.to(tl.int64) * stride_key
    value_base = token.to(tl.int64) * stride_value
    for h0 in range(0, NUM_KV_HEADS, HEADS_CHUNK):
        h = h0 + tl.arange(0, HEADS_CHUNK)
        mask = (h < NUM_KV_HEADS)[:, None] & d_mask[None, :]
        src = h[:, None] * HEAD_SIZE + d[None, :]
        dst = dst_base + h[:, None] * (BLOCK_SIZE * HEAD_SIZE) + d[None, :]
        k = tl.load(key_ptr + key_base + src, mask=mask)
        tl.store(key_cache_ptr + dst, k.to(key_cache_ptr.dtype.element_ty), mask=mask)
        v = tl.load(value_ptr + value_base + src, mask=mask)
        tl.store(value_cache_ptr + dst, v.to(value_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attend_tile(
    q,
    acc,
    m_i,
    l_i,
    k_cache_ptr,
    v_cache_ptr,
    block_table_row,
    kv_head_offset,
    start,
    kv_end,
    q_pos,
    window,
    scale_log2e,
    stride_cache_block,
    d,
    d_mask,
    CAUSAL: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """One online-softmax step of rows q [M, HEAD_PAD] over context positions start..+TILE_N.

    Positions at or past kv_end are masked; with CAUSAL, so is every position after the
    row's own q_pos [M], and with window > 0 every one at or before q_pos - window. Returns
    the updated (acc [M, HEAD_PAD], m_i [M], l_i [M]).
    """
    pos = start + tl.arange(0, TILE_N)
    valid = pos < kv_end
    phys = tl.load(block_table_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    row = phys * stride_cache_block + kv_head_offset + (pos % BLOCK_SIZE) * HEAD_SIZE
    if HEAD_PAD == HEAD_SIZE:
        kv_mask = valid[:, None]  # a mask per token, not per element: fewer registers
    else:
        kv_mask = valid[:, None] & d_mask[None, :]
    k = tl.load(k_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
    if DOT_F32:
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * scale_log2e
    keep = valid[None, :]
    if CAUSAL:
        keep = keep & (pos[None, :] <= q_pos[:, None])
        keep = keep & ((window == 0) | (pos[None, :] > q_pos[:, None] - window))
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no key yet (only padding rows) keeps m = -inf; subtracting 0
    # instead keeps exp2 at 0 rather than NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
    if DOT_F32:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def _decode_kernel(
    out_ptr,  # [num_seqs, num_heads, head_size], contiguous (single-pass mode)
    part_out_ptr,  # [num_seqs, num_heads, num_partitions, head_size] fp32 (split mode)
    part_max_ptr,  # [num_seqs, num_heads, num_partitions] fp32, log2-domain max score
    part_sum_ptr,  # [num_seqs, num_heads, num_partitions] fp32, softmax denominator
    q_ptr,  # [num_seqs, num_heads, head_size], row stride stride_q
    k_cache_ptr,  # [num_blocks, num_kv_heads, block_size, head_size]
    v_cache_ptr,  # same
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32, row stride stride_bt
    seq_lens_ptr,  # [num_seqs] int32
    scale_log2e,
    stride_q,
    stride_bt,
    stride_cache_block,  # num_kv_heads * block_size * head_size
    num_heads,
    num_partitions,
    window,  # sliding window in tokens (0: none): the query sees its last `window` keys
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # >= 16 (tl.dot's minimum M), power of two
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    PARTITION_SIZE: tl.constexpr,  # context tokens per program; unused unless SPLIT
    SPLIT: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    if SPLIT:
        # The grid is sized for the longest possible context: a partition past this
        # sequence's end runs no tile, and the reduce kernel ignores what it writes.
        kv_start = part * PARTITION_SIZE
        kv_end = tl.minimum(kv_start + PARTITION_SIZE, seq_len)
    else:
        kv_start = 0
        kv_end = seq_len
    if window > 0:
        # Nothing before the window is read (its blocks may have been freed); a partition
        # wholly before it runs no tile.
        kv_start = tl.maximum(kv_start, seq_len - window)

    g = tl.arange(0, GROUP_PAD)
    g_mask = g < GROUP
    heads = kv_head * GROUP + g
    d = tl.arange(0, HEAD_PAD)
    d_mask = d < HEAD_SIZE
    q_mask = g_mask[:, None] & d_mask[None, :]
    q = tl.load(
        q_ptr + seq.to(tl.int64) * stride_q + heads[:, None] * HEAD_SIZE + d[None, :],
        mask=q_mask,
        other=0.0,
    )
    if DOT_F32:
        q = q.to(tl.float32)
    else:
        q = q.to(k_cache_ptr.dtype.element_ty)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_PAD], tl.float32)
    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kv_head_offset = kv_head.to(tl.int64) * (BLOCK_SIZE * HEAD_SIZE)
    # Every position before kv_end is visible to the single query (q_pos `g` is unused).
    for start in range(kv_start, kv_end, TILE_N):
        acc, m_i, l_i = _attend_tile(
            q,
            acc,
            m_i,
            l_i,
            k_cache_ptr,
            v_cache_ptr,
            block_table_row,
            kv_head_offset,
            start,
            kv_end,
            g,
            window,
            scale_log2e,
            stride_cache_block,
            d,
            d_mask,
            False,
            HEAD_SIZE,
            HEAD_PAD,
            BLOCK_SIZE,
            TILE_N,
            DOT_F32,
        )

    # l_i is 0 only when there was no context at all (seq_len 0): the output is zeros.
    o = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
    if SPLIT:
        stat = (seq.to(tl.int64) * num_heads + heads) * num_partitions + part  # [GROUP_PAD]
        tl.store(part_out_ptr + stat[:, None] * HEAD_SIZE + d[None, :], o, mask=q_mask)
        tl.store(part_max_ptr + stat, m_i, mask=g_mask)
        tl.store(part_sum_ptr + stat, l_i, mask=g_mask)
    else:
        dst = (seq.to(tl.int64) * num_heads + heads[:, None]) * HEAD_SIZE + d[None, :]
        tl.store(out_ptr + dst, o.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _decode_reduce_kernel(
    out_ptr,  # [num_seqs, num_heads, head_size], contiguous
    part_out_ptr,  # [num_seqs, num_heads, num_partitions, head_size] fp32
    part_max_ptr,  # [num_seqs, num_heads, num_partitions] fp32
    part_sum_ptr,  # [num_seqs, num_heads, num_partitions] fp32
    seq_lens_ptr,  # [num_seqs] int32
    num_heads,
    num_partitions,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    PARTITION_SIZE: tl.constexpr,
    PART_CHUNK: tl.constexpr,  # partitions combined per step (power of two)
):
    """Merges the per-partition softmax results of one (sequence, query head)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    # min(): a seq_len past the bound the grid was sized for (a broken caller contract)
    # must not read past the partition buffers.
    n_parts = tl.minimum(tl.cdiv(seq_len, PARTITION_SIZE), num_partitions)
    stat_base = (seq.to(tl.int64) * num_heads + head) * num_partitions
    c = tl.arange(0, PART_CHUNK)

    m_max = tl.full([PART_CHUNK], float("-inf"), tl.float32)
    for p0 in range(0, n_parts, PART_CHUNK):
        m = tl.load(part_max_ptr + stat_base + p0 + c, mask=p0 + c < n_parts, other=float("-inf"))
        m_max = tl.maximum(m_max, m)
    m_all = tl.max(m_max, 0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)  # seq_len 0: no partitions

    d = tl.arange(0, HEAD_PAD)
    d_mask = d < HEAD_SIZE
    acc = tl.zeros([HEAD_PAD], tl.float32)
    total = tl.zeros([PART_CHUNK], tl.float32)
    for p0 in range(0, n_parts, PART_CHUNK):
        p = p0 + c
        p_mask = p < n_parts
        m = tl.load(part_max_ptr + stat_base + p, mask=p_mask, other=float("-inf"))
        s = tl.load(part_sum_ptr + stat_base + p, mask=p_mask, other=0.0)
        w = tl.exp2(m - m_all) * s  # each partition's share of the global denominator
        o = tl.load(
            part_out_ptr + (stat_base + p)[:, None] * HEAD_SIZE + d[None, :],
            mask=p_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        acc += tl.sum(o * w[:, None], 0)
        total += w
    denom = tl.sum(total, 0)
    o = tl.where(denom > 0, acc / tl.where(denom > 0, denom, 1.0), 0.0)
    dst = (seq.to(tl.int64) * num_heads + head) * HEAD_SIZE + d
    tl.store(out_ptr + dst, o.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _find_seq(query_start_loc_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence owning query tile `tile`: sequence i's tiles start at qsl[i]//BLOCK_Q + i.

    That numbering gives every sequence cdiv(q_len, BLOCK_Q) tiles or one more, so the grid
    (num_tokens // BLOCK_Q + num_seqs) is known without reading lengths on the host.
    """
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _prefill_kernel(
    out_ptr,  # [num_tokens, num_heads, head_size], contiguous
    q_ptr,  # [num_tokens, num_heads, head_size], row stride stride_q
    k_cache_ptr,  # [num_blocks, num_kv_heads, block_size, head_size]
    v_cache_ptr,  # same
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32, row stride stride_bt
    query_start_loc_ptr,  # [num_seqs + 1] int32
    seq_lens_ptr,  # [num_seqs] int32
    scale_log2e,
    stride_q,
    stride_bt,
    stride_cache_block,
    num_heads,
    num_seqs,
    window,  # sliding window in tokens (0: none)
    GROUP: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program: BLOCK_Q tokens x GROUP heads (+ padding)
    BLOCK_Q: tl.constexpr,  # BLOCK_M // GROUP query tokens
    TILE_N: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq(query_start_loc_ptr, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    tile_in_seq = tile - (q_start // BLOCK_Q + seq)
    if tile_in_seq * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len  # cached tokens before this step's queries

    # Row r is query token tile_in_seq*BLOCK_Q + r // GROUP of query head r % GROUP, so the
    # group sharing a KV head reads each K/V tile once.
    r = tl.arange(0, BLOCK_M)
    q_idx = tile_in_seq * BLOCK_Q + r // GROUP
    heads = kv_head * GROUP + r % GROUP
    row_mask = (r < BLOCK_Q * GROUP) & (q_idx < q_len)
    q_pos = prefix + q_idx
    d = tl.arange(0, HEAD_PAD)
    d_mask = d < HEAD_SIZE
    mask = row_mask[:, None] & d_mask[None, :]
    q_row = (q_start + q_idx).to(tl.int64)
    q = tl.load(
        q_ptr + q_row[:, None] * stride_q + heads[:, None] * HEAD_SIZE + d[None, :],
        mask=mask,
        other=0.0,
    )
    if DOT_F32:
        q = q.to(tl.float32)
    else:
        q = q.to(k_cache_ptr.dtype.element_ty)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    # The tile's last query sees the context up to its own position, nothing after.
    kv_end = prefix + tl.minimum((tile_in_seq + 1) * BLOCK_Q, q_len)
    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kv_head_offset = kv_head.to(tl.int64) * (BLOCK_SIZE * HEAD_SIZE)
    # From the tile's first query's first key (0 without a window).
    kv_start = 0
    if window > 0:
        kv_start = tl.maximum(prefix + tile_in_seq * BLOCK_Q - window + 1, 0)
    for start in range(kv_start, kv_end, TILE_N):
        acc, m_i, l_i = _attend_tile(
            q,
            acc,
            m_i,
            l_i,
            k_cache_ptr,
            v_cache_ptr,
            block_table_row,
            kv_head_offset,
            start,
            kv_end,
            q_pos,
            window,
            scale_log2e,
            stride_cache_block,
            d,
            d_mask,
            True,
            HEAD_SIZE,
            HEAD_PAD,
            BLOCK_SIZE,
            TILE_N,
            DOT_F32,
        )

    o = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
    dst = (q_row[:, None] * num_heads + heads[:, None]) * HEAD_SIZE + d[None, :]
    tl.store(out_ptr + dst, o.to(out_ptr.dtype.element_ty), mask=mask)


INTERPRETED: bool = isinstance(_decode_kernel, InterpretedFunction)
