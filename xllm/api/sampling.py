"""OpenAI request -> SamplingParams, with the context-length rule. Shared with the master."""

from __future__ import annotations

import asyncio

from xllm.api.errors import APIError
from xllm.api.protocol import ChatCompletionRequest, CompletionRequest
from xllm.sampling_params import SamplingParams
from xllm.structured import GrammarSpec
from xllm.structured.grammar import check as check_grammar

__all__ = ["check_context", "check_structured", "requested_max_tokens", "structured_spec",
           "to_sampling_params"]

# OpenAI's completions endpoint defaults to 16 new tokens; chat to whatever the context holds.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


def requested_max_tokens(request: CompletionRequest | ChatCompletionRequest) -> int | None:
    if isinstance(request, ChatCompletionRequest):
        if request.max_completion_tokens is not None:
            return request.max_completion_tokens
        return request.max_tokens
    return request.max_tokens


def check_context(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int,
                  param: str) -> None:
    """400 when the prompt (plus the tokens asked for) does not fit the context."""
    if num_prompt_tokens >= max_model_len:
        raise APIError.bad_request(
            f"this model's maximum context length is {max_model_len} tokens, but the prompt "
            f"has {num_prompt_tokens} tokens (at most {max_model_len - 1} leave room for one "
            "new token); shorten the prompt", param=param, code="context_length_exceeded")
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
        raise APIError.bad_request(
            f"this model's maximum context length is {max_model_len} tokens, but "
            f"{num_prompt_tokens + max_tokens} were requested ({num_prompt_tokens} in the "
            f"prompt, {max_tokens} to generate); lower max_tokens to at most "
            f"{max_model_len - num_prompt_tokens} or shorten the prompt",
            param="max_tokens", code="context_length_exceeded")


def _structured_param(request: CompletionRequest | ChatCompletionRequest,
                      kind: str | None = None) -> str:
    """The request field a structured-output spec came from (for a 400's ``param``)."""
    fmt = request.response_format
    if fmt is not None and fmt.type == "json_schema":
        return "response_format.json_schema.schema"
    if fmt is not None and fmt.type == "json_object":
        return "response_format"
    return "structured_outputs" + (f".{kind}" if kind else "")


def structured_spec(request: CompletionRequest | ChatCompletionRequest) -> GrammarSpec | None:
    """What ``response_format`` or the ``structured_outputs`` extension asks the output to
    match (None: nothing). A 400 for a malformed request; ``check_structured`` then parses
    the spec itself."""
    fmt, so = request.response_format, request.structured_outputs
    if fmt is not None and fmt.type != "text" and so is not None:
        raise APIError.bad_request("give response_format or structured_outputs, not both",
                                   param="structured_outputs")
    kind = None
    try:
        if fmt is not None and fmt.type == "json_object":
            return GrammarSpec("json_object")
        if fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise ValueError("response_format of type json_schema needs json_schema.schema")
            return GrammarSpec.json_schema(fmt.json_schema.schema_)
        if so is None:
            return None
        fields = {"json": so.json_, "regex": so.regex, "choice": so.choice,
                  "grammar": so.grammar, "json_object": so.json_object or None}
        named = [k for k, v in fields.items() if v is not None]
        if len(named) != 1:
            raise ValueError("structured_outputs takes exactly one of json, regex, choice, "
                             f"grammar, json_object; got {', '.join(named) or 'none'}")
        kind = named[0]
        value = fields[kind]
        if kind == "json":
            return GrammarSpec.json_schema(value)  # type: ignore[arg-type]
        if kind == "choice":
            return GrammarSpec.choice(value)  # type: ignore[arg-type]
        return GrammarSpec(kind, "" if kind == "json_object" else value)  # type: ignore
    except ValueError as e:
        raise APIError.bad_request(str(e), param=_structured_param(request, kind)) from e


async def check_structured(request: CompletionRequest | ChatCompletionRequest,
                           spec: GrammarSpec | None, param: str | None = None) -> None:
    """A 400 that says what is wrong with a schema, regex or grammar that does not parse.
    Parsed on a worker thread: a large schema takes a while, and the first one loads the
    grammar engine. ``param``: the field to blame (default: where ``structured_spec``
    found it)."""
    if spec is None:
        return
    try:
        await asyncio.to_thread(check_grammar, spec)
    except ValueError as e:
        raise APIError.bad_request(
            str(e), param=param or _structured_param(request, spec.kind)) from e


