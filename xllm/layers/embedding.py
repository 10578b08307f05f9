"""Token embedding and the LM head (optionally tied to the embedding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xllm.ops.blocks import BlockLinearWeight


class VocabEmbedding(nn.Module):
    """Token id -> row of a [vocab_size, hidden_size] table."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.weight = nn.Parameter(
            torch.empty(vocab_size, hidden_size, dtype=dtype), requires_grad=False
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)

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
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.tied = tied_to is not None
        # A plain attribute, not a submodule, so the tied table is listed once (as the
        # embedding's) by named_parameters() and state_dict().
        self._tied_to = [tied_to] if tied_to is not None else []
        if tied_to is None:
            self.weight = nn.Parameter(
                torch.empty(vocab_size, hidden_size, dtype=dtype), requires_grad=False
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

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.blocks is not None:
            return self.blocks(hidden.float())
        w = self.table
        return F.linear(hidden.to(w.dtype), w).float()

    def extra_repr(self) -> str:
        return f"vocab={self.vocab_size}, tied={self.tied}"
