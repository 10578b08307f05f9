"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """silu(x[..., :d]) * x[..., d:] for x [..., 2d] (gate | up, as MergedLinear lays them out).

    Same arithmetic as transformers' ``act_fn(gate_proj(x)) * up_proj(x)``, with one
    temporary instead of two.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        out = F.silu(x[..., :d])
        return out.mul_(x[..., d:])
