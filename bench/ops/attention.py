"""Paged attention benchmark: the native CPU kernels against what a torch-only engine does.

Without a paged kernel, every decode step must gather each sequence's blocks into
contiguous K/V tensors (index the block tables) and then call
``torch.nn.functional.scaled_dot_product_attention``. That gather + SDPA is the
baseline; GQA is handled by ``enable_gqa=True`` or by ``repeat_interleave`` of the
gathered K/V, whichever is faster for the shape (measured first, both kept in
``extra``). ``extra["sdpa_only_s"]`` is SDPA alone on K/V gathered beforehand: the
part of the baseline that is attention proper.

Blocks are handed out in shuffled order, as in a cache that has run for a while,
and block 0 is the null block; the KV cache is float32 unless the row says bf16.
The native side is timed through the public op (``xllm.ops.attention``), so the
dispatcher and argument checks are part of its time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bench.ops.common import Row, compare, per_call_seconds
from xllm import _C
from xllm.ops import attention as ops
from xllm.ops.kv_cache import dequantize_rows, quantize_rows

BLOCK_SIZE = 16
# name -> (num_heads, num_kv_heads, head_size)
MODELS = {"SmolLM2-135M": (9, 3, 64), "Llama-3-8B": (32, 8, 128)}
DECODE_GRID = [(1, 128), (1, 1024), (1, 4096), (16, 512), (16, 2048), (64, 128), (64, 1024)]
# Shapes that only fit the time and memory budget for the small model.
DECODE_EXTRA = {"SmolLM2-135M": [(64, 4096)]}
QUICK_DECODE = [("SmolLM2-135M", 1, 128), ("SmolLM2-135M", 16, 512), ("Llama-3-8B", 1, 1024)]
BASELINE = "gather paged KV (index block tables) + torch SDPA"


class Paged:
    """A batch of sequences in a freshly filled paged cache."""

    def __init__(
        self,
        batch: int,
        lens: list[int],
        heads: tuple[int, int, int],
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.num_heads, self.num_kv_heads, self.head_size = heads
        self.lens = lens
        self.block_size = block_size
        self.width = max((n + block_size - 1) // block_size for n in lens)
        num_blocks = batch * self.width + 1
        shape = (num_blocks, self.num_kv_heads, block_size, self.head_size)
        self.key_cache, self.value_cache = (
            quantize_rows(x) if dtype == torch.int8 else x.to(dtype)
            for x in (torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)))
        # Shuffled block ids 1.. (0 is the null block), one row per sequence.
        order = torch.randperm(num_blocks - 1, generator=gen) + 1
        self.block_tables = order.view(batch, self.width).to(torch.int32)
        self.seq_lens = torch.tensor(lens, dtype=torch.int32)
        # What a torch engine keeps next to its int32 tables for indexing.
        self.block_ids = self.block_tables.flatten().long()

    def gather(self, cache: torch.Tensor) -> torch.Tensor:
        """[batch, kv_heads, width * block_size, head_size] float32, padded past each length."""
        batch = self.block_tables.shape[0]
        blocks = cache.index_select(0, self.block_ids)  # [batch * width, kv, bs, hs]
        row = cache.shape[-1]  # head_size, + 4 for int8 rows
        blocks = blocks.view(batch, self.width, self.num_kv_heads, self.block_size, row)
        kv = blocks.transpose(1, 2).reshape(batch, self.num_kv_heads, -1, row)
        if kv.dtype == torch.int8:
            return dequantize_rows(kv)
        return kv if kv.dtype == torch.float32 else kv.float()


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, gqa: str, **kwargs
) -> torch.Tensor:
    """q: [b, heads, q_len, hs]; k/v: [b, kv_heads, ctx, hs]."""
    if gqa == "enable_gqa":
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True, **kwargs)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, scale=scale, **kwargs)


def _pick_gqa(make_step) -> tuple[str, dict[str, float]]:
    """Times one baseline variant per GQA strategy briefly; returns the faster and both times."""
    times = {
        g: per_call_seconds(make_step(g), min_time=0.02, repeat=2, warmup=1)
        for g in ("enable_gqa", "repeat_interleave")
    }
    return min(times, key=times.__getitem__), times


def _sdpa_only_seconds(p: Paged, q4: torch.Tensor, ctx: int, scale: float, gqa: str) -> float:
    """SDPA alone, on K/V gathered once beforehand (freed on return)."""
    k = p.gather(p.key_cache)[:, :, :ctx].contiguous()
    v = p.gather(p.value_cache)[:, :, :ctx].contiguous()
    return per_call_seconds(lambda: _sdpa(q4, k, v, scale, gqa), min_time=0.02, repeat=3, warmup=1)


def _timer_kwargs(bytes_per_call: int) -> dict:
    # Large shapes take tens of ms per call; fewer, shorter rounds keep the suite bounded.
    return {"repeat": 3, "warmup": 1} if bytes_per_call > (256 << 20) else {}


def decode_row(model: str, batch: int, ctx: int, dtype: torch.dtype = torch.float32) -> Row:
    heads = MODELS[model]
    p = Paged(batch, [ctx] * batch, heads, dtype)
    scale = 1.0 / math.sqrt(p.head_size)
    query = torch.randn(batch, p.num_heads, p.head_size)
    out = torch.empty(batch, p.num_heads, p.head_size)
    q4 = query.unsqueeze(2)

    def native() -> None:
        ops.paged_attention_decode(
            query, p.key_cache, p.value_cache, p.block_tables, p.seq_lens, scale, out=out
        )

    def baseline_for(gqa: str):
        def step() -> torch.Tensor:
            k = p.gather(p.key_cache)[:, :, :ctx]
            v = p.gather(p.value_cache)[:, :, :ctx]
            return _sdpa(q4, k, v, scale, gqa)

        return step

    # The native result must match the baseline before either is timed.
    native()
    torch.testing.assert_close(out, baseline_for("enable_gqa")().squeeze(2), rtol=1e-4, atol=1e-4)
    gqa, variants = _pick_gqa(baseline_for)
    sdpa_only = _sdpa_only_seconds(p, q4, ctx, scale, gqa)
    kv_bytes = 2 * batch * ctx * p.num_kv_heads * p.head_size * p.key_cache.element_size()
    dt = "bf16 cache" if dtype == torch.bfloat16 else "fp32 cache"
    row = compare(
        "paged_attention_decode",
        f"{model} h{p.num_heads}/kv{p.num_kv_heads}/d{p.head_size} batch {batch} ctx {ctx} {dt}",
        native,
        baseline_for(gqa),
        f"{BASELINE} ({gqa})",
        min_ratio=2.0,
        **_timer_kwargs(kv_bytes),
    )
    row.extra = {
        "sdpa_only_s": sdpa_only,
        "baseline_variants_s": variants,
        "kv_bytes": kv_bytes,
        "native_gb_per_s": kv_bytes / row.native_s / 1e9,
    }
    row.note = (
        f"SDPA alone on pre-gathered KV: {sdpa_only * 1e3:.3f} ms "
        f"({sdpa_only / row.native_s:.2f}x native)"
    )
    return row


def prefill_row(model: str, q_len: int, cached: int) -> Row:
    heads = MODELS[model]
    ctx = cached + q_len
    p = Paged(1, [ctx], heads)
    scale = 1.0 / math.sqrt(p.head_size)
    query = torch.randn(q_len, p.num_heads, p.head_size)
    out = torch.empty_like(query)
    starts = torch.tensor([0, q_len], dtype=torch.int32)
    q4 = query.transpose(0, 1).unsqueeze(0)  # [1, heads, q_len, hs]
    # Query row i sits at position cached + i; SDPA's is_causal aligns top-left, so a
    # chunk after cached tokens needs an explicit mask (built once, outside the timing).
    allowed = torch.arange(ctx)[None, :] <= (cached + torch.arange(q_len))[:, None]
    mask = {"is_causal": True} if cached == 0 else {"attn_mask": allowed}

    def native() -> None:
        ops.paged_attention_prefill(
            query, p.key_cache, p.value_cache, p.block_tables, starts, p.seq_lens, scale, out=out
        )

    def baseline_for(gqa: str):
        def step() -> torch.Tensor:
            k = p.gather(p.key_cache)[:, :, :ctx]
            v = p.gather(p.value_cache)[:, :, :ctx]
            return _sdpa(q4, k, v, scale, gqa, **mask)

        return step

    native()
    expected = baseline_for("enable_gqa")()[0].transpose(0, 1)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    gqa, variants = _pick_gqa(baseline_for)
    what = f"{q_len}-token prompt" if cached == 0 else f"{q_len}-token chunk after {cached} cached"
    row = compare(
        "paged_attention_prefill",
        f"{model} h{p.num_heads}/kv{p.num_kv_heads}/d{p.head_size} {what}",
        native,
        baseline_for(gqa),
        f"{BASELINE} causal ({gqa})",
    )
    row.extra = {"baseline_variants_s": variants}
    row.note = "no target; reported for reference"
    return row


def isa_row(model: str, batch: int, ctx: int, dtype: torch.dtype, layers: int = 1,
            block_size: int = BLOCK_SIZE) -> Row:
    """Decode on the best ISA level this CPU has against the AVX2 level, alternating.

    With ``layers`` > 1 a call is a whole step's attention: one cache per layer, each
    read once, so the KV streams from memory as in an engine (one layer's cache of a
    small batch otherwise stays in cache from one timing round to the next)."""
    best = _C.detected_isa()
    heads = MODELS[model]
    caches = [Paged(batch, [ctx] * batch, heads, dtype, seed=i, block_size=block_size)
              for i in range(layers)]
    p = caches[0]
    scale = 1.0 / math.sqrt(p.head_size)
    query = torch.randn(batch, p.num_heads, p.head_size)
    out = torch.empty(batch, p.num_heads, p.head_size)

    def at(isa: str):
        def step() -> None:
            _C.set_cpu_isa(isa)
            for c in caches:
                ops.paged_attention_decode(
                    query, c.key_cache, c.value_cache, c.block_tables, c.seq_lens, scale, out=out
                )
        return step

    try:
        at("avx2")()
        expected = out.clone()
        at(best)()
        # On an int8 cache the AVX-512 kernels round the query to int8 (kernels_avx512.cpp),
        # which the AVX2 ones do not: the two agree within that rounding.
        close = 3e-2 if dtype == torch.int8 else 1e-4
        torch.testing.assert_close(out, expected, rtol=close, atol=close)
        kv_bytes = (layers * 2 * batch * ctx * p.num_kv_heads * p.key_cache.shape[-1]
                    * p.key_cache.element_size())
        dt = {torch.bfloat16: "bf16 cache", torch.int8: "int8 cache"}.get(dtype, "fp32 cache")
        where = f", {layers} layers" if layers > 1 else ""
        if block_size != BLOCK_SIZE:
            where += f", {block_size}-token blocks"
        row = compare(
            "paged_attention_decode",
            f"{model} h{p.num_heads}/kv{p.num_kv_heads}/d{p.head_size} batch {batch} ctx {ctx} "
            f"{dt}{where}: {best} kernels",
            at(best), at("avx2"), "the same op at the avx2 level", **_timer_kwargs(kv_bytes))
    finally:
        _C.set_cpu_isa(best)
    row.extra = {"kv_bytes": kv_bytes, "native_gb_per_s": kv_bytes / row.native_s / 1e9,
                 "avx2_gb_per_s": kv_bytes / row.reference_s / 1e9}
    row.note = (f"{row.extra['native_gb_per_s']:.1f} against {row.extra['avx2_gb_per_s']:.1f} "
                "GB/s of KV")
    return row


def run(quick: bool) -> list[Row]:
    rows: list[Row] = []
    if quick:
        for model, batch, ctx in QUICK_DECODE:
            rows.append(decode_row(model, batch, ctx))
        rows.append(prefill_row("SmolLM2-135M", 128, 0))
        return rows
    for model in MODELS:
        for batch, ctx in DECODE_GRID + DECODE_EXTRA.get(model, []):
            rows.append(decode_row(model, batch, ctx))
    # bf16 storage halves the bytes streamed; the baseline widens after gathering.
    rows.append(decode_row("Llama-3-8B", 16, 2048, torch.bfloat16))
    for model in MODELS:
        rows.append(prefill_row(model, 512, 0))
        rows.append(prefill_row(model, 256, 1024))
    return rows
