"""KV cache write benchmark: the native scatter against torch indexing.

The baseline is what a torch-only engine does each step: turn the slot mapping
into row indices of the cache viewed as [num_blocks * num_kv_heads * block_size,
head_size] and ``index_copy_`` the new K and V rows there (the index arithmetic
is part of every step, so it is timed). ``extra["advanced_indexing_s"]`` is the
other torch idiom, ``cache[blocks, :, offsets] = key``.
Sizes: a 512-token prefill and a batch-64 decode step, slots in shuffled blocks.
"""

from __future__ import annotations

import torch

from bench.ops.common import Row, compare, per_call_seconds
from xllm.ops import attention as ops

BLOCK_SIZE = 16
MODELS = {"SmolLM2-135M": (3, 64), "Llama-3-8B": (8, 128)}  # name -> (num_kv_heads, head_size)
NUM_BLOCKS = 2048


def _slots(num_tokens: int, decode: bool, gen: torch.Generator) -> torch.Tensor:
    """Prefill: consecutive tokens of one sequence; decode: one token of each of many."""
    blocks = torch.randperm(NUM_BLOCKS - 1, generator=gen)[:num_tokens] + 1
    if decode:
        offsets = torch.randint(0, BLOCK_SIZE, (num_tokens,), generator=gen)
        return blocks * BLOCK_SIZE + offsets
    pos = torch.arange(num_tokens)
    return blocks[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE


def write_row(model: str, num_tokens: int, decode: bool, dtype: torch.dtype = torch.float32) -> Row:
    kv_heads, head_size = MODELS[model]
    gen = torch.Generator().manual_seed(0)
    shape = (NUM_BLOCKS, kv_heads, BLOCK_SIZE, head_size)
    key_cache, value_cache = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    # A fused QKV output is the usual source: key and value are strided views of it.
    qkv = torch.randn(num_tokens, 3, kv_heads, head_size, generator=gen)
    key, value = qkv[:, 1], qkv[:, 2]
    slots = _slots(num_tokens, decode, gen)
    heads = torch.arange(kv_heads)
    flat_k, flat_v = key_cache.view(-1, head_size), value_cache.view(-1, head_size)

    def native() -> None:
        ops.write_kv_cache(key, value, key_cache, value_cache, slots)

    def index_copy() -> None:
        block, offset = slots // BLOCK_SIZE, slots % BLOCK_SIZE
        rows = ((block[:, None] * kv_heads + heads) * BLOCK_SIZE + offset[:, None]).flatten()
        flat_k.index_copy_(0, rows, key.reshape(-1, head_size).to(dtype))
        flat_v.index_copy_(0, rows, value.reshape(-1, head_size).to(dtype))

    def advanced_indexing() -> None:
        block, offset = slots // BLOCK_SIZE, slots % BLOCK_SIZE
        key_cache[block, :, offset] = key.to(dtype)
        value_cache[block, :, offset] = value.to(dtype)

    # Both must store the same bytes before either is timed.
    native()
    expect_k, expect_v = key_cache.clone(), value_cache.clone()
    key_cache.zero_()
    value_cache.zero_()
    index_copy()
    assert torch.equal(key_cache, expect_k) and torch.equal(value_cache, expect_v)

    adv = per_call_seconds(advanced_indexing, min_time=0.02, repeat=3)
    what = f"decode batch {num_tokens}" if decode else f"prefill {num_tokens} tokens"
    dt = "bf16" if dtype == torch.bfloat16 else "fp32"
    row = compare(
        "write_kv_cache",
        f"{model} kv{kv_heads}/d{head_size} {what} {dt} cache",
        native,
        index_copy,
        "torch index_copy_ on the flattened cache",
    )
    row.extra = {"advanced_indexing_s": adv}
    row.note = f"advanced indexing: {adv * 1e6:.1f} us; no target"
    return row


def run(quick: bool) -> list[Row]:
    if quick:
        return [write_row("SmolLM2-135M", 64, decode=True)]
    rows = []
    for model in MODELS:
        rows.append(write_row(model, 512, decode=False))
        rows.append(write_row(model, 64, decode=True))
    rows.append(write_row("Llama-3-8B", 512, decode=False, dtype=torch.bfloat16))
    return rows
