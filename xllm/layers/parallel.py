"""Tensor parallelism: which share of a layer one rank holds, and the sums between ranks.

A model built with ``TensorParallel(rank, size, comm)`` holds, on each rank:

- whole GQA groups of attention heads (a KV head with the query heads that read it). When
  the groups do not divide evenly the first ranks hold one group more (the demo model's 3
  groups over 2 ranks: 6 and 3 heads), and start-up says so. With fewer KV heads than
  ranks, each KV head is replicated on ``size / num_kv_heads`` ranks, which split its
  query heads;
- a contiguous share of the MLP's intermediate columns (gate|up rows, down_proj columns);
- ``ceil(vocab / size)`` rows of the embedding and the LM head, the last rank's padded
  with zero rows so every rank's logits have one shape.

Column-parallel layers (q|k|v, gate|up) need no communication; the row-parallel ones
(o_proj, down_proj) and the embedding produce partial sums that ``comm`` adds up
(``xllm.ops.allreduce.ShmAllReduce``: each element summed once, in rank order, so every
rank holds bit-identical activations). The LM head's vocabulary slices meet on rank 0,
which samples. ``shard_spec`` says which slice of each checkpoint tensor a rank reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Slice:
    """Rows (dim 0) or columns (dim 1) ``start:stop`` of a checkpoint tensor whose ``dim``
    has ``full`` entries; ``pad_to``: the result is padded with zero rows to this many (the
    vocabulary's last shard); ``zero``: the rank takes zeros of the tensor's shape instead
    (a row-parallel bias is added once, by rank 0)."""

    dim: int
    start: int
    stop: int
    full: int
    pad_to: int | None = None
    zero: bool = False

    def take(self, src: Any, name: str) -> Any:
        """This slice of ``src``: a torch tensor, or a safetensors slice (``get_slice``), of
        which only these bytes are read. ValueError naming ``name`` on a wrong shape."""
        import torch

        shape = tuple(src.shape) if isinstance(src, torch.Tensor) else tuple(src.get_shape())
        if len(shape) <= self.dim or shape[self.dim] != self.full:
            raise ValueError(f"checkpoint tensor {name!r} has shape {shape}; tensor "
                             f"parallelism expects {self.full} along dim {self.dim}")
        if self.zero:
            return torch.zeros(shape)
        if isinstance(src, torch.Tensor):
            part = src.narrow(self.dim, self.start, self.stop - self.start)
        elif self.dim == 0:
            part = src[self.start:self.stop]
        else:
            part = src[:, self.start:self.stop]
        if self.pad_to is not None and part.shape[0] < self.pad_to:
            pad = torch.zeros((self.pad_to - part.shape[0], *part.shape[1:]), dtype=part.dtype)
            part = torch.cat([part, pad])
        return part


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    comm: Any = None  # xllm.ops.allreduce.ShmAllReduce (allreduce / gather) when size > 1
    # The row-parallel sums travel as bf16 (half the bytes): a model computing in bf16, whose
    # products already round their inputs to bf16 or int8. Every rank alike.
    bf16_sums: bool = False
    # Expert parallelism: mixture-of-experts layers place whole experts on the ranks
    # (xllm.layers.eplb) instead of refusing; ``num_redundant_experts`` extra replicas per layer.
    expert_parallel: bool = False
    num_redundant_experts: int = 0

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tensor parallel rank {self.rank} of {self.size} is not valid")
        if self.size > 1 and self.comm is None:
            raise ValueError("tensor parallelism over several ranks needs a comm group")

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def allreduce(self, x, exact: bool = False):  # noqa: ANN001, ANN201
        """Sums a contiguous CPU tensor over the ranks in place (in bf16 where bf16_sums,
        unless ``exact``)."""
        if self.size > 1:
            self.comm.allreduce(x, self.bf16_sums and not exact)
        return x


def _even(total: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part ``index`` when ``total`` splits into ``parts`` as evenly as
    possible, the first parts one larger."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass(frozen=True)
class HeadShard:
    """One rank's attention heads: query heads ``[q_start, q_start + num_heads)`` and KV
    heads ``[kv_start, kv_start + num_kv_heads)`` of the checkpoint."""

    q_start: int
    num_heads: int
    kv_start: int
    num_kv_heads: int


def head_shard(heads: int, kv: int, tp: TensorParallel) -> HeadShard:
    """This rank's share of ``heads`` query heads in ``kv`` GQA groups (see the module
    docstring); ValueError when no split exists."""
    n, r = tp.size, tp.rank
    group = heads // kv
    if kv >= n:
        kv_start, kv_stop = _even(kv, n, r)
        return HeadShard(kv_start * group, (kv_stop - kv_start) * group, kv_start,
                         kv_stop - kv_start)
    if n % kv:
        raise ValueError(f"tensor_parallel_size {n} cannot split {kv} KV heads: with fewer KV "
                         f"heads than ranks, the ranks must be a multiple of them ({kv}, "
                         f"{2 * kv}, ...) so each KV head is replicated on the same number "
                         "of ranks")
    per_kv = n // kv
    if group < per_kv:
        raise ValueError(f"tensor_parallel_size {n} exceeds what {heads} attention heads in "
                         f"{kv} KV groups can share: at most {kv * group} ranks")
    kv_index, part = divmod(r, per_kv)
    start, stop = _even(group, per_kv, part)
    return HeadShard(kv_index * group + start, stop - start, kv_index, 1)


def check_tensor_parallel(heads: int, kv: int, intermediate: int, size: int) -> list[str]:
    """ValueError when ``size`` ranks cannot split a model of ``heads`` attention heads in
    ``kv`` KV groups and an MLP of ``intermediate`` columns; else notes on an uneven split
    (for the start-up log)."""
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {size}")
    if size == 1:
        return []
    if size > heads:
        raise ValueError(f"tensor_parallel_size {size} exceeds the model's {heads} attention "
                         "heads")
    if size > intermediate:
        raise ValueError(f"tensor_parallel_size {size} exceeds the MLP's {intermediate} "
                         "columns")
    shards = [head_shard(heads, kv, TensorParallel(r, size, comm=object())) for r in range(size)]
    notes = []
    if len({s.num_heads for s in shards}) > 1:
        notes.append(f"the {heads} attention heads in {kv} KV groups split unevenly over "
                     f"{size} ranks ({', '.join(str(s.num_heads) for s in shards)} heads): "
                     "attention work is as uneven")
    if intermediate % size:
        notes.append(f"the MLP's {intermediate} columns split unevenly over {size} ranks")
    return notes


def mlp_shard(intermediate: int, tp: TensorParallel) -> tuple[int, int]:
    """This rank's share [start, stop) of the MLP's ``intermediate`` columns."""
    return _even(intermediate, tp.size, tp.rank)


def vocab_shard(vocab_size: int, tp: TensorParallel) -> tuple[int, int, int]:
    """(start, stop, rows): this rank's vocabulary rows [start, stop) of a table padded to
    ``rows`` per rank."""
    rows = -(-vocab_size // tp.size)
    start = min(vocab_size, tp.rank * rows)
    return start, min(vocab_size, start + rows), rows


SINGLE = TensorParallel()  # one rank holding everything: the default everywhere
