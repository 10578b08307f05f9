"""Multi-head latent attention (DeepSeek-V2/V3), absorbed: the paged cache holds one row per
token, not per head.

transformers computes, per head h and token t (c = kv_lora_rank, dn/dr/dv = the nope, rope and
value head sizes):

    latent[t]  = RMSNorm(kv_a[t, :c]),   k_pe[t] = rope(kv_a[t, c:])      (shared by all heads)
    k[t, h]    = [W_UK[h] @ latent[t] | k_pe[t]],   v[t, h] = W_UV[h] @ latent[t]
    out[t, h]  = softmax_s(q[t, h] . k[:, h]) @ v[:, h]

with W_UK [H, dn, c] and W_UV [H, dv, c] the rows of ``kv_b_proj``. Since
``q_nope . (W_UK latent) = (W_UK^T q_nope) . latent``, the weight is absorbed into the query
instead: each head's query becomes ``[W_UK[h]^T q_nope[t, h] | q_pe[t, h]]`` (c + dr), every head
attends to the same cache rows ``[latent | k_pe]`` (one KV head, so the GQA kernels read each
row once for all heads), and the value side takes the first c columns of the output and applies
W_UV after the sum. The cache row is both the key and the value of ``PagedAttention`` (the
value's rope tail is computed and dropped: dr / (c + dr) of the value work, 11% at DeepSeek's
sizes). Decode therefore reads c + dr numbers per cached token instead of H * (dn + dr + dv):
576 against 40960 for DeepSeek-V3 (``kv_cache_geometry``).

Rope: DeepSeek-V2 (and V3 with ``rope_interleave``) rotates interleaved pairs. The q and k rope
rows are permuted at load (``finish_loading``) to the halves layout the rotary kernels use;
scores are sums over the same dimensions in another order, so nothing else changes.

Prefill uses the same absorbed form (one code path and one cache format); its attention costs
(c + dr) / (dn + dr) times the expanded form's multiply-adds, which matters only for long
prompts.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from xllm.layers.attention import PagedAttention
from xllm.layers.attn_metadata import AttentionMetadata
from xllm.layers.layernorm import RMSNorm
from xllm.layers.linear import Linear, MergedLinear
from xllm.layers.parallel import SINGLE, Slice, TensorParallel, head_shard
from xllm.layers.rotary import Rotation
from xllm.models.config import ModelConfig

__all__ = ["MLAttention", "mla_softmax_scale"]

_LATENT_NORM_EPS = 1e-6  # q_a_layernorm and kv_a_layernorm: transformers' default, not the config's


def mla_softmax_scale(config: ModelConfig) -> float:
    """(dn + dr)^-0.5, times yarn's mscale(factor, mscale_all_dim) squared where the rope is
    scaled (transformers' ``yarn_apply_mscale``; DeepSeek's reference does the same)."""
    scale = config.head_dim ** -0.5
    scaling = config.rope_scaling or {}
    all_dim = scaling.get("mscale_all_dim")
    factor = scaling.get("factor")
    if config.rope_type != "default" and all_dim and factor and factor > 1:
        m = 0.1 * all_dim * math.log(factor) + 1.0
        scale *= m * m
    return scale


def _halves(dim: int) -> torch.Tensor:
    """The order that takes interleaved pairs (x0, x1), (x2, x3), ... to halves (x0, x2, ...,
    x1, x3, ...)."""
    return torch.cat([torch.arange(0, dim, 2), torch.arange(1, dim, 2)])


class MLAttention(nn.Module):
    """DeepSeek's attention over a paged cache of latent rows; see the module docstring.

    Checkpoint names (``self_attn.``): q_a_proj, q_a_layernorm, q_b_proj (or q_proj when
    q_lora_rank is null), kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj.

    Tensor parallelism: a rank holds a share of the heads (their rows of q_b_proj and kv_b_proj,
    their columns of o_proj, whose partial outputs are summed) and the whole latent path
    (q_a, kv_a and their norms), so every rank caches the same latent rows.
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype,
                 tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.shard = head_shard(config.num_attention_heads, config.num_attention_heads, tp)
        self.tp = tp
        h = self.shard.num_heads
        c, dn, dr, dv = (config.kv_lora_rank, config.qk_nope_head_dim, config.qk_rope_head_dim,
                         config.v_head_dim)
        self.num_heads, self.num_kv_heads = h, 1
        self._total_heads = config.num_attention_heads
        self.kv_lora_rank, self.nope_dim, self.rope_dim, self.v_dim = c, dn, dr, dv
        self.q_lora_rank = config.q_lora_rank
        self.rope_interleave = config.rope_interleave
        bias = config.attention_bias
        q_out = h * (dn + dr)
        if self.q_lora_rank:
            # q_a and kv_a read the same input: one matmul.
            self.qkv_a_proj = MergedLinear(config.hidden_size, [self.q_lora_rank, c + dr],
                                           ("q_a_proj", "kv_a_proj_with_mqa"), bias=bias,
                                           dtype=dtype)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, _LATENT_NORM_EPS, dtype)
            self.q_b_proj = Linear(self.q_lora_rank, q_out, False, dtype)
        else:
            self.q_proj = Linear(config.hidden_size, q_out, False, dtype)
            self.kv_a_proj_with_mqa = Linear(config.hidden_size, c + dr, bias, dtype)
        self.kv_a_layernorm = RMSNorm(c, _LATENT_NORM_EPS, dtype)
        # Never multiplied as a whole: its rows are W_UK and W_UV (views below).
        self.kv_b_proj = nn.Module()
        self.kv_b_proj.weight = nn.Parameter(torch.empty(h * (dn + dv), c, dtype=dtype),
                                             requires_grad=False)
        self.o_proj = Linear(h * dv, config.hidden_size, bias, dtype, reduce=tp)
        self.attn = PagedAttention(h, 1, c + dr, scale=mla_softmax_scale(config))

    def shard_specs(self, prefix: str) -> dict[str, Slice]:
        """Checkpoint name -> this rank's slice, for the tensors tensor parallelism splits
        (``prefix``: "model.layers.N.self_attn.")."""
        h0, h1 = self.shard.q_start, self.shard.q_start + self.shard.num_heads
        total = self._total_heads
        q_head = self.nope_dim + self.rope_dim
        kv_head = self.nope_dim + self.v_dim
        q_name = "q_b_proj" if self.q_lora_rank else "q_proj"
        hidden = self.o_proj.out_features
        return {
            f"{prefix}{q_name}.weight": Slice(0, h0 * q_head, h1 * q_head, total * q_head),
            f"{prefix}kv_b_proj.weight": Slice(0, h0 * kv_head, h1 * kv_head, total * kv_head),
            f"{prefix}o_proj.weight": Slice(1, h0 * self.v_dim, h1 * self.v_dim,
                                            total * self.v_dim),
            # A row-parallel bias joins the sum once: rank 0 adds it.
            f"{prefix}o_proj.bias": Slice(0, 0, hidden, hidden, zero=self.tp.rank != 0),
        }

    @property
    def w_uk(self) -> torch.Tensor:
        """[H, dn, c]: a head's latent -> its nope key."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, -1)
        return w[:, : self.nope_dim]

    @property
    def w_uv_t(self) -> torch.Tensor:
        """[H, c, dv]: a head's attended latent -> its value output."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, -1)
        return w[:, self.nope_dim:].transpose(1, 2)

    def finish_loading(self) -> None:
        """Puts interleaved rope rows (of the q and kv_a projections) in halves order; called
        once the checkpoint is loaded."""
        if not self.rope_interleave:
            return
        dr, c = self.rope_dim, self.kv_lora_rank
        order = _halves(dr)
        per_head = self.nope_dim + dr
        q_rows = torch.arange(self.num_heads * per_head).view(self.num_heads, per_head)
        q_rows[:, self.nope_dim:] = q_rows[:, self.nope_dim:][:, order]
        q = self.q_b_proj if self.q_lora_rank else self.q_proj
        kv = self.qkv_a_proj if self.q_lora_rank else self.kv_a_proj_with_mqa
        kv_rows = torch.cat([torch.arange(c), c + order])
        with torch.no_grad():
            q.weight.copy_(q.weight[q_rows.view(-1)])
            for param in (kv.weight, kv.bias):  # kv_a's rows: after q_a's in the fused one
                if param is not None:
                    part = param[self.q_lora_rank:]
                    part.copy_(part[kv_rows])

    def forward(self, hidden: torch.Tensor, rope: Rotation,
                attn: AttentionMetadata) -> torch.Tensor:
        t = hidden.shape[0]
        h, c, dn, dr = self.num_heads, self.kv_lora_rank, self.nope_dim, self.rope_dim
        if self.q_lora_rank:
            qkv_a = self.qkv_a_proj(hidden)
            q = self.q_b_proj(self.q_a_layernorm(qkv_a[:, : self.q_lora_rank]))
            kv = qkv_a[:, self.q_lora_rank:]
        else:
            q = self.q_proj(hidden)
            kv = self.kv_a_proj_with_mqa(hidden)
        q = q.view(t, h, dn + dr)
        self.kv_a_layernorm.forward_inplace(kv[:, :c])
        rope(kv[:, c:].unsqueeze(1))
        # The absorbed query [latent part | rope part] per head.
        query = torch.empty(t, h, c + dr, dtype=q.dtype, device=q.device)
        lat = torch.bmm(q[:, :, :dn].transpose(0, 1), self.w_uk)  # [H, T, c]
        query[:, :, :c].copy_(lat.transpose(0, 1))
        query[:, :, c:].copy_(q[:, :, dn:])
        rope(query[:, :, c:])
        row = kv.unsqueeze(1)  # [T, 1, c + dr]: the cache row, as key and as value
        out = self.attn(query, row, row, attn)  # [T, H, c + dr]
        w_uv_t = self.w_uv_t
        o = torch.bmm(out[:, :, :c].transpose(0, 1).to(w_uv_t.dtype), w_uv_t)  # [H, T, dv]
        return self.o_proj(o.transpose(0, 1).reshape(t, h * self.v_dim))

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_lora_rank={self.kv_lora_rank}, "
                f"q_lora_rank={self.q_lora_rank}, nope={self.nope_dim}, rope={self.rope_dim}, "
                f"v={self.v_dim}, interleaved={self.rope_interleave}")

