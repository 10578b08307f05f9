"""From a validated OpenAI request to engine requests and back: admission (model, readiness,
overload), prompts, streaming over several engine requests, logprobs, usage and metrics.

The two endpoints' body formats live in ``completions.py`` and ``chat.py``; what they share
is here. A request that ends early - the client went away, an SSE write failed, the task was
cancelled at shutdown - aborts its engine requests on the way out, so their KV blocks are
freed at the engine's next turn.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from fastapi import Request

from xllm.api.errors import APIError
from xllm.api.metrics import ServerMetrics
from xllm.api.protocol import PromptLogprob, PromptTokensDetails, UsageInfo
from xllm.api.settings import ServerSettings
from xllm.engine.async_engine import READY, EngineDeadError, EngineOverloadedError
from xllm.engine.outputs import RequestOutput
from xllm.engine.protocol import EngineClient, OutputStream
from xllm.sampling_params import SamplingParams

__all__ = ["Job", "OpenAIServing", "PromptInput"]

_LONG_TEXT = 1 << 14  # characters; longer texts are tokenized off the event loop
_MIN_LOGPROB = -9999.0  # JSON has no -inf (a token the sampler had masked out)


@dataclass
class PromptInput:
    text: str | None  # None when the client sent token ids
    token_ids: list[int]


@dataclass
class _Track:
    """One engine request's timing and token counts, for metrics and usage."""

    arrival: float
    num_prompt_tokens: int
    first_token: float | None = None
    finished: float | None = None
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)


@dataclass
class Job:
    """All engine requests of one HTTP request (one per prompt; each has n completions)."""

    streams: list[OutputStream]
    prompts: list[PromptInput]
    params: list[SamplingParams]
    tracks: list[_Track]

    def abort(self) -> None:
        for s in self.streams:
            s.abort()

    def usage(self) -> UsageInfo:
        p = sum(t.num_prompt_tokens for t in self.tracks)
        c = sum(t.num_output_tokens for t in self.tracks)
        cached = sum(t.num_cached_tokens for t in self.tracks)
        return UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c,
                         prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


