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


WEIGHT_FORMATS = ("auto", "dense", "blocks")


def load_model(model_dir: Path, model_config: ModelConfig, dtype: torch.dtype,
               device: torch.device, progress: bool = True,
               weight_format: str = "dense") -> torch.nn.Module:
    """The model with its weights. ``weight_format``: ``dense`` computes on the
    safetensors weights; ``blocks`` on the GGUF blocks an import kept beside them
    (``xllm.ops.blocks``: the same fp32 values, decoded on the fly; CPU, fp32 only);
    ``auto`` picks blocks where they exist and apply."""
    from xllm.loader import iter_weights
    from xllm.loader.gguf_import import BLOCKS_FILE

    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    blocks_path = Path(model_dir) / BLOCKS_FILE
    use_blocks = weight_format == "blocks" or (
        weight_format == "auto" and blocks_path.is_file() and device.type == "cpu"
        and dtype == torch.float32)
    if use_blocks:
        if not blocks_path.is_file():
            raise ValueError(f"weight_format 'blocks' needs {blocks_path}, which only a GGUF "
                             "import writes; use weight_format 'dense' or 'auto'")
        if device.type != "cpu" or dtype != torch.float32:
            raise ValueError("weight_format 'blocks' runs on the CPU in float32 only; got "
                             f"device {device.type} and dtype {dtype}")
    cls = get_model_class(model_config.architecture)
    model = cls(model_config, dtype=dtype)
    model.load_weights(iter_weights(model_dir, progress=progress))
    if use_blocks:
        from xllm.ops.blocks import read_blocks

        model.attach_blocks(read_blocks(blocks_path))
    return model.to(device).eval()
