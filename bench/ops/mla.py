"""Multi-head latent attention, decode: the absorbed form xllm runs (``xllm.layers.mla``: W_UK
folded into the query, paged attention over one latent row per token, W_UV after the sum)
against recomputing every head's K and V from the cached latents each step (what
transformers' DeepSeek attention does with its cache of latents).

Both start from the step's query heads and the cached latents + rope keys, and end with the
value outputs [B, H * dv] (before o_proj). Shapes: DeepSeek-V2-Lite's attention (16 heads,
latent 512, rope 64, nope 128, value 128) and V3's head count (128), contexts 1k and 4k,
1 and 4 sequences. Target (issue 16): at least 2x at 4k context.

``extra`` also records the KV bytes per token per layer: the latent row against the same
model's expanded per-head K and V (what an MHA cache of that model would hold).
"""

from __future__ import annotations

import math

import torch

from bench.ops.common import Row, compare
from xllm.ops.attention import paged_attention_decode

SHAPES = {  # name -> (heads, kv_lora_rank, rope, nope, v)
    "v2-lite-like": (16, 512, 64, 128, 128),
    "v3-heads": (128, 512, 64, 128, 128),
}
BLOCK = 16


def run(quick: bool = False) -> list[Row]:
    rows = []
    shapes = {"v2-lite-like": SHAPES["v2-lite-like"]} if quick else SHAPES
    cases = ((1, 1024), (1, 4096)) if quick else ((1, 1024), (1, 4096), (4, 4096))
    for name, (h, c, dr, dn, dv) in shapes.items():
        gen = torch.Generator().manual_seed(0)
        kv_b = torch.randn(h * (dn + dv), c, generator=gen) / math.sqrt(c)
        w = kv_b.view(h, dn + dv, c)
        w_uk, w_uv_t = w[:, :dn], w[:, dn:].transpose(1, 2)
        w_uk_t_full = w[:, :dn].reshape(h * dn, c).t().contiguous()  # latent -> all nope keys
        w_uv_t_full = w[:, dn:].reshape(h * dv, c).t().contiguous()  # latent -> all values
        scale = (dn + dr) ** -0.5
        for b, ctx in cases:
            if b * ctx * h > 4096 * 128:
                continue  # the recompute side would rebuild over 2 GB of K/V per step
            blocks = b * ctx // BLOCK
            cache = torch.randn(blocks + 1, 1, BLOCK, c + dr, generator=gen)
            tables = torch.arange(1, blocks + 1, dtype=torch.int32).view(b, ctx // BLOCK)
            seq_lens = torch.full((b,), ctx, dtype=torch.int32)
            q = torch.randn(b, h, dn + dr, generator=gen)
            query = torch.empty(b, h, c + dr)
            out = torch.empty(b, h, c + dr)

            def absorbed(q=q, query=query, out=out, cache=cache, tables=tables,
                         seq_lens=seq_lens, w_uk=w_uk, w_uv_t=w_uv_t, c=c, b=b,
                         h=h, dn=dn, dv=dv, scale=scale) -> torch.Tensor:  # noqa: ANN001
                query[:, :, :c].copy_(torch.bmm(q[:, :, :dn].transpose(0, 1), w_uk)
                                      .transpose(0, 1))
                query[:, :, c:].copy_(q[:, :, dn:])
                paged_attention_decode(query, cache, cache, tables, seq_lens, scale, out=out)
                o = torch.bmm(out[:, :, :c].transpose(0, 1), w_uv_t)
                return o.transpose(0, 1).reshape(b, h * dv)

            def recompute(q=q, cache=cache, tables=tables, w_uk_t=w_uk_t_full,
                          w_uv_t=w_uv_t_full, c=c, b=b, h=h, dn=dn, dr=dr, dv=dv,
                          ctx=ctx, scale=scale) -> torch.Tensor:  # noqa: ANN001
                outs = []
                for i in range(b):
                    rows = cache[tables[i].long(), 0].reshape(ctx, c + dr)
                    latent, k_pe = rows[:, :c], rows[:, c:]
                    k_nope = (latent @ w_uk_t).view(ctx, h, dn)
                    v = (latent @ w_uv_t).view(ctx, h, dv)
                    k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(ctx, h, dr)], -1)
                    o = torch.nn.functional.scaled_dot_product_attention(
                        q[i].unsqueeze(1), k.transpose(0, 1), v.transpose(0, 1), scale=scale)
                    outs.append(o.reshape(1, h * dv))
                return torch.cat(outs)

            torch.testing.assert_close(absorbed(), recompute(), atol=2e-4, rtol=2e-4)
            row = compare("mla_decode", f"{name} B={b} ctx={ctx}", absorbed, recompute,
                          "recomputing every head's K/V from the latents (torch matmuls + "
                          "SDPA)", min_ratio=2.0 if ctx >= 4096 else None,
                          min_time=0.2, repeat=3)
            row.extra["kv_bytes_per_token_layer_fp32"] = {"latent": 4 * (c + dr),
                                                          "expanded_mha": 4 * h * (dn + dr + dv)}
            rows.append(row)
    return rows
