"""The paged KV cache layout, defined here once for every backend (C++, Triton, torch).

Each attention layer owns two tensors of the same shape::

    key_cache:   [num_blocks, num_kv_heads, block_size, head_size]
    value_cache: [num_blocks, num_kv_heads, block_size, head_size]

Multi-head latent attention (DeepSeek) caches one row per token, its latent and rope key
(``num_kv_heads`` 1), and that one tensor serves as both key_cache and value_cache
(``ModelConfig.kv_cache_geometry``, ``xllm.layers.mla``).

A *block* holds ``block_size`` consecutive tokens of one sequence for every KV
head. Within a block each head's tokens are contiguous (``block_size *
head_size`` elements), so an attention kernel working on one (sequence, KV head)
streams memory linearly and loads each K/V row once for all the query heads that
share it (GQA/MQA).

A token's *slot* is ``block_id * block_size + offset_in_block``; the cache write
takes one slot per new token, and slot ``-1`` marks padding that is skipped.

A sequence's *block table* row lists its block ids in order: token ``i`` of the
sequence lives in block ``block_table[i // block_size]`` at offset
``i % block_size``. Rows are padded with the null block 0 (never written, never
read past the sequence length). Block tables and sequence lengths are int32.

Storage dtype: float32 or bfloat16 on CPU (bf16 is widened to fp32 on the fly;
compute is always fp32 there), float32/float16/bfloat16 on CUDA. On CPU also int8
("q8" rows): each row is ``head_size`` int8 values followed by their fp32 scale (4
bytes, in the row so a block stays one run of bytes for the pool, the tiers and
transfers), so the cache's last dimension is ``head_size + 4``; a row is written as
``scale = max|x| / 127``, ``q = round(x / scale)`` (half to even) and read as
``q * scale`` (``quantize_rows`` / ``dequantize_rows``: the reference).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from xllm.models.config import ModelConfig

DEFAULT_BLOCK_SIZE = 16


Q8_SCALE_BYTES = 4  # an int8 row's trailing fp32 scale
# EngineConfig.kv_cache_dtype names (but auto) -> the cache tensors' dtype.
KV_CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16, "int8": torch.int8}


def kv_row_width(head_size: int, dtype: torch.dtype) -> int:
    """Elements of ``dtype`` in one cache row: ``head_size``, plus the scale's 4 bytes for
    int8 rows."""
    return head_size + Q8_SCALE_BYTES if dtype == torch.int8 else head_size


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., head_size] float -> [..., head_size + 4] int8 rows (the layout above)."""
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True) / 127.0
    q = torch.where(scale > 0, torch.round(x / torch.where(scale > 0, scale, 1.0)),
                    torch.zeros_like(x))
    q = q.clamp(-127, 127).to(torch.int8)
    return torch.cat([q, scale.contiguous().view(torch.int8)], dim=-1)


def dequantize_rows(rows: torch.Tensor) -> torch.Tensor:
    """[..., head_size + 4] int8 rows -> [..., head_size] float32."""
    scale = rows[..., -Q8_SCALE_BYTES:].contiguous().view(torch.float32)
    return rows[..., :-Q8_SCALE_BYTES].float() * scale


def kv_cache_shape(num_blocks: int, num_kv_heads: int, block_size: int, head_size: int) -> tuple:
    """Shape of one layer's key (or value) cache."""
    for name, value in (("num_blocks", num_blocks), ("num_kv_heads", num_kv_heads),
                        ("block_size", block_size), ("head_size", head_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    return (num_blocks, num_kv_heads, block_size, head_size)


def allocate_kv_cache(num_blocks: int, num_kv_heads: int, block_size: int, head_size: int,
                      dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed (key_cache, value_cache) for one layer. On the CPU the zeros are calloc'd
    pages, which the OS backs only as blocks are written (torch.zeros would touch them all)."""
    return tuple(allocate_kv_cache_one(num_blocks, num_kv_heads, block_size, head_size, dtype,
                                       device) for _ in range(2))


def allocate_model_kv_caches(config: ModelConfig, num_blocks: int, block_size: int,
                             dtype: torch.dtype = torch.float32,
                             device: torch.device | str = "cpu",
                             num_kv_heads: int | None = None
                             ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (key_cache, value_cache) for a ``ModelConfig``'s geometry
    (``kv_cache_geometry``): with one tensor per layer (MLA's latent rows) the pair is that
    tensor twice. ``num_kv_heads``: this rank's heads under tensor parallelism."""
    heads, head_size, per_layer = config.kv_cache_geometry()
    return allocate_kv_caches(config.num_hidden_layers, num_blocks, num_kv_heads or heads,
                              block_size, head_size, dtype, device, per_layer)


def allocate_kv_caches(num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int,
                       head_size: int, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu", tensors_per_layer: int = 2
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (key_cache, value_cache): two zeroed tensors, or with
    ``tensors_per_layer`` 1 one tensor read as both."""
    caches = []
    for _ in range(num_layers):
        if tensors_per_layer == 2:
            caches.append(allocate_kv_cache(num_blocks, num_kv_heads, block_size, head_size,
                                            dtype, device))
        else:
            one = allocate_kv_cache_one(num_blocks, num_kv_heads, block_size, head_size, dtype,
                                        device)
            caches.append((one, one))
    return caches


def allocate_kv_cache_one(num_blocks: int, num_kv_heads: int, block_size: int, head_size: int,
                          dtype: torch.dtype = torch.float32,
                          device: torch.device | str = "cpu") -> torch.Tensor:
    """One zeroed cache tensor (calloc'd on the CPU, as ``allocate_kv_cache``); int8 rows
    have the scale's 4 bytes beyond ``head_size``."""
    shape = kv_cache_shape(num_blocks, num_kv_heads, block_size, kv_row_width(head_size, dtype))
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


def slots_for_positions(block_table: list[int], positions: list[int], block_size: int) -> list[int]:
    """Slots of the given token positions of one sequence (a helper for tests and callers)."""
    return [block_table[p // block_size] * block_size + p % block_size for p in positions]
