"""What the engine hands back per request: text, token ids, logprobs, finish reason."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int  # which of the request's n completions
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    # Per generated token: {token id: logprob} holding the sampled token and the top-k.
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    # Text and token ids added since the previous output of this request, per completion index.
    deltas: dict[int, tuple[str, list[int]]] = field(default_factory=dict)
    # With SamplingParams.prompt_logprobs, per prompt token: {token id: logprob} holding that
    # token and the top-k alternatives at its position, given the prompt before it; None for
    # the first token (nothing precedes it). Complete in every output (the prompt is scored
    # before the first token is sampled); None when not asked for.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    # Aligned with prompt_logprobs: each prompt token's rank (1 = the model's likeliest).
    prompt_token_ranks: list[int | None] | None = None
    # An embedding request's (SamplingParams.pooling) L2-normalized pooled hidden state, in
    # its finished output; None otherwise.
    embedding: list[float] | None = None
