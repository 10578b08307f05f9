"""Linear projections, plain and merged (several projections of one input as one matmul).

Weights are stored as transformers stores them, ``[out_features, in_features]``, so
``F.linear`` runs one GEMM against the transposed operand. A merged layer keeps its parts
as consecutive row ranges of one weight (q|k|v or gate|up): one matmul per step instead
of two or three, and the loader fills each range from the checkpoint's separate tensor.
Parameters never require grad: this is inference, and autograd bookkeeping costs time.

A layer can instead run on its weight's GGUF quantization blocks (``use_blocks``), decoded
exactly to fp32 on the fly by a native kernel; the dense weight is then released.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from xllm.layers.parallel import TensorParallel
from xllm.ops.blocks import BlockLinearWeight


def copy_checked(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    """dst.copy_(src) after checking shapes; a mismatch names the checkpoint tensor.

    Converts dtype on the way (a bf16 checkpoint into fp32 weights).
    """
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(
            f"checkpoint tensor {name!r} has shape {tuple(src.shape)}, but the model expects "
            f"{tuple(dst.shape)}; is config.json the one this checkpoint was saved with?"
        )
    with torch.no_grad():
        dst.copy_(src)


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    # Uninitialised on purpose: load_weights fills every element, and zeroing a multi-GB
    # model first would cost a full pass over memory.
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T + b with W [out_features, in_features].

    ``reduce``: a row-parallel layer (``xllm.layers.parallel``): this rank holds some of the
    input columns, and the outputs of all ranks are summed (the bias is rank 0's alone).
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32,
        reduce: TensorParallel | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = _param(out_features, in_features, dtype=dtype)
        self.bias = _param(out_features, dtype=dtype) if bias else None
        self.blocks: BlockLinearWeight | None = None
        self.reduce = reduce if reduce is not None and reduce.enabled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.blocks(x) if self.blocks is not None else F.linear(x, self.weight, self.bias)
        if self.reduce is not None:
            y = self.reduce.allreduce(y.contiguous())
        return y

    def use_blocks(self, blocks: BlockLinearWeight) -> None:
        """Computes on ``blocks`` from now on (fp32) and frees the dense weight."""
        if (blocks.out_features, blocks.in_features) != (self.out_features, self.in_features):
            raise ValueError(
                f"blocks of shape [{blocks.out_features}, {blocks.in_features}] cannot replace "
                f"a weight [{self.out_features}, {self.in_features}]"
            )
        if self.weight.dtype != torch.float32:
            raise ValueError(f"block weights compute in fp32; this layer is {self.weight.dtype}")
        self.blocks = blocks
        self.weight = nn.Parameter(torch.empty(0, dtype=self.weight.dtype), requires_grad=False)

    def extra_repr(self) -> str:
        blocks = f", blocks={self.blocks.format}" if self.blocks is not None else ""
        return (
            f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"
            f"{blocks}"
        )


class MergedLinear(Linear):
    """Several projections of the same input, computed as one matmul.

    ``shard_names`` are the checkpoint's names of the parts (e.g. ``("q_proj", "k_proj",
    "v_proj")``); part ``i`` owns output columns ``offsets[i]:offsets[i + 1]``. The output
    is ``[..., sum(output_sizes)]``; callers take the parts as views, never copies.
    """

    def __init__(
        self,
        in_features: int,
        output_sizes: Sequence[int],
        shard_names: Sequence[str],
        bias: bool,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if len(output_sizes) != len(shard_names) or not output_sizes:
            raise ValueError(
                f"output_sizes {list(output_sizes)} and shard_names {list(shard_names)} must be "
                "non-empty and of the same length"
            )
        super().__init__(in_features, sum(output_sizes), bias, dtype)
        self.output_sizes = tuple(int(s) for s in output_sizes)
        self.shard_names = tuple(shard_names)
        self.offsets = [0]
        for size in self.output_sizes:
            self.offsets.append(self.offsets[-1] + size)

    def shard(self, param_name: str, index: int) -> torch.Tensor:
        """The rows of ``weight`` or ``bias`` that part ``index`` owns (a view)."""
        param = getattr(self, param_name)
        return param[self.offsets[index] : self.offsets[index + 1]]

    def extra_repr(self) -> str:
        pairs = zip(self.shard_names, self.output_sizes, strict=True)
        parts = ", ".join(f"{n}={s}" for n, s in pairs)
        return f"in={self.in_features}, {parts}, bias={self.bias is not None}"
