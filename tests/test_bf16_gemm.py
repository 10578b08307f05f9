"""bf16 arithmetic linears (BlockWeight format 'bf16_gemm', csrc/quant/bf16_gemm.h) against
the torch reference bf16(x) @ bf16(W)^T in float64, at every ISA level this CPU runs: AMX
tiles, AVX512-BF16 dot products, and the fp32 kernels of the avx2 and scalar levels."""

from __future__ import annotations

import pytest
import torch

from xllm import _C
from xllm.ops.blocks import BlockLinearWeight


def _reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.bfloat16().double() @ w.bfloat16().double().T
    return out if bias is None else out + bias.double()


# Rows on both sides of the AMX threshold and of the 16-row tiles and 4-row passes, and
# (700 rows of 1536 inputs) over several of the AMX kernel's 320-row bands; output features
# that fill no group (33), one group, odd and even numbers of groups.
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 32, 33, 70, 700])
@pytest.mark.parametrize("n,k", [(33, 64), (16, 32), (48, 96), (160, 576), (576, 1536)])
def test_linear_matches_reference(isa: str, m: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(n * 1000 + k + m)
    w = torch.randn(n, k, generator=g)
    bias = torch.randn(n, generator=g) if m % 2 else None
    weight = BlockLinearWeight.from_rows(w, "bf16_gemm", bias)
    x = torch.randn(m, k, generator=g)
    out = weight(x)
    ref = _reference(x, w, bias)
    # Every product is exact in fp32; only the order of the fp32 sums differs.
    tol = 4e-7 * k * (x.abs().max() * w.abs().max()).item() + 1e-5
    assert (out.double() - ref).abs().max().item() < tol


# The AMX driver's blocking: 600 outputs (19 pairs of groups, the last one group short of 32
# outputs) in blocks of pairs; 40 and 100 rows split the groups between threads and sum
# 1600 inputs in one pass, 4160 in 3 (passes of up to 2048 inputs up to 128 rows); 300 and
# 601 rows split the rows (in bands of 256) and sum 1600 inputs in 4 passes, 4160 in 9; with
# and without a bias.
@pytest.mark.parametrize("m", [40, 100, 300, 601])
@pytest.mark.parametrize("k", [1600, 4160])
def test_long_inputs_in_passes(isa: str, m: int, k: int) -> None:
    g = torch.Generator().manual_seed(m + k)
    w = torch.randn(600, k, generator=g)
    bias = torch.randn(600, generator=g) if m % 2 else None
    weight = BlockLinearWeight.from_rows(w, "bf16_gemm", bias)
    x = torch.randn(m, k, generator=g)
    ref = _reference(x, w, bias)
    tol = 4e-7 * k * (x.abs().max() * w.abs().max()).item() + 1e-5
    assert (weight(x).double() - ref).abs().max().item() < tol


def test_amx_rows_do_not_depend_on_the_batch(isa: str) -> None:
    """From _C.AMX_MIN_ROWS rows each output row is the same tile products in the same order
    whichever way the rows are split between threads or K into passes: a row's result is
    bit-identical in a small batch (output groups split between threads; up to 128 rows the
    1600 inputs in one pass) and inside a prompt-sized one (rows split between threads, K in
    passes of 512)."""
    if isa != "amx":
        pytest.skip("the amx level's tiles; the other levels' order depends on the rows")
    g = torch.Generator().manual_seed(5)
    weight = BlockLinearWeight.from_rows(torch.randn(600, 1600, generator=g), "bf16_gemm")
    x = torch.randn(300, 1600, generator=g)
    whole = weight(x)
    for rows in (_C.AMX_MIN_ROWS, 20, 40):
        assert torch.equal(whole[:rows], weight(x[:rows]))


def test_strided_rows_and_large_output(isa: str) -> None:
    g = torch.Generator().manual_seed(7)
    w = torch.randn(4100, 64, generator=g)
    weight = BlockLinearWeight.from_rows(w, "bf16_gemm")
    big = torch.randn(20, 200, generator=g)
    x = big[:, 8:72]  # row stride 200
    out_big = torch.full((20, 5000), 7.0)
    weight.native.linear(x, out_big[:, 100:4200])
    ref = _reference(x, w, None)
    assert (out_big[:, 100:4200].double() - ref).abs().max().item() < 1e-3
    assert (out_big[:, :100] == 7).all() and (out_big[:, 4200:] == 7).all()  # nothing outside


def test_dequantize_round_trips_and_storage() -> None:
    w = torch.randn(50, 96)
    weight = BlockLinearWeight.from_rows(w, "bf16_gemm")
    assert torch.equal(weight.dequantize(), w.bfloat16().float())
    assert weight.qs is None  # only the packed copy is kept
    assert weight.nbytes() == 64 * 96 * 2  # 50 rows padded to 4 groups of 16


def test_special_values_propagate(isa: str) -> None:
    w = torch.ones(16, 32)
    weight = BlockLinearWeight.from_rows(w, "bf16_gemm")
    x = torch.zeros(16, 32)
    x[3, 5] = float("inf")
    x[4, 6] = float("nan")
    out = weight(x)
    assert torch.isinf(out[3]).all() and torch.isnan(out[4]).all()
    assert torch.equal(out[0], torch.zeros(16))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="must be bfloat16"):
        _C.BlockWeight("bf16_gemm", torch.zeros(16, 32))
    with pytest.raises(ValueError, match="multiple of 32"):
        _C.BlockWeight("bf16_gemm", torch.zeros(16, 48, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="must be None"):
        _C.BlockWeight("bf16_gemm", torch.zeros(16, 32, dtype=torch.bfloat16), torch.zeros(16, 1))
    weight = BlockLinearWeight.from_rows(torch.zeros(16, 32), "bf16_gemm")
    with pytest.raises(ValueError, match="in_features"):
        weight.native.linear(torch.zeros(2, 64), torch.zeros(2, 16))


def assert_fused_glu_is_unfused(weight: _C.BlockWeight, x: torch.Tensor) -> torch.Tensor:
    """weight.linear_silu_and_mul(x) is bit for bit weight.linear(x) then silu_and_mul (also
    tests/test_int8_dot.py's check); returns that [m, I] result."""
    m, inter = x.shape[0], weight.out_features // 2
    gate_up = torch.empty(m, 2 * inter)
    weight.linear(x, gate_up)
    expected = torch.empty(m, inter)
    _C.silu_and_mul(expected, gate_up)
    out = torch.full((m, inter), float("nan"))
    weight.linear_silu_and_mul(x, out)
    assert torch.equal(out, expected)
    return expected


# The gate|up form: SiLU-and-mul applied as the AMX tiles store (each gate group paired
# with its up group) against the linear and then silu_and_mul: the same bits at every level
# and row count, fused or not (below _C.AMX_MIN_ROWS rows, off AMX, with a bias, or I not a
# multiple of 16 it is the linear and then silu_and_mul). 1600 inputs go in passes; 300 and 601
# rows split the rows between threads, 8 and 40 the gate groups.
@pytest.mark.parametrize("m", [1, 8, 40, 300, 601])
@pytest.mark.parametrize("inter,k,biased", [(96, 64, False), (208, 1600, False), (40, 96, False),
                                            (96, 64, True)])
def test_gate_up_with_silu_and_mul(isa: str, m: int, inter: int, k: int, biased: bool) -> None:
    g = torch.Generator().manual_seed(m * 7 + inter + k)
    w = torch.randn(2 * inter, k, generator=g) / k**0.5
    bias = torch.randn(2 * inter, generator=g) if biased else None
    weight = BlockLinearWeight.from_rows(w, "bf16_gemm", bias).native
    x = torch.randn(m, k, generator=g) * 3
    expected = assert_fused_glu_is_unfused(weight, x)
    # Strided rows of x and out.
    xs = torch.randn(m, k + 32, generator=g)[:, :k]
    xs.copy_(x)
    wide = torch.full((m, inter + 16), float("nan"))
    weight.linear_silu_and_mul(xs, wide[:, :inter])
    assert torch.equal(wide[:, :inter], expected)
    assert wide[:, inter:].isnan().all()


def test_gate_up_bad_arguments() -> None:
    weight = BlockLinearWeight.from_rows(torch.randn(34, 32), "bf16_gemm").native
    with pytest.raises(ValueError, match="out_features / 2"):
        weight.linear_silu_and_mul(torch.randn(3, 32), torch.empty(3, 34))
    odd = BlockLinearWeight.from_rows(torch.randn(33, 32), "bf16_gemm").native
    with pytest.raises(ValueError, match="even number"):
        odd.linear_silu_and_mul(torch.randn(3, 32), torch.empty(3, 16))
