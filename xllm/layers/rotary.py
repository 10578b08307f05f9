"""Rotary position embeddings (RoPE): default, linear, llama3 and yarn frequencies.

The inverse frequencies follow transformers' ``modeling_rope_utils`` init functions
operation for operation, so the cos/sin values are the ones transformers computes. The
table covers every position up to ``max_position_embeddings`` and is built once; a
forward pass prepares a ``Rotation`` for its positions once (``prepare``) and every layer
rotates its q/k in place with it, with no loop over tokens: on the CPU in fp32 the native
``_C.rotary`` reads the table rows itself; elsewhere the rows are gathered once
(``lookup``) and ``apply_rotary`` runs in torch.

Layout is transformers' "rotate half" (not interleaved): a head's first half pairs with
its second half.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from xllm import _C

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _need(scaling: dict[str, Any], key: str, rope_type: str) -> Any:
    if scaling.get(key) is None:
        raise ValueError(f"config.json: rope_scaling of type {rope_type!r} needs the key {key!r}")
    return scaling[key]


def _yarn(
    inv_freq_base: torch.Tensor,
    dim: int,
    base: float,
    scaling: dict[str, Any],
    max_position_embeddings: int,
) -> tuple[torch.Tensor, float]:
    original = _need(scaling, "original_max_position_embeddings", "yarn")
    factor = scaling.get("factor")
    if factor is None:  # as transformers: the ratio of the extended to the original context
        factor = max_position_embeddings / original
    mscale = scaling.get("mscale")
    mscale_all_dim = scaling.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            ratio = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
            attention_factor = float(ratio)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, float(attention_factor)


def _llama3(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = _need(scaling, "factor", "llama3")
    low_freq_factor = _need(scaling, "low_freq_factor", "llama3")
    high_freq_factor = _need(scaling, "high_freq_factor", "llama3")
    old_context_len = _need(scaling, "original_max_position_embeddings", "llama3")
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by factor, short ones kept, the band between blended.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def compute_inv_freq(
    head_dim: int,
    base: float,
    rope_scaling: dict[str, Any] | None,
    max_position_embeddings: int,
) -> tuple[torch.Tensor, float]:
    """(inv_freq fp32 [head_dim // 2], attention_scaling) as transformers computes them.

    ``attention_scaling`` multiplies cos and sin (yarn's mscale; 1.0 otherwise).
    """
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be even and >= 2 for rotary embeddings, got {head_dim}")
    scaling = dict(rope_scaling or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling type {rope_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    dim = head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim
    inv_freq = 1.0 / (base**exponents)
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / _need(scaling, "factor", "linear"), 1.0
    if rope_type == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    return _yarn(inv_freq, dim, base, scaling, max_position_embeddings)


class RotaryEmbedding(nn.Module):
    """cos/sin table [max_position_embeddings, head_dim // 2] and the lookup into it.

    One instance per model: every layer shares the table and the per-step lookup.
    """

    def __init__(
        self,
        head_dim: int,
        max_position_embeddings: int,
        base: float,
        rope_scaling: dict[str, Any] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if max_position_embeddings < 1:
            raise ValueError(f"max_position_embeddings must be >= 1, got {max_position_embeddings}")
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        inv_freq, attention_scaling = compute_inv_freq(
            head_dim, base, rope_scaling, max_position_embeddings
        )
        # Same products as transformers' position_ids.float() * inv_freq (exact in fp32).
        positions = torch.arange(max_position_embeddings, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        self.attention_scaling = attention_scaling
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos_cache", (freqs.cos() * attention_scaling).to(dtype), False)
        self.register_buffer("sin_cache", (freqs.sin() * attention_scaling).to(dtype), False)

    def prepare(self, positions: torch.Tensor) -> Rotation:
        """The rotation for this step's positions [T] (int64), shared by all layers."""
        if positions.device.type == "cpu" and self.cos_cache.dtype == torch.float32:
            return Rotation(positions, None, None, self.cos_cache, self.sin_cache)
        cos, sin = self.lookup(positions)
        return Rotation(positions, cos, sin, self.cos_cache, self.sin_cache)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [T, 1, head_dim // 2], for positions [T] (int64)."""
        cos = self.cos_cache.index_select(0, positions).unsqueeze(1)
        sin = self.sin_cache.index_select(0, positions).unsqueeze(1)
        return cos, sin

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, max_position={self.max_position_embeddings}, "
            f"attention_scaling={self.attention_scaling}"
        )


class Rotation:
    """Rotates [T, heads, head_dim] views in place for one step's positions."""

    __slots__ = ("positions", "cos", "sin", "cos_cache", "sin_cache")

    def __init__(self, positions: torch.Tensor, cos: torch.Tensor | None,
                 sin: torch.Tensor | None, cos_cache: torch.Tensor,
                 sin_cache: torch.Tensor) -> None:
        self.positions, self.cos, self.sin = positions, cos, sin
        self.cos_cache, self.sin_cache = cos_cache, sin_cache

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.cos is None:
            _C.rotary(x, self.positions, self.cos_cache, self.sin_cache)
            return x
        return apply_rotary(x, self.cos, self.sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x [T, heads, head_dim] in place (any row stride); cos/sin from ``lookup``.

    Per half: x1' = x1*cos - x2*sin, x2' = x2*cos + x1*sin, which is transformers'
    ``x*cos + rotate_half(x)*sin`` with the same roundings.
    """
    half = x.shape[-1] // 2
    x1 = x[..., :half]
    x2 = x[..., half:]
    new1 = x1 * cos
    new1.sub_(x2 * sin)
    new2 = x2 * cos
    new2.add_(x1 * sin)
    x1.copy_(new1)
    x2.copy_(new2)
    return x
