"""ServerSettings: the HTTP server's own options (the engine's are EngineConfig's)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ServerSettings"]


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    served_model_names: list[str] = field(default_factory=list)  # default: the --model value
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer KEY"
    max_request_body_bytes: int = 8 << 20  # larger bodies get 413
    max_waiting_requests: int = 1024  # requests not yet started above this get 503
    max_tokens_limit: int | None = None  # cap on new tokens per completion (None: context)
    max_n: int = 128  # cap on completions per prompt (``n``)
    # Chat answers split into reasoning_content and content (xllm.api.reasoning), or None.
    reasoning_parser: str | None = None
    # The format tool calls are read from under tool_choice "auto" (xllm.api.tool_parsers);
    # None: the one the chat template shows, if any.
    tool_call_parser: str | None = None
    # /v1/embeddings: the prompt's final hidden states pooled so ("last" token or "mean").
    embedding_pooling: str = "last"
    grace_period_s: float = 30.0  # SIGTERM/SIGINT: how long in-flight requests may finish
    access_log: bool = False
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_request_body_bytes < 1024:
            raise ValueError("max_request_body_bytes must be >= 1024, got "
                             f"{self.max_request_body_bytes}")
        if self.max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be >= 1, got "
                             f"{self.max_waiting_requests}")
        if self.max_tokens_limit is not None and self.max_tokens_limit < 1:
            raise ValueError(f"max_tokens_limit must be >= 1, got {self.max_tokens_limit}")
        if not 1 <= self.max_n <= 128:
            raise ValueError(f"max_n must be in [1, 128], got {self.max_n}")
        if self.reasoning_parser is not None:
            from xllm.api.reasoning import parser_name

            self.reasoning_parser = parser_name(self.reasoning_parser)
        if self.tool_call_parser is not None:
            from xllm.api.tool_parsers import get_parser

            get_parser(self.tool_call_parser)  # ValueError naming the known parsers
        if self.embedding_pooling not in ("last", "mean"):
            raise ValueError("embedding_pooling must be 'last' or 'mean', got "
                             f"{self.embedding_pooling!r}")
        if self.grace_period_s < 0:
            raise ValueError(f"grace_period_s must be >= 0, got {self.grace_period_s}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (leave it out to serve without a key)")
        if any(not name for name in self.served_model_names):
            raise ValueError("served model names must not be empty")
