"""Token embedding and the LM head (optionally tied to the embedding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xllm.layers.parallel import SINGLE, TensorParallel, vocab_shard
from xllm.layers.sampler import argmax_first
from xllm.ops.blocks import BlockLinearWeight


class VocabEmbedding(nn.Module):
    """Token id -> row of a [vocab_size, hidden_size] table.

    Under tensor parallelism (``tp``) a rank holds rows ``[start, stop)`` of the table padded
    to ``ceil(vocab / size)``; tokens outside them look up zeros, and the ranks' rows sum."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype = torch.float32,
                 tp: TensorParallel = SINGLE):
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.tp = tp
        self.start, self.stop, rows = vocab_shard(vocab_size, tp)
        self.weight = nn.Parameter(
            torch.empty(rows, hidden_size, dtype=dtype), requires_grad=False
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.tp.enabled:
            return F.embedding(input_ids, self.weight)
        mine = (input_ids >= self.start) & (input_ids < self.stop)
        out = F.embedding(torch.where(mine, input_ids - self.start, 0), self.weight)
        out.mul_(mine.unsqueeze(-1).to(out.dtype))
        return self.tp.allreduce(out, exact=True)  # one rank's row each: nothing to round

    def extra_repr(self) -> str:
        return f"{self.vocab_size}, {self.hidden_size}"


class LMHead(nn.Module):
    """hidden [n, H] -> logits [n, vocab] in fp32.

    With ``tied_to`` the head reads that embedding's table (one copy in memory, as the
    checkpoint intends) and owns no parameter of its own.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        dtype: torch.dtype = torch.float32,
        tied_to: VocabEmbedding | None = None,
        tp: TensorParallel = SINGLE,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.tp = tp
        self.tied = tied_to is not None
        # A plain attribute, not a submodule, so the tied table is listed once (as the
        # embedding's) by named_parameters() and state_dict().
        self._tied_to = [tied_to] if tied_to is not None else []
        if tied_to is None:
            rows = vocab_shard(vocab_size, tp)[2]
            self.weight = nn.Parameter(
                torch.empty(rows, hidden_size, dtype=dtype), requires_grad=False
            )
        self.blocks: BlockLinearWeight | None = None

    def use_blocks(self, blocks: BlockLinearWeight) -> None:
        """Computes logits on ``blocks`` (fp32). The table stays: a tied embedding's lookup
        still reads it, and lookups touch only the rows of the step's tokens."""
        if (blocks.out_features, blocks.in_features) != tuple(self.table.shape):
            raise ValueError(
                f"blocks of shape [{blocks.out_features}, {blocks.in_features}] cannot replace "
                f"the LM head's table {tuple(self.table.shape)}"
            )
        self.blocks = blocks

    @property
    def table(self) -> torch.Tensor:
        return self._tied_to[0].weight if self.tied else self.weight

    def forward(self, hidden: torch.Tensor, argmax: bool = False) -> torch.Tensor | None:
        """Logits [n, vocab]; under tensor parallelism each rank computes its vocabulary
        rows, and they meet on rank 0, which returns them (the others return None).

        ``argmax`` (tensor parallelism, rows that only take their greedy token): each rank
        sends its slice's best logit and where it is instead of the slice, and rank 0
        returns the token ids [n] (int64) that ``argmax_first`` of the whole rows gives: a
        batch's 2 x 4 bytes a row instead of the vocabulary's 4 a token."""
        if self.blocks is not None:
            logits = self.blocks(hidden.float())
        else:
            w = self.table
            logits = F.linear(hidden.to(w.dtype), w).float()
        if not self.tp.enabled:
            return argmax_first(logits) if argmax else logits
        n, rows = logits.shape
        if argmax:
            return self._argmax(logits)
        dst = (torch.empty(n, self.tp.size * rows, device=logits.device)
               if self.tp.rank == 0 else None)
        self.tp.comm.gather(logits.contiguous(), dst, n)  # each row's slices side by side
        if dst is None:
            return None
        return dst[:, :self.vocab_size]

    def _argmax(self, logits: torch.Tensor) -> torch.Tensor | None:
        start, stop, _ = vocab_shard(self.vocab_size, self.tp)
        local = logits[:, :stop - start]  # (the padding rows of the last slice left out)
        n = local.shape[0]
        best = torch.empty(n, 2, device=logits.device)
        if local.shape[1]:
            at = argmax_first(local.contiguous())
            best[:, 0] = local.gather(1, at[:, None])[:, 0]
            best[:, 1] = at + start  # exact in fp32 below 2^24 tokens
        else:  # (a rank past the vocabulary's end: never the best)
            best[:, 0] = float("-inf")
            best[:, 1] = 0
        dst = torch.empty(n, self.tp.size * 2, device=logits.device) \
            if self.tp.rank == 0 else None
        self.tp.comm.gather(best, dst, n)
        return None if dst is None else combine_argmax(dst.view(n, self.tp.size, 2))

    def extra_repr(self) -> str:
        return f"vocab={self.vocab_size}, tied={self.tied}"


def combine_argmax(best: torch.Tensor) -> torch.Tensor:
    """Token ids [n] from each rank's best logit and its token, ``best`` [n, ranks, 2] in
    rank order (vocabulary order): what ``argmax_first`` of the whole rows returns -- the
    first NaN, else the largest logit, a tie going to the lower token (the lower rank)."""
    values, tokens = best[..., 0], best[..., 1]
    nan = values.isnan()
    rank = torch.where(nan.any(1), nan.to(torch.int8).argmax(1), argmax_first(values))
    return tokens.gather(1, rank[:, None])[:, 0].long()
