"""The Llama family: Llama, Mistral, Qwen2 and Qwen3 as one model with switches.

What differs between them is data in ``ModelConfig`` (biases, q/k norm, tied
embeddings, GQA/MQA, head_dim, rope theta and scaling), so one set of modules serves all
four; the registry maps each architecture name to a class of this family.

Per layer: x -> RMSNorm -> fused QKV (one matmul) -> [Qwen3: per-head RMSNorm on q, k]
-> rope on q|k in place -> paged attention -> o_proj -> + residual -> RMSNorm -> fused
gate|up (one matmul) -> silu(gate) * up -> down_proj -> + residual. The residual add is
fused into the next norm.

Weights load from Hugging Face names (``load_weights``); the checkpoint's q/k/v and
gate/up tensors are copied into row ranges of the fused projections.

Tensor parallelism (``tp``, ``xllm.layers.parallel``): the same modules hold one rank's
share (whole GQA groups of heads, a slice of the MLP and of the vocabulary), each rank
reads only its slices of the checkpoint, and o_proj, down_proj and the embedding sum their
partial outputs over the ranks. The native decoder stack is built from these modules, so
it runs the same shard with the sums inside it: one definition of the math, two executors.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from xllm import _C
from xllm.layers.activation import SiluAndMul
from xllm.layers.attention import PagedAttention
from xllm.layers.attn_metadata import AttentionMetadata
from xllm.layers.embedding import LMHead, VocabEmbedding
from xllm.layers.eplb import Placement, static_placement
from xllm.layers.layernorm import RMSNorm
from xllm.layers.linear import Linear, MergedLinear, copy_checked
from xllm.layers.mla import MLAttention
from xllm.layers.moe import SparseMoE
from xllm.layers.parallel import (
    SINGLE,
    Slice,
    TensorParallel,
    head_shard,
    mlp_shard,
    vocab_shard,
)
from xllm.layers.rotary import RotaryEmbedding, Rotation
from xllm.models.config import ModelConfig
from xllm.ops.blocks import BLOCK, BlockLinearWeight, PackedBlocks, concat_rows

# Checkpoint tensors that carry no weights of ours (precomputed rope tables in old
# checkpoints); accepted and skipped.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype,
                 tp: TensorParallel = SINGLE, window: int = 0) -> None:
        super().__init__()
        shard = head_shard(config.num_attention_heads, config.num_key_value_heads, tp)
        self.shard = shard
        self.num_heads = shard.num_heads
        self.num_kv_heads = shard.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = shard.num_heads * config.head_dim
        self.kv_size = shard.num_kv_heads * config.head_dim
        self.qkv_proj = MergedLinear(
            config.hidden_size,
            [self.q_size, self.kv_size, self.kv_size],
            ("q_proj", "k_proj", "v_proj"),
            bias=config.attention_bias,
            dtype=dtype,
        )
        self.o_proj = Linear(self.q_size, config.hidden_size, config.o_proj_bias, dtype,
                             reduce=tp)
        self.qk_norm = config.qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype)
        self.attn = PagedAttention(
            self.num_heads, self.num_kv_heads, self.head_dim, scale=self.head_dim**-0.5,
            window=window,
        )

    def forward(
        self,
        hidden: torch.Tensor,
        rope: Rotation,
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)  # [T, q_size + 2 * kv_size]
        t = qkv.shape[0]
        qk_end = self.q_size + self.kv_size
        # Views into qkv (row stride q_size + 2 * kv_size); the ops accept that stride.
        q = qkv[:, : self.q_size].view(t, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size : qk_end].view(t, self.num_kv_heads, self.head_dim)
        v = qkv[:, qk_end:].view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            self.q_norm.forward_inplace(q)
            self.k_norm.forward_inplace(k)
        # q and k sit side by side in each row, so one rotation covers both.
        rope(qkv[:, :qk_end].view(t, self.num_heads + self.num_kv_heads, -1))
        out = self.attn(q, k, v, attn)
        return self.o_proj(out.view(t, self.q_size).to(self.o_proj.weight.dtype))


class LlamaMLP(nn.Module):
    """``reduce``: whether down_proj sums its partial output over the ranks itself (a shared
    expert's part joins the MoE layer's one sum instead)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype,
                 tp: TensorParallel = SINGLE, intermediate_size: int | None = None,
                 reduce: bool = True) -> None:
        super().__init__()
        start, stop = mlp_shard(intermediate_size or config.intermediate_size, tp)
        inter = stop - start
        self.gate_up_proj = MergedLinear(
            config.hidden_size, [inter, inter], ("gate_proj", "up_proj"), config.mlp_bias, dtype
        )
        self.down_proj = Linear(inter, config.hidden_size, config.mlp_bias, dtype,
                                reduce=tp if reduce else None)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype,
                 tp: TensorParallel = SINGLE, index: int = 0,
                 placement: np.ndarray | None = None) -> None:
        super().__init__()
        self.self_attn: nn.Module = (MLAttention(config, dtype, tp) if config.mla
                                     else LlamaAttention(config, dtype, tp,
                                                         config.layer_window(index)))
        self.mlp: nn.Module
        if index in config.sparse_layers:
            ep = tp if tp.expert_parallel else SINGLE
            shared = (LlamaMLP(config, dtype, ep, config.moe_intermediate_size
                               * config.n_shared_experts, reduce=False)
                      if config.n_shared_experts else None)
            self.mlp = SparseMoE(config, dtype, shared, ep, placement)
        else:
            self.mlp = LlamaMLP(config, dtype, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        rope: Rotation,
        attn: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it); the caller adds them."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, rope, attn)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype,
                 tp: TensorParallel = SINGLE, placement: Placement | None = None) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, dtype, tp)
        rows = {layer: placement.phy2log[j] for j, layer in enumerate(config.sparse_layers)
                } if placement is not None else {}
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, dtype, tp, i, rows.get(i))
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.rotary_emb = RotaryEmbedding(
            config.rope_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
            dtype,
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        rope = self.rotary_emb.prepare(positions)  # once per step, shared by all layers
        residual: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, rope, attn)
        assert residual is not None  # ModelConfig guarantees num_hidden_layers >= 1
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """Decoder-only LM over the paged KV cache; see the module docstring."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32,
                 tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype}")
        rope_keys = config.raw.get("rope_parameters") or config.raw.get("rope_scaling") or {}
        partial = config.raw.get("partial_rotary_factor", rope_keys.get("partial_rotary_factor"))
        if partial not in (None, 1, 1.0):
            raise ValueError(
                f"config.json: partial_rotary_factor {partial!r} is not supported by "
                f"{config.architecture} here; only full-head rotary (1.0) is"
            )
        if config.num_experts and tp.enabled and not tp.expert_parallel:
            raise ValueError(f"tensor parallelism does not split {config.architecture}'s "
                             "experts; place them on the ranks with --enable-expert-parallel "
                             "(or run with --tensor-parallel-size 1)")
        self.config = config
        self.dtype = dtype
        self.tp = tp
        self._stack: _C.DecoderStack | None = None
        # Expert parallelism: where each MoE layer's experts live (xllm.layers.eplb).
        self.placement: Placement | None = None
        if config.num_experts and tp.expert_parallel and tp.enabled:
            self.placement = static_placement(len(config.sparse_layers), config.num_experts,
                                              tp.size, tp.num_redundant_experts)
        self.checkpoint_dir: str | None = None  # where set_placement reads experts from
        self.model = LlamaModel(config, dtype, tp, self.placement)
        self.lm_head = LMHead(
            config.vocab_size,
            config.hidden_size,
            dtype,
            tied_to=self.model.embed_tokens if config.tie_word_embeddings else None,
            tp=tp,
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata
    ) -> torch.Tensor:
        """Final hidden states [T, hidden_size] for input_ids/positions [T] (int64).

        Writes every row's K/V into the bound caches at attn.slot_mapping. Runs the native
        decoder stack when it applies (see ``use_native_stack``), else the modules.
        """
        stack = self._stack
        if stack is None:
            return self.model(input_ids, positions, attn)
        x = self.model.embed_tokens(input_ids)
        out = torch.empty_like(x)
        stack.forward(
            x, positions, attn.slot_mapping, attn.num_decode_tokens, attn.decode_block_tables,
            attn.decode_seq_lens, attn.prefill_block_tables, attn.prefill_query_start_loc,
            attn.prefill_seq_lens, out,
        )
        return out

    def use_native_stack(self, enabled: bool = True) -> bool:
        """Runs all decoder layers as one native call (``_C.DecoderStack``) where it applies:
        CPU, fp32, every projection on block weights, KV caches bound. Same computation as the
        modules (to fp32 rounding) without their per-layer Python and tensor overhead.
        Returns whether the stack is in use."""
        self._stack = None
        if not enabled or self.dtype != torch.float32:
            return False
        if self.tp.enabled and self.tp.comm.native is None:
            return False  # sums through torch.distributed: the modules run
        rope = self.model.rotary_emb
        if rope.cos_cache.device.type != "cpu" or rope.cos_cache.dtype != torch.float32:
            return False
        if any(not isinstance(layer.self_attn, LlamaAttention) for layer in self.model.layers):
            return False  # latent-attention layers run as modules
        layers = []
        inter = 1  # the dense MLPs' columns (none in an all-experts model)
        for layer in self.model.layers:
            a, m = layer.self_attn, layer.mlp
            moe = None
            if isinstance(m, SparseMoE):
                moe = m.stack_entry()
                if moe is None:
                    return False  # experts not on native rows, expert-parallel or shared
                projections = (a.qkv_proj, a.o_proj)
            else:
                projections = (a.qkv_proj, a.o_proj, m.gate_up_proj, m.down_proj)
                inter = m.down_proj.in_features
            if any(p.blocks is None for p in projections) or a.attn.key_cache is None:
                return False
            if a.attn.key_cache.device.type != "cpu":
                return False
            norms = (a.q_norm.weight, a.k_norm.weight) if a.qk_norm else (None, None)
            natives = [p.blocks.native for p in projections] + [None] * (4 - len(projections))
            layers.append((
                *natives,
                layer.input_layernorm.weight, layer.post_attention_layernorm.weight, *norms,
                a.attn.key_cache, a.attn.value_cache, moe,
            ))
        cfg = self.config
        first = self.model.layers[0]
        self._stack = _C.DecoderStack(
            cfg.hidden_size, first.self_attn.num_heads, first.self_attn.num_kv_heads,
            cfg.head_dim, inter, cfg.rms_norm_eps,
            first.self_attn.attn.scale, rope.cos_cache, rope.sin_cache, self.model.norm.weight,
            layers, self.tp.comm.native if self.tp.enabled else None, self.tp.bf16_sums,
            [layer.self_attn.attn.window for layer in self.model.layers],
        )
        return True

    @property
    def comm_seconds(self) -> float:
        """Seconds the native stack has spent in tensor-parallel sums (0 without TP or off
        the native stack, where the modules' sums are not timed)."""
        return self._stack.comm_seconds if self._stack is not None else 0.0

    @property
    def max_context_len(self) -> int:
        """The longest context computed exactly as transformers does: max_position_embeddings
        (sliding windows are applied by the attention kernels)."""
        return self.config.max_position_embeddings

    def compute_logits(self, hidden: torch.Tensor, argmax: bool = False
                       ) -> torch.Tensor | None:
        """fp32 logits [n, vocab_size] for hidden rows [n, hidden_size] (``argmax``: their
        greedy token ids [n] instead, LMHead.forward). Under tensor parallelism every rank
        must call it with the same rows and ``argmax``; rank 0 gets the result, the others
        None."""
        return self.lm_head(hidden, argmax)

    def bind_kv_caches(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Gives layer i the (key_cache, value_cache) pair kv_caches[i]."""
        layers = self.model.layers
        if len(kv_caches) != len(layers):
            raise ValueError(
                f"kv_caches has {len(kv_caches)} (key, value) pairs; the model has "
                f"{len(layers)} layers and needs one pair per layer"
            )
        for i, (layer, pair) in enumerate(zip(layers, kv_caches, strict=True)):
            try:
                key_cache, value_cache = pair
                layer.self_attn.attn.bind_kv_cache(key_cache, value_cache)
            except (TypeError, ValueError) as e:
                raise ValueError(f"kv_caches[{i}]: {e}") from None
        self.use_native_stack()

    def attach_blocks(self, blocks: dict[str, PackedBlocks], arithmetic: str = "fp32") -> int:
        """Runs every projection whose checkpoint tensors all have blocks on those blocks
        (``xllm.ops.blocks``), releasing its dense weight; returns how many layers switched.

        Call after ``load_weights`` (biases and norms still come from the dense checkpoint).
        A fused projection switches only when all its parts share one block format.
        ``arithmetic``: ``fp32`` (exact), ``int8`` or ``int16`` (activations quantized to 8 or
        16 bits per block of 32; ``BlockLinearWeight``).
        """
        if self.dtype != torch.float32:
            raise ValueError(f"block weights compute in fp32; the model is {self.dtype}")
        switched = 0
        for module_name, module in self.named_modules():
            if not isinstance(module, Linear):
                continue
            if isinstance(module, MergedLinear):
                parent = module_name.rpartition(".")[0]
                names = [f"{parent}.{shard}.weight" for shard in module.shard_names]
            else:
                names = [f"{module_name}.weight"]
            parts = [blocks.get(n) for n in names]
            if any(p is None for p in parts) or len({p.format for p in parts}) != 1:
                continue
            module.use_blocks(BlockLinearWeight(concat_rows(parts), module.bias, arithmetic))
            switched += 1
        head_name = "model.embed_tokens.weight" if self.lm_head.tied else "lm_head.weight"
        head = blocks.get(head_name)
        if head is not None:
            # int8 too: faster than the packed bf16 rows at every batch size, on the
            # avx512_bf16 level (VNNI against VDPBF16PS) as on amx (the demo's 49152 x 576
            # head at 64 rows: 5.8 against 17.8 ms, 2.1 against 3.0).
            self.lm_head.use_blocks(BlockLinearWeight(head, arithmetic=arithmetic))
            if not self.lm_head.tied:
                self.lm_head.weight = nn.Parameter(torch.empty(0), requires_grad=False)
            switched += 1
        return switched

    def attach_rows(self, fmt: str) -> int:
        """Runs every projection (and the LM head) whose input size suits the kernels on its
        own weight as plain ``bf16`` or ``f32`` rows (``xllm.ops.blocks``), which lets the
        native stack run any checkpoint; returns how many switched. ``bf16`` is exact only
        for a bf16 checkpoint's values; ``bf16_gemm`` multiplies in bf16 (fp32 sums). Call
        after ``load_weights``."""
        if self.dtype != torch.float32:
            raise ValueError(f"row weights compute in fp32; the model is {self.dtype}")
        switched = 0
        for module in self.modules():
            if isinstance(module, SparseMoE) and module.native is None:
                switched += module.use_rows(fmt)
            if isinstance(module, Linear) and module.blocks is None and (
                    module.in_features % BLOCK == 0):
                module.use_blocks(BlockLinearWeight.from_rows(module.weight, fmt, module.bias))
                switched += 1
        head = self.lm_head
        if head.blocks is None and head.table.shape[1] % BLOCK == 0:
            head.use_blocks(BlockLinearWeight.from_rows(head.table, fmt))
            if not head.tied:
                head.weight = nn.Parameter(torch.empty(0), requires_grad=False)
            switched += 1
        return switched

    def _checkpoint_maps(self) -> tuple[dict[str, torch.Tensor],
                                        dict[str, tuple[torch.Tensor, list[str], list[int]]],
                                        set[str]]:
        """(checkpoint name -> destination (a parameter, or a fused one's row-range view);
        transformers' fused expert names -> (destination, the names they stand for, the
        experts taken); the tensors this rank leaves to others (other ranks' experts))."""
        expected: dict[str, torch.Tensor] = {}
        aliases: dict[str, tuple[torch.Tensor, list[str], list[int]]] = {}
        skip: set[str] = set()
        for module_name, module in self.named_modules():
            prefix = f"{module_name}." if module_name else ""
            if isinstance(module, SparseMoE):
                moe_expected, moe_aliases, moe_skip = module.checkpoint_tensors(prefix)
                expected.update(moe_expected)
                aliases.update(moe_aliases)
                skip |= moe_skip
                continue
            for pname, param in module.named_parameters(recurse=False):
                if isinstance(module, MergedLinear):
                    parent = module_name.rpartition(".")[0]
                    for i, shard_name in enumerate(module.shard_names):
                        hf_name = f"{parent}.{shard_name}.{pname}"
                        expected[hf_name] = module.shard(pname, i)
                else:
                    expected[prefix + pname] = param
        return expected, aliases, skip

    def moe_layers(self) -> list[SparseMoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, SparseMoE)]

    def expert_counts(self) -> np.ndarray:
        """[MoE layers, experts] int64: tokens routed to each logical expert since start."""
        layers = self.moe_layers()
        if not layers:
            return np.zeros((0, 0), dtype=np.int64)
        return np.stack([m.counts.numpy().copy() for m in layers])

    def apply_placement(self, phy2log: np.ndarray) -> int:
        """Moves every MoE layer's experts to a new placement (expert parallelism), reading
        the experts this rank gains from the checkpoint; returns how many it read."""
        from xllm.loader.hf import read_tensors

        if self.placement is None:
            raise ValueError("the model does not run with expert parallelism")
        if self.checkpoint_dir is None:
            raise ValueError("set checkpoint_dir: new experts are read from the checkpoint")
        placement = Placement(np.asarray(phy2log, dtype=np.int64), self.config.num_experts,
                              self.tp.size)
        if placement.phy2log.shape != self.placement.phy2log.shape:
            raise ValueError(f"placement {placement.phy2log.shape} does not fit "
                             f"{self.placement.phy2log.shape}")
        layers = list(zip(self.moe_layers(), placement.phy2log, strict=True))
        names = [n for m, row in layers for n in m.names_to_gain(row)]
        got = read_tensors(self.checkpoint_dir, names) if names else {}  # one pass, all layers
        read = sum(m.set_placement(row, got) for m, row in layers)
        self.placement = placement
        return read

    def shard_specs(self) -> dict[str, Slice]:
        """Checkpoint name -> the slice of it this rank holds, for every tensor that tensor
        parallelism splits (none without it; norms are whole on every rank)."""
        if not self.tp.enabled:
            return {}
        cfg, tp = self.config, self.tp
        hd, hidden = cfg.head_dim, cfg.hidden_size
        start, stop, rows = vocab_shard(cfg.vocab_size, tp)
        vocab = Slice(0, start, stop, cfg.vocab_size, pad_to=rows)
        specs = {"model.embed_tokens.weight": vocab, "lm_head.weight": vocab}
        m0, m1 = mlp_shard(cfg.intermediate_size, tp)
        inter = cfg.intermediate_size
        for i, layer in enumerate(self.model.layers):
            a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
            if isinstance(layer.self_attn, MLAttention):
                specs.update(layer.self_attn.shard_specs(a))
            else:
                sh = layer.self_attn.shard
                q = Slice(0, sh.q_start * hd, (sh.q_start + sh.num_heads) * hd, cfg.q_size)
                kv = Slice(0, sh.kv_start * hd, (sh.kv_start + sh.num_kv_heads) * hd,
                           cfg.kv_size)
                for kind in ("weight", "bias"):
                    specs.update({f"{a}q_proj.{kind}": q, f"{a}k_proj.{kind}": kv,
                                  f"{a}v_proj.{kind}": kv})
                specs[f"{a}o_proj.weight"] = Slice(1, q.start, q.stop, cfg.q_size)
                # A row-parallel bias joins the sum once: rank 0 adds it.
                specs[f"{a}o_proj.bias"] = Slice(0, 0, hidden, hidden, zero=tp.rank != 0)
            mlp = Slice(0, m0, m1, inter)
            for kind in ("weight", "bias"):
                specs.update({f"{m}gate_proj.{kind}": mlp, f"{m}up_proj.{kind}": mlp})
            specs[f"{m}down_proj.weight"] = Slice(1, m0, m1, inter)
            specs[f"{m}down_proj.bias"] = Slice(0, 0, hidden, hidden, zero=tp.rank != 0)
            if cfg.n_shared_experts and i in cfg.sparse_layers:  # split as a dense MLP
                full = cfg.moe_intermediate_size * cfg.n_shared_experts
                s0, s1 = mlp_shard(full, tp)
                s = f"{m}shared_experts."
                specs.update({f"{s}gate_proj.weight": Slice(0, s0, s1, full),
                              f"{s}up_proj.weight": Slice(0, s0, s1, full),
                              f"{s}down_proj.weight": Slice(1, s0, s1, full)})
        return specs

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fills every parameter from (Hugging Face name, tensor) pairs, converting dtype.

        A tensor may also be a safetensors slice (``iter_weights(lazy=True)``): a rank then
        reads only its share of it (``shard_specs``). Raises ValueError for a tensor of the
        wrong shape, an unknown name, a name seen twice, or any expected tensor the
        checkpoint lacks. With tied embeddings a checkpoint's lm_head.weight (transformers'
        state_dict has it) is checked and skipped.
        """
        expected, aliases, skip = self._checkpoint_maps()
        specs = self.shard_specs()
        loaded: set[str] = set()
        tied = self.lm_head.tied
        extra = self._extra_layers()
        for name, tensor in weights:
            if name.endswith(_IGNORED_SUFFIXES) or name.startswith(extra):
                continue
            name = name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's checkpoints
            if name in skip:  # another rank's expert: not read
                continue
            if name in aliases:  # transformers' fused experts (its in-memory state_dict)
                target, covered, experts = aliases[name]
                if loaded.intersection(covered):
                    raise ValueError(f"checkpoint tensor {name!r} overlaps tensors seen before")
                full = tensor if isinstance(tensor, torch.Tensor) else tensor[:]
                if len(experts) != full.shape[0]:
                    full = full[experts]
                copy_checked(target, full, name)
                loaded.update(covered)
                continue
            if tied and name == "lm_head.weight":
                want = (self.config.vocab_size, self.config.hidden_size)
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else tuple(
                    tensor.get_shape())
                if shape != want:
                    raise ValueError(
                        f"checkpoint tensor 'lm_head.weight' has shape {shape}, but "
                        f"the model expects {want}"
                    )
                continue
            target = expected.get(name)
            if target is None:
                raise ValueError(
                    f"checkpoint tensor {name!r} does not belong to {self.config.architecture} "
                    f"with this config (e.g. a bias the config does not enable); expected names "
                    f"look like {next(iter(expected), '')!r}"
                )
            if name in loaded:
                raise ValueError(f"checkpoint tensor {name!r} appears twice")
            spec = specs.get(name)
            if spec is not None:
                part = spec.take(tensor, name)
            else:
                part = tensor if isinstance(tensor, torch.Tensor) else tensor[:]
            copy_checked(target, part, name)
            loaded.add(name)
        missing = [n for n in expected if n not in loaded]
        if missing:
            shown = ", ".join(repr(n) for n in missing[:8])
            more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
            raise ValueError(
                f"checkpoint lacks {len(missing)} tensor(s) the model needs: {shown}{more}"
            )
        for module in self.modules():
            if isinstance(module, MLAttention):
                module.finish_loading()

    def _extra_layers(self) -> tuple[str, ...]:
        """Prefixes of checkpoint layers past num_hidden_layers that are not part of the model:
        DeepSeek-V3's multi-token-prediction layers (num_nextn_predict_layers), which
        speculative decoding would use and plain decoding does not (transformers skips them
        too)."""
        cfg = self.config
        n = int(cfg.raw.get("num_nextn_predict_layers") or 0) if cfg.mla else 0
        layers = cfg.num_hidden_layers
        return tuple(f"model.layers.{i}." for i in range(layers, layers + n))


class MistralForCausalLM(LlamaForCausalLM):
    """Llama layers; no biases; a sliding window on every layer when set."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama layers with q/k/v bias (set by ModelConfig for this architecture)."""


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Llama layers with per-head RMSNorm on q and k before rope, and explicit head_dim."""


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    """Qwen3 attention (q/k norm) with mixture-of-experts MLPs (xllm.layers.moe) on the
    layers ModelConfig.sparse_layers lists, dense ones elsewhere."""


class MixtralForCausalLM(LlamaForCausalLM):
    """Mistral attention with a mixture of experts in every layer (top-k renormalized)."""


class DeepseekV2ForCausalLM(LlamaForCausalLM):
    """Multi-head latent attention (xllm.layers.mla) with the first ``first_k_dense_replace``
    layers dense and the rest routed experts plus shared experts (softmax routing, greedy or
    group-limited)."""


class DeepseekV3ForCausalLM(LlamaForCausalLM):
    """DeepSeek-V2's layers with V3's router: sigmoid scores, a correction bias for the
    choice, groups ranked by their best two scores."""
