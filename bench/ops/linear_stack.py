"""A model's projections over all its layers at a batch's or a prompt's rows, the weights
streamed from memory as in an engine (the ``linear_stack`` suite).

A call is one step's projections (qkv, o, gate|up, down) over every layer of Llama-3.2-1B's
shapes (16 layers, 2048 -> 3072 / 2048 / 16384 / 2048, each layer's weights distinct: 1.95 GB
of bf16, more than the caches), at 32-128 rows (a batch's decode step) and 256-1024 (a
prompt). Ours: bf16 rows (``bf16_gemm``, AMX tiles) and int8 (the checkpoint's weights
quantized to Q8_0, what ``weight_format=int8`` makes of a Hugging Face checkpoint: AMX-INT8
tiles on the per-row int8 copy); the reference: torch's bf16 ``F.linear`` (oneDNN) on the same
bf16 values with x already in bf16, layer by layer as well. The note gives our bf16 call in
TFLOP/s and in GB/s of weight. The gate|up weight is one linear here (the engine fuses
SiLU-and-mul into its store), so both sides compute the same products.

``bench.ops --only linear_rows`` covers fewer rows (1-16, the tiles against the
avx512_bf16 level); ``linear`` and ``linear_8b`` single weights that stay in cache. Only on
CPUs with bf16 and int8 units (ISA level avx512_bf16 or amx); about 5 minutes, ``--quick``
64 and 509 rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.ops.common import Row, compare
from xllm import _C
from xllm.ops.blocks import BlockLinearWeight

LAYERS, HIDDEN, QKV, INTER = 16, 2048, 3072, 8192  # Llama-3.2-1B
ROWS = (32, 64, 128, 256, 509, 1024)


def _stack() -> list[list[tuple[torch.Tensor, BlockLinearWeight, BlockLinearWeight]]]:
    """Per layer, per projection: (bf16 weight for torch, our bf16 rows, our Q8_0 int8)."""
    gen = torch.Generator().manual_seed(0)
    shapes = ((QKV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTER, HIDDEN), (HIDDEN, INTER))
    stack = []
    for _ in range(LAYERS):
        layer = []
        for n, k in shapes:
            w16 = (torch.randn(n, k, generator=gen) * 0.02).bfloat16()
            w = w16.float()
            layer.append((w16, BlockLinearWeight.from_rows(w, "bf16_gemm"),
                          BlockLinearWeight.from_rows(w, "q8_0")))
            del w
        stack.append(layer)
    return stack


def run(quick: bool = False) -> list[Row]:
    if _C.detected_isa() not in ("avx512_bf16", "amx"):
        return []
    stack = _stack()
    flops_per_row = 2 * sum(w16.numel() for layer in stack for w16, _, _ in layer)
    bf16_bytes = sum(ours.nbytes() for layer in stack for _, ours, _ in layer)
    out: list[Row] = []
    for m in (64, 509) if quick else ROWS:
        gen = torch.Generator().manual_seed(m)
        xs = [torch.randn(m, w16.shape[1], generator=gen) for w16, _, _ in stack[0]]
        xs16 = [x.bfloat16() for x in xs]
        outs = [torch.empty(m, w16.shape[0]) for w16, _, _ in stack[0]]

        def ours(which: int, xs: list[torch.Tensor] = xs, outs: list[torch.Tensor] = outs):  # noqa: ANN202
            def step() -> None:
                for layer in stack:
                    for proj, x, o in zip(layer, xs, outs, strict=True):
                        proj[which].native.linear(x, o)
            return step

        def onednn(xs16: list[torch.Tensor] = xs16) -> None:
            for layer in stack:
                for (w16, _, _), x16 in zip(layer, xs16, strict=True):
                    F.linear(x16, w16)

        shape = f"Llama-3.2-1B x {LAYERS} layers, {m} rows ({_C.detected_isa()})"
        timer = {"min_time": 0.3, "repeat": 3, "warmup": 1}
        bf16 = compare("bf16 projections, streamed", shape, ours(1), onednn,
                       "torch bf16 F.linear (oneDNN), the same weights", **timer)
        bf16.note = (f"{flops_per_row * m / bf16.native_s / 1e12:.2f} TFLOP/s, "
                     f"{bf16_bytes / bf16.native_s / 1e9:.1f} GB/s of weight")
        int8 = compare("int8 (Q8_0) projections, streamed", shape, ours(2), onednn,
                       "torch bf16 F.linear (oneDNN), the same weights", **timer)
        int8.note = f"{flops_per_row * m / int8.native_s / 1e12:.2f} TFLOP/s"
        out += [bf16, int8]
    return out
