"""A request as the scheduler sees it: token ids, how many of them have KV computed, the
blocks holding that KV, and how it finished.

There is no prefill or decode state. A request has ``num_tokens`` known tokens (prompt plus
the outputs sampled so far) and ``num_computed_tokens`` of them whose KV is in its blocks;
each step the scheduler feeds some of the rest. Torch-free.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable
from typing import Any

from xllm.sampling_params import SamplingParams

__all__ = ["FINISH_REASONS", "Request", "RequestStatus"]


class RequestStatus(enum.IntEnum):
    WAITING = 0  # queued, never run (or deferred behind its prefix leader)
    RUNNING = 1  # holds blocks and a seat in the batch
    PREEMPTED = 2  # queued again after preemption: no blocks, recomputes prompt + outputs
    FINISHED_STOPPED = 3  # EOS, a stop token id or a stop string
    FINISHED_LENGTH = 4  # max_tokens, or the context hit max_model_len / the KV capacity
    FINISHED_ABORTED = 5

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


# OpenAI's finish_reason for each finished status, and back.
FINISH_REASONS: dict[str, RequestStatus] = {
    "stop": RequestStatus.FINISHED_STOPPED,
    "length": RequestStatus.FINISHED_LENGTH,
    "abort": RequestStatus.FINISHED_ABORTED,
}
_REASON_OF = {status: reason for reason, status in FINISH_REASONS.items()}


class Request:
    """One sequence to generate. ``priority``: lower value = more important (vLLM's rule);
    ``offline`` requests only use capacity that online ones leave idle.

    ``share_prefix_with`` (an extension of the engine contract, for ``n > 1``): the id of a
    request with the same prompt. The scheduler holds this one back until that request's
    prompt blocks are in the prefix cache, so the siblings take them as a prefix hit instead
    of computing the prompt n times.
    """

    __slots__ = (
        "request_id",
        "prompt_token_ids",
        "sampling_params",
        "eos_token_ids",
        "priority",
        "offline",
        "arrival_time",
        "share_prefix_with",
        "output_token_ids",
        "num_computed_tokens",
        "block_ids",
        "num_released_blocks",
        "block_hashes",
        "status",
        "stop_reason",
        "num_cached_tokens",
        "num_preemptions",
        "seq",
        "all_token_ids",
        "stop_token_ids",
        "min_tokens",
        "max_output_tokens",
        "stopping_token_ids",
        "hold_kv",
        "num_inflight_tokens",
        "num_pending_outputs",
        "grammar",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: Iterable[int] = frozenset(),
        priority: int = 0,
        offline: bool = False,
        arrival_time: float | None = None,
        share_prefix_with: str | None = None,
    ) -> None:
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty str, got {request_id!r}")
        if not isinstance(sampling_params, SamplingParams):
            raise ValueError(
                f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}"
            )
        prompt = list(prompt_token_ids)
        if not prompt:
            raise ValueError(
                "prompt_token_ids must not be empty (there is nothing to condition on)"
            )
        if not all(type(t) is int and t >= 0 for t in prompt):
            bad = next(i for i, t in enumerate(prompt) if not (type(t) is int and t >= 0))
            raise ValueError(
                f"prompt_token_ids[{bad}] must be a non-negative int, got {prompt[bad]!r}"
            )
        eos = frozenset(eos_token_ids)
        if not all(type(t) is int for t in eos):
            raise ValueError(f"eos_token_ids must be ints, got {sorted(map(repr, eos))}")
        if type(priority) is not int:
            raise ValueError(f"priority must be an int (lower = more important), got {priority!r}")
        if type(offline) is not bool:
            raise ValueError(f"offline must be a bool, got {offline!r}")
        if arrival_time is None:
            arrival_time = time.monotonic()
        elif not isinstance(arrival_time, (int, float)) or isinstance(arrival_time, bool):
            raise ValueError(f"arrival_time must be a float or None, got {arrival_time!r}")
        if share_prefix_with is not None and not isinstance(share_prefix_with, str):
            raise ValueError("share_prefix_with must be a request id (str) or None")

        self.request_id = request_id
        self.prompt_token_ids = prompt
        self.sampling_params = sampling_params
        self.eos_token_ids = eos
        self.priority = priority
        self.offline = offline
        self.arrival_time = float(arrival_time)
        self.share_prefix_with = share_prefix_with
        # Prefill/decode: when it finishes, its full blocks stay held (pinned) for a decode
        # instance to fetch, until released (KVCacheManager.release_hold).
        self.hold_kv = False
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0  # tokens whose KV is written into block_ids
        # Overlap scheduling: tokens of steps scheduled but not yet through update_from_output
        # (their KV is being written, after num_computed_tokens), and tokens those steps are
        # sampling (not yet in all_token_ids). Both 0 between steps without overlap.
        self.num_inflight_tokens = 0
        self.num_pending_outputs = 0
        # Structured outputs: the matcher of the request's grammar (accept_token,
        # fill_next_token_bitmask, is_terminated), advanced over every output token; None
        # for an unconstrained request.
        self.grammar: Any = None
        self.block_ids: list[int] = []
        # Leading entries of block_ids given back to the pool because they lie wholly before
        # the model's sliding window (0 there: the null block, never read).
        self.num_released_blocks = 0
        # Chained hashes of the full blocks of all_token_ids, extended as tokens arrive; a full
        # block's tokens never change, so they stay valid across preemption.
        self.block_hashes: list[int] = []
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_cached_tokens = 0  # prefix-cache hit at the request's first admission
        self.num_preemptions = 0
        self.seq = -1  # admission order, set by Scheduler.add_request; breaks arrival ties
        # Prompt then outputs, one list that only grows (slicing it is the runner's hot path).
        # Read it; only append_output_token changes it.
        self.all_token_ids: list[int] = list(prompt)
        # Token-level stop conditions, resolved once so the per-token check is two lookups.
        self.stop_token_ids = frozenset(sampling_params.stop_token_ids)
        self.min_tokens = sampling_params.min_tokens
        self.max_output_tokens = sampling_params.max_tokens  # None: until the context is full
        self.stopping_token_ids = (
            self.stop_token_ids if sampling_params.ignore_eos else self.stop_token_ids | eos
        )

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)})"
        )

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI finish_reason ("stop", "length" or "abort") once finished, else None."""
        return _REASON_OF.get(self.status)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
