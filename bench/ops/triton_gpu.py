"""Triton paged attention and KV cache write on CUDA against gather + torch SDPA / index_put.

    python -m bench.ops.triton_gpu [--quick]

Also usable as a suite (``run(quick) -> list[Row]``). Without a CUDA device it returns no
rows. Times come from ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls),
taken in alternating rounds so clock drift hits both sides alike; the baselines pay for
their gather/padding, as an engine without a paged kernel would.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable

import torch

from bench.ops.common import Row

_SDPA = "torch SDPA on gathered, padded KV"


def _time_pair(native, reference, rounds: int) -> tuple[float, float]:
    from triton.testing import do_bench

    native_ms, ref_ms = [], []
    for _ in range(rounds):
        native_ms.append(do_bench(native, warmup=10, rep=50))
        ref_ms.append(do_bench(reference, warmup=10, rep=50))
    return statistics.median(native_ms) / 1e3, statistics.median(ref_ms) / 1e3


def _paged_cache(
    lens: list[int], kv_heads: int, head: int, bs: int, dtype: torch.dtype, device: str
):
    per_seq = [(n + bs - 1) // bs for n in lens]
    width = max(per_seq)
    num_blocks = 1 + sum(per_seq)
    shape = (num_blocks, kv_heads, bs, head)
    kc = torch.randn(shape, dtype=dtype, device=device)
    vc = torch.randn(shape, dtype=dtype, device=device)
    ids = torch.randperm(num_blocks - 1) + 1
    table = torch.zeros(len(lens), width, dtype=torch.int32)
    used = 0
    for i, nb in enumerate(per_seq):
        table[i, :nb] = ids[used : used + nb].to(torch.int32)
        used += nb
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    return kc, vc, table.to(device), seq_lens


def _gather(cache: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """[S, kv_heads, width * block_size, head] for every sequence (padded with block 0)."""
    blocks = cache[table.long()]  # [S, width, kv_heads, bs, head]
    s, w, h, bs, d = blocks.shape
    return blocks.permute(0, 2, 1, 3, 4).reshape(s, h, w * bs, d)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


DECODE_SHAPES = [(1, 32, 8, 128, 8192), (8, 32, 8, 128, 2048), (64, 32, 8, 128, 1024)]
DECODE_SHAPES_FULL = [(256, 32, 8, 128, 512), (4, 64, 8, 128, 32768), (32, 32, 32, 128, 2048)]
PREFILL_SHAPES = [([2048], [0]), ([512] * 8, [0] * 8), ([256] * 4, [1024] * 4)]
PREFILL_SHAPES_FULL = [([4096], [0]), ([128] * 32, [0] * 32)]


def _check(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """The baseline must compute the same thing, or the ratio means nothing."""
    err = (got.float() - want.float()).abs().max().item()
    if not err < 5e-2:
        raise AssertionError(f"{what}: Triton and baseline differ by {err}")


TimePair = Callable[[Callable[[], object], Callable[[], object]], tuple[float, float]]


def _row(op: str, shape: str, native, reference, baseline: str, time_pair: TimePair) -> Row:
    t_native, t_ref = time_pair(native, reference)
    return Row(op, shape, t_native, t_ref, baseline, target=">= 1x", met=t_ref >= t_native)


def decode_row(shape: tuple, device: str, time_pair: TimePair) -> Row:
    """shape: (num_seqs, num_heads, num_kv_heads, head_size, longest context)."""
    from xllm.ops.triton import attention as tri

    seqs, heads, kv_heads, head, ctx = shape
    lens = [max(1, ctx - 37 * i) for i in range(seqs)]
    kc, vc, table, seq_lens = _paged_cache(lens, kv_heads, head, 16, torch.bfloat16, device)
    q = torch.randn(seqs, heads, head, dtype=torch.bfloat16, device=device)
    out = torch.empty_like(q)
    scale = head**-0.5
    positions = torch.arange(table.shape[1] * 16, device=device)
    mask = (positions[None, :] < seq_lens[:, None].long())[:, None, None, :]

    def native() -> None:
        tri.paged_attention_decode(out, q, kc, vc, table, seq_lens, scale)

    def reference() -> torch.Tensor:
        k, v = _gather(kc, table), _gather(vc, table)
        return _sdpa(q[:, :, None], k, v, mask)

    native()
    _check(out, reference()[:, :, 0], "decode")
    desc = f"seqs={seqs} heads={heads}/{kv_heads} d={head} ctx<={ctx} bf16"
    return _row("triton decode", desc, native, reference, _SDPA, time_pair)


def prefill_row(shape: tuple, device: str, time_pair: TimePair) -> Row:
    """shape: (query lengths, cached prefix lengths), one entry per sequence."""
    from xllm.ops.triton import attention as tri

    q_lens, prefixes = shape
    heads, kv_heads, head = 32, 8, 128
    lens = [q + p for q, p in zip(q_lens, prefixes, strict=True)]
    kc, vc, table, seq_lens = _paged_cache(lens, kv_heads, head, 16, torch.bfloat16, device)
    starts = torch.tensor([0, *q_lens], device=device).cumsum(0).to(torch.int32)
    q = torch.randn(int(starts[-1]), heads, head, dtype=torch.bfloat16, device=device)
    out = torch.empty_like(q)
    scale = head**-0.5
    num_seqs, q_max, kv_width = len(q_lens), max(q_lens), table.shape[1] * 16
    # Padded batch for SDPA: row j of sequence i sits at context position prefix_i + j.
    rows_idx = torch.cat([torch.arange(n) + i * q_max for i, n in enumerate(q_lens)]).to(device)
    q_pos = torch.tensor(prefixes, device=device)[:, None] + torch.arange(q_max, device=device)
    k_pos = torch.arange(kv_width, device=device)
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (
        k_pos[None, None, :] < seq_lens[:, None, None].long()
    )
    mask = mask[:, None]  # [S, 1, q_max, kv_width]

    def native() -> None:
        tri.paged_attention_prefill(out, q, kc, vc, table, starts, seq_lens, scale)

    def reference() -> torch.Tensor:
        padded = q.new_zeros(num_seqs * q_max, heads, head)
        padded[rows_idx] = q
        padded = padded.view(num_seqs, q_max, heads, head).transpose(1, 2)
        o = _sdpa(padded, _gather(kc, table), _gather(vc, table), mask)
        return o.transpose(1, 2).reshape(-1, heads, head)[rows_idx]

    native()
    _check(out, reference(), "prefill")
    desc = f"q_lens={q_lens[0]}x{num_seqs} prefix={prefixes[0]} heads={heads}/{kv_heads} d={head}"
    return _row("triton prefill", desc, native, reference, _SDPA, time_pair)


def write_row(tokens: int, device: str, time_pair: TimePair) -> Row:
    from xllm.ops.triton import attention as tri

    kv_heads, head, bs, num_blocks = 8, 128, 16, 4096
    kc = torch.zeros(num_blocks, kv_heads, bs, head, dtype=torch.bfloat16, device=device)
    vc = torch.zeros_like(kc)
    key = torch.randn(tokens, kv_heads, head, dtype=torch.bfloat16, device=device)
    value = torch.randn_like(key)
    slots = torch.randperm(num_blocks * bs, device=device)[:tokens]
    blocks, offsets = slots // bs, slots % bs

    def native() -> None:
        tri.write_kv_cache(key, value, kc, vc, slots)

    def reference() -> None:
        kc[blocks, :, offsets] = key
        vc[blocks, :, offsets] = value

    native()
    written = kc.clone()
    reference()
    _check(written, kc, "kv write")
    desc = f"tokens={tokens} heads={kv_heads} d={head} bf16"
    baseline = "torch index_put on precomputed (block, offset)"
    return _row("triton kv write", desc, native, reference, baseline, time_pair)


def run(quick: bool) -> list[Row]:
    if not torch.cuda.is_available():
        print("# triton_gpu: no CUDA device, nothing measured", flush=True)
        return []
    torch.manual_seed(0)

    def time_pair(native, reference) -> tuple[float, float]:
        return _time_pair(native, reference, 2 if quick else 3)

    decode = DECODE_SHAPES + ([] if quick else DECODE_SHAPES_FULL)
    prefill = PREFILL_SHAPES + ([] if quick else PREFILL_SHAPES_FULL)
    tokens = (64, 4096) if quick else (1, 64, 4096, 16384)
    return (
        [decode_row(shape, "cuda", time_pair) for shape in decode]
        + [prefill_row(shape, "cuda", time_pair) for shape in prefill]
        + [write_row(n, "cuda", time_pair) for n in tokens]
    )


if __name__ == "__main__":
    from bench.ops.__main__ import print_table

    print_table(run(quick="--quick" in sys.argv[1:]))
