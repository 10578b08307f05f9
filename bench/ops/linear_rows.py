"""Where the amx level's linears take their tiles: a decode step's linears at few rows, on
the amx level against the same weights forced to the avx512_bf16 level (VDPBF16PS for bf16 rows,
VNNI on the blocks for int8), timed in alternating rounds (the ``linear_rows`` suite).

A call is one decode step's projections (qkv, o, gate|up, down) over every layer of a
model's shapes, each layer's weights distinct, so that they stream from memory as in an
engine: 30 layers of the demo's (SmolLM2-135M) and 16 of Llama-3.2-1B's. Formats: bf16 rows
(``bf16_gemm``), Q8_0 and Q4_1 blocks with int8 arithmetic. At a row count below the
format's switch (``_C.AMX_MIN_ROWS``, ``_C.AMX_INT8_MIN_ROWS``) both levels run the same
kernels, and the ratio is about 1: a check of the timer. AMX CPUs only; elsewhere the suite
reports nothing.
"""

from __future__ import annotations

import gguf
import torch
from gguf.quants import quantize

from bench.ops.common import Row, compare
from xllm import _C
from xllm.ops.blocks import BlockLinearWeight, pack_gguf_blocks

# model -> (layers, hidden, q + 2 kv outputs, intermediate)
MODELS = {"SmolLM2-135M": (30, 576, 960, 1536), "Llama-3.2-1B": (16, 2048, 3072, 8192)}
ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 16)
FORMATS = ("bf16", "q8_0", "q4_1")


def _weight(w: torch.Tensor, fmt: str) -> BlockLinearWeight:
    if fmt == "bf16":
        return BlockLinearWeight.from_rows(w, "bf16_gemm")
    if fmt == "q8_0":
        return BlockLinearWeight.from_rows(w, "q8_0")
    q = quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_1)
    return BlockLinearWeight(pack_gguf_blocks(q, "q4_1", tuple(w.shape)), arithmetic="int8")


def _layers(model: str, fmt: str) -> list[list[BlockLinearWeight]]:
    layers, h, qkv, inter = MODELS[model]
    gen = torch.Generator().manual_seed(0)
    shapes = ((qkv, h), (h, h), (2 * inter, h), (h, inter))
    return [[_weight(torch.randn(n, k, generator=gen) * 0.02, fmt) for n, k in shapes]
            for _ in range(layers)]


def _rows(model: str, fmt: str, rows: tuple[int, ...]) -> list[Row]:
    stack = _layers(model, fmt)
    nbytes = sum(w.nbytes() for layer in stack for w in layer)  # bf16: the bytes a step reads
    out = []
    for m in rows:
        xs = [torch.randn(m, w.in_features) for w in stack[0]]
        outs = [torch.empty(m, w.out_features) for w in stack[0]]

        def at(isa: str, xs: list[torch.Tensor] = xs, outs: list[torch.Tensor] = outs):  # noqa: ANN202
            def step() -> None:
                _C.set_cpu_isa(isa)
                for layer in stack:
                    for w, x, o in zip(layer, xs, outs, strict=True):
                        w.native.linear(x, o)
            return step

        try:
            row = compare("decode-step linears", f"{model} {fmt} x {m} rows", at("amx"),
                          at("avx512_bf16"), "the same at the avx512_bf16 level (VDPBF16PS / VNNI)",
                          min_time=0.2, repeat=3)
        finally:
            _C.set_cpu_isa(_C.detected_isa())
        if fmt == "bf16":  # (the int8 weights keep two forms: the blocks and the tiles' copy)
            row.note = f"{nbytes / row.native_s / 1e9:.1f} GB/s of weights at amx"
        out.append(row)
    return out


def run(quick: bool = False) -> list[Row]:
    if _C.detected_isa() != "amx":
        return []
    rows: list[Row] = []
    for model in ("SmolLM2-135M",) if quick else tuple(MODELS):
        for fmt in FORMATS:
            rows += _rows(model, fmt, (1, 4) if quick else ROWS)
    return rows
