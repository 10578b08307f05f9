"""Paged attention and KV cache write: one function per op, backend picked per call.

CPU tensors go to the native kernels in ``xllm._C`` (OpenMP, AVX2/FMA with a
scalar fallback), CUDA tensors to the Triton kernels in ``xllm.ops.triton``,
anything else to the plain-torch references. ``backend=`` forces one ("native",
"triton" or "torch"); tests and benchmarks use it. Layout: ``xllm.ops.kv_cache``.
"""

from __future__ import annotations

import torch

from xllm.ops import attention_ref as ref

_BACKENDS = ("native", "triton", "torch")


def _pick(backend: str | None, tensor: torch.Tensor) -> str:
    if backend is None:
        if tensor.device.type == "cpu":
            return "native"
        if tensor.device.type == "cuda":
            return "triton"
        return "torch"
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS} or None, got {backend!r}")
    return backend


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                   value_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   backend: str | None = None) -> None:
    """Scatter new K/V rows into their cache slots.

    key, value: [num_tokens, num_kv_heads, head_size]; key_cache, value_cache:
    [num_blocks, num_kv_heads, block_size, head_size]; slot_mapping: int64
    [num_tokens], where -1 marks padding that is skipped.
    """
    chosen = _pick(backend, key_cache)
    if chosen == "native":
        from xllm import _C

        _C.write_kv_cache(key, value, key_cache, value_cache, slot_mapping)
    elif chosen == "triton":
        from xllm.ops.triton import attention as tri

        tri.write_kv_cache(key, value, key_cache, value_cache, slot_mapping)
    else:
        ref.write_kv_cache_ref(key, value, key_cache, value_cache, slot_mapping)


def paged_attention_decode(query: torch.Tensor, key_cache: torch.Tensor,
                           value_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None,
                           backend: str | None = None, window: int = 0) -> torch.Tensor:
    """One query token per sequence attending to its whole paged context, or with ``window``
    > 0 to its last ``window`` tokens (a sliding window; the blocks before it are not read).

    query: [num_seqs, num_heads, head_size]; block_tables: int32
    [num_seqs, max_blocks_per_seq]; seq_lens: int32 [num_seqs] (context length,
    the query's own token included; 0 gives zeros). Returns ``out``
    [num_seqs, num_heads, head_size] (fp32 on CPU; query's dtype on CUDA).
    """
    return _attend("paged_attention_decode", backend, out, query, key_cache, value_cache,
                   block_tables, seq_lens, float(scale), int(window))


def paged_attention_prefill(query: torch.Tensor, key_cache: torch.Tensor,
                            value_cache: torch.Tensor, block_tables: torch.Tensor,
                            query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                            out: torch.Tensor | None = None,
                            backend: str | None = None, window: int = 0) -> torch.Tensor:
    """Several new tokens per sequence attending causally to a paged context (with ``window``
    > 0, a token at position p to keys (p - window, p] only, as transformers' sliding window).

    query: [num_tokens, num_heads, head_size], sequence i owning rows
    query_start_loc[i]:query_start_loc[i+1] (int32 [num_seqs + 1]); those rows are
    the last tokens of a context of seq_lens[i] tokens (int32 [num_seqs]) whose K/V,
    the new tokens' included, are already in the cache. Covers whole prompts,
    chunked prefill and prefix-cache hits alike. Returns ``out`` shaped like query.
    """
    return _attend("paged_attention_prefill", backend, out, query, key_cache, value_cache,
                   block_tables, query_start_loc, seq_lens, float(scale), int(window))


def _attend(op: str, backend: str | None, out: torch.Tensor | None, query: torch.Tensor,
            *args: object) -> torch.Tensor:
    """Runs attention op `op` (same name in _C, the Triton module and, with _ref, the
    references) on the chosen backend, into `out` when given."""
    chosen = _pick(backend, query)
    if chosen == "torch":
        result = getattr(ref, op + "_ref")(query, *args)
        return result if out is None else out.copy_(result)
    if out is None:
        dtype = torch.float32 if chosen == "native" else query.dtype
        out = torch.empty(query.shape, dtype=dtype, device=query.device)
    if chosen == "native":
        from xllm import _C as impl
    else:
        from xllm.ops.triton import attention as impl
    getattr(impl, op)(out, query, *args)
    return out
