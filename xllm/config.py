"""EngineConfig: every engine option in one validated dataclass; the CLIs map onto it one to one."""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field, fields
from typing import Any

_DTYPES = ("auto", "float32", "bfloat16", "float16")
# EngineConfig.weight_format's values (docs/models.md; xllm.loader.model loads them).
WEIGHT_FORMATS = ("auto", "dense", "blocks", "int8", "int16", "bf16", "f32")
# overlap_scheduling's default per device, from bench.overlap (docs/benchmarks.md).
OVERLAP_BY_DEFAULT = {"cpu": False, "cuda": False}


@dataclass
class EngineConfig:
    model: str = "demo"  # "demo" or a local Hugging Face-format model directory
    # auto | float32 | bfloat16 | float16; auto = bfloat16 on CPUs with bf16 arithmetic (AMX,
    # AVX512-BF16), float32 on other CPUs, the checkpoint's dtype on CUDA
    dtype: str = "auto"
    # auto | dense | blocks | int8 | bf16 | f32: how the CPU stores the weights (GGUF blocks or
    # plain rows through native kernels, or torch's dense path); dtype says how they are
    # multiplied. See xllm.loader.model.load_model and docs/models.md.
    weight_format: str = "auto"
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = 256  # requests running at once
    max_num_batched_tokens: int = 2048  # token budget per step (long prompts are chunked)
    # Tokens per KV block. None: 64 with an int8 KV cache (its 16-token blocks of one head
    # are 1 KB, too short for the CPU's prefetchers: decode steps 1.13-1.2x faster at 64,
    # docs/benchmarks.md), else 16.
    block_size: int | None = None
    num_kv_blocks: int | None = None  # default: as many as kv_cache_memory_gb holds
    # The KV pool's ceiling. On CPU its memory is mapped as blocks come into use and given
    # back after kv_idle_release_s seconds with spare free blocks (see xllm.kvcache).
    kv_cache_memory_gb: float = 2.0
    kv_idle_release_s: float = 5.0
    # A CPU tier below the pool: blocks the pool frees are written there (in the background)
    # and prefix hits on it are loaded instead of recomputed. 0 = off.
    kv_offload_cpu_gb: float = 0.0
    # A disk tier in this directory (kept across restarts of the same model), below the CPU
    # tier if there is one; kv_offload_disk_gb caps its files.
    kv_offload_disk: str | None = None
    kv_offload_disk_gb: float = 0.0
    # auto (= compute dtype) | float32 | bfloat16 | float16 (CUDA) | int8: rows of int8 with a
    # scale per token and KV head (CPU; half a bf16 cache's bytes, xllm.ops.kv_cache)
    kv_cache_dtype: str = "auto"
    enable_prefix_caching: bool = True
    seed: int = 0  # seeds the sampler for requests without their own seed
    num_threads: int | None = None  # torch threads; default: all cores
    device: str = "cpu"  # cpu | cuda
    # Ranks that each hold 1/N of the model (heads, MLP, vocabulary); rank 0 is the engine
    # process, the others are worker processes it starts, each pinned to its share of the
    # cores (xllm.runtime.tp); on CUDA, rank r on device r.
    tensor_parallel_size: int = 1
    # What the ranks' sums go through: auto = the native shared-memory group on the CPU
    # (xllm.ops.allreduce), NCCL on CUDA (xllm.ops.dist_group); gloo = torch.distributed's
    # gloo on either device (slower; on CUDA it lets ranks share a device, for checks).
    tp_backend: str = "auto"
    # HOST:PORT: the tensor-parallel ranks 1..N-1 run on other hosts, each started there with
    # `python -m xllm.runtime.worker --master HOST:PORT --rank R`; rank 0 serves the
    # rendezvous (torch.distributed's TCP store) at this address, on its own cores, and the
    # ranks talk over TCP (xllm.ops.tcp_group). None: every rank on this host, over shared
    # memory.
    tp_master: str | None = None
    # Expert parallelism (mixture-of-experts models under tensor parallelism): whole experts
    # placed on the ranks, every rank routing every token and computing the pairs whose
    # expert it holds, one allreduce per MoE layer (xllm.layers.eplb, docs/models.md).
    enable_expert_parallel: bool = False
    # Replicas of hot experts beside the E logical ones, per MoE layer (E + this must split
    # evenly over the ranks).
    num_redundant_experts: int = 0
    # The expert-parallel load balancer: every eplb_step_interval steps the placement is
    # recomputed from the tokens each expert got since the last one (DeepSeek's EPLB
    # method) and applied between steps, each rank reading the experts it gains.
    enable_eplb: bool = False
    eplb_step_interval: int = 3000
    # Overlap scheduling: a helper thread schedules and prepares the next step while the
    # model computes this one. None: on where it measures faster (docs/benchmarks.md). With
    # KV tiers, a load into blocks a step in flight may still write waits for that step.
    overlap_scheduling: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight_format must be {', '.join(WEIGHT_FORMATS[:-1])} or "
                             f"{WEIGHT_FORMATS[-1]}, got {self.weight_format!r}")
        if self.kv_cache_dtype not in ("auto", "float32", "bfloat16", "float16", "int8"):
            raise ValueError("kv_cache_dtype must be auto, float32, bfloat16, float16 or int8, "
                             f"got {self.kv_cache_dtype!r}")
        if self.kv_cache_dtype == "int8" and self.device != "cpu":
            raise ValueError("kv_cache_dtype int8 runs on the CPU kernels only; on "
                             f"{self.device} use auto, bfloat16, float16 or float32")
        if self.block_size is None:
            self.block_size = 64 if self.kv_cache_dtype == "int8" else 16
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks must be >= 2 (block 0 is reserved), "
                             f"got {self.num_kv_blocks}")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if self.kv_idle_release_s < 0:
            raise ValueError(f"kv_idle_release_s must be >= 0, got {self.kv_idle_release_s}")
        if self.kv_offload_cpu_gb < 0:
            raise ValueError(f"kv_offload_cpu_gb must be >= 0 (0 = no CPU tier), got "
                             f"{self.kv_offload_cpu_gb}")
        if self.kv_offload_disk_gb < 0:
            raise ValueError(f"kv_offload_disk_gb must be >= 0, got {self.kv_offload_disk_gb}")
        if self.kv_offload_disk is not None and self.kv_offload_disk_gb <= 0:
            raise ValueError("kv_offload_disk needs kv_offload_disk_gb > 0 (the tier's size)")
        if self.kv_offload_disk is None and self.kv_offload_disk_gb > 0:
            raise ValueError("kv_offload_disk_gb needs kv_offload_disk (the tier's directory)")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got "
                             f"{self.tensor_parallel_size!r}")
        if self.tp_backend not in ("auto", "gloo"):
            raise ValueError(f"tp_backend must be auto or gloo, got {self.tp_backend!r}")
        if self.tensor_parallel_size > 1:
            if self.device != "cpu":
                if self.tp_master is not None:
                    raise ValueError("tp_master (ranks on other hosts) runs on the CPU only; "
                                     f"on {self.device} every rank is on this host")
                if self.kv_tiers:
                    raise ValueError("KV tiers with tensor parallelism run on the CPU only "
                                     "for now (a device pool's parts are not gathered)")
                import torch

                devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
                if self.tp_backend == "auto" and self.tensor_parallel_size > devices:
                    raise ValueError(f"tensor_parallel_size {self.tensor_parallel_size} "
                                     f"exceeds the {devices} CUDA devices here: every rank "
                                     "needs a device of its own (tp_backend gloo lets ranks "
                                     "share one, for checks)")
            cores = len(os.sched_getaffinity(0))
            if self.tp_master is not None:
                from xllm.ops.tcp_group import parse_address

                parse_address(self.tp_master)
            elif self.tensor_parallel_size > cores:
                raise ValueError(f"tensor_parallel_size {self.tensor_parallel_size} exceeds the "
                                 f"{cores} CPU cores this process may use: every rank needs a "
                                 "core of its own")
        if not isinstance(self.num_redundant_experts, int) or self.num_redundant_experts < 0:
            raise ValueError(f"num_redundant_experts must be an integer >= 0, got "
                             f"{self.num_redundant_experts!r}")
        if not isinstance(self.eplb_step_interval, int) or self.eplb_step_interval < 1:
            raise ValueError(f"eplb_step_interval must be an integer >= 1, got "
                             f"{self.eplb_step_interval!r}")
        if (self.enable_eplb or self.num_redundant_experts) and not self.enable_expert_parallel:
            raise ValueError("enable_eplb and num_redundant_experts need enable_expert_parallel")
        if self.enable_expert_parallel and self.tensor_parallel_size < 2:
            raise ValueError("enable_expert_parallel places experts on the tensor-parallel "
                             "ranks; it needs tensor_parallel_size >= 2")
        if self.tp_master is not None and self.tensor_parallel_size < 2:
            raise ValueError("tp_master names the rendezvous of ranks on other hosts; it needs "
                             "tensor_parallel_size >= 2")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")

    @property
    def threads(self) -> int:
        """Threads of one rank: all cores, or a rank's share of them under TP on one host."""
        ranks_here = 1 if self.tp_master is not None else self.tensor_parallel_size
        share = len(os.sched_getaffinity(0)) // ranks_here
        return self.num_threads or share

    @property
    def kv_tiers(self) -> bool:
        """Whether the KV store has a tier below the pool (CPU memory or disk)."""
        return self.kv_offload_cpu_gb > 0 or self.kv_offload_disk is not None

    @property
    def overlap(self) -> bool:
        """Whether the engine overlaps scheduling with the model (overlap_scheduling, or its
        default where it is None)."""
        if self.overlap_scheduling is not None:
            return self.overlap_scheduling
        return OVERLAP_BY_DEFAULT[self.device]

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "extra"]


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """One --flag per EngineConfig field, typed and defaulted from the dataclass."""
    hints = typing.get_type_hints(EngineConfig)
    group = parser.add_argument_group("engine options (EngineConfig)")
    for f in dataclasses.fields(EngineConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        if base is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=f.default)
        else:
            group.add_argument(flag, dest=f.name, type=base, default=f.default,
                               metavar=f.name.upper())


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{name: getattr(args, name) for name in EngineConfig.option_names()})
