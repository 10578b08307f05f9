"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xllm import _C


class SiluAndMul(nn.Module):
    """silu(x[..., :d]) * x[..., d:] for x [..., 2d] (gate | up, as MergedLinear lays them out).

    Same arithmetic as transformers' ``act_fn(gate_proj(x)) * up_proj(x)``, with one
    temporary instead of two.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        if x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2:
            out = torch.empty((x.shape[0], d), dtype=torch.float32)
            _C.silu_and_mul(out, x)  # one pass; exp differs from torch's in the last bit
            return out
        out = F.silu(x[..., :d])
        return out.mul_(x[..., d:])
