"""int8-activation linears on GGUF blocks (BlockWeight arithmetic='int8', csrc/quant/
int8_dot.h) at every ISA level this CPU runs, against a float64 reference of the same
arithmetic: x quantized per block of 32 to int8 (round half to even), exact integer block
sums, scaled by the weight's and x's block scales. On the amx level, from
_C.AMX_INT8_MIN_ROWS rows (by the blocks' format), the AMX-INT8 tiles run on the weight
requantized per output row (q = round(w / s), s = max|w row| / 127) and x in 16 bits per row
(quantized_x16); those are checked against that arithmetic."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import quantize
from test_bf16_gemm import assert_fused_glu_is_unfused

from xllm import _C
from xllm.ops.blocks import BlockLinearWeight, dequantize_ref, pack_gguf_blocks

Q = gguf.GGMLQuantizationType
FORMATS = [("q4_1", Q.Q4_1), ("q8_0", Q.Q8_0)]
AMX_ROWS = _C.AMX_INT8_MIN_ROWS  # format -> rows from which the amx level takes its tiles


def _blocks(fmt: str, qtype: Q, rows: int, cols: int, seed: int):  # noqa: ANN202
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 3)).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block (d = 0)
    return pack_gguf_blocks(quantize(w, qtype), fmt, (rows, cols))


def quantized_x(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels see it: per block of 32, d = max|x| / 127, round(x / d) * d."""
    m, k = x.shape
    xb = x.view(m, k // 32, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    return (torch.round(xb * inv) * d).view(m, k)  # torch.round: half to even


def quantized_x16(x: torch.Tensor) -> torch.Tensor:
    """x as the amx level's tiles see it: per row, s = max|x| / 32767, round(x * (1 / s)) * s
    (the reciprocal rounded to fp32 first, as the kernel computes it)."""
    amax = x.abs().amax(1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(32767.0) / amax, torch.zeros_like(amax))
    return torch.round(x * inv).double() * (amax / 32767.0).double()


def amx_weight(w: torch.Tensor) -> torch.Tensor:
    """w as the amx level's tiles hold it: int8 per output row, s = max|w row| / 127."""
    s = w.abs().amax(1, keepdim=True) / 127.0
    return torch.round(w * torch.where(s > 0, 1.0 / s, torch.zeros_like(s))) * s


@pytest.mark.parametrize("fmt, qtype", FORMATS)
@pytest.mark.parametrize("rows, cols", [(16, 32), (33, 96), (96, 64), (160, 576), (50, 1536)])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8, 9, 16, 31, 32, 40, 127, 130, 1101])
def test_int8_linear_matches_reference(isa: str, fmt: str, qtype: Q, rows: int, cols: int,
                                       m: int) -> None:
    p = _blocks(fmt, qtype, rows, cols, seed=rows + cols + m)
    w32 = torch.from_numpy(dequantize_ref(p))
    w = w32.double()
    bias = torch.randn(rows) if m % 2 else None
    weight = BlockLinearWeight(p, bias, arithmetic="int8")
    x = torch.randn(m, cols, generator=torch.Generator().manual_seed(m + cols)) * 3
    out = weight(x).double()
    b = 0 if bias is None else bias.double()
    tol = 1e-6 * cols * float(x.abs().max() * w.abs().max()) + 1e-5
    if isa == "amx" and m >= AMX_ROWS[fmt]:
        ref = quantized_x16(x) @ amx_weight(w32).double().T + b  # rounded in fp32
    else:
        ref = quantized_x(x).double() @ w.T + b
    assert (out - ref).abs().max().item() < tol


# The amx level sums K over 4096 inputs in passes (int8_amx.cpp) from 17 rows, in one pass
# below: 4160 inputs (65 tiles of 64), 600 outputs (19 pairs of groups, the last short), one
# row block (9, with a bias), rows split by groups (40) and by threads' rows (301, biased).
@pytest.mark.parametrize("m", [9, 40, 301])
def test_long_inputs_in_passes(isa: str, m: int) -> None:
    if isa != "amx":
        pytest.skip("the passes are the amx level's; the others are covered above")
    p = _blocks("q8_0", Q.Q8_0, 600, 4160, seed=m)
    w32 = torch.from_numpy(dequantize_ref(p))
    bias = torch.randn(600) if m % 2 else None
    weight = BlockLinearWeight(p, bias, arithmetic="int8")
    x = torch.randn(m, 4160, generator=torch.Generator().manual_seed(m)) * 3
    ref = quantized_x16(x) @ amx_weight(w32).double().T + (0 if bias is None else bias.double())
    tol = 1e-6 * 4160 * float(x.abs().max() * w32.abs().max()) + 1e-5
    assert (weight(x).double() - ref).abs().max().item() < tol


def test_amx_rows_do_not_depend_on_the_batch(isa: str) -> None:
    """x is quantized per row and the tile sums are exact integers, so on the amx level a
    row's output is bit-identical in a small batch (output groups split between threads)
    and in a prompt-sized one (rows split), with K in one pass or in several."""
    if isa != "amx":
        pytest.skip("the amx level's tiles")
    for cols in (576, 4160):
        weight = BlockLinearWeight(_blocks("q4_1", Q.Q4_1, 600, cols, seed=cols),
                                   arithmetic="int8")
        x = torch.randn(300, cols, generator=torch.Generator().manual_seed(cols))
        assert torch.equal(weight(x)[:40], weight(x[:40]))