def to_sampling_params(request: CompletionRequest | ChatCompletionRequest, *,
                       num_prompt_tokens: int, max_model_len: int,
                       max_tokens_limit: int | None = None, max_n: int | None = None,
                       scores_prompts: bool = True,
                       structured: GrammarSpec | None = None) -> SamplingParams:
    """SamplingParams for one prompt. APIError(400) naming the parameter on bad values.

    ``max_tokens_limit``: the server's cap on new tokens per completion (requests above it
    are refused; requests without max_tokens get at most that many). ``max_n``: the server's
    cap on ``n``. ``scores_prompts``: whether the engine behind the server computes prompt
    logprobs (completions' ``echo`` with ``logprobs``, the ``prompt_logprobs`` extension);
    where it does not, those requests are refused. ``structured``: the grammar the output
    must match, when not the request's own (``structured_spec``): a forced tool call's.
    """
    if max_n is not None and request.n > max_n:
        raise APIError.bad_request(f"n is {request.n} but this server allows at most {max_n} "
                                   "completions per prompt", param="n")
    max_tokens = requested_max_tokens(request)
    param = "messages" if isinstance(request, ChatCompletionRequest) else "prompt"
    check_context(num_prompt_tokens, max_tokens, max_model_len, param)
    if max_tokens is not None and max_tokens_limit is not None and max_tokens > max_tokens_limit:
        raise APIError.bad_request(
            f"max_tokens is {max_tokens} but this server allows at most {max_tokens_limit} new "
            "tokens per completion", param="max_tokens")
    if max_tokens is None:
        room = max_model_len - num_prompt_tokens
        if isinstance(request, CompletionRequest):
            room = min(room, COMPLETIONS_DEFAULT_MAX_TOKENS)
        max_tokens = room if max_tokens_limit is None else min(room, max_tokens_limit)
    if isinstance(request, ChatCompletionRequest):
        if request.top_logprobs is not None and not request.logprobs:
            raise APIError.bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
    else:
        logprobs = request.logprobs
    prompt_logprobs = request.prompt_logprobs
    if isinstance(request, CompletionRequest) and request.echo and logprobs is not None:
        # OpenAI's echo + logprobs scores the echoed prompt with the same k.
        prompt_logprobs = max(logprobs, prompt_logprobs or 0)
    if prompt_logprobs is not None and not scores_prompts:
        echoing = request.prompt_logprobs is None
        raise APIError.bad_request(
            ("echo with logprobs needs" if echoing else "prompt_logprobs needs")
            + " the prompt tokens scored, which this server's engine does not do",
            param="echo" if echoing else "prompt_logprobs")
    if request.min_tokens > max_tokens:
        raise APIError.bad_request(
            f"min_tokens ({request.min_tokens}) must not exceed max_tokens ({max_tokens})",
            param="min_tokens")
    stop = request.stop if request.stop is not None else []
    logit_bias = None
    if request.logit_bias is not None:
        logit_bias = {}
        for key, bias in request.logit_bias.items():
            if not key.strip().isdigit():
                raise APIError.bad_request(f"logit_bias keys are token ids; got {key!r}",
                                           param="logit_bias")
            logit_bias[int(key)] = bias
    try:
        return SamplingParams(
            n=request.n,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=request.top_k, min_p=request.min_p, seed=request.seed,
            repetition_penalty=request.repetition_penalty,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            max_tokens=max_tokens, min_tokens=request.min_tokens,
            stop=[stop] if isinstance(stop, str) else list(stop),
            stop_token_ids=list(request.stop_token_ids or []), ignore_eos=request.ignore_eos,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=request.skip_special_tokens,
            include_stop_str_in_output=request.include_stop_str_in_output,
            logit_bias=logit_bias,
            structured=structured if structured is not None else structured_spec(request))
    except ValueError as e:  # SamplingParams names the field in its message
        raise APIError.bad_request(str(e)) from e
