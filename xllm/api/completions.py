"""POST /v1/completions: text or token-id prompts (one or a batch), stream or not, echo,
``logprobs: int`` (with echo, the prompt tokens' too, as OpenAI's legacy completions), the
``prompt_logprobs`` extension. Choice ``index`` is ``prompt_index * n + completion_index``."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from xllm.api.errors import APIError, error_body
from xllm.api.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    PromptLogprob,
    random_id,
)
from xllm.api.sampling import check_structured, to_sampling_params
from xllm.api.serving import Job, OpenAIServing, delta_logprobs
from xllm.engine.outputs import RequestOutput

__all__ = ["create_completion"]


class _Logprobs:
    """Builds a choice's CompletionLogprobs incrementally (text offsets run on)."""

    def __init__(self, serving: OpenAIServing, k: int, offset: int) -> None:
        self.serving, self.k, self.offset = serving, k, offset

    def add(self, out: RequestOutput, index: int, num_new: int,
            lp: CompletionLogprobs | None = None) -> CompletionLogprobs:
        """Appends the last ``num_new`` generated tokens of completion ``index`` to ``lp``."""
        ids, entries = delta_logprobs(out, index, num_new)
        lp = lp if lp is not None else CompletionLogprobs()
        for tid, value, top in self.serving.logprob_entries(ids, entries, self.k):
            text = self.serving.token_text(tid)
            lp.tokens.append(text)
            lp.token_logprobs.append(value)
            lp.top_logprobs.append({self.serving.token_text(t): v for t, v in top})
            lp.text_offset.append(self.offset)
            self.offset += len(text)
        return lp

    def prompt(self, out: RequestOutput) -> CompletionLogprobs:
        """The echoed prompt's tokens, as OpenAI: the first one's logprob and alternatives are
        null. Offsets run on from 0 over the tokens' texts; the generated tokens' offsets
        continue from the echoed text's length (``offset``), where they sit in the text."""
        lp = CompletionLogprobs()
        offset = 0
        for tid, value, top in self.serving.prompt_logprob_entries(out, self.k):
            text = self.serving.token_text(tid)
            lp.tokens.append(text)
            lp.token_logprobs.append(value)
            lp.top_logprobs.append(None if top is None else
                                   {self.serving.token_text(t): v for t, v in top})
            lp.text_offset.append(offset)
            offset += len(text)
        return lp


async def create_completion(serving: OpenAIServing, req: CompletionRequest,
                            raw: Request) -> Response:
    serving.check_model(req.model)
    serving.check_ready()
    prompts = await serving.prompt_inputs(req.prompt, "prompt")
    params = [to_sampling_params(req, num_prompt_tokens=len(p.token_ids),
                                 max_model_len=serving.max_model_len,
                                 max_tokens_limit=serving.settings.max_tokens_limit,
                                 max_n=serving.settings.max_n,
                                 scores_prompts=serving.scores_prompts)
              for p in prompts]
    await check_structured(req, params[0].structured)
    echo = [(p.text if p.text is not None else serving.decode(p.token_ids)) if req.echo else ""
            for p in prompts]
    job = serving.submit(prompts, params, priority=req.priority, offline=req.offline)
    rid = random_id("cmpl")
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(serving, req, job, rid, echo, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    final = await serving.finished_outputs(job, raw)
    if final is None:
        return Response(status_code=499)  # nobody is listening
    choices = []
    for i in range(len(prompts)):
        out = final[i]
        prompt_logprobs = _prompt_logprobs(serving, req, out)
        for c in out.outputs:
            logprobs = None
            if req.logprobs is not None:
                builder = _Logprobs(serving, req.logprobs, len(echo[i]))
                logprobs = builder.add(out, c.index, len(c.token_ids),
                                       builder.prompt(out) if req.echo else None)
            choices.append(CompletionChoice(
                index=i * req.n + c.index, text=echo[i] + c.text, logprobs=logprobs,
                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                prompt_logprobs=prompt_logprobs))
    body = CompletionResponse(id=rid, model=serving.model_name, choices=choices,
                              usage=job.usage())
    return JSONResponse(body.model_dump())


async def _stream(serving: OpenAIServing, req: CompletionRequest, job: Job, rid: str,
                  echo: list[str], include_usage: bool) -> AsyncIterator[str]:
    n = req.n
    started: set[int] = set()
    done: set[int] = set()
    builders: dict[int, _Logprobs] = {}
    try:
        async for i, out in serving.outputs(job):
            choices = []
            for c in out.outputs:
                index = i * n + c.index
                if index in done:
                    continue
                text, ids = out.deltas.get(c.index, ("", []))
                first = index not in started
                if first:
                    text = echo[i] + text
                if not text and not ids and c.finish_reason is None:
                    continue
                started.add(index)
                logprobs = None
                if req.logprobs is not None:
                    builder = builders.setdefault(
                        index, _Logprobs(serving, req.logprobs, len(echo[i])))
                    # The echoed prompt (text and logprobs) rides on the choice's first chunk.
                    logprobs = builder.add(out, c.index, len(ids),
                                           builder.prompt(out) if first and req.echo else None)
                if c.finish_reason is not None:
                    done.add(index)
                choices.append(CompletionChoice(
                    index=index, text=text, logprobs=logprobs, finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                    prompt_logprobs=_prompt_logprobs(serving, req, out) if first else None))
            if choices:
                chunk = CompletionStreamResponse(id=rid, model=serving.model_name,
                                                 choices=choices)
                yield f"data: {chunk.model_dump_json()}\n\n"
        if include_usage:
            chunk = CompletionStreamResponse(id=rid, model=serving.model_name, choices=[],
                                             usage=job.usage())
            yield f"data: {chunk.model_dump_json()}\n\n"
    except APIError as e:
        yield f"data: {_json(error_body(e.status, e.message, e.type, e.param, e.code))}\n\n"
    yield "data: [DONE]\n\n"


def _prompt_logprobs(serving: OpenAIServing, req: CompletionRequest,
                     out: RequestOutput) -> list[dict[str, PromptLogprob] | None] | None:
    """The prompt_logprobs extension's body, when the request asked for it."""
    if req.prompt_logprobs is None:
        return None
    return serving.prompt_logprobs(out, req.prompt_logprobs)


def _json(obj: object) -> str:
    import json

    return json.dumps(obj, separators=(",", ":"))