@pytest.mark.parametrize("arithmetic, fmt, qtype, m", [
    ("int8", "q4_1", Q.Q4_1, AMX_ROWS["q4_1"] - 1),
    ("int16", "q4_1", Q.Q4_1, _C.X16_AVX2_MAX_ROWS),
    ("int16", "q8_0", Q.Q8_0, _C.X16_AVX2_MAX_ROWS)])
def test_every_level_computes_the_same_block_sums(arithmetic: str, fmt: str, qtype: Q,
                                                  m: int) -> None:
    """The integer part is exact and x's parts the same bits on every level, so levels
    differ only in the order of fp32 additions (int8: below AMX_ROWS rows, where the amx
    level takes the block sums too; int16: up to X16_AVX2_MAX_ROWS rows, where the avx2
    level does: from there it runs the exact fp32 tiles on these shapes)."""
    weight = BlockLinearWeight(_blocks(fmt, qtype, 64, 576, seed=3), arithmetic=arithmetic)
    x = torch.randn(m, 576, generator=torch.Generator().manual_seed(11))
    outs = []
    for level in _C.cpu_isas():
        _C.set_cpu_isa(level)
        outs.append(weight(x))
    _C.set_cpu_isa(_C.detected_isa())
    # 18 block terms summed in fp32 in different orders: a few ulps of the largest output.
    scale = float(outs[0].abs().max())
    for out in outs[1:]:
        assert (out - outs[0]).abs().max().item() <= 2e-6 * scale


@pytest.mark.parametrize("fmt, qtype", FORMATS)
def test_repacked_weight_decodes_exactly(fmt: str, qtype: Q) -> None:
    p = _blocks(fmt, qtype, 37, 96, seed=5)
    weight = BlockLinearWeight(p, arithmetic="int8")
    assert weight.qs is None and weight.arithmetic == "int8"  # only the repacked copy is kept
    assert np.array_equal(weight.dequantize().numpy(), dequantize_ref(p))
    per_block = 256 if fmt == "q4_1" else 512
    # 3 groups of 16 x 3 blocks; on an AMX CPU also the tile form: 2 tiles of 1 KB (64
    # inputs, the last half zeros) and 16 row scales a group.
    amx = 3 * (2 * 1024 + 64) if _C.detected_isa() == "amx" else 0
    assert weight.nbytes() == 3 * 3 * (per_block + 128) + amx


def test_int8_bad_arguments() -> None:
    with pytest.raises(ValueError, match="arithmetic 'int8' needs format 'q4_1' or 'q8_0'"):
        _C.BlockWeight("f32", torch.zeros(16, 32), arithmetic="int8")
    with pytest.raises(ValueError, match="arithmetic 'int16' needs format 'q4_1' or 'q8_0'"):
        _C.BlockWeight("f32", torch.zeros(16, 32), arithmetic="int16")
    with pytest.raises(ValueError, match="'arithmetic' must be 'fp32', 'int8' or 'int16'"):
        _C.BlockWeight("f32", torch.zeros(16, 32), arithmetic="int4")


@pytest.mark.parametrize("m", [1, 3, 8, 40])
@pytest.mark.parametrize("arithmetic", ["int8", "int16"])
def test_int8_non_finite_input_gives_nan_rows(isa: str, m: int, arithmetic: str) -> None:
    """A NaN or infinity in a row of x makes that row's outputs NaN on every integer path
    (VNNI, AVX2, scalar, AMX tiles), and where int16 runs the exact fp32 tiles, what fp32
    gives (NaN, or an infinity's +-inf); the other rows are unaffected."""
    p = _blocks("q4_1", Q.Q4_1, 48, 96, seed=7)
    weight = BlockLinearWeight(p, arithmetic=arithmetic)
    x = torch.randn(m, 96, generator=torch.Generator().manual_seed(m))
    clean = weight(x.clone())
    x[0, 50] = float("nan")
    if m > 1:
        x[1, 3] = float("inf")
    out = weight(x)
    bad = 2 if m > 1 else 1
    if arithmetic == "int16" and runs_fp32_tiles(isa, m):
        assert torch.isnan(out[0]).all() and not torch.isfinite(out[:bad]).any()
    else:
        assert torch.isnan(out[:bad]).all()
    if m > bad:  # the AMX tiles quantize per row, VNNI per block: other rows keep their bits
        assert torch.equal(out[bad:], clean[bad:])


