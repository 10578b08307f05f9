"""Triton fused mixture-of-experts (called by ``xllm.layers.moe.SparseMoE`` for CUDA tensors).

``fused_moe(x, w13, w2, ids, weights)`` computes ``xllm.layers.moe.moe_reference``: each
token's top-k experts, each ``w2[e] @ (silu(gate) * up)`` with ``[gate; up] = w13[e] @ x``,
summed with the routing weights. Three steps, no host sync (CUDA-graph safe):

1. ``align_by_expert``: the (token, slot) pairs sorted by expert and each expert's run padded
   to a multiple of BLOCK_M (torch ops on the device: scatter-add counts, a stable sort, a
   scatter), so every block of BLOCK_M rows belongs to one expert. The number of blocks is
   bounded without reading the counts back (``ceil(pairs / BLOCK_M) + experts``); blocks past
   the last expert's run are marked -1 and exit at once.
2. ``_gate_up_kernel``: per (block, tile of the expert's intermediate columns), the gate and
   up tiles of ``x[tokens] @ w13[e]^T`` accumulate side by side in fp32 and leave as
   ``silu(gate) * up``, one row per pair.
3. ``_down_kernel``: per (block, tile of hidden columns), ``act @ w2[e]^T`` times the pair's
   routing weight, one row per pair; then the k rows of each token are summed (torch).

The kernels run on CUDA, or on CPU tensors when TRITON_INTERPRET=1 was set before ``triton``
and this module were first imported (tests/test_triton_moe.py); the interpreter cannot
multiply 16-bit tiles, so interpreted weights are widened to fp32 first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

__all__ = ["align_by_expert", "fused_moe"]


@triton.jit
def _gate_up_kernel(
    x_ptr,  # [T, H]
    w13_ptr,  # [E, 2I, H]
    act_ptr,  # [P, I] out: silu(gate) * up per (token, slot) pair
    sorted_pairs_ptr,  # [num_blocks * BLOCK_M] pair ids by expert; P marks padding
    block_expert_ptr,  # [num_blocks] the block's expert, -1 past the last run
    num_pairs,
    top_k,
    hidden,
    inter,
    stride_x,
    stride_we,
    stride_wn,
    stride_act,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:
        return
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pairs_ptr + rows)
    valid = pair < num_pairs
    token = tl.where(valid, pair // top_k, 0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    w_base = w13_ptr + expert.to(tl.int64) * stride_we
    gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < hidden
        a = tl.load(x_ptr + token[:, None] * stride_x + ks[None, :],
                    mask=valid[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        wg = tl.load(w_base + cols[None, :].to(tl.int64) * stride_wn + ks[:, None],
                     mask=w_mask, other=0.0)
        wu = tl.load(w_base + (inter + cols[None, :]).to(tl.int64) * stride_wn + ks[:, None],
                     mask=w_mask, other=0.0)
        gate += tl.dot(a.to(wg.dtype), wg, input_precision="ieee")
        up += tl.dot(a.to(wu.dtype), wu, input_precision="ieee")
    act = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(act_ptr + pair[:, None].to(tl.int64) * stride_act + cols[None, :],
             act.to(act_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(
    act_ptr,  # [P, I]
    w2_ptr,  # [E, H, I]
    out_ptr,  # [P, H] out: weight * expert output per pair
    weights_ptr,  # [P] fp32 routing weights
    sorted_pairs_ptr,
    block_expert_ptr,
    num_pairs,
    hidden,
    inter,
    stride_act,
    stride_we,
    stride_wn,
    stride_out,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:
        return
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pairs_ptr + rows)
    valid = pair < num_pairs
    safe = tl.where(valid, pair, 0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    w_base = w2_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < inter
        a = tl.load(act_ptr + safe[:, None] * stride_act + ks[None, :],
                    mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + cols[None, :].to(tl.int64) * stride_wn + ks[:, None],
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(a.to(w.dtype), w, input_precision="ieee")
    acc *= tl.load(weights_ptr + safe, mask=valid, other=0.0)[:, None]
    tl.store(out_ptr + safe[:, None] * stride_out + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])


INTERPRETED: bool = isinstance(_down_kernel, InterpretedFunction)


def align_by_expert(ids: torch.Tensor, num_experts: int,
                    block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_pairs [num_blocks * block_m], block_expert [num_blocks]) for expert ids [T, k]:
    pair ids (t * k + j) grouped by expert, each expert's run padded to whole blocks with the
    sentinel T * k; each block's expert, -1 for blocks past the last run. num_blocks is the
    bound ``ceil(T * k / block_m) + num_experts``, known without reading the ids."""
    flat = ids.reshape(-1)
    pairs = flat.numel()
    device = ids.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(
        0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    run_end = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    by_expert = flat[order]
    rank = torch.arange(pairs, device=device) - (torch.cumsum(counts, 0) - counts)[by_expert]
    num_blocks = -(-pairs // block_m) + num_experts
    sorted_pairs = torch.full((num_blocks * block_m,), pairs, dtype=torch.int64, device=device)
    sorted_pairs[(run_end - padded)[by_expert] + rank] = order
    block_start = torch.arange(num_blocks, device=device) * block_m
    block_expert = torch.searchsorted(run_end, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1)
    return sorted_pairs, block_expert.to(torch.int32)


def _blocks(m: int, inter: int, hidden: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): small rows per expert for decode-sized batches."""
    block_m = 16 if m <= 64 else 64
    return block_m, 64 if min(inter, hidden) >= 64 else 32, 32


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor,
              weights: torch.Tensor) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) for x [T, H], w13 [E, 2I, H],
    w2 [E, H, I], ids [T, k] int64, weights [T, k]; returns [T, H] in x's dtype."""
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"x must be [T, H], w13 [E, 2I, H] and w2 [E, H, I]; got "
                         f"{tuple(x.shape)}, {tuple(w13.shape)}, {tuple(w2.shape)}")
    t, hidden = x.shape
    experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    if (w13.shape[2] != hidden or two_inter % 2 or tuple(w2.shape) != (experts, hidden, inter)):
        raise ValueError(f"w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not fit x of "
                         f"hidden size {hidden}")
    if ids.shape != weights.shape or ids.dim() != 2 or ids.shape[0] != t:
        raise ValueError(f"ids {tuple(ids.shape)} and weights {tuple(weights.shape)} must both "
                         f"be [{t}, top_k]")
    k = ids.shape[1]
    out = torch.zeros_like(x)
    if t == 0:
        return out
    if INTERPRETED:  # the interpreter multiplies fp32 tiles only
        x, w13, w2 = x.float(), w13.float(), w2.float()
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    pairs = t * k
    block_m, block_n, block_k = _blocks(pairs, inter, hidden)
    sorted_pairs, block_expert = align_by_expert(ids.to(torch.int64), experts, block_m)
    num_blocks = block_expert.numel()
    act = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)
    _gate_up_kernel[(num_blocks, triton.cdiv(inter, block_n))](
        x, w13, act, sorted_pairs, block_expert, pairs, k, hidden, inter, x.stride(0),
        w13.stride(0), w13.stride(1), act.stride(0), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k)
    per_pair = torch.empty(pairs, hidden, dtype=torch.float32, device=x.device)
    _down_kernel[(num_blocks, triton.cdiv(hidden, block_n))](
        act, w2, per_pair, weights.reshape(-1).float().contiguous(), sorted_pairs, block_expert,
        pairs, hidden, inter, act.stride(0), w2.stride(0), w2.stride(1), per_pair.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out.copy_(per_pair.view(t, k, hidden).sum(1))
