"""Weights in GGUF quantization blocks, decoded exactly to fp32 on the fly.

A GGUF file such as the demo model's stores its linear weights as Q4_1 blocks
(``w = d * q + m``, 4-bit q) and its embedding as Q8_0 blocks (``w = d * q``, 8-bit q),
32 consecutive input features per block, with fp16 ``d`` and ``m``. Decoding a block
is exact in fp32 (``d * q`` has at most 19 significant bits), so the fp32 weights are
the same numbers whether they are decoded once at import time (the dense safetensors
the importer writes) or on the fly, block by block, inside a matmul. Keeping the blocks
moves 5 bits (Q4_1) or 8.5 bits (Q8_0) per weight through memory instead of 32, which
is what limits a decode step on a CPU. All arithmetic stays fp32.

The native kernel (``xllm._C.BlockWeight``) takes the blocks repacked into three
arrays per weight ``[N, K]`` (N output, K input features, K a multiple of 32):

- ``qs``: Q4_1 uint8 ``[N, K/2]``, byte j of a block holding element j (low nibble)
  and element j + 16 (high nibble), llama.cpp's order; Q8_0 int8 ``[N, K]``;
- ``scales``: fp32 ``[N, K/32]``, the blocks' ``d`` widened from fp16 (exact);
- ``mins``: fp32 ``[N, K/32]``, the blocks' ``m`` (Q4_1 only).

Q4_0 and Q4_K tensors are held as Q4_1 blocks (their values are of that form exactly:
``gguf_tensor_blocks``). ``pack_gguf_blocks`` builds them from a GGUF tensor's raw bytes,
``dequantize_ref`` is the plain numpy reference (it is gguf's own formula), and
``BlockLinearWeight`` is the callable a layer uses. The native kernel is used for every
batch size: with few rows it moves a sixth of the bytes of a dense GEMV, and with many it
runs at the core's fp32 peak (decoding each weight once per call), ahead of decode-then-MKL
at every size measured.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

BLOCK = 32
FORMATS = ("q4_1", "q8_0")  # GGUF block formats
ROW_FORMATS = ("bf16", "f32")  # plain rows of any checkpoint, through the same kernels
# bf16 rows multiplied in bf16 (x rounded to bf16, fp32 sums), packed for AMX / AVX512-BF16.
GEMM_FORMATS = ("bf16_gemm",)
# Bytes per 32-weight block in a GGUF file.
_GGUF_BLOCK_BYTES = {"q4_1": 20, "q8_0": 34}


@dataclass
class PackedBlocks:
    """One weight's repacked blocks (numpy arrays; see the module docstring)."""

    format: str
    qs: np.ndarray
    scales: np.ndarray
    mins: np.ndarray | None

    @property
    def shape(self) -> tuple[int, int]:
        rows, nblocks = self.scales.shape
        return rows, nblocks * BLOCK

    def take_rows(self, index: np.ndarray) -> PackedBlocks:
        """The blocks of rows ``index`` in that order (row permutations, e.g. rope's)."""
        mins = None if self.mins is None else self.mins[index]
        return PackedBlocks(self.format, self.qs[index], self.scales[index], mins)


