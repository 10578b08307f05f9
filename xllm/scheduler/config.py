"""SchedulerConfig: the scheduler's knobs, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SchedulerConfig"]


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    max_num_seqs: int = 256  # requests in one batch (running set), online and offline together
    max_num_batched_tokens: int = 2048  # token budget of one step: decodes + prefill chunks
    block_size: int = 16  # tokens per KV block
    num_blocks: int  # KV blocks in the pool, including the null block 0 (never handed out)
    max_model_len: int  # longest context (prompt + outputs) a request may reach
    enable_prefix_caching: bool = True
    # Overlap scheduling: schedule() may run once more while the previous step is still being
    # computed (its outputs not yet passed to update_from_output). A request whose token is
    # being sampled then decodes with that token unknown (the runner fills it in), and blocks
    # of a request finished while a step computing it is in flight are released when it ends.
    overlap: bool = False
    # Every layer attends within this many tokens (0: no sliding window): blocks wholly before
    # a running request's window are given back to the pool (KVCacheManager.release_outside_window).
    sliding_window: int = 0

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_model_len"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if type(self.num_blocks) is not int or self.num_blocks < 2:
            raise ValueError(
                f"num_blocks must be an integer >= 2 (block 0 is the reserved null block), "
                f"got {self.num_blocks!r}"
            )
        if type(self.sliding_window) is not int or self.sliding_window < 0:
            raise ValueError(f"sliding_window must be an integer >= 0 (0: none), got "
                             f"{self.sliding_window!r}")
        if type(self.overlap) is not bool:
            raise ValueError(f"overlap must be a bool, got {self.overlap!r}")
        if type(self.enable_prefix_caching) is not bool:
            raise ValueError(
                f"enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}"
            )

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def max_seq_len(self) -> int:
        """The longest a request's context can get: max_model_len, or less when the whole KV
        pool holds fewer tokens (a request alone must always fit, or it could never finish)."""
        return min(self.max_model_len, self.num_usable_blocks * self.block_size)
