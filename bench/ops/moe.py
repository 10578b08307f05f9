"""Mixture-of-experts layer: the native experts (``_C.MoeExperts``) against the torch loop
over experts (``xllm.layers.moe.moe_reference``, the shape of transformers' eager experts).

The reference routes in torch (softmax over the experts, top-k), the native side in one call
(``_C.moe_route``) and then runs the experts in one call on f32 rows (the same fp32
arithmetic as the reference). Shapes: a Qwen3-MoE-like layer (64 experts, top 8, hidden
1024, expert 384) and a Mixtral-like one (8 experts, top 2, hidden 1024, expert 2048), at 1,
16 and 256 tokens (decode, a batch, a prompt chunk). Target (issue 16): at least 3x.
``extra``: the native experts on bf16_gemm rows and on Q8_0 blocks quantized at load (int8
arithmetic: ``--weight-format int8`` on a checkpoint without GGUF blocks), and the torch loop
in bf16 (what a bf16 checkpoint's torch path runs).
"""

from __future__ import annotations

import math

import torch

from bench.ops.common import Row, compare, per_call_seconds
from xllm.layers.moe import RouterSpec, moe_reference, route, route_native

SHAPES = {  # name -> (experts, top_k, hidden, expert intermediate)
    "qwen3-moe-like": (64, 8, 1024, 384),
    "mixtral-like": (8, 2, 1024, 2048),
}


def _experts(fmt: str, w13: torch.Tensor, w2: torch.Tensor):  # noqa: ANN202
    from xllm import _C
    from xllm.ops.blocks import BlockLinearWeight

    return _C.MoeExperts([BlockLinearWeight.from_rows(w, fmt).native for w in w13],
                         [BlockLinearWeight.from_rows(w, fmt).native for w in w2])


def run(quick: bool = False) -> list[Row]:
    rows = []
    shapes = {"qwen3-moe-like": SHAPES["qwen3-moe-like"]} if quick else SHAPES
    for name, (e, k, h, i) in shapes.items():
        gen = torch.Generator().manual_seed(0)
        router = torch.randn(e, h, generator=gen) / math.sqrt(h)
        w13 = torch.randn(e, 2 * i, h, generator=gen) / math.sqrt(h)
        w2 = torch.randn(e, h, i, generator=gen) / math.sqrt(i)
        w13_bf16, w2_bf16 = w13.bfloat16(), w2.bfloat16()
        native = _experts("f32", w13, w2)
        gemm = _experts("bf16_gemm", w13, w2)
        q8 = _experts("q8_0", w13, w2)
        for t in ((1, 16) if quick else (1, 16, 256)):
            x = torch.randn(t, h, generator=gen)
            out = torch.empty(t, h)

            def ours(experts=native, x=x, out=out, router=router, k=k) -> torch.Tensor:  # noqa: ANN001
                ids, w = route_native(x @ router.t(), RouterSpec(k, renormalize=True))
                experts.forward(x, ids, w, out)
                return out

            def reference(x=x, w13=w13, w2=w2, router=router, k=k) -> torch.Tensor:  # noqa: ANN001
                ids, w = route(x.float() @ router.t(), k, True)
                return moe_reference(x, ids, w, w13, w2)

            torch.testing.assert_close(ours(), reference(), atol=1e-4, rtol=1e-4)
            row = compare("moe", f"{name} T={t}", ours, reference,
                          "torch loop over the active experts (moe_reference), fp32",
                          min_ratio=3.0)
            row.extra["bf16_gemm_s"] = per_call_seconds(lambda g=gemm: ours(g))
            row.extra["q8_0_int8_s"] = per_call_seconds(lambda g=q8: ours(g))
            # torch in bf16 (oneDNN's bf16 matmuls): the loop a bf16 checkpoint would run
            xb = x.bfloat16()
            row.extra["torch_bf16_loop_s"] = per_call_seconds(
                lambda xb=xb, a=w13_bf16, b=w2_bf16: reference(xb, a, b))
            row.extra["experts_with_tokens"] = int(route(x @ router.t(), k, True)[0]
                                                   .unique().numel())
            rows.append(row)
    return rows
