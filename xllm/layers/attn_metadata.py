"""What one forward pass tells every attention layer about the batch.

The runner orders a step's batch as: all decode requests first (one token
each), then the prefill requests (whole prompts, prompt chunks, or the tail of a
prompt after a prefix-cache hit; several tokens each). Token rows follow that
order in input_ids/positions/slot_mapping, so an attention layer splits its
q/k/v at ``num_decode_tokens``: the decode op takes the head, the prefill op the
tail. Passed explicitly through ``forward`` (no global context object).
Layout of the KV cache: ``xllm.ops.kv_cache``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    # [num_tokens] int64: where each token's K/V goes; -1 for padding rows.
    slot_mapping: torch.Tensor
    num_decode_tokens: int  # == number of decode requests
    # Decode part: int32 [num_decodes, max_blocks]; int32 [num_decodes] (context incl. new token).
    decode_block_tables: torch.Tensor
    decode_seq_lens: torch.Tensor
    # Prefill part: int32 [num_prefills, max_blocks], int32 [num_prefills + 1] (row offsets
    # relative to the first prefill token), int32 [num_prefills] (context incl. new tokens).
    prefill_block_tables: torch.Tensor
    prefill_query_start_loc: torch.Tensor
    prefill_seq_lens: torch.Tensor
    num_prefill_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return self.num_decode_tokens + self.num_prefill_tokens

    @property
    def num_decodes(self) -> int:
        return self.num_decode_tokens

    @property
    def num_prefills(self) -> int:
        return int(self.prefill_seq_lens.shape[0])
