"""EngineClient: what the OpenAI layer (xllm.api) needs from whatever serves it.

Two things implement it: ``AsyncEngine`` (an engine on a thread of this process, for
xllm-server) and ``xllm.service.master.ClusterEngine`` (the cluster, for xllm-master). The
API talks to nothing else: the model's facts (tokenizer, context length, vocabulary and
hidden sizes) are read here, not from an engine object behind it, so the master need not
imitate one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from xllm.engine.async_engine import EngineStats
    from xllm.engine.outputs import RequestOutput
    from xllm.sampling_params import SamplingParams
    from xllm.tokenizer import Tokenizer

__all__ = ["EngineClient", "OutputStream"]


class OutputStream(Protocol):
    """One request's outputs, ending after the finished one; ``abort()`` stops it (and is
    called when the reader leaves early)."""

    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...

    async def __anext__(self) -> RequestOutput: ...

    def abort(self) -> None: ...


@runtime_checkable
class EngineClient(Protocol):
    # Whether prompt logprobs (echo + logprobs, prompt_logprobs) are computed.
    supports_prompt_logprobs: bool

    @property
    def model_path(self) -> str:
        """The model it serves, as given (the default served model name)."""
        ...

    @property
    def state(self) -> str:
        """``xllm.engine.async_engine.READY`` while it serves; "loading", "failed", ..."""
        ...

    @property
    def error(self) -> str | None:
        """Why it is not serving, when it is not."""
        ...

    # The model's facts; read only while READY.
    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def hidden_size(self) -> int: ...

    def stats(self) -> EngineStats: ...

    def num_unstarted(self) -> int:
        """Requests submitted that have no output yet (the overload check)."""
        ...

    def generate(self, prompt: str | list[int], params: SamplingParams, *,
                 request_id: str | None = None, priority: int = 0,
                 offline: bool = False) -> OutputStream:
        """Submits a request. EngineDeadError when not serving, EngineOverloadedError when
        full; ValueError (from the stream) when the request is refused."""
        ...

    def shutdown(self, timeout: float = 10.0) -> None: ...
