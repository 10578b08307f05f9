"""The reduced-precision linears of ``bench/ops/linear.py`` on Llama-3-8B's projection shapes.

qkv (6144 x 4096), gate|up (28672 x 4096) and down (4096 x 14336) at 1 row (a decode step:
the weight streamed from memory), 509 and 2048 rows (prompts), bf16 and int8 (Q4_1 blocks)
against torch's bf16 ``F.linear`` (oneDNN) on the same values. The exact fp32 block kernel
is not timed here (seconds a call at 2048 rows). Takes a few minutes; ``--quick`` runs the
down projection at 509 rows only. Only on CPUs with bf16 and int8 units (ISA level
avx512_bf16 or amx).
"""

from __future__ import annotations

import numpy as np

from bench.ops.common import Row
from bench.ops.linear import _rows
from xllm import _C

SHAPES = {"llama3-8b qkv": (6144, 4096), "llama3-8b gate_up": (28672, 4096),
          "llama3-8b down": (4096, 14336)}


def run(quick: bool = False) -> list[Row]:
    if _C.detected_isa() not in ("avx512_bf16", "amx"):
        return []
    rng = np.random.default_rng(0)
    rows: list[Row] = []
    if quick:
        return _rows("llama3-8b down", *SHAPES["llama3-8b down"], 509, rng, fp32_blocks=False)
    for m in (1, 509, 2048):
        for name, (n, k) in SHAPES.items():
            rows += _rows(name, n, k, m, rng, fp32_blocks=False)
    return rows
