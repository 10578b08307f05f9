"""Plain-torch references for paged attention and the KV cache write.

They define what the native and Triton kernels must compute; tests compare the
kernels against them. Clarity over speed: one sequence at a time, fp32 math.
Layout and conventions: ``xllm.ops.kv_cache``.
"""

from __future__ import annotations

import torch

from xllm.ops.kv_cache import dequantize_rows, quantize_rows


def write_kv_cache_ref(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                       value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """key/value: [num_tokens, num_kv_heads, head_size]; slot_mapping: [num_tokens], -1 skipped."""
    block_size = key_cache.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blocks, offsets = slots // block_size, slots % block_size
    # [n, heads, head_size] written at cache[block, :, offset, :]
    if key_cache.dtype == torch.int8:
        key_cache[blocks, :, offsets, :] = quantize_rows(key[keep])
        value_cache[blocks, :, offsets, :] = quantize_rows(value[keep])
        return
    key_cache[blocks, :, offsets, :] = key[keep].to(key_cache.dtype)
    value_cache[blocks, :, offsets, :] = value[keep].to(value_cache.dtype)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """One sequence's first seq_len tokens as [num_kv_heads, seq_len, head_size] (fp32)."""
    block_size = cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]  # [nb, heads, bs, hs]
    heads, head_size = cache.shape[1], cache.shape[3]
    kv = blocks.permute(1, 0, 2, 3).reshape(heads, num_blocks * block_size, head_size)
    kv = kv[:, :seq_len]
    return dequantize_rows(kv) if kv.dtype == torch.int8 else kv.float()


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            q_positions: torch.Tensor, window: int = 0) -> torch.Tensor:
    """q: [q_len, heads, hs]; k/v: [kv_heads, ctx, hs]; causal by absolute position, and with
    ``window`` > 0 no key at or before q_position - window."""
    heads, kv_heads = q.shape[1], k.shape[0]
    group = heads // kv_heads
    k = k.repeat_interleave(group, dim=0)  # [heads, ctx, hs]
    v = v.repeat_interleave(group, dim=0)
    scores = torch.einsum("qhd,hkd->hqk", q.float(), k) * scale
    ctx = k.shape[1]
    keys = torch.arange(ctx, device=q.device)[None, :]
    mask = keys > q_positions[:, None]  # [q_len, ctx]
    if window > 0:
        mask |= keys <= q_positions[:, None] - window
    scores = scores.masked_fill(mask[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,hkd->qhd", probs, v)


def paged_attention_decode_ref(query: torch.Tensor, key_cache: torch.Tensor,
                               value_cache: torch.Tensor, block_tables: torch.Tensor,
                               seq_lens: torch.Tensor, scale: float,
                               window: int = 0) -> torch.Tensor:
    """query: [num_seqs, num_heads, head_size] -> [num_seqs, num_heads, head_size] (fp32).

    Each sequence's single query token is its last token (position seq_len - 1) and
    attends to all seq_len cached tokens. A sequence with seq_len 0 yields zeros.
    """
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    for i in range(query.shape[0]):
        n = int(seq_lens[i])
        if n == 0:
            continue
        k = gather_kv(key_cache, block_tables[i], n)
        v = gather_kv(value_cache, block_tables[i], n)
        pos = torch.tensor([n - 1], device=query.device)
        out[i] = _attend(query[i : i + 1], k, v, scale, pos, window)[0]
    return out


def paged_attention_prefill_ref(query: torch.Tensor, key_cache: torch.Tensor,
                                value_cache: torch.Tensor, block_tables: torch.Tensor,
                                query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                                scale: float, window: int = 0) -> torch.Tensor:
    """query: [num_tokens, num_heads, head_size] -> same shape (fp32).

    Sequence i owns query rows query_start_loc[i]:query_start_loc[i+1] (q_len of them);
    they are its last q_len tokens, at positions seq_lens[i]-q_len .. seq_lens[i]-1, and
    their K/V are already in the cache. Each attends causally to every cached token at
    or before its own position (earlier context from a prefix-cache hit or an earlier
    chunk included).
    """
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    for i in range(block_tables.shape[0]):
        start, end = int(query_start_loc[i]), int(query_start_loc[i + 1])
        q_len, n = end - start, int(seq_lens[i])
        if q_len == 0:
            continue
        k = gather_kv(key_cache, block_tables[i], n)
        v = gather_kv(value_cache, block_tables[i], n)
        pos = torch.arange(n - q_len, n, device=query.device)
        out[start:end] = _attend(query[start:end], k, v, scale, pos, window)
    return out
