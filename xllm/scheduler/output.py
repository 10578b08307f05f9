"""What one scheduling step hands the runner, and the scheduler's metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

from xllm.scheduler.request import Request

__all__ = ["ScheduledRequest", "SchedulerOutput", "SchedulerStats"]


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step.

    The runner feeds ``request.all_token_ids[num_computed_tokens : num_computed_tokens +
    num_new_tokens]`` at those positions; ``request.block_ids`` already covers them.
    """

    request: Request
    num_new_tokens: int
    num_computed_tokens: int  # before this step
    samples: bool  # this step reaches the request's last known token: sample its next one
    # Admitted from the waiting queue this step (first time, or again after preemption): its
    # block table is request.block_ids whole, not the previous one plus new_block_ids.
    is_new: bool = False
    # Allocated this step, appended to request.block_ids. Tensor-parallel step messages send
    # only these to the workers (xllm.runtime.tp, which checks they add up).
    new_block_ids: list[int] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass(slots=True)
class SchedulerOutput:
    """``decodes``: one new token each, continuing a request whose KV is otherwise all
    computed (``samples`` is True). ``prefills``: every other request (prompts, prompt
    chunks, recomputation after preemption, the tail after a prefix hit). Rows go to the
    model in ``scheduled`` order: decodes first."""

    decodes: list[ScheduledRequest]
    prefills: list[ScheduledRequest]
    preempted_ids: list[str]  # preempted this step: the runner drops their cached state
    num_batched_tokens: int

    @property
    def scheduled(self) -> list[ScheduledRequest]:
        return self.decodes + self.prefills

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_preempted: int  # preemptions since start (a request preempted twice counts twice)
    kv_cache_usage: float  # share of usable blocks held by requests, 0..1
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int

    @property
    def prefix_cache_hit_rate(self) -> float:
        q = self.prefix_cache_queried_tokens
        return self.prefix_cache_hit_tokens / q if q else 0.0
