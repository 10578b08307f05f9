"""Block weights (xllm.ops.blocks, xllm._C.BlockWeight) against numpy and gguf references.

Decoding must be bit-identical to gguf's dequantize; the matmul equal to x @ W^T to fp32
rounding on every path the kernel has (registers-only for <= 3 rows, decoded tiles for
more), on AVX2 and the scalar fallback.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

from xllm import _C
from xllm.ops.blocks import (
    BlockLinearWeight,
    concat_rows,
    dequantize_ref,
    gguf_tensor_blocks,
    pack_gguf_blocks,
    quantize_q8_0,
    read_blocks,
)

Q = gguf.GGMLQuantizationType
FORMATS = [("q4_1", Q.Q4_1), ("q8_0", Q.Q8_0)]
ISAS = _C.cpu_isas()  # every level this CPU runs, lowest first


@contextlib.contextmanager
def on_isa(isa: str) -> Iterator[None]:
    _C.set_cpu_isa(isa)
    try:
        yield
    finally:
        _C.set_cpu_isa(_C.detected_isa())


def _weight(fmt_type: Q, rows: int, cols: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 3)).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block (d = 0)
    raw = quantize(w, fmt_type)
    return raw, dequantize(raw, fmt_type)


@pytest.mark.parametrize("fmt, qtype", FORMATS)
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows, cols", [(1, 32), (5, 96), (64, 576), (13, 1536)])
def test_decode_is_bit_identical_to_gguf(fmt: str, qtype: Q, isa: str, rows: int,
                                         cols: int) -> None:
    raw, want = _weight(qtype, rows, cols, rows + cols)
    packed = pack_gguf_blocks(raw, fmt, (rows, cols))
    assert np.array_equal(dequantize_ref(packed), want)
    with on_isa(isa):
        got = BlockLinearWeight(packed).dequantize().numpy()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("fmt, qtype", FORMATS)
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [0, 1, 2, 3, 4, 5, 7, 16, 51])
def test_linear_matches_dense_matmul(fmt: str, qtype: Q, isa: str, m: int) -> None:
    rows, cols = 70, 192  # 70 output features: a 2-row edge tile after 17 full ones
    raw, dense = _weight(qtype, rows, cols, m)
    g = torch.Generator().manual_seed(m)
    bias = torch.randn(rows, generator=g)
    weight = BlockLinearWeight(pack_gguf_blocks(raw, fmt, (rows, cols)), bias)
    # A strided input: the rows of a wider tensor, as a fused projection's output is.
    wide = torch.randn(m, cols + 40, generator=g)
    x = wide[:, 8:8 + cols]
    want = x.double() @ torch.from_numpy(dense).double().t() + bias.double()
    with on_isa(isa):
        got = weight(x)
    assert got.shape == (m, rows) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fmt, qtype", FORMATS)
@pytest.mark.parametrize("isa", ISAS)
def test_prompt_sized_inputs_pass_over_the_weight_in_row_blocks(fmt: str, qtype: Q,
                                                                isa: str) -> None:
    # 1536 inputs: a pass holds 256 KiB of x, 42 rows, so 100 rows take passes of 42, 42
    # and 16 rows. Blocking must change no row's arithmetic: rows across a pass boundary
    # equal what a small call on those rows alone gives, bit for bit.
    rows, cols, m = 70, 1536, 100
    raw, dense = _weight(qtype, rows, cols, 7)
    weight = BlockLinearWeight(pack_gguf_blocks(raw, fmt, (rows, cols)))
    x = torch.randn(m, cols, generator=torch.Generator().manual_seed(7))
    with on_isa(isa):
        got = weight(x)
        across = weight(x[40:47].contiguous())
    want = x.double() @ torch.from_numpy(dense).double().t()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)
    assert torch.equal(got[40:47], across)


@pytest.mark.parametrize("fmt, qtype", FORMATS)
@pytest.mark.parametrize("isa", ISAS)
def test_many_inputs_pass_over_the_weight_in_chunks(fmt: str, qtype: Q, isa: str) -> None:
    # Above 2048 inputs decoded weights go 1024 inputs at a time (block_linear.cpp), each
    # chunk's sums added to out, and a pass holds 256 KiB of a chunk of x (63 rows): 3104
    # inputs are chunks of 1024, 1024, 1024 and 32; 100 rows passes of 63 and 37. Against the
    # dense product, with a bias (added once); rows across a pass boundary as a small call on
    # them alone gives, bit for bit.
    rows, cols, m = 37, 3104, 100
    raw, dense = _weight(qtype, rows, cols, 11)
    bias = torch.randn(rows, generator=torch.Generator().manual_seed(11))
    weight = BlockLinearWeight(pack_gguf_blocks(raw, fmt, (rows, cols)), bias)
    x = torch.randn(m, cols, generator=torch.Generator().manual_seed(12))
    with on_isa(isa):
        got = weight(x)
        across = weight(x[60:67].contiguous())
    want = x.double() @ torch.from_numpy(dense).double().t() + bias.double()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)
    assert torch.equal(got[60:67], across)


def _q4_k_raw(rows: int, cols: int, seed: int) -> np.ndarray:
    """Random Q4_K super-blocks (every byte pattern is a valid block once d and dmin are
    finite): gguf-py can dequantize Q4_K but not quantize it."""
    rng = np.random.default_rng(seed)
    n = rows * cols // 256
    raw = rng.integers(0, 256, (n, 144), dtype=np.uint8)
    for at, scale in ((0, 0.05), (2, 0.02)):  # d, dmin
        v = rng.uniform(-scale, scale, n).astype(np.float16)
        v[0] = 0.0  # a super-block with d = 0 (and dmin = 0)
        raw[:, at:at + 2] = v.view(np.uint8).reshape(n, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows, cols", [(1, 256), (7, 512), (33, 1536)])
def test_q4_0_and_q4_k_run_as_q4_1_with_gguf_values(isa: str, rows: int, cols: int) -> None:
    """Q4_0 and Q4_K tensors become Q4_1 blocks that decode to gguf's values exactly, in
    numpy and on every level, and compute on the fp32 and int8 paths."""
    rng = np.random.default_rng(rows)
    cases = [("Q4_0", quantize((rng.standard_normal((rows, cols)) * 0.3).astype(np.float32),
                               Q.Q4_0)),
             ("Q4_K", _q4_k_raw(rows, cols, rows + cols))]
    for name, raw in cases:
        want = dequantize(raw, Q[name]).reshape(rows, cols)
        packed = gguf_tensor_blocks(raw, name, (rows, cols))
        assert packed.format == "q4_1"
        # Equal values (a zero's sign may differ: d q + (-8 d) is +0 where d (q - 8) is -0).
        assert np.array_equal(dequantize_ref(packed), want)
        x = torch.randn(3, cols, generator=torch.Generator().manual_seed(cols))
        with on_isa(isa):
            exact = BlockLinearWeight(packed)
            assert np.array_equal(exact.dequantize().numpy(), want)
            got = exact(x)
            int8 = BlockLinearWeight(packed, arithmetic="int8")(x)
        ref = x.double() @ torch.from_numpy(want).double().t()
        scale = float(ref.abs().max())  # random Q4_K scales make outputs in the hundreds
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6 * scale + 1e-4)
        assert (int8.double() - ref).abs().max() < 0.02 * scale + 1e-3  # x in int8
    with pytest.raises(ValueError, match="multiple of its super-block"):
        gguf_tensor_blocks(np.zeros(144 * 2, np.uint8), "Q4_K", (1, 288))
    with pytest.raises(ValueError, match="GGUF type must be one of"):
        gguf_tensor_blocks(np.zeros(10, np.uint8), "Q6_K", (1, 256))
    with pytest.raises(ValueError, match="needs 36 bytes"):
        gguf_tensor_blocks(np.zeros(10, np.uint8), "Q4_0", (1, 64))


def test_q4_0_import_keeps_q4_1_blocks(tmp_path: Path) -> None:
    """A Q4_0 GGUF imports with Q4_1 blocks equal to its dense weights, and the engine runs
    on them as on the dense weights."""
    from test_loader import write_tiny_gguf

    from xllm import LLM, SamplingParams
    from xllm.loader.gguf_import import BLOCKS_FILE, convert_gguf_to_hf

    write_tiny_gguf(tmp_path / "m.gguf", arch="llama", qtype=Q.Q4_0, tied=False, seed=3)
    out = convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf", progress=False)
    blocks = read_blocks(out / BLOCKS_FILE)
    from safetensors.numpy import load_file

    dense = load_file(str(out / "model.safetensors"))
    assert blocks and {b.format for b in blocks.values()} == {"q4_1"}
    assert all(np.array_equal(dequantize_ref(b), dense[n]) for n, b in blocks.items())
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    runs = [LLM(str(out), dtype="float32", weight_format=fmt, num_kv_blocks=32,
                max_model_len=64, block_size=8).generate([[5, 9, 30, 31]], params,
                                                          use_tqdm=False)
            for fmt in ("dense", "blocks")]
    assert runs[0][0].outputs[0].token_ids == runs[1][0].outputs[0].token_ids


@pytest.mark.parametrize("fmt", ["bf16", "f32"])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [1, 3, 4, 16])
def test_row_formats_match_dense_matmul(fmt: str, isa: str, m: int) -> None:
    g = torch.Generator().manual_seed(m)
    weight = torch.randn(36, 96, generator=g)
    if fmt == "bf16":
        weight = weight.bfloat16().float()  # bf16 rows are exact for bf16 values
    bias = torch.randn(36, generator=g)
    rows = BlockLinearWeight.from_rows(weight, fmt, bias)
    x = torch.randn(m, 96, generator=g)
    with on_isa(isa):
        assert torch.equal(rows.dequantize(), weight)
        got = rows(x)
    want = x.double() @ weight.double().t() + bias.double()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    if fmt == "f32":  # no copy of a contiguous fp32 weight
        assert rows.qs.data_ptr() == weight.data_ptr()
    with pytest.raises(ValueError, match="multiple of 32"):
        BlockLinearWeight.from_rows(torch.zeros(4, 40), fmt)
    with pytest.raises(ValueError, match="must be None for format"):
        _C.BlockWeight(fmt, rows.qs, torch.ones(36, 3))


def test_linear_keeps_leading_dims_and_writes_into_out() -> None:
    raw, dense = _weight(Q.Q4_1, 8, 64, 1)
    weight = BlockLinearWeight(pack_gguf_blocks(raw, "q4_1", (8, 64)))
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(weight(x), x @ torch.from_numpy(dense).t(), rtol=1e-5, atol=1e-5)
    out = torch.empty(2, 8)
    assert weight(x[0, :2], out=out).data_ptr() == out.data_ptr()


def test_concat_rows_and_row_permutation() -> None:
    raw_a, dense_a = _weight(Q.Q4_1, 8, 64, 2)
    raw_b, dense_b = _weight(Q.Q4_1, 4, 64, 3)
    a = pack_gguf_blocks(raw_a, "q4_1", (8, 64))
    b = pack_gguf_blocks(raw_b, "q4_1", (4, 64))
    assert np.array_equal(dequantize_ref(concat_rows([a, b])), np.concatenate([dense_a, dense_b]))
    order = np.array([3, 0, 7, 1])
    assert np.array_equal(dequantize_ref(a.take_rows(order)), dense_a[order])
    with pytest.raises(ValueError, match="share format"):
        concat_rows([a, pack_gguf_blocks(*_weight(Q.Q8_0, 4, 64, 4)[:1], "q8_0", (4, 64))])


def test_bad_arguments_raise_clear_errors() -> None:
    raw, _ = _weight(Q.Q4_1, 4, 64, 5)
    p = pack_gguf_blocks(raw, "q4_1", (4, 64))
    qs, sc, mn = (torch.from_numpy(a) for a in (p.qs, p.scales, p.mins))
    with pytest.raises(ValueError, match="'q4_1', 'q8_0', 'bf16', 'f32' or 'bf16_gemm'"):
        _C.BlockWeight("q4_0", qs, sc, mn)
    with pytest.raises(ValueError, match="'mins' is required"):
        _C.BlockWeight("q4_1", qs, sc)
    with pytest.raises(ValueError, match="'qs' must be int8"):
        _C.BlockWeight("q8_0", qs, sc)
    with pytest.raises(ValueError, match="'scales' must be float32"):
        _C.BlockWeight("q4_1", qs, sc.double(), mn)
    with pytest.raises(ValueError, match="'qs'.*in_features"):
        _C.BlockWeight("q4_1", qs[:, :16].contiguous(), sc, mn)
    with pytest.raises(ValueError, match="'bias'"):
        _C.BlockWeight("q4_1", qs, sc, mn, torch.zeros(5))
    w = _C.BlockWeight("q4_1", qs, sc, mn)
    with pytest.raises(ValueError, match="'x'.*in_features"):
        w.linear(torch.zeros(1, 32), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="'out'.*out_features"):
        w.linear(torch.zeros(1, 64), torch.zeros(1, 5))
    with pytest.raises(ValueError, match="contiguous rows"):
        w.linear(torch.zeros(64, 2).t(), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="needs 160 bytes, got 40"):
        pack_gguf_blocks(raw[:1], "q4_1", (4, 64))
    with pytest.raises(ValueError, match="multiple of the block size"):
        pack_gguf_blocks(raw, "q4_1", (8, 40))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_imported_model_runs_on_blocks_like_dense(tmp_path: Path, arch: str) -> None:
    """A Q4_1 GGUF import keeps its blocks (rows unpermuted like the dense q/k). The engine
    generates the same on the dense weights, on the blocks through the Python modules, and
    on the blocks through the native decoder stack, with prompts chunked so that steps mix
    decode and prefill rows."""
    from test_loader import write_tiny_gguf

    from xllm import LLM, SamplingParams
    from xllm.loader.gguf_import import BLOCKS_FILE, convert_gguf_to_hf

    write_tiny_gguf(tmp_path / "m.gguf", arch=arch, qtype=Q.Q4_1, tied=arch == "llama", seed=9)
    out = convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf", progress=False)
    blocks = read_blocks(out / BLOCKS_FILE)
    from safetensors.numpy import load_file

    dense = load_file(str(out / "model.safetensors"))
    assert blocks and all(np.array_equal(dequantize_ref(b), dense[n]) for n, b in blocks.items())
    assert json.loads((out / "config.json").read_text())["architectures"]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0)
    prompts = [[5, 9, 30, 31], list(range(40, 75)), [7] * 19]
    runs = {}
    for name, fmt, stack in (("dense", "dense", False), ("modules", "blocks", False),
                             ("stack", "blocks", True)):
        llm = LLM(str(out), dtype="float32", weight_format=fmt, num_kv_blocks=64, max_model_len=128,
                  block_size=8, max_num_batched_tokens=16)
        model = llm.engine.runner.model
        assert (model.model.layers[0].mlp.down_proj.blocks is not None) == (fmt == "blocks")
        assert model.use_native_stack(stack) == stack
        runs[name] = llm.generate(prompts, params, use_tqdm=False)
    for d, m, st in zip(runs["dense"], runs["modules"], runs["stack"], strict=True):
        assert d.outputs[0].token_ids == m.outputs[0].token_ids == st.outputs[0].token_ids
        for other in (m, st):
            assert d.outputs[0].cumulative_logprob == pytest.approx(
                other.outputs[0].cumulative_logprob, abs=1e-3)


def test_decoder_stack_rejects_bad_input() -> None:
    raw, _ = _weight(Q.Q4_1, 64, 64, 6)
    w = BlockLinearWeight(pack_gguf_blocks(raw, "q4_1", (64, 64))).native
    cos = torch.zeros(16, 8)
    norm = torch.ones(64)
    cache = torch.zeros(4, 1, 8, 16)
    layer = (w, w, w, w, norm, norm, None, None, cache, cache)
    with pytest.raises(ValueError, match=r"layers\[0\].qkv is \[64, 64\]; the model needs \[96"):
        _C.DecoderStack(64, 4, 1, 16, 32, 1e-5, 0.25, cos, cos, norm, [layer])
    with pytest.raises(ValueError, match="at least one layer"):
        _C.DecoderStack(64, 4, 1, 16, 32, 1e-5, 0.25, cos, cos, norm, [])
    def bw(rows: int, cols: int) -> _C.BlockWeight:
        return BlockLinearWeight(
            pack_gguf_blocks(_weight(Q.Q8_0, rows, cols, rows)[0], "q8_0", (rows, cols))).native

    good = (bw(96, 64), bw(64, 64), bw(64, 64), bw(64, 32), norm, norm, None, None, cache, cache)
    stack = _C.DecoderStack(64, 4, 1, 16, 32, 1e-5, 0.25, cos, cos, norm, [good])
    x, out = torch.randn(2, 64), torch.empty(2, 64)
    i32 = torch.int32
    no_tables, no_lens = torch.zeros(0, 4, dtype=i32), torch.zeros(0, dtype=i32)
    args = (torch.tensor([0, 1]), torch.tensor([0, 99]), 2, torch.ones(2, 4, dtype=i32),
            torch.tensor([1, 2], dtype=i32), no_tables, torch.zeros(1, dtype=i32), no_lens, out)
    # Checks inside the stack run without the GIL and still surface as ValueError.
    with pytest.raises(ValueError, match="slot_mapping"):
        stack.forward(x, *args)
    with pytest.raises(ValueError, match="positions must be in"):
        stack.forward(x, torch.tensor([0, 16]), *args[1:])
    with pytest.raises(ValueError, match="must be an xllm._C.BlockWeight"):
        _C.DecoderStack(64, 4, 1, 16, 32, 1e-5, 0.25, cos, cos, norm,
                        [("x", w, w, w, norm, norm, None, None, cache, cache)])


def test_weight_format_blocks_needs_an_import(tmp_path: Path) -> None:
    from test_loader import write_tiny_gguf

    from xllm import LLM
    from xllm.loader.gguf_import import convert_gguf_to_hf

    write_tiny_gguf(tmp_path / "m.gguf", seed=1)  # F32 tensors: nothing kept as blocks
    out = convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf", progress=False)
    for fmt in ("blocks", "int16"):
        with pytest.raises(ValueError, match=f"weight_format '{fmt}' needs"):
            LLM(str(out), weight_format=fmt, num_kv_blocks=16)
    with pytest.raises(ValueError, match="weight_format must be"):
        LLM(str(out), weight_format="int4")


def test_q8_0_quantizer_is_ggufs_bit_for_bit() -> None:
    """quantize_q8_0 (load-time int8 for checkpoints without GGUF blocks) gives the blocks
    gguf's reference quantizer gives: zero blocks, halves that round away from zero, and the
    fp16 scale included; from_rows("q8_0") multiplies them in int8."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(48, 96, generator=gen)
    w[0, :32] = 0.0  # an all-zero block: scale 0, quants 0
    w[1, :32] = torch.arange(32) - 15.5  # quants at exact halves
    ours = quantize_q8_0(w)
    want = pack_gguf_blocks(quantize(w.numpy(), Q.Q8_0), "q8_0", (48, 96))
    assert np.array_equal(ours.qs, want.qs) and np.array_equal(ours.scales, want.scales)
    layer = BlockLinearWeight.from_rows(w, "q8_0")
    assert layer.arithmetic == "int8" and layer.format == "q8_0"
    from test_int8_dot import AMX_ROWS, quantized_x  # the int8 arithmetic's view of x

    x = torch.randn(AMX_ROWS["q8_0"] - 1, 96, generator=gen)  # below the AMX tiles' rows
    want = quantized_x(x).double() @ torch.from_numpy(dequantize_ref(ours)).double().t()
    torch.testing.assert_close(layer(x).double(), want, atol=1e-4, rtol=1e-5)

