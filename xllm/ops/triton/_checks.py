"""Argument checks for the Triton ops, run before any launch.

Each failure raises ValueError naming the argument and saying what to change. Only
metadata is checked (dtypes, shapes, strides, devices): reading contents such as slot ids
or lengths would need a device-to-host copy on every call.
"""

from __future__ import annotations

import math

import torch

from xllm.ops.triton import _kernels

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(
            f"{name} is on {t.device} but the other tensors are on {device}; "
            "move them to one device"
        )


def check_backend_device(name: str, t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and _kernels.INTERPRETED:
        return
    raise ValueError(
        f"{name} is on {t.device}: the Triton kernels need CUDA tensors (CPU "
        "tensors only when TRITON_INTERPRET=1 is set before triton and xllm.ops.triton "
        "are imported); use backend='native' or 'torch' for other devices"
    )


def check_tensor(name: str, t: object, ndim: int, dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must be {names}, got {str(t.dtype).removeprefix('torch.')}")


def check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous; pass {name}.contiguous()")


def check_rows(name: str, t: torch.Tensor) -> None:
    """[rows, heads, head_size] with heads and head_size packed; any stride between rows."""
    if t.stride(2) != 1 or (t.shape[1] > 1 and t.stride(1) != t.shape[2]):
        raise ValueError(
            f"{name} must be contiguous within each row (dims 1 and 2); only "
            f"dim 0 may be strided, got strides {tuple(t.stride())}"
        )


def check_caches(key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    check_tensor("key_cache", key_cache, 4, FLOAT_DTYPES)
    check_tensor("value_cache", value_cache, 4, FLOAT_DTYPES)
    if value_cache.shape != key_cache.shape:
        raise ValueError(
            f"value_cache shape {tuple(value_cache.shape)} must equal key_cache "
            f"shape {tuple(key_cache.shape)}"
        )
    if value_cache.dtype != key_cache.dtype:
        raise ValueError(
            f"value_cache dtype {value_cache.dtype} must equal key_cache dtype {key_cache.dtype}"
        )
    for dim, what in ((1, "num_kv_heads"), (2, "block_size"), (3, "head_size")):
        if key_cache.shape[dim] < 1:
            raise ValueError(f"key_cache {what} (dim {dim}) must be >= 1, got 0")
    check_contiguous("key_cache", key_cache)
    check_contiguous("value_cache", value_cache)
    check_backend_device("key_cache", key_cache)
    check_device("value_cache", value_cache, key_cache.device)


def check_scale(scale: float) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a float, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be finite and > 0, got {scale}")


def check_attention_args(
    out: torch.Tensor,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> None:
    """Checks shared by decode and prefill (num_seqs is block_tables.shape[0])."""
    check_tensor("query", query, 3, FLOAT_DTYPES)
    check_caches(key_cache, value_cache)
    check_device("query", query, key_cache.device)
    check_rows("query", query)
    check_tensor("out", out, 3, FLOAT_DTYPES)
    if out.shape != query.shape:
        raise ValueError(
            f"out shape {tuple(out.shape)} must equal query shape {tuple(query.shape)}"
        )
    check_contiguous("out", out)
    check_device("out", out, key_cache.device)
    num_heads, head_size = query.shape[1], query.shape[2]
    num_kv_heads = key_cache.shape[1]
    if key_cache.shape[3] != head_size:
        raise ValueError(
            f"key_cache head_size {key_cache.shape[3]} must equal query head_size {head_size}"
        )
    if num_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"query's num_heads {num_heads} must be a positive multiple of key_cache's "
            f"num_kv_heads {num_kv_heads}"
        )
    check_tensor("block_tables", block_tables, 2, (torch.int32,))
    check_contiguous("block_tables", block_tables)
    check_device("block_tables", block_tables, key_cache.device)
    check_tensor("seq_lens", seq_lens, 1, (torch.int32,))
    check_contiguous("seq_lens", seq_lens)
    check_device("seq_lens", seq_lens, key_cache.device)
    if seq_lens.shape[0] != block_tables.shape[0]:
        raise ValueError(
            f"seq_lens has {seq_lens.shape[0]} entries but block_tables has "
            f"{block_tables.shape[0]} rows; both need one per sequence"
        )
    check_scale(scale)


def check_write_args(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    check_caches(key_cache, value_cache)
    _, num_kv_heads, _, head_size = key_cache.shape
    for name, t in (("key", key), ("value", value)):
        check_tensor(name, t, 3, FLOAT_DTYPES)
        check_device(name, t, key_cache.device)
        if tuple(t.shape[1:]) != (num_kv_heads, head_size):
            raise ValueError(
                f"{name} shape {tuple(t.shape)} must be [num_tokens, "
                f"{num_kv_heads}, {head_size}] to match the cache"
            )
        check_rows(name, t)
    if value.shape[0] != key.shape[0]:
        raise ValueError(f"value has {value.shape[0]} tokens but key has {key.shape[0]}")
    check_tensor("slot_mapping", slot_mapping, 1, (torch.int64, torch.int32))
    check_contiguous("slot_mapping", slot_mapping)
    check_device("slot_mapping", slot_mapping, key_cache.device)
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(
            f"slot_mapping has {slot_mapping.shape[0]} entries but key has "
            f"{key.shape[0]} tokens; pass one slot per token (-1 for padding)"
        )


def check_query_start_loc(
    query_start_loc: torch.Tensor, num_seqs: int, device: torch.device
) -> None:
    check_tensor("query_start_loc", query_start_loc, 1, (torch.int32,))
    check_contiguous("query_start_loc", query_start_loc)
    check_device("query_start_loc", query_start_loc, device)
    if query_start_loc.shape[0] != num_seqs + 1:
        raise ValueError(
            f"query_start_loc has {query_start_loc.shape[0]} entries; it needs "
            f"num_seqs + 1 = {num_seqs + 1} (block_tables has {num_seqs} rows)"
        )


def check_window(window: int) -> None:
    """A sliding window in tokens: an integer >= 0 (0: none)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an integer >= 0 (0: no sliding window), got {window!r}")