def pack_gguf_blocks(raw: np.ndarray, fmt: str, shape: tuple[int, int]) -> PackedBlocks:
    """Repacks a GGUF tensor's raw block bytes (any uint8 array) for ``BlockWeight``."""
    if fmt not in FORMATS:
        raise ValueError(f"block format must be one of {FORMATS}, got {fmt!r}")
    rows, cols = shape
    if cols % BLOCK:
        raise ValueError(f"in_features {cols} is not a multiple of the block size {BLOCK}")
    nb = cols // BLOCK
    blocks = _raw_blocks(raw, fmt, shape, rows * nb, _GGUF_BLOCK_BYTES[fmt])
    scales = _fp16(blocks, 0).reshape(rows, nb)
    if fmt == "q4_1":
        qs = np.ascontiguousarray(blocks[:, 4:]).reshape(rows, cols // 2)
        return PackedBlocks(fmt, qs, scales, _fp16(blocks, 2).reshape(rows, nb))
    qs = np.ascontiguousarray(blocks[:, 2:]).view(np.int8).reshape(rows, cols)
    return PackedBlocks(fmt, qs, scales, None)


def quantize_q8_0(weight: torch.Tensor) -> PackedBlocks:
    """A dense weight [N, K] (K a multiple of 32) as Q8_0 blocks, bit for bit what ggml's
    reference quantizer (and gguf's ``quantize``) gives: per block of 32, d = max|w| / 127,
    q = round-half-away(w / d) as int8, d kept as fp16."""
    if weight.dim() != 2 or weight.shape[1] % BLOCK:
        raise ValueError(f"weight must be [out, in] with in a multiple of {BLOCK}, got "
                         f"{tuple(weight.shape)}")
    rows, cols = weight.shape
    w = weight.detach().float().reshape(rows, cols // BLOCK, BLOCK)
    d = w.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    x = w * inv
    q = (torch.sign(x) * torch.floor(x.abs() + 0.5)).to(torch.int8)
    scales = d.squeeze(-1).half().float()
    return PackedBlocks("q8_0", q.reshape(rows, cols).numpy(), scales.numpy(), None)


def _raw_blocks(raw: np.ndarray, name: str, shape: tuple[int, int], count: int,
                size: int) -> np.ndarray:
    """A GGUF tensor's bytes as [count, size] blocks, its size checked."""
    data = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    if data.size != count * size:
        raise ValueError(f"{name} data of shape {shape} needs {count * size} bytes, "
                         f"got {data.size}")
    return data.reshape(count, size)


def _fp16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte ``at`` of each block, widened to fp32 (exact): [count]."""
    return blocks[:, at:at + 2].copy().view(np.float16).reshape(-1).astype(np.float32)


def _q4_0_as_q4_1(raw: np.ndarray, shape: tuple[int, int]) -> PackedBlocks:
    """Q4_0 (``w = d (q - 8)``, 18-byte blocks, the same nibble order) as Q4_1 with
    ``m = -8 d``: ``d q`` and ``8 d`` are exact in fp32 and so is their sum, ``d (q - 8)``,
    so the blocks decode to gguf's values exactly (a zero's sign aside: ``+0`` here where
    gguf gives ``-0`` for a negative ``d``)."""
    rows, cols = shape
    nb = cols // BLOCK
    blocks = _raw_blocks(raw, "Q4_0", shape, rows * nb, 18)
    d = _fp16(blocks, 0).reshape(rows, nb)
    qs = np.ascontiguousarray(blocks[:, 2:]).reshape(rows, cols // 2)
    return PackedBlocks("q4_1", qs, d, -8.0 * d)


def _q4_k_as_q4_1(raw: np.ndarray, shape: tuple[int, int]) -> PackedBlocks:
    """Q4_K (super-blocks of 256: fp16 ``d`` and ``dmin``, 6-bit scale and min per 32, 4-bit
    q) as Q4_1 per 32: scale ``d * sc`` and min ``-(dmin * m)`` are exact in fp32 (fp16
    times a 6-bit integer), so ``scale q + min`` rounds once, where gguf's ``d sc q - dmin m``
    does: the same fp32 values."""
    rows, cols = shape
    if cols % 256:
        raise ValueError(f"Q4_K in_features {cols} is not a multiple of its super-block, 256")
    n = rows * (cols // 256)
    blocks = _raw_blocks(raw, "Q4_K", shape, n, 144)
    d, dmin = _fp16(blocks, 0)[:, None], _fp16(blocks, 2)[:, None]
    # The 12 scale bytes: sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales) and 4-7
    # (mins); 4-7 in the nibbles of bytes 8-11 with their top 2 bits in bytes 0-7's top bits.
    sb = blocks[:, 4:16].reshape(n, 3, 4)
    lo, hi, mix = sb[:, 0], sb[:, 1], sb[:, 2]
    sc = np.concatenate([lo & 0x3F, (mix & 0x0F) | ((lo >> 2) & 0x30)], axis=1)
    mn = np.concatenate([hi & 0x3F, (mix >> 4) | ((hi >> 2) & 0x30)], axis=1)
    scales = (d * sc.astype(np.float32)).reshape(rows, cols // BLOCK)
    mins = (-(dmin * mn.astype(np.float32))).reshape(rows, cols // BLOCK)
    # Sub-block 2c + h holds the low (h = 0) or high nibbles of the 32 bytes of chunk c;
    # Q4_1 packs element j with element j + 16 in one byte.
    q = (blocks[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1))
    q = (q & 0x0F).reshape(n, 8, 32)
    qs = (q[:, :, :16] | (q[:, :, 16:] << 4)).astype(np.uint8).reshape(rows, cols // 2)
    return PackedBlocks("q4_1", qs, scales, mins)


# GGUF tensor types the engine computes on, by ggml type name: the native block formats
# as they are, and 4-bit formats whose values Q4_1 blocks hold exactly.
_GGUF_BLOCKS = {
    "Q4_1": lambda raw, shape: pack_gguf_blocks(raw, "q4_1", shape),
    "Q8_0": lambda raw, shape: pack_gguf_blocks(raw, "q8_0", shape),
    "Q4_0": _q4_0_as_q4_1,
    "Q4_K": _q4_k_as_q4_1,
}
GGUF_BLOCK_TYPES = tuple(_GGUF_BLOCKS)


def gguf_tensor_blocks(raw: np.ndarray, ggml_type: str, shape: tuple[int, int]) -> PackedBlocks:
    """The blocks of a GGUF tensor of type ``ggml_type`` (one of ``GGUF_BLOCK_TYPES``) and
    shape [N, K], in a format ``BlockWeight`` computes on, decoding to gguf's own values."""
    if ggml_type not in _GGUF_BLOCKS:
        raise ValueError(f"GGUF type must be one of {GGUF_BLOCK_TYPES}, got {ggml_type!r}")
    if shape[1] % BLOCK:
        raise ValueError(f"in_features {shape[1]} is not a multiple of the block size {BLOCK}")
    return _GGUF_BLOCKS[ggml_type](raw, shape)


def concat_rows(parts: list[PackedBlocks]) -> PackedBlocks:
    """One weight of the parts' rows in order (fused q|k|v or gate|up projections)."""
    if len({p.format for p in parts}) != 1 or len({p.shape[1] for p in parts}) != 1:
        raise ValueError("blocks to concatenate must share format and in_features")
    if len(parts) == 1:
        return parts[0]
    mins = None if parts[0].mins is None else np.concatenate([p.mins for p in parts])
    return PackedBlocks(parts[0].format, np.concatenate([p.qs for p in parts]),
                        np.concatenate([p.scales for p in parts]), mins)


def read_blocks(path: Path, shards: Mapping[str, Any] | None = None) -> dict[str, PackedBlocks]:
    """The blocks file an import wrote (``xllm_blocks/blocks.safetensors``), by HF name.

    ``shards`` (tensor parallelism: name -> ``xllm.layers.parallel.Slice``) reads only each
    named weight's slice: rows, or columns in whole blocks. A column slice that does not
    fall on block boundaries leaves that weight out (its layer keeps the dense weight).
    """
    from safetensors import safe_open

    out: dict[str, PackedBlocks] = {}
    with safe_open(str(path), framework="numpy") as f:
        formats = f.metadata() or {}
        for name, fmt in formats.items():
            if fmt not in FORMATS:
                raise ValueError(f"{path}: tensor {name!r} has unknown block format {fmt!r}")
            parts = ("qs", "scales", "mins") if fmt == "q4_1" else ("qs", "scales")
            spec = (shards or {}).get(name)
            if spec is None:
                arrays = [f.get_tensor(f"{name}.{p}") for p in parts]
            elif spec.dim == 0:
                arrays = [f.get_slice(f"{name}.{p}")[spec.start:spec.stop] for p in parts]
                if spec.pad_to is not None and arrays[0].shape[0] < spec.pad_to:
                    arrays = [np.concatenate([a, np.zeros((spec.pad_to - a.shape[0],
                                                           *a.shape[1:]), a.dtype)])
                              for a in arrays]
            elif spec.start % BLOCK or spec.stop % BLOCK:
                continue
            else:
                b0, b1 = spec.start // BLOCK, spec.stop // BLOCK
                nb = f.get_slice(f"{name}.scales").get_shape()[1]
                width = f.get_slice(f"{name}.qs").get_shape()[1] // nb
                arrays = [f.get_slice(f"{name}.qs")[:, b0 * width:b1 * width]]
                arrays += [f.get_slice(f"{name}.{p}")[:, b0:b1] for p in parts[1:]]
            mins = arrays[2] if fmt == "q4_1" else None
            out[name] = PackedBlocks(fmt, arrays[0], arrays[1], mins)
    return out


def dequantize_ref(p: PackedBlocks) -> np.ndarray:
    """fp32 [N, K] by gguf's formula, in numpy: the reference for the native decode."""
    rows, cols = p.shape
    nb = cols // BLOCK
    if p.format == "q4_1":
        q = p.qs.reshape(rows, nb, BLOCK // 2)
        q = np.concatenate([q & 0x0F, q >> 4], axis=2).astype(np.float32)
        out = p.scales[:, :, None] * q + p.mins[:, :, None]
    else:
        q = p.qs.reshape(rows, nb, BLOCK).astype(np.float32)
        out = q * p.scales[:, :, None]
    return out.reshape(rows, cols)


class BlockLinearWeight:
    """A linear layer's weight (and bias) as blocks, callable like F.linear on fp32 input."""

    def __init__(self, blocks: PackedBlocks, bias: torch.Tensor | None = None,
                 arithmetic: str = "fp32") -> None:
        """``arithmetic``: ``fp32`` decodes the blocks exactly to fp32; ``int8`` quantizes
        x to int8 per block of 32 and multiplies the quants as integers (csrc/quant/
        int8_dot.h: VNNI; on AMX CPUs from 3 rows on Q8_0 and 7 on Q4_x, x in 16 bits per
        row times a per-row int8 copy of the weight on AMX-INT8 tiles); ``int16`` the same
        with x in 16 bits per block of 32 (two integer passes; the blocks' own weights at
        every row count: within ~3e-5 of ``fp32``)."""
        self.format = blocks.format
        self.qs = torch.from_numpy(np.ascontiguousarray(blocks.qs))
        self.scales = torch.from_numpy(np.ascontiguousarray(blocks.scales))
        self.mins = None if blocks.mins is None else torch.from_numpy(
            np.ascontiguousarray(blocks.mins))
        self._finish(bias, arithmetic)
        if self.arithmetic in ("int8", "int16"):  # the native weight repacked its own copy
            self.qs = self.scales = self.mins = None

    @classmethod
    def from_rows(cls, weight: torch.Tensor, fmt: str,
                  bias: torch.Tensor | None = None) -> BlockLinearWeight:
        """A dense fp32 weight [N, K] as ``bf16`` rows (exact only when the values are bf16
        values, e.g. a bf16 checkpoint's), ``f32`` rows (no copy when contiguous),
        ``bf16_gemm`` (bf16 rows packed for the matrix units; bf16 arithmetic: the layer
        computes bf16(x) @ bf16(W)^T with fp32 sums), or ``q8_0`` (quantized here to Q8_0
        blocks, ``quantize_q8_0``, and multiplied in int8 arithmetic)."""
        if fmt == "q8_0":
            return cls(quantize_q8_0(weight), bias, "int8")
        if fmt not in ROW_FORMATS + GEMM_FORMATS:
            raise ValueError(f"row format must be one of {ROW_FORMATS + GEMM_FORMATS}, "
                             f"got {fmt!r}")
        if weight.dim() != 2 or weight.shape[1] % BLOCK:
            raise ValueError(f"weight must be [out, in] with in a multiple of {BLOCK}, got "
                             f"{tuple(weight.shape)}")
        self = cls.__new__(cls)
        self.format = fmt
        dtype = torch.float32 if fmt == "f32" else torch.bfloat16
        self.qs = weight.detach().to(dtype).contiguous()
        self.scales = self.mins = None
        self._finish(bias)
        if fmt in GEMM_FORMATS:
            self.qs = None  # the native weight packed its own copy
        return self

    def _finish(self, bias: torch.Tensor | None, arithmetic: str = "fp32") -> None:
        self.bias = None if bias is None else bias.detach().float().contiguous()
        from xllm import _C  # here, so that the importer (numpy only) needs no native build

        self.native = _C.BlockWeight(self.format, self.qs, self.scales, self.mins, self.bias,
                                     arithmetic)
        self.arithmetic = self.native.arithmetic
        self.out_features = self.native.out_features
        self.in_features = self.native.in_features

    def nbytes(self) -> int:
        """Bytes of weight storage the kernels read."""
        return self.native.nbytes

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight [out_features, in_features] (a new tensor)."""
        out = torch.empty(self.out_features, self.in_features, dtype=torch.float32)
        self.native.dequantize(out)
        return out

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., in_features] fp32 -> [..., out_features] fp32."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        rows = x2.shape[0]
        if out is None:
            out = torch.empty(rows, self.out_features, dtype=torch.float32, device=x.device)
        self.native.linear(x2, out)
        return out.view(*lead, self.out_features)
