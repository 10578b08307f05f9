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


def load_model(model_dir: Path, model_config: ModelConfig, dtype: torch.dtype,
               device: torch.device, progress: bool = True) -> torch.nn.Module:
    from xllm.loader import iter_weights

    cls = get_model_class(model_config.architecture)
    model = cls(model_config, dtype=dtype)
    model.load_weights(iter_weights(model_dir, progress=progress))
    return model.to(device).eval()