class OpenAIServing:
    def __init__(self, engine: EngineClient, settings: ServerSettings,
                 metrics: ServerMetrics) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics

    @property
    def model_name(self) -> str:
        return self.settings.served_model_names[0]

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def scores_prompts(self) -> bool:
        """Whether the engine computes prompt logprobs (AsyncEngine does, the cluster master
        does not yet)."""
        return self.engine.supports_prompt_logprobs

    # ---- admission -----------------------------------------------------------------------

    def check_model(self, name: str) -> None:
        if name not in self.settings.served_model_names:
            served = ", ".join(repr(n) for n in self.settings.served_model_names)
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                           f"{served} (see /v1/models)", param="model",
                           code="model_not_found")

    def check_ready(self) -> None:
        state = self.engine.state
        if state != READY:
            message = (self.engine.error if state != "loading" else None) or (
                "the model is still loading; retry shortly")
            raise APIError(503, message, code="engine_unavailable",
                           headers={"Retry-After": "1"})

    def check_overload(self, adding: int) -> None:
        waiting = self.engine.num_unstarted()
        limit = self.settings.max_waiting_requests
        if waiting + adding > limit:
            raise APIError(503, f"the server is overloaded: {waiting} requests are waiting "
                           f"to start (limit {limit}); retry later", code="overloaded",
                           headers={"Retry-After": "1"})

    # ---- prompts -------------------------------------------------------------------------

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Tokenizes a prompt (long ones off the event loop); a 400 before tokenizing for
        one whose bytes alone show it cannot fit the context."""
        tok = self.engine.tokenizer
        if len(text) > _LONG_TEXT:
            per_token = tok.max_bytes_per_token
            size = len(text.encode("utf-8", "surrogatepass"))
            if per_token and size > per_token * self.max_model_len:
                raise APIError.bad_request(
                    f"the prompt has {size} bytes of text; no token of this model covers more "
                    f"than {per_token}, so it is over {size // per_token} tokens, more than the "
                    f"context holds ({self.max_model_len}, max_model_len); shorten it",
                    code="context_length_exceeded")
            return await asyncio.to_thread(tok.encode, text, add_special_tokens)
        return tok.encode(text, add_special_tokens)

    async def prompt_inputs(self, p: str | list[str] | list[int] | list[list[int]],
                            param: str) -> list[PromptInput]:
        """The prompts of a request's text, texts, token ids or lists of token ids."""
        if isinstance(p, str):
            return [PromptInput(p, await self.encode(p))]
        if isinstance(p[0], str):
            return [PromptInput(t, await self.encode(t)) for t in p]  # type: ignore[arg-type]
        if isinstance(p[0], int):
            self.check_token_ids(p, param)  # type: ignore[arg-type]
            return [PromptInput(None, list(p))]  # type: ignore[arg-type]
        for ids in p:
            self.check_token_ids(ids, param)  # type: ignore[arg-type]
        return [PromptInput(None, list(ids)) for ids in p]  # type: ignore[arg-type]

    def decode(self, ids: Sequence[int]) -> str:
        return self.engine.tokenizer.decode(ids, skip_special_tokens=False)

    @functools.lru_cache(maxsize=1 << 16)  # noqa: B019 - one serving object per server
    def token_text(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id], skip_special_tokens=False)

    def check_token_ids(self, ids: Sequence[int], param: str) -> None:
        vocab = self.engine.vocab_size
        bad = next((t for t in ids if t >= vocab), None)
        if bad is not None:
            raise APIError.bad_request(f"token id {bad} is outside the vocabulary [0, {vocab})",
                                       param=param)

    # ---- running -------------------------------------------------------------------------

    def submit(self, prompts: list[PromptInput], params: list[SamplingParams], *,
               priority: int, offline: bool) -> Job:
        """Submits one engine request per prompt (all or none)."""
        self.check_ready()
        self.check_overload(len(prompts))
        arrival = time.monotonic()
        job = Job([], prompts, params, [])
        try:
            for prompt, p in zip(prompts, params, strict=True):
                source = prompt.token_ids
                job.streams.append(self.engine.generate(source, p, priority=priority,
                                                        offline=offline))
                job.tracks.append(_Track(arrival, len(prompt.token_ids)))
        except EngineOverloadedError as e:
            job.abort()
            raise APIError(503, str(e), code="overloaded", headers={"Retry-After": "1"}) from e
        except EngineDeadError as e:
            job.abort()
            raise APIError(503, str(e), code="engine_unavailable") from e
        return job

    async def outputs(self, job: Job) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) as the engine produces them, over all of the job's
        requests; engine errors become APIError. Aborts the job if left early."""
        try:
            async for i, out in _merge_streams(job.streams):
                self._track(job.tracks[i], out)
                yield i, out
        except EngineDeadError as e:
            raise APIError(503, str(e), code="engine_unavailable") from e
        except ValueError as e:  # the engine refused the request
            raise APIError.bad_request(str(e)) from e
        finally:
            job.abort()

    def _track(self, track: _Track, out: RequestOutput) -> None:
        now = time.monotonic()
        if track.first_token is None and any(ids for _, ids in out.deltas.values()):
            track.first_token = now
        track.num_cached_tokens = out.num_cached_tokens
        if out.finished:
            track.finished = now
            track.num_output_tokens = sum(len(c.token_ids) for c in out.outputs)
            track.finish_reasons = [c.finish_reason or "abort" for c in out.outputs]
            self.metrics.record(arrival=track.arrival, first_token=track.first_token,
                                finished=now, num_prompt_tokens=track.num_prompt_tokens,
                                num_output_tokens=track.num_output_tokens,
                                finish_reasons=track.finish_reasons)

    async def until_done_or_disconnected(self, job: Job, raw: Request,
                                         collect: AsyncIterator[None]) -> bool:
        """Runs ``collect`` to its end; False (and the job aborted) if the client left."""

        async def drain() -> None:
            async for _ in collect:
                pass

        async def disconnected() -> None:
            while (await raw.receive())["type"] != "http.disconnect":
                pass

        work = asyncio.ensure_future(drain())
        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
                job.abort()
        if work.done() and not work.cancelled():
            work.result()  # re-raise an APIError
            return True
        return False

    async def finished_outputs(self, job: Job, raw: Request) -> dict[int, RequestOutput] | None:
        """Each prompt's finished output, once all are in; None (and the job aborted) if the
        client left first."""
        final: dict[int, RequestOutput] = {}

        async def collect() -> AsyncIterator[None]:
            async for i, out in self.outputs(job):
                if out.finished:
                    final[i] = out
                yield None

        if not await self.until_done_or_disconnected(job, raw, collect()):
            return None
        return final

    # ---- logprobs ------------------------------------------------------------------------

    def logprob_entries(self, token_ids: Sequence[int], logprobs: Sequence[dict[int, float]],
                        k: int) -> list[tuple[int, float, list[tuple[int, float]]]]:
        """(sampled token, its logprob, top-k alternatives by logprob) per token."""
        out = []
        for tid, entry in zip(token_ids, logprobs, strict=False):
            top = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
            out.append((tid, _finite(entry.get(tid, _MIN_LOGPROB)),
                        [(t, _finite(v)) for t, v in top]))
        return out


    def prompt_logprob_entries(self, out: RequestOutput, k: int
                               ) -> list[tuple[int, float | None, list[tuple[int, float]] | None]]:
        """(prompt token, its logprob, top-k alternatives) per prompt token; the first
        token's logprob and alternatives are None (nothing precedes it)."""
        ids, entries = out.prompt_token_ids, out.prompt_logprobs
        if entries is None or len(entries) != len(ids):
            raise APIError(500, "the engine returned no prompt logprobs for a request that "
                           "asked for them")
        first: list[tuple[int, float | None, list[tuple[int, float]] | None]] = [
            (ids[0], None, None)]
        return first + self.logprob_entries(ids[1:], entries[1:], k)  # type: ignore[arg-type]

    def prompt_logprobs(self, out: RequestOutput, k: int) -> list[dict[str, PromptLogprob] | None]:
        """The ``prompt_logprobs`` extension's body (vLLM's shape): per prompt token, the
        token and its k best alternatives keyed by token id, with rank and text."""
        ranks = out.prompt_token_ranks or []
        result: list[dict[str, PromptLogprob] | None] = []
        for i, (tid, value, top) in enumerate(self.prompt_logprob_entries(out, k)):
            if value is None or top is None:
                result.append(None)
                continue
            entry = {str(tid): PromptLogprob(logprob=value, rank=ranks[i] if i < len(ranks)
                                             else None, decoded_token=self.token_text(tid))}
            for rank, (alt, alt_value) in enumerate(top, start=1):
                entry.setdefault(str(alt), PromptLogprob(
                    logprob=alt_value, rank=rank, decoded_token=self.token_text(alt)))
            result.append(entry)
        return result


def _finite(value: float) -> float:
    return max(float(value), _MIN_LOGPROB)


def delta_logprobs(out: RequestOutput, index: int, num_new: int) -> tuple[list[int], list]:
    """The last ``num_new`` tokens of completion ``index`` and their logprob entries."""
    c = out.outputs[index]
    start = len(c.token_ids) - num_new
    ids = c.token_ids[start:]
    entries = (c.logprobs or [])[start:start + num_new]
    return ids, entries


async def _merge_streams(
        streams: list[OutputStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleaves several streams as their outputs arrive; one pending read per stream, so
    a slow reader keeps each stream's coalescing (memory stays bounded)."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                out = task.result()  # StopAsyncIteration cannot happen: we stop at finished
                yield i, out
                if not out.finished:
                    pending[asyncio.ensure_future(anext(streams[i]))] = i
    finally:
        for task in pending:
            task.cancel()
