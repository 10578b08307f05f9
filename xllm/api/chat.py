"""POST /v1/chat/completions: the model's chat template, stream or not, ``logprobs`` /
``top_logprobs``, ``n``, tool calls (``xllm.api.tools``), reasoning content, the
``prompt_logprobs`` extension (vLLM's)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace

import jinja2
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from xllm.api.errors import APIError, error_body
from xllm.api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatStreamChoice,
    ChoiceLogprobs,
    DeltaMessage,
    PromptLogprob,
    TokenLogprob,
    TopLogprob,
    random_id,
)
from xllm.api.reasoning import ReasoningStream, split
from xllm.api.sampling import check_structured, to_sampling_params
from xllm.api.serving import Job, OpenAIServing, PromptInput, delta_logprobs
from xllm.api.tools import ToolPlan, plan_tools, template_messages
from xllm.engine.outputs import RequestOutput

__all__ = ["create_chat_completion"]


async def _prompt(serving: OpenAIServing, req: ChatCompletionRequest,
                  plan: ToolPlan) -> PromptInput:
    tok = serving.engine.tokenizer
    try:
        text = tok.apply_chat_template(template_messages(req), tools=plan.tools,
                                       add_generation_prompt=req.add_generation_prompt)
    except (ValueError, jinja2.TemplateError) as e:
        # The template itself rejects some conversations (raise_exception in Jinja).
        raise APIError.bad_request(f"the chat template rejected the messages: {e}",
                                   param="messages") from e
    # The template writes BOS itself; do not add special tokens a second time.
    return PromptInput(text, await serving.encode(text, add_special_tokens=False))


def _logprobs(serving: OpenAIServing, out: RequestOutput, index: int, num_new: int,
              k: int) -> ChoiceLogprobs:
    ids, entries = delta_logprobs(out, index, num_new)
    content = []
    for tid, value, top in serving.logprob_entries(ids, entries, k):
        text = serving.token_text(tid)
        content.append(TokenLogprob(
            token=text, logprob=value, bytes=list(text.encode()),
            top_logprobs=[TopLogprob(token=(t := serving.token_text(a)), logprob=v,
                                     bytes=list(t.encode())) for a, v in top]))
    return ChoiceLogprobs(content=content)


def _message(parser: str | None, plan: ToolPlan, text: str,
             finish: str | None) -> tuple[AssistantMessage, str | None]:
    """The answer's message (reasoning split off, then tool calls read) and its
    finish_reason ("tool_calls" when the model stopped after calling tools on its own)."""
    reasoning, content = split(parser, text) if parser is not None else (None, text)
    calls = []
    if plan.reads_calls and content is not None:
        content, calls = plan.parse(content)
    return (AssistantMessage(content=content, reasoning_content=reasoning, tool_calls=calls),
            _finish(plan, finish, bool(calls)))


def _finish(plan: ToolPlan, finish: str | None, called: bool) -> str | None:
    return "tool_calls" if called and finish == "stop" and plan.mode != "named" else finish


async def create_chat_completion(serving: OpenAIServing, req: ChatCompletionRequest,
                                 raw: Request) -> Response:
    serving.check_model(req.model)
    serving.check_ready()
    plan = plan_tools(req, serving.settings.tool_call_parser,
                      serving.engine.tokenizer.chat_template)
    prompt = await _prompt(serving, req, plan)
    params = to_sampling_params(req, num_prompt_tokens=len(prompt.token_ids),
                                max_model_len=serving.max_model_len,
                                max_tokens_limit=serving.settings.max_tokens_limit,
                                max_n=serving.settings.max_n,
                                scores_prompts=serving.scores_prompts, structured=plan.spec)
    if plan.mode == "auto" and params.skip_special_tokens:
        # Tool-call markers ([TOOL_CALLS], <|python_tag|>, DeepSeek's) are special tokens:
        # the parser must see them in the text (as vLLM's parsers ask too).
        params = replace(params, skip_special_tokens=False)
    await check_structured(req, params.structured,
                           param="tools" if plan.spec is not None else None)
    k = params.logprobs
    job = serving.submit([prompt], [params], priority=req.priority, offline=req.offline)
    rid = random_id("chatcmpl")
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(serving, req, plan, job, rid, k, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    final = await serving.finished_outputs(job, raw)
    if final is None:
        return Response(status_code=499)  # nobody is listening
    out = final[0]
    parser = serving.settings.reasoning_parser
    choices = []
    for c in out.outputs:
        message, finish = _message(parser, plan, c.text, c.finish_reason)
        choices.append(ChatChoice(
            index=c.index, message=message,
            logprobs=None if k is None else _logprobs(serving, out, c.index, len(c.token_ids),
                                                      k),
            finish_reason=finish, stop_reason=c.stop_reason))
    body = ChatCompletionResponse(
        id=rid, model=serving.model_name, choices=choices, usage=job.usage(),
        prompt_logprobs=None if req.prompt_logprobs is None else serving.prompt_logprobs(
            out, req.prompt_logprobs))
    return JSONResponse(body.model_dump())


async def _stream(serving: OpenAIServing, req: ChatCompletionRequest, plan: ToolPlan, job: Job,
                  rid: str, k: int | None, include_usage: bool) -> AsyncIterator[str]:
    model = serving.model_name

    def event(choices: list[ChatStreamChoice],
              prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None) -> str:
        chunk = ChatCompletionChunk(id=rid, model=model, choices=choices,
                                    prompt_logprobs=prompt_logprobs)
        return f"data: {chunk.model_dump_json()}\n\n"

    done: set[int] = set()
    prompt_sent = req.prompt_logprobs is None
    parser = serving.settings.reasoning_parser
    splits = {i: ReasoningStream(parser) for i in range(req.n)} if parser else None
    tools = {i: plan.streamer() for i in range(req.n)} if plan.reads_calls else None
    try:
        # The role first, as OpenAI does, before any token is computed.
        yield event([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                     for i in range(req.n)])
        async for _, out in serving.outputs(job):
            choices = []
            for c in out.outputs:
                if c.index in done:
                    continue
                text, ids = out.deltas.get(c.index, ("", []))
                if not text and not ids and c.finish_reason is None:
                    continue
                if c.finish_reason is not None:
                    done.add(c.index)
                final = c.finish_reason is not None
                finish = c.finish_reason
                delta = DeltaMessage(content=text)
                if splits is not None or tools is not None:
                    reasoning, content = (splits[c.index].feed(text, final=final)
                                          if splits is not None else ("", text))
                    calls = None
                    if tools is not None:
                        content, calls = tools[c.index].feed(content, final)
                        finish = _finish(plan, finish, tools[c.index].called)
                    delta = DeltaMessage(content=content or None,
                                         reasoning_content=reasoning or None,
                                         tool_calls=calls or None)
                choices.append(ChatStreamChoice(
                    index=c.index, delta=delta,
                    logprobs=None if k is None else _logprobs(serving, out, c.index, len(ids), k),
                    finish_reason=finish, stop_reason=c.stop_reason))
            if choices:
                prompt_logprobs = None
                if not prompt_sent:  # the extension rides on the first chunk with tokens
                    prompt_sent = True
                    prompt_logprobs = serving.prompt_logprobs(out, req.prompt_logprobs or 0)
                yield event(choices, prompt_logprobs)
        if include_usage:
            chunk = ChatCompletionChunk(id=rid, model=model, choices=[], usage=job.usage())
            yield f"data: {chunk.model_dump_json()}\n\n"
    except APIError as e:
        body = error_body(e.status, e.message, e.type, e.param, e.code)
        yield f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
    yield "data: [DONE]\n\n"
