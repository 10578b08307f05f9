"""Triton paged attention and KV cache write (called by ``xllm.ops.attention`` for CUDA tensors).

- ``write_kv_cache``: one program per new token scatters its K/V rows (all KV heads) into
  the cache slot, casting to the cache dtype; slot -1 (padding) is skipped.
- ``paged_attention_decode``: flash-decoding. Programs own (sequence, KV head, context
  partition) and process the KV head's whole group of query heads together, so each K/V
  tile is read once per group; with more than one partition a second kernel merges the
  partial softmax results. The partition count comes from the block-table width (or a
  ``max_seq_len`` hint), never from a device-to-host read, so the launch is CUDA-graph safe.
- ``paged_attention_prefill``: flash-attention over the paged context. Programs own a tile
  of a sequence's query tokens x the query heads of one KV head, walk the context in
  tiles with online softmax, and stop at the tile's last causal position. Sequences are
  found from query_start_loc inside the kernel (no host sync).

Semantics are those of ``xllm.ops.attention_ref``; layout: ``xllm.ops.kv_cache``. Arguments
are checked here, before any launch: a bad one raises ValueError naming it. Contents
(slot ids, block ids, lengths within the block-table width) are the caller's contract and
are not read back; slots past the end of the cache are skipped rather than written.

The kernels run on CUDA, or on CPU tensors when TRITON_INTERPRET=1 was set before `triton`
and this package were first imported (tests use that). The interpreter cannot multiply bf16 tiles,
so interpreted bf16 caches are widened to fp32 before the dot products.
"""

from __future__ import annotations

import functools

import torch
import triton

from xllm.ops.triton import _checks, _kernels

_LOG2E = 1.4426950408889634
# Decode: contexts no longer than this are never split; longer ones are cut into
# partitions of at least this many tokens, enough to fill the GPU ~4 programs per SM.
_MIN_PARTITION = 512
_PROGRAMS_PER_SM = 4


def kernels_interpreted() -> bool:
    """Whether the kernels were decorated under TRITON_INTERPRET=1 (CPU tensors then)."""
    return _kernels.INTERPRETED


# ---------------------------------------------------------------- launch helpers


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _dot_in_f32(query: torch.Tensor, key_cache: torch.Tensor) -> bool:
    """fp32 caches (exact fp32 dot), mixed dtypes, or bf16 under the interpreter (see top)."""
    return (
        key_cache.dtype == torch.float32
        or query.dtype != key_cache.dtype
        or (_kernels.INTERPRETED and key_cache.dtype == torch.bfloat16)
    )


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter: any small number exercises the same code
    return torch.cuda.get_device_properties(device).multi_processor_count


# Tile shapes were chosen by compiling for sm_80 and sm_90 and reading the register use
# (cuobjdump -res-usage) until nothing spilled; they have not been timed on a GPU. fp32 dot
# products run on FMA units with whole tiles in registers, hence their smaller tiles.


def _decode_tile(head_pad: int, dot_f32: bool) -> int:
    """Context tokens per step of a decode program."""
    if dot_f32:
        return 32 if head_pad <= 128 else 16
    return 64 if head_pad <= 128 else 32


def _prefill_config(head_pad: int, dot_f32: bool, group: int) -> tuple[int, int, int, int]:
    """(BLOCK_M query rows, TILE_N context tokens, num_warps, num_stages) per program."""
    if dot_f32:
        block_m, tile, warps, stages = 16, (32 if head_pad <= 128 else 16), 4, 1
    elif head_pad <= 128:
        block_m, tile, warps, stages = 128, 64, 8, 2
    else:
        block_m, tile, warps, stages = 64, 32, 8, 2
    # A KV head's whole group must fit in one program's rows.
    return max(block_m, _next_pow2(group)), tile, warps, stages


def _decode_partition_size(
    num_seqs: int, num_kv_heads: int, max_context: int, device: torch.device, tile: int
) -> int | None:
    """Tokens per split-KV partition, or None for one pass (no split)."""
    if max_context <= _MIN_PARTITION:
        return None
    target = _PROGRAMS_PER_SM * _sm_count(device)
    programs = num_seqs * num_kv_heads
    if programs >= target:
        return None
    wanted = triton.cdiv(target, programs)
    size = max(_MIN_PARTITION, triton.cdiv(max_context, wanted))
    size = triton.cdiv(size, tile) * tile
    return None if size >= max_context else size


