"""The OpenAI-compatible wire format: request and response bodies as pydantic models.

Shared by xllm-server and the cluster master, so it holds no server state. Field names,
defaults and ranges follow the OpenAI API; fields marked *extension* are vLLM-style extras.
Unknown fields are rejected (400 naming the field) rather than silently ignored: a client
sending a field this server does not know must learn that it is not applied.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ChatCompletionChunk", "ChatCompletionRequest", "ChatCompletionResponse", "ChatMessage",
    "CompletionRequest", "CompletionResponse", "CompletionStreamResponse", "ErrorInfo",
    "ErrorResponse", "HealthResponse", "ModelCard", "ModelList", "PromptLogprob",
    "PromptTokensDetails", "UsageInfo",
    "VersionResponse",
    "MAX_N", "MAX_LOGPROBS",
]

MAX_N = 128  # completions per prompt
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI

FinishReason = Literal["stop", "length", "abort", "tool_calls"]
NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0)]


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class _Strict(BaseModel):
    # NaN and infinities have no JSON form; reject them even where Python's json parser
    # accepts the non-standard literals.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)


class ResponseFormat(_Strict):
    """OpenAI's response_format: text (no constraint), any JSON object, or a JSON schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsParams(_Strict):
    """vLLM's structured_outputs extension: exactly one of these constrains the output."""

    json_: dict[str, Any] | str | None = Field(None, alias="json",
                                               description="a JSON schema (object or text)")
    regex: str | None = None
    choice: list[NonEmptyStr] | None = Field(None, min_length=1)
    grammar: str | None = Field(None, description="EBNF (GBNF dialect) with a root rule")
    json_object: bool | None = None

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)


class _SamplingFields(_Strict):
    """What both endpoints share: the model, sampling, stopping and the extensions."""

    model: str
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: NonEmptyStr | list[NonEmptyStr] | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="accepted for compatibility; not used")
    # Extensions (vLLM's names).
    top_k: int = Field(-1, ge=-1, description="extension; -1 or 0 = off")
    min_p: float = Field(0.0, ge=0, le=1, description="extension")
    repetition_penalty: float = Field(1.0, gt=0, le=10, description="extension; 1 = off")
    ignore_eos: bool = Field(False, description="extension")
    min_tokens: int = Field(0, ge=0, description="extension")
    stop_token_ids: list[TokenId] | None = Field(None, description="extension")
    skip_special_tokens: bool = Field(True, description="extension")
    include_stop_str_in_output: bool = Field(False, description="extension")
    priority: int = Field(0, description="extension; lower is more important")
    prompt_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS,
        description="extension: each prompt token's logprob and this many alternatives, in "
        "the response's prompt_logprobs (the first prompt token's entry is null)")
    offline: bool = Field(False, description="extension; best-effort traffic that only uses "
                          "capacity online requests leave idle")
    logit_bias: dict[str, float] | None = Field(
        None, description="token id (as a string) -> bias in [-100, 100], added to the logits "
        "before sampling")
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = Field(
        None, description="extension (vLLM's): the output matches a JSON schema, a regex, "
        "one of a list of strings or a grammar")


class CompletionRequest(_SamplingFields):
    prompt: (NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1)]
             | Annotated[list[TokenId], Field(min_length=1)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]],
                         Field(min_length=1)])
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class TextContentPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="the arguments as JSON text")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant's earlier calls")
    tool_call_id: str | None = Field(None, description="the call a tool message answers")


ToolName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


class FunctionDefinition(_Strict):
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema")
    strict: bool | None = None


class ChatCompletionTool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ChatCompletionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="default: auto with tools, none without")
    parallel_tool_calls: bool = True
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = Field(True, description="extension")


class EmbeddingRequest(_Strict):
    model: str
    input: (NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1, max_length=2048)]
            | Annotated[list[TokenId], Field(min_length=1)]
            | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]],
                        Field(min_length=1, max_length=2048)])
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="must be the model's hidden size: "
                                   "embeddings are not shortened")
    user: str | None = Field(None, description="accepted for compatibility; not used")
    priority: int = Field(0, description="extension; lower is more important")


# ---- responses ---------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens not recomputed (from the pool or a tier below it)


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian "
                                         "float32 with encoding_format base64")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "xllm"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class VersionResponse(BaseModel):
    version: str


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class PromptLogprob(BaseModel):
    """vLLM's shape of one entry of ``prompt_logprobs`` (keyed by the token id)."""

    logprob: float
    rank: int | None = Field(None, description="1 = the model's likeliest token there")
    decoded_token: str


# Per prompt token: {token id: PromptLogprob} for the token itself and the alternatives;
# null for the first token, which nothing precedes.
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = Field(None, description="the stop token or string")
    prompt_logprobs: PromptLogprobs | None = Field(
        None, description="extension, with the request's prompt_logprobs (in a stream: the "
        "choice's first chunk)")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(BaseModel):
    """One SSE event of a streamed completion (``data: {...}``; the stream ends with
    ``data: [DONE]``)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = Field(
        None, description="with --reasoning-parser: the model's thinking, apart from content")
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = Field(None, description="the stop token or string")


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = Field(
        None, description="extension, with the request's prompt_logprobs")


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A tool call's piece in a stream: the first carries its id, type and name; the
    following ones fragments of its arguments (concatenated, they are the JSON text)."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    """One SSE event of a streamed chat completion (the stream ends with ``data: [DONE]``)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    prompt_logprobs: PromptLogprobs | None = Field(
        None, description="extension, with the request's prompt_logprobs: in the first chunk "
        "that carries tokens")
