"""Exact resumption at the instance: ``Instance.Generate`` with ``generated_token_ids`` (a
prefix of an uninterrupted run, as the master sends after the first instance died) must
continue exactly as the uninterrupted run did - for seeded sampling with penalties and
min_tokens too, and with a stop string spanning the resume point. In-process gRPC server
over the shared engine, loopback only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest

from xllm.sampling_params import SamplingParams
from xllm.service.instance import InstanceServicer, params_to_proto
from xllm.service.proto import instance_pb2, instance_pb2_grpc

pytestmark = pytest.mark.timeout(120)

PROMPT = "Write a short list of fruits and their colours:"
SAMPLED = SamplingParams(
    temperature=0.9,
    top_p=0.95,
    top_k=50,
    seed=1234,
    max_tokens=32,
    min_tokens=20,
    frequency_penalty=0.6,
    presence_penalty=0.4,
    repetition_penalty=1.15,
    ignore_eos=False,
)


@asynccontextmanager
async def _instance(engine) -> AsyncIterator[instance_pb2_grpc.InstanceStub]:  # noqa: ANN001
    server = grpc.aio.server()
    instance_pb2_grpc.add_InstanceServicer_to_server(InstanceServicer(engine), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield instance_pb2_grpc.InstanceStub(channel)
    finally:
        await channel.close()
        await server.stop(0)


async def _generate(
    stub: instance_pb2_grpc.InstanceStub,
    prompt: list[int],
    params: SamplingParams,
    generated: list[int] = (),  # type: ignore[assignment]
    sent: str = "",
    rid: str = "r",
) -> list[instance_pb2.GenerateResponse]:
    req = instance_pb2.GenerateRequest(
        request_id=rid,
        prompt_token_ids=prompt,
        generated_token_ids=list(generated),
        generated_text=sent,
        sampling_params=params_to_proto(params),
    )
    return [resp async for resp in stub.Generate(req, timeout=60)]


def _joined(resps: list[instance_pb2.GenerateResponse]) -> tuple[list[int], str, str]:
    ids = [t for r in resps for t in r.token_ids]
    return ids, "".join(r.text_delta for r in resps), resps[-1].finish_reason


def _cuts(resps: list[instance_pb2.GenerateResponse]) -> list[tuple[list[int], str]]:
    """(tokens, text) the client had after each message of a stream but the last: the
    points at which a master may have to resume."""
    out, ids, text = [], [], ""
    for r in resps[:-1]:
        ids, text = ids + list(r.token_ids), text + r.text_delta
        out.append((ids, text))
    return out


def test_seeded_sampled_request_resumes_exactly(served_engine) -> None:  # noqa: ANN001
    prompt = served_engine.engine.tokenizer.encode(PROMPT)

    async def run() -> None:
        async with _instance(served_engine) as stub:
            full = await _generate(stub, prompt, SAMPLED, rid="full")
            want_ids, want_text, want_finish = _joined(full)
            assert len(want_ids) >= SAMPLED.min_tokens
            # the sampled run is not greedy: otherwise this test would prove nothing
            greedy = await _generate(
                stub,
                prompt,
                SamplingParams(temperature=0.0, max_tokens=SAMPLED.max_tokens),
                rid="greedy",
            )
            assert _joined(greedy)[0] != want_ids
            cuts = _cuts(full)
            # early (inside min_tokens), middle and late resume points
            for k in sorted({0, 4, len(cuts) // 2, len(cuts) - 1}):
                ids, sent = cuts[k]
                resumed = await _generate(stub, prompt, SAMPLED, ids, sent, rid=f"resume{k}")
                got_ids, got_text, finish = _joined(resumed)
                assert ids + got_ids == want_ids, k
                assert sent + got_text == want_text, k
                assert finish == want_finish
                assert resumed[-1].usage.completion_tokens == len(want_ids)

    asyncio.run(run())


def test_stop_string_spanning_the_resume_point_is_found(served_engine) -> None:  # noqa: ANN001
    prompt = served_engine.engine.tokenizer.encode(PROMPT)
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)

    async def run() -> None:
        async with _instance(served_engine) as stub:
            plain = await _generate(stub, prompt, greedy, rid="plain")
            text = _joined(plain)[1]
            # A stop string of the last 3 characters the client had after k tokens and the
            # next 3 (its first occurrence): resumed after k tokens, the new instance sees
            # only its first half in the tokens it is given.
            for ids_c, text_k in _cuts(plain)[6:18]:
                k, before = len(ids_c), len(text_k)
                stop = text[before - 3 : before + 3]
                if len(stop) == 6 and text.find(stop) == before - 3:
                    break
            else:
                raise AssertionError(f"no usable stop string in {text!r}")
            params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop])
            full = await _generate(stub, prompt, params, rid="stopped")
            want_ids, want_text, finish = _joined(full)
            assert (finish, full[-1].stop_string) == ("stop", stop)
            assert want_text == text[: before - 3]
            # what the client had after k tokens (messages carry one token each unless the
            # reader fell behind; then: the same rule, 5 characters held back for a stop)
            ids_k, sent = next(
                (c for c in _cuts(full) if len(c[0]) == k), (want_ids[:k], text_k[: before - 5])
            )
            assert len(sent) <= before - 3  # held back: the stop's first part is not sent
            resumed = await _generate(stub, prompt, params, ids_k, sent, rid="resumed")
            got_ids, got_text, got_finish = _joined(resumed)
            assert (got_finish, resumed[-1].stop_string) == ("stop", stop)
            assert sent + got_text == want_text
            assert ids_k + got_ids == want_ids

    asyncio.run(run())


def test_resume_validation(served_engine) -> None:  # noqa: ANN001
    prompt = served_engine.engine.tokenizer.encode(PROMPT)

    async def run() -> None:
        async with _instance(served_engine) as stub:
            for generated, params, match in [
                ([1, 2, 3], SamplingParams(max_tokens=3), "nothing is left"),
                ([10**7], SamplingParams(max_tokens=8), "generated_token_ids must be in"),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await _generate(stub, prompt, params, generated, rid="bad")
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert match in (e.value.details() or "")

    asyncio.run(run())
