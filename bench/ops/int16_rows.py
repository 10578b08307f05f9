"""The avx2 level's default on GGUF blocks, ``int16``, against the exact ``blocks`` on the
same weights, by rows of x (the ``int16_rows`` suite). Up to ``_C.X16_AVX2_MAX_ROWS`` rows
int16 is x in 16 bits per block times the blocks, two VPMADDUBSW passes (docs/ops.md); from
there it is the exact fp32 tiles on its packed weight, so the ratio should be about 1: a
check of the rule. On an AVX2 CPU other than the one that set the threshold (an AMX Xeon
forced to the level), a ratio well below 1 at ``X16_AVX2_MAX_ROWS`` rows says to lower it.

A call is one step's projections (qkv, o, gate|up, down) over every layer of a model's
shapes, each layer's weights distinct, so that they stream from memory as in an engine: 30
layers of the demo's (SmolLM2-135M) and 16 of Llama-3.2-1B's, Q4_1 weights. Both formats
run at the avx2 level, timed in alternating rounds. CPUs without AVX2 report nothing.
"""

from __future__ import annotations

import gguf
import torch
from gguf.quants import quantize

from bench.ops.common import Row, compare
from bench.ops.linear_rows import MODELS
from xllm import _C
from xllm.ops.blocks import BlockLinearWeight, pack_gguf_blocks

ROWS = (1, 2, 4, 8, 9, 16, 64)


def _layers(model: str) -> dict[str, list[list[BlockLinearWeight]]]:
    layers, h, qkv, inter = MODELS[model]
    gen = torch.Generator().manual_seed(0)
    shapes = ((qkv, h), (h, h), (2 * inter, h), (h, inter))
    stacks: dict[str, list[list[BlockLinearWeight]]] = {"int16": [], "fp32": []}
    for _ in range(layers):
        blocks = [pack_gguf_blocks(quantize((torch.randn(n, k, generator=gen) * 0.02).numpy(),
                                            gguf.GGMLQuantizationType.Q4_1), "q4_1", (n, k))
                  for n, k in shapes]
        for arithmetic, stack in stacks.items():
            stack.append([BlockLinearWeight(b, arithmetic=arithmetic) for b in blocks])
    return stacks


def _rows(model: str, rows: tuple[int, ...]) -> list[Row]:
    stacks = _layers(model)
    out = []
    for m in rows:
        xs = [torch.randn(m, w.in_features) for w in stacks["fp32"][0]]
        outs = [torch.empty(m, w.out_features) for w in stacks["fp32"][0]]

        def step(arithmetic: str, xs: list[torch.Tensor] = xs,  # noqa: ANN202
                 outs: list[torch.Tensor] = outs):
            def run() -> None:
                for layer in stacks[arithmetic]:
                    for w, x, o in zip(layer, xs, outs, strict=True):
                        w.native.linear(x, o)
            return run

        form = "16-bit x" if m <= _C.X16_AVX2_MAX_ROWS else "fp32 tiles"
        out.append(compare("int16 at avx2", f"{model} q4_1 x {m} rows", step("int16"),
                           step("fp32"), "exact fp32 blocks at the avx2 level",
                           note=f"int16 runs its {form} here", min_time=0.2, repeat=3))
    return out


def run(quick: bool = False) -> list[Row]:
    if "avx2" not in _C.cpu_isas():
        return []
    level = _C.cpu_isa()
    _C.set_cpu_isa("avx2")
    try:
        rows: list[Row] = []
        for model in ("SmolLM2-135M",) if quick else tuple(MODELS):
            rows += _rows(model, (1, 16) if quick else ROWS)
        return rows
    finally:
        _C.set_cpu_isa(level)