# ---------------------------------------------------------------- the ops


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """key/value [num_tokens, num_kv_heads, head_size] -> cache slots; slot -1 is skipped."""
    _checks.check_write_args(key, value, key_cache, value_cache, slot_mapping)
    num_blocks, num_kv_heads, block_size, head_size = key_cache.shape
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    head_pad = _next_pow2(head_size)
    heads_chunk = min(_next_pow2(num_kv_heads), max(1, 4096 // head_pad))
    _kernels._write_kv_kernel[(num_tokens,)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        key.stride(0),
        value.stride(0),
        num_blocks * block_size,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_SIZE=head_size,
        BLOCK_SIZE=block_size,
        HEADS_CHUNK=heads_chunk,
        HEAD_PAD=head_pad,
        num_warps=4 if heads_chunk * head_pad >= 1024 else 1,
    )


def paged_attention_decode(
    out: torch.Tensor,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    window: int = 0,
    *,
    max_seq_len: int | None = None,
    partition_size: int | None = None,
) -> None:
    """out[i] = softmax(query[i] K_i^T * scale) V_i over sequence i's seq_lens[i] cached tokens.

    max_seq_len: optional host-side upper bound on seq_lens, used only to size the split;
    without it the block-table width is the bound. partition_size forces the split-KV
    partition length in tokens (tests; 0 forces a single pass); None picks it from the GPU.
    """
    _checks.check_attention_args(out, query, key_cache, value_cache, block_tables, seq_lens, scale)
    _checks.check_window(window)
    if block_tables.shape[0] != query.shape[0]:
        raise ValueError(
            f"block_tables has {block_tables.shape[0]} rows but query has "
            f"{query.shape[0]} sequences; decode takes one query row per sequence"
        )
    num_seqs, num_heads, head_size = query.shape
    _, num_kv_heads, block_size, _ = key_cache.shape
    if num_seqs == 0:
        return
    group = num_heads // num_kv_heads
    head_pad = max(16, _next_pow2(head_size))
    dot_f32 = _dot_in_f32(query, key_cache)
    tile = _decode_tile(head_pad, dot_f32)
    max_context = block_tables.shape[1] * block_size
    if max_seq_len is not None:
        if max_seq_len < 0:
            raise ValueError(f"max_seq_len must be >= 0, got {max_seq_len}")
        max_context = min(max_context, max_seq_len)
    if partition_size is None:
        part = _decode_partition_size(num_seqs, num_kv_heads, max_context, query.device, tile)
    elif partition_size < 0:
        raise ValueError(f"partition_size must be >= 0 (0: no split), got {partition_size}")
    else:
        part = partition_size if 0 < partition_size < max_context else None
    num_partitions = 1 if part is None else triton.cdiv(max_context, part)
    common = dict(
        GROUP=group,
        GROUP_PAD=max(16, _next_pow2(group)),
        HEAD_SIZE=head_size,
        HEAD_PAD=head_pad,
        BLOCK_SIZE=block_size,
        TILE_N=tile,
        DOT_F32=dot_f32,
        num_warps=4,
        num_stages=3,
    )
    grid = (num_seqs, num_kv_heads, num_partitions)
    args = (
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        float(scale) * _LOG2E,
        query.stride(0),
        block_tables.stride(0),
        key_cache.stride(0),
        num_heads,
        num_partitions,
        int(window),
    )
    if part is None:
        _kernels._decode_kernel[grid](
            out, out, out, out, *args, PARTITION_SIZE=1, SPLIT=False, **common
        )
        return
    stats_shape = (num_seqs, num_heads, num_partitions)
    part_out = torch.empty((*stats_shape, head_size), dtype=torch.float32, device=out.device)
    part_max = torch.empty(stats_shape, dtype=torch.float32, device=out.device)
    part_sum = torch.empty(stats_shape, dtype=torch.float32, device=out.device)
    _kernels._decode_kernel[grid](
        out, part_out, part_max, part_sum, *args, PARTITION_SIZE=part, SPLIT=True, **common
    )
    _kernels._decode_reduce_kernel[(num_seqs, num_heads)](
        out,
        part_out,
        part_max,
        part_sum,
        seq_lens,
        num_heads,
        num_partitions,
        HEAD_SIZE=head_size,
        HEAD_PAD=head_pad,
        PARTITION_SIZE=part,
        PART_CHUNK=min(16, _next_pow2(num_partitions)),
        num_warps=4,
    )


def paged_attention_prefill(
    out: torch.Tensor,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    window: int = 0,
) -> None:
    """Causal attention of each sequence's new tokens (rows query_start_loc[i]:[i+1], the last
    q_len of its seq_lens[i] tokens) over its paged context, cached prefix included."""
    _checks.check_attention_args(out, query, key_cache, value_cache, block_tables, seq_lens, scale)
    _checks.check_window(window)
    num_seqs = block_tables.shape[0]
    _checks.check_query_start_loc(query_start_loc, num_seqs, key_cache.device)
    num_tokens, num_heads, head_size = query.shape
    _, num_kv_heads, block_size, _ = key_cache.shape
    if num_seqs == 0 or num_tokens == 0:
        return
    group = num_heads // num_kv_heads
    head_pad = max(16, _next_pow2(head_size))
    dot_f32 = _dot_in_f32(query, key_cache)
    block_m, tile, num_warps, num_stages = _prefill_config(head_pad, dot_f32, group)
    block_q = block_m // group
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    _kernels._prefill_kernel[grid](
        out,
        query,
        key_cache,
        value_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        float(scale) * _LOG2E,
        query.stride(0),
        block_tables.stride(0),
        key_cache.stride(0),
        num_heads,
        num_seqs,
        int(window),
        GROUP=group,
        HEAD_SIZE=head_size,
        HEAD_PAD=head_pad,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        TILE_N=tile,
        DOT_F32=dot_f32,
        num_warps=num_warps,
        num_stages=num_stages,
    )
