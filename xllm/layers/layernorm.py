"""RMSNorm, with the residual add fused in."""

from __future__ import annotations

import torch
from torch import nn

from xllm import _C


class RMSNorm(nn.Module):
    """weight * x / sqrt(mean(x^2) + eps) over the last dimension.

    The arithmetic follows transformers' LlamaRMSNorm op for op (statistics in fp32, then
    back to the input dtype before the weight), so fp32 results match it bit for bit.
    (``F.rms_norm`` gives the same bits but is not fused on CPU in torch 2.13: it
    decomposes into more dispatches than this.) On the CPU in fp32 the native
    ``_C.rms_norm`` does the same arithmetic in one call (only the mean's summation order
    differs), residual add included.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def _normed(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        variance = xf.pow(2).mean(-1, keepdim=True)
        return xf * variance.add_(self.eps).rsqrt_()

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x), or with ``residual``: (norm(residual + x), residual + x).

        The fused form updates ``residual`` in place (it is the running hidden state the
        decoder layers pass along), saving an allocation per layer.
        """
        if x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2:
            out = torch.empty(x.shape, dtype=torch.float32)
            _C.rms_norm(out, x, self.weight, self.eps, residual)
            return out if residual is None else (out, residual)
        if residual is None:
            return self._normed(x).to(x.dtype).mul_(self.weight)
        residual.add_(x)
        return self._normed(residual).to(residual.dtype).mul_(self.weight), residual

    def forward_inplace(self, x: torch.Tensor) -> torch.Tensor:
        """Normalises x (any strides, e.g. per-head views into a fused QKV output) in place;
        2-D fp32 CPU rows with contiguous columns in one native call."""
        if (x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2
                and x.stride(1) == 1 and self.weight.dtype == torch.float32):
            _C.rms_norm(x, x, self.weight, self.eps, None)
            return x
        x.copy_(self._normed(x)).mul_(self.weight)
        return x

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
