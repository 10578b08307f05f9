"""Attention over the paged KV cache: cache write, then decode and prefill ops.

The runner orders a batch's token rows decodes first, then prefills (see
``xllm.layers.attn_metadata``), so one call writes every new K/V row into the cache and
then runs ``paged_attention_decode`` on the head rows and ``paged_attention_prefill`` on
the tail, each into its slice of one output tensor. The ops pick their backend from the
tensors' device (native C++ on CPU, Triton on CUDA); layout: ``xllm.ops.kv_cache``.
"""

from __future__ import annotations

import torch
from torch import nn

from xllm.layers.attn_metadata import AttentionMetadata
from xllm.ops import attention as ops
from xllm.ops.kv_cache import kv_row_width


class PagedAttention(nn.Module):
    """softmax(q k^T * scale) v for q [T, num_heads, head_dim] against the paged cache.

    q/k/v may be views with a row stride (parts of a fused QKV output); each head's row
    must be contiguous. The caches are bound once by ``bind_kv_cache``.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 window: int = 0) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.window = window  # sliding window in tokens (0: full causal attention)
        self.key_cache: torch.Tensor | None = None
        self.value_cache: torch.Tensor | None = None

    def bind_kv_cache(self, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
        """Uses these [num_blocks, num_kv_heads, block_size, head_dim] tensors as this
        layer's cache from now on (they are written in place by every forward); int8 caches
        have rows of head_dim + 4 (xllm.ops.kv_cache)."""
        for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
            if (
                not isinstance(cache, torch.Tensor)
                or cache.dim() != 4
                or cache.shape[1] != self.num_kv_heads
                or cache.shape[3] != kv_row_width(self.head_dim, cache.dtype)
            ):
                got = tuple(cache.shape) if isinstance(cache, torch.Tensor) else type(cache)
                row = (kv_row_width(self.head_dim, cache.dtype)
                       if isinstance(cache, torch.Tensor) else self.head_dim)
                raise ValueError(
                    f"{name} must be a tensor [num_blocks, {self.num_kv_heads}, block_size, "
                    f"{row}] (num_kv_heads and head_dim of the model), got {got}"
                )
        if key_cache.shape != value_cache.shape:
            raise ValueError(
                f"key_cache {tuple(key_cache.shape)} and value_cache "
                f"{tuple(value_cache.shape)} must have the same shape"
            )
        self.key_cache = key_cache
        self.value_cache = value_cache

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: AttentionMetadata
    ) -> torch.Tensor:
        """Writes k/v at attn.slot_mapping, then attends; returns [T, num_heads, head_dim]
        (fp32 on CPU, q's dtype on CUDA)."""
        key_cache, value_cache = self.key_cache, self.value_cache
        if key_cache is None or value_cache is None:
            raise RuntimeError("PagedAttention has no KV cache; call model.bind_kv_caches first")
        ops.write_kv_cache(k, v, key_cache, value_cache, attn.slot_mapping)
        num_tokens = q.shape[0]
        out_dtype = torch.float32 if q.device.type == "cpu" else q.dtype
        out = torch.empty(
            (num_tokens, self.num_heads, self.head_dim), dtype=out_dtype, device=q.device
        )
        nd = attn.num_decode_tokens
        if nd > 0:
            ops.paged_attention_decode(
                q[:nd],
                key_cache,
                value_cache,
                attn.decode_block_tables,
                attn.decode_seq_lens,
                self.scale,
                out=out[:nd],
                window=self.window,
            )
        if num_tokens > nd:
            ops.paged_attention_prefill(
                q[nd:],
                key_cache,
                value_cache,
                attn.prefill_block_tables,
                attn.prefill_query_start_loc,
                attn.prefill_seq_lens,
                self.scale,
                out=out[nd:],
                window=self.window,
            )
        return out

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"scale={self.scale:.6g}" + (f", window={self.window}" if self.window else "")
        )
