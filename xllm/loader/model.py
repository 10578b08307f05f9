"""Builds a model from a Hugging Face-format directory: config -> registry class -> weights."""

from __future__ import annotations

from pathlib import Path

import torch

from xllm.models.config import ModelConfig
from xllm.models.registry import get_model_class

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_bf16_compute() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 / AMX); else bf16 matmul crawls."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, model_config: ModelConfig, device: torch.device) -> torch.dtype:
    """'auto' = the checkpoint's dtype on CUDA; fp32 on CPUs without bf16 units."""
    if dtype != "auto":
        return TORCH_DTYPES[dtype]
    if device.type == "cuda":
        return TORCH_DTYPES.get(model_config.torch_dtype, torch.bfloat16)
    if model_config.torch_dtype == "bfloat16" and cpu_has_bf16_compute():
        return torch.bfloat16
    return torch.float32


WEIGHT_FORMATS = ("auto", "dense", "blocks", "bf16", "f32")


def load_model(model_dir: Path, model_config: ModelConfig, dtype: torch.dtype,
               device: torch.device, progress: bool = True,
               weight_format: str = "dense") -> torch.nn.Module:
    """The model with its weights. ``weight_format`` (docs/models.md):

    - ``dense``: torch modules on the fp32 (or ``dtype``) parameters, MKL matmuls;
    - ``blocks``: the GGUF blocks an import kept beside the weights, decoded exactly to the
      same fp32 values on the fly by native kernels (``xllm.ops.blocks``);
    - ``bf16`` / ``f32``: the same native kernels on the weights as plain rows, stored as
      bf16 (half the bytes; exact for a bf16 checkpoint) or fp32;
    - ``auto``: on a CPU in fp32, ``blocks`` where an import kept them, else ``bf16`` for a
      bf16 checkpoint and ``f32`` otherwise; ``dense`` everywhere else.

    Every format but ``dense`` runs on the CPU in fp32 only, and lets the native decoder
    stack run the whole model.
    """
    from xllm.loader import iter_weights
    from xllm.loader.gguf_import import BLOCKS_FILE

    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    blocks_path = Path(model_dir) / BLOCKS_FILE
    native = device.type == "cpu" and dtype == torch.float32
    if weight_format == "auto":
        if not native:
            weight_format = "dense"
        elif blocks_path.is_file():
            weight_format = "blocks"
        else:
            weight_format = "bf16" if model_config.torch_dtype == "bfloat16" else "f32"
    if weight_format != "dense" and not native:
        raise ValueError(f"weight_format {weight_format!r} runs on the CPU in float32 only; got "
                         f"device {device.type} and dtype {dtype}; use 'dense'")
    if weight_format == "blocks" and not blocks_path.is_file():
        raise ValueError(f"weight_format 'blocks' needs {blocks_path}, which only a GGUF "
                         "import writes; use weight_format 'auto', 'f32' or 'dense'")
    cls = get_model_class(model_config.architecture)
    model = cls(model_config, dtype=dtype)
    model.load_weights(iter_weights(model_dir, progress=progress))
    if weight_format == "blocks":
        from xllm.ops.blocks import read_blocks

        model.attach_blocks(read_blocks(blocks_path))
    elif weight_format in ("bf16", "f32"):
        model.attach_rows(weight_format)
    return model.to(device).eval()
