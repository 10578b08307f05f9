"""Paged decode attention at this CPU's best ISA level against the same op at the AVX2
level, timed in alternating rounds (the ``attention_isa`` suite; no rows on a CPU
without AVX-512)."""

from __future__ import annotations

import torch

from bench.ops.attention import isa_row
from bench.ops.common import Row
from xllm import _C

# ISA-level rows (model, batch, context, cache dtype, layers[, block size]): in-cache shapes
# (compute-bound) and one step of a 30-layer model's attention at a long context (the KV
# streams from memory).
ISA_GRID = [
    ("SmolLM2-135M", 8, 128, torch.bfloat16, 1),
    ("SmolLM2-135M", 8, 1024, torch.bfloat16, 1),
    ("SmolLM2-135M", 8, 1024, torch.float32, 1),
    ("Llama-3-8B", 4, 1024, torch.bfloat16, 1),
    ("SmolLM2-135M", 8, 1024, torch.bfloat16, 30),
    ("SmolLM2-135M", 8, 1024, torch.int8, 1),
    ("SmolLM2-135M", 8, 1024, torch.int8, 30),
    ("SmolLM2-135M", 8, 1024, torch.int8, 30, 64),  # an int8 cache's default blocks
]


def run(quick: bool) -> list[Row]:
    if _C.detected_isa() not in ("avx512", "avx512_bf16", "amx"):
        return []
    grid = ISA_GRID[:1] if quick else ISA_GRID
    return [isa_row(*row) for row in grid]
