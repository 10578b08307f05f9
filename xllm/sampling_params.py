"""SamplingParams: how to pick tokens and when to stop, validated at construction.

Torch-free: the scheduler and the API use it. Field names and meanings follow
vLLM and the OpenAI API so users' habits carry over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from xllm.structured.spec import GrammarSpec


@dataclass
class SamplingParams:
    n: int = 1  # completions per prompt; they share the prompt's KV blocks
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # in (0, 1]
    top_k: int = -1  # -1 or 0 = off
    min_p: float = 0.0  # in [0, 1]
    seed: int | None = None  # per-request: the same tokens whatever else is in the batch
    repetition_penalty: float = 1.0  # > 0; 1 = off (applied to prompt and output tokens)
    presence_penalty: float = 0.0  # in [-2, 2]; output tokens only
    frequency_penalty: float = 0.0  # in [-2, 2]; output tokens only
    max_tokens: int | None = 16  # None = up to the model's context length
    min_tokens: int = 0  # EOS and stop tokens are suppressed until this many are generated
    stop: list[str] = field(default_factory=list)  # found in detokenized text, not returned
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; k >= 0 = the chosen token's plus top-k alternatives
    # None = off; k >= 0 = each prompt token's logprob (given the tokens before it) plus the
    # top-k alternatives at that position; the first prompt token has none. A request asking
    # for it computes its whole prompt (no prefix-cache hit: cached positions have no logits).
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # {token id: bias in [-100, 100]} added to the logits before sampling (OpenAI's
    # logit_bias; -100 bans a token in practice, +100 all but forces it). Logprobs stay the
    # raw model's.
    logit_bias: dict[int, float] | None = None
    # The output must match this (a JSON schema, a regex, a choice, a grammar): tokens that
    # cannot continue a match are masked before sampling (xllm.structured). Logprobs stay the
    # raw model's.
    structured: GrammarSpec | None = None
    # An embedding request: the prompt's final hidden states pooled ("last": the last
    # token's, "mean": the average over the prompt), L2-normalized, in
    # RequestOutput.embedding. It computes its whole prompt (no prefix-cache hit), samples
    # one token (max_tokens must be 1; the token is not the answer) and has n = 1.
    pooling: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        _check(
            isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}"
        )
        _check(
            _finite(self.temperature) and self.temperature >= 0,
            f"temperature must be >= 0 (0 means greedy), got {self.temperature!r}",
        )
        _check(
            _finite(self.top_p) and 0 < self.top_p <= 1,
            f"top_p must be in (0, 1], got {self.top_p!r}",
        )
        _check(
            isinstance(self.top_k, int) and self.top_k >= -1,
            f"top_k must be -1 (off), 0 (off) or a positive integer, got {self.top_k!r}",
        )
        _check(
            _finite(self.min_p) and 0 <= self.min_p <= 1,
            f"min_p must be in [0, 1], got {self.min_p!r}",
        )
        _check(
            _finite(self.repetition_penalty) and self.repetition_penalty > 0,
            f"repetition_penalty must be > 0 (1 is off), got {self.repetition_penalty!r}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_finite(value) and -2 <= value <= 2, f"{name} must be in [-2, 2], got {value!r}")
        _check(
            self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
            f"max_tokens must be an integer >= 1 (or None), got {self.max_tokens!r}",
        )
        _check(
            isinstance(self.min_tokens, int) and self.min_tokens >= 0,
            f"min_tokens must be an integer >= 0, got {self.min_tokens!r}",
        )
        _check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
        )
        _check(
            self.seed is None or isinstance(self.seed, int),
            f"seed must be an integer or None, got {self.seed!r}",
        )
        _check(
            self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
            f"logprobs must be None or an integer in [0, 20], got {self.logprobs!r}",
        )
        _check(
            self.prompt_logprobs is None
            or (
                isinstance(self.prompt_logprobs, int)
                and not isinstance(self.prompt_logprobs, bool)
                and 0 <= self.prompt_logprobs <= 20
            ),
            "prompt_logprobs must be None (off) or an integer in [0, 20] (alternatives per "
            f"prompt token), got {self.prompt_logprobs!r}",
        )
        _check(
            all(isinstance(s, str) and s for s in self.stop),
            "stop must be a list of non-empty strings",
        )
        _check(
            all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids must be a list of non-negative integers",
        )
        if self.logit_bias is not None:
            _check(isinstance(self.logit_bias, dict), "logit_bias must map token ids to biases")
            self.logit_bias = dict(self.logit_bias)
            for token, bias in self.logit_bias.items():
                _check(
                    isinstance(token, int) and not isinstance(token, bool) and token >= 0,
                    f"logit_bias keys must be token ids (integers >= 0), got {token!r}",
                )
                _check(
                    _finite(bias) and -100 <= bias <= 100,
                    f"logit_bias[{token}] must be a number in [-100, 100], got {bias!r}",
                )

        _check(self.pooling in (None, "last", "mean"),
               f"pooling must be None, 'last' or 'mean', got {self.pooling!r}")
        _check(self.pooling is None or (self.n == 1 and self.max_tokens == 1),
               "an embedding request (pooling) has n = 1 and max_tokens = 1")
        _check(self.structured is None or isinstance(self.structured, GrammarSpec),
               "structured must be an xllm.structured.GrammarSpec or None, got "
               f"{type(self.structured).__name__}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