# The gate|up form (SiLU-and-mul applied as the AMX tiles store, each gate group paired with
# its up group) against int8 linear then silu_and_mul: the same bits at every level and row
# count, fused or not (below AMX_ROWS rows, off AMX or with I not a multiple of 16 it is the linear
# then silu_and_mul). 4160 inputs go in passes; 301 and 601 rows split the rows between
# threads, 8 and 40 the gate groups.
@pytest.mark.parametrize("m", [1, 8, 40, 301, 601])
@pytest.mark.parametrize("fmt, qtype, inter, k", [("q4_1", Q.Q4_1, 96, 576),
                                                   ("q8_0", Q.Q8_0, 208, 4160),
                                                   ("q8_0", Q.Q8_0, 40, 96)])
def test_gate_up_with_silu_and_mul(isa: str, m: int, fmt: str, qtype: Q, inter: int,
                                   k: int) -> None:
    weight = BlockLinearWeight(_blocks(fmt, qtype, 2 * inter, k, m + k), arithmetic="int8").native
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 2
    assert_fused_glu_is_unfused(weight, x)


# ---- int16: x in 16 bits per block of 32 (QuantizedRows in int8_dot.h) ---------------------


def quantized_x16_blocks(x: torch.Tensor) -> torch.Tensor:
    """x as the int16 arithmetic sees it: per block of 32, d = max|x| / 32385 and
    v = round(x * (1 / d)), all in fp32 as the kernels compute it; returns v * d in float64."""
    m, k = x.shape
    xb = x.view(m, k // 32, 32)
    d = xb.abs().amax(-1, keepdim=True) / torch.tensor(32385.0)
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    return (torch.round(xb * inv).double() * d.double()).view(m, k)


def runs_fp32_tiles(isa: str, m: int) -> bool:
    """Whether int16 runs the exact fp32 tiles here (x16_runs_fp32_tiles, int8_dot.h)."""
    return isa == "avx2" and m > _C.X16_AVX2_MAX_ROWS


@pytest.mark.parametrize("fmt, qtype", FORMATS)
@pytest.mark.parametrize("rows, cols", [(16, 32), (33, 96), (160, 576), (50, 1536), (20, 4096)])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 16, 17, 40, 130])
def test_int16_linear_matches_reference(isa: str, fmt: str, qtype: Q, rows: int, cols: int,
                                        m: int) -> None:
    """Every level and row count (the amx level keeps the blocks too: no tiles) against the
    arithmetic's reference, and within 1e-4 of the exact fp32 product (int8 x: ~1e-2). Where
    the avx2 level runs the exact fp32 tiles instead, the blocks' own fp32 product: bit for
    bit up to 1024 inputs, and to fp32 rounding above (the packed weight goes in chunks of
    K from 1024 inputs, the blocks' rows from 2048: sums in another order)."""
    p = _blocks(fmt, qtype, rows, cols, seed=rows + cols + m)
    w = torch.from_numpy(dequantize_ref(p)).double()
    bias = torch.randn(rows) if m % 2 else None
    weight = BlockLinearWeight(p, bias, arithmetic="int16")
    assert weight.arithmetic == "int16"
    x = torch.randn(m, cols, generator=torch.Generator().manual_seed(m + cols)) * 3
    x[0, :32] *= 100  # a block far larger than the others: scales are per block
    out = weight(x)
    if runs_fp32_tiles(isa, m):
        exact = BlockLinearWeight(p, bias)(x)
        if cols <= 1024:
            assert torch.equal(out, exact)
        torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-5 * float(exact.abs().max()))
        return
    out = out.double()
    b = 0 if bias is None else bias.double()
    tol = 1e-6 * cols * float(x.abs().max() * w.abs().max()) + 1e-5
    assert (out - (quantized_x16_blocks(x) @ w.T + b)).abs().max().item() < tol
    exact = x.double() @ w.T + b
    assert (out - exact).abs().max().item() < 1e-4 * exact.abs().max().item()


def test_int16_keeps_the_blocks_only() -> None:
    """No AMX tile copy (its per-row requantization is what int16 avoids): the repacked
    blocks alone, decoding exactly."""
    p = _blocks("q8_0", Q.Q8_0, 37, 96, seed=5)
    weight = BlockLinearWeight(p, arithmetic="int16")
    assert weight.qs is None
    assert np.array_equal(weight.dequantize().numpy(), dequantize_ref(p))
    assert weight.nbytes() == 3 * 3 * (512 + 128)


@pytest.mark.parametrize("fmt, qtype", FORMATS)
def test_int16_rows_do_not_depend_on_the_batch(isa: str, fmt: str, qtype: Q) -> None:
    """Each row's 16-bit parts and integer sums are its own, so a row's output is
    bit-identical in any batch that runs the same form: every batch on the levels with VNNI
    and the scalar one; at the avx2 level the batches of up to X16_AVX2_MAX_ROWS rows, and
    apart from those the larger ones (the exact fp32 tiles)."""
    weight = BlockLinearWeight(_blocks(fmt, qtype, 200, 576, seed=9), arithmetic="int16")
    x = torch.randn(40, 576, generator=torch.Generator().manual_seed(9))
    small = weight(x[:8])
    whole = weight(x)
    for m in (1, 2, 3, 4, 5, 8, 9, 16, 17, 33):
        ref = small if m <= 8 and runs_fp32_tiles(isa, 40) else whole
        assert torch.equal(ref[:m], weight(x[:m])), m
