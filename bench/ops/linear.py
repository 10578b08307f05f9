"""Reduced-precision linears against torch, on the demo model's projection shapes.

- bf16 (``BlockWeight`` format ``bf16_gemm``: AMX tiles from 3 rows, AVX512-BF16 below)
  against torch's bf16 ``F.linear`` (oneDNN, AMX where present) on the same bf16 values;
- int8 (Q4_1 blocks, ``arithmetic='int8'``: VNNI below 8 rows, AMX-INT8 tiles on the
  per-row int8 copy from 8, x in 16 bits per row)
  against the same torch bf16 ``F.linear`` (what a bf16 engine runs for that layer); its
  ``extra`` holds the fp32 block kernel's time (``weight_format=blocks``) too.

Rows: 1 (a decode step), 16 and 64 (batched decode steps) and 509 (a prompt). Only on
CPUs with bf16 and int8 units (ISA level avx512_bf16 or amx); elsewhere the suite reports
nothing: those CPUs compute in fp32 by default and these paths exist there only as plain
references.

The suite ``linear_8b`` (``bench/ops/linear_8b.py``) runs the same comparison on
Llama-3-8B's projection shapes, where the weights no longer fit the caches and K reaches
14336 inputs; ``linear_rows`` (``bench/ops/linear_rows.py``) times a decode step's linears
at few rows on the amx level against the avx512_bf16 level, where the tiles take over.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from bench.ops.common import Row, compare, per_call_seconds
from xllm import _C
from xllm.ops.blocks import BlockLinearWeight, PackedBlocks

SHAPES = {"qkv": (960, 576), "gate_up": (3072, 576), "down": (576, 1536)}  # SmolLM2-135M


def _q4_1(rows: int, cols: int, rng: np.random.Generator) -> PackedBlocks:
    nb = cols // 32
    return PackedBlocks("q4_1", rng.integers(0, 256, (rows, cols // 2), dtype=np.uint8),
                        (rng.random((rows, nb)) * 0.02).astype(np.float32),
                        (-rng.random((rows, nb)) * 0.1).astype(np.float32))


def _rows(name: str, n: int, k: int, m: int, rng: np.random.Generator,
          fp32_blocks: bool = True) -> list[Row]:
    """bf16 and int8 rows of one shape; `fp32_blocks` also times the exact fp32 block kernel
    into the int8 row's ``extra`` (seconds a call on the large shapes, so they skip it)."""
    blocks = _q4_1(n, k, rng)
    exact = BlockLinearWeight(blocks)
    int8 = BlockLinearWeight(blocks, arithmetic="int8")
    w16 = exact.dequantize().bfloat16()
    bf16 = BlockLinearWeight.from_rows(w16.float(), "bf16_gemm")
    x = torch.randn(m, k)
    out = torch.empty(m, n)
    x16 = x.bfloat16()
    shape = f"{name} [{n}, {k}] x {m} rows ({_C.detected_isa()})"

    def torch_bf16() -> None:
        F.linear(x16, w16)

    bf16_row = compare("bf16_linear", shape, lambda: bf16.native.linear(x, out), torch_bf16,
                       "torch bf16 F.linear (oneDNN) on the same values")
    int8_row = compare("int8_linear (q4_1)", shape, lambda: int8.native.linear(x, out),
                       torch_bf16, "torch bf16 F.linear (oneDNN) on the decoded weight")
    if fp32_blocks:
        fp32_s = per_call_seconds(lambda: exact.native.linear(x, out))
        int8_row.extra["fp32_blocks_s"] = fp32_s
        int8_row.note = f"fp32 blocks (exact): {fp32_s * 1e6:.1f} us"
    return [bf16_row, int8_row]


def run(quick: bool = False) -> list[Row]:
    if _C.detected_isa() not in ("avx512_bf16", "amx"):
        return []
    rng = np.random.default_rng(0)
    rows: list[Row] = []
    for m in (1, 16) if quick else (1, 16, 64, 509):
        for name, (n, k) in SHAPES.items():
            rows += _rows(name, n, k, m, rng)
    return rows
