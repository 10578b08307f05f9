"""Builds a model from a Hugging Face-format directory: config -> registry class -> weights."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from xllm.config import WEIGHT_FORMATS
from xllm.layers.parallel import SINGLE, TensorParallel
from xllm.models.config import ModelConfig
from xllm.models.registry import get_model_class

logger = logging.getLogger("xllm.loader")

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_bf16_compute() -> bool:
    """Whether the CPU kernels' level multiplies bf16 natively (AVX512-BF16 / AMX); else bf16
    matmul crawls. The level is the CPU's, or a lower one that ``_C.set_cpu_isa`` forced (so
    that a machine with more can stand in for an AVX2 CPU)."""
    from xllm import _C

    return _C.cpu_isa() in ("avx512_bf16", "amx")


def resolve_dtype(dtype: str, model_config: ModelConfig, device: torch.device,
                  weight_format: str = "auto") -> torch.dtype:
    """The compute dtype. 'auto': the checkpoint's dtype on CUDA; on a CPU, bfloat16 where the
    CPU has bf16 arithmetic (AMX or AVX512-BF16: bf16 GEMMs with fp32 sums, several times
    fp32's speed, within the accuracy bounds tests/test_reduced_precision.py holds), else
    float32, and float32 whenever the weight format asked for computes in fp32 (blocks,
    f32). Logs the choice and why."""
    if dtype != "auto":
        return TORCH_DTYPES[dtype]
    if device.type == "cpu" and weight_format in ("blocks", "f32"):
        chosen = torch.float32
        why = f"weight_format {weight_format} computes in fp32"
    elif device.type == "cuda":
        chosen = TORCH_DTYPES.get(model_config.torch_dtype, torch.bfloat16)
        why = f"the checkpoint's torch_dtype ({model_config.torch_dtype})"
    elif cpu_has_bf16_compute():
        from xllm import _C

        chosen = torch.bfloat16
        why = (f"this CPU has bf16 and int8 dot-product units (ISA level "
               f"{_C.cpu_isa()}): bf16 or int8 products with fp32 sums, fp32 residual "
               "stream, bf16 KV cache")
    else:
        chosen = torch.float32
        why = ("this CPU has no bf16 arithmetic (no AVX512-BF16 or AMX): bf16 matmuls would "
               "be emulated; fp32 activations and KV cache")
    logger.info("dtype auto -> %s: %s", str(chosen).removeprefix("torch."), why)
    return chosen


def resolve_weight_format(weight_format: str, dtype: torch.dtype, model_config: ModelConfig,
                          device: torch.device, model_dir: Path, auto_dtype: bool = False) -> str:
    """The weight format ``load_model`` loads. 'auto' picks the fastest format that passes the
    accuracy checks (tests/test_reduced_precision.py):

    - on a CPU in bfloat16 (``dtype`` auto on CPUs with bf16 arithmetic): ``int8`` where a
      GGUF import kept its blocks (a 4-5 bit weight moves a third of bf16's bytes in a decode
      step, and prompt-sized inputs run on the AMX tiles), else ``bf16``;
    - on a CPU in float32 that ``dtype`` auto chose (``auto_dtype``), at the avx512 level
      (VNNI without bf16 arithmetic: Cascade Lake, Ice Lake) or the avx2 level, ``int16``
      where an import kept its blocks: x in 16 bits per block times the blocks, within
      ~3e-5 of exact; at avx512 1.7-1.8x the exact blocks' speed; at avx2 the 16-bit form
      for up to 8 rows of x (one stream ~1.6x) and the exact fp32 kernels from 9 rows
      (docs/benchmarks.md);
    - otherwise in float32: ``blocks`` (decoded exactly to fp32) where an import kept them,
      else ``bf16`` rows for a bf16 checkpoint and ``f32`` otherwise: exact fp32, which an
      explicit ``dtype`` float32 always gets. At the avx2 level ``int8`` on the blocks
      measured faster still (on an AMX Xeon forced to it) but it changes the demo's greedy
      answer at a near-tie, so it stays a choice;
    - ``dense`` everywhere else (CUDA, float16).

    Any other value is returned as it is (``load_model`` checks it). Logs what 'auto'
    chose."""
    if weight_format != "auto":
        return weight_format
    from xllm import _C
    from xllm.loader.gguf_import import BLOCKS_FILE

    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        chosen = "dense"
    elif (Path(model_dir) / BLOCKS_FILE).is_file():
        if dtype == torch.bfloat16:
            chosen = "int8"
        else:
            chosen = "int16" if auto_dtype and _C.cpu_isa() in ("avx2", "avx512") else "blocks"
    elif dtype == torch.bfloat16:
        chosen = "bf16"
    else:
        chosen = "bf16" if model_config.torch_dtype == "bfloat16" else "f32"
    logger.info("weight_format auto -> %s", chosen)
    return chosen


def load_model(model_dir: Path, model_config: ModelConfig, dtype: torch.dtype,
               device: torch.device, progress: bool = True,
               weight_format: str = "dense", tp: TensorParallel = SINGLE) -> torch.nn.Module:
    """The model with its weights. ``weight_format`` (docs/models.md) says how the weights
    are stored; ``dtype`` how they are multiplied:

    - ``dense``: torch modules on ``dtype`` parameters (MKL / oneDNN matmuls);
    - ``blocks``: the GGUF blocks an import kept beside the weights, decoded exactly to the
      same fp32 values on the fly by native kernels (``xllm.ops.blocks``); float32 only;
    - ``int8``: the same blocks (without an import's blocks file, the checkpoint's weights
      quantized to Q8_0 at load) with activations quantized to int8 per block of 32 and
      integer dot products (llama.cpp's arithmetic: VNNI; on AMX CPUs from 3 rows (Q8_0) or 7
      (Q4_x), x in 16 bits per row times a per-row int8 copy of the weights on AMX-INT8
      tiles); float32 or bfloat16 (which sets the KV cache's dtype and attention's
      arithmetic);
    - ``int16``: an import's blocks times x quantized to 16 bits per block of 32, integer
      dot products in two passes (the int8 kernels run twice; the blocks' own weights at
      every row count): products within ~3e-5 of ``blocks``' at about int8's speed on VNNI;
      float32 or bfloat16;
    - ``bf16``: bf16 rows. In float32, widened exactly to fp32 in the native kernels
      (exact for a bf16 checkpoint's values); in bfloat16, packed for the matrix units and
      multiplied in bf16 with fp32 sums (``bf16_gemm``: AMX tiles for many rows,
      AVX512-BF16 dot products for few, fp32 FMAs on CPUs without either);
    - ``f32``: fp32 rows through the native kernels; float32 only;
    - ``auto``: ``resolve_weight_format``. The choice is logged.

    Every format but ``dense`` runs on the CPU, keeps norms, rope, attention and the residual
    stream in fp32, and lets the native decoder stack run the whole model.

    ``tp``: this rank's share of a tensor-parallel model (``xllm.layers.parallel``); it reads
    only its slices of the checkpoint and of the blocks file.
    """
    from xllm.loader import iter_weights
    from xllm.loader.gguf_import import BLOCKS_FILE

    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    blocks_path = Path(model_dir) / BLOCKS_FILE
    cpu = device.type == "cpu"
    weight_format = resolve_weight_format(weight_format, dtype, model_config, device, model_dir)
    if weight_format != "dense":
        if not cpu or dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"weight_format {weight_format!r} runs on the CPU in float32 or "
                             f"bfloat16 only; got device {device.type} and dtype {dtype}; use "
                             "'dense'")
        if dtype == torch.bfloat16 and weight_format not in ("bf16", "int8", "int16"):
            raise ValueError(f"weight_format {weight_format!r} computes in float32; with dtype "
                             "bfloat16 use 'bf16', 'int8' or 'int16' (or 'dense'), or use "
                             "dtype float32")
    if weight_format in ("blocks", "int16") and not blocks_path.is_file():
        raise ValueError(f"weight_format {weight_format!r} needs {blocks_path}, which only a "
                         "GGUF import writes; use weight_format 'auto', 'int8', 'bf16', 'f32' "
                         "or 'dense'")
    # int8 without an import's blocks: the checkpoint's weights quantized to Q8_0 at load.
    int8_from_dense = weight_format == "int8" and not blocks_path.is_file()
    bf16_gemm = weight_format == "bf16" and dtype == torch.bfloat16
    cls = get_model_class(model_config.architecture)
    # The native formats keep everything around the linears (embedding, norms, rope, residual)
    # in fp32, whatever dtype the linears multiply in.
    model = cls(model_config, dtype=torch.float32 if cpu and weight_format != "dense" else dtype,
                tp=tp)
    model.load_weights(iter_weights(model_dir, progress=progress, lazy=tp.enabled))
    model.checkpoint_dir = str(model_dir)  # expert parallelism reads moved experts from it
    if int8_from_dense:
        model.attach_rows("q8_0")
    elif weight_format in ("blocks", "int8", "int16"):
        from xllm.ops.blocks import read_blocks

        model.attach_blocks(read_blocks(blocks_path, model.shard_specs()),
                            "fp32" if weight_format == "blocks" else weight_format)
    elif bf16_gemm:
        model.attach_rows("bf16_gemm")
    elif weight_format in ("bf16", "f32"):
        model.attach_rows(weight_format)
    how = {"int8": (": the checkpoint's weights quantized to Q8_0 at load" if int8_from_dense
                    else ": GGUF blocks") + " times x quantized to int8 per block of 32 (VNNI, "
                   "or VPMADDUBSW on AVX2); "
                   "on AMX from 3 rows (Q8_0) or 7 (Q4_x) x in 16 bits per row times a per-row "
                   "int8 copy (AMX-INT8)",
           "bf16": ": bf16 products with fp32 sums (bf16_gemm)" if bf16_gemm else
                   ": bf16 rows widened exactly to fp32",
           "int16": ": GGUF blocks times x quantized to 16 bits per block of 32 (two "
                    "integer passes: VNNI, or VPMADDUBSW on AVX2)",
           "blocks": ": GGUF blocks decoded exactly to fp32"}.get(weight_format, "")
    logger.info("weight_format %s, dtype %s%s", weight_format, str(dtype).removeprefix("torch."),
                how)
    return model.to(device).eval()
