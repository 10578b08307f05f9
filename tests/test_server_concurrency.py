"""Many concurrent streaming clients against the offline result; a mid-stream disconnect."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlparse

import openai
import pytest
from live_server import LiveServer

from xllm import LLM, SamplingParams
from xllm.api.app import build_app
from xllm.api.settings import ServerSettings

pytestmark = pytest.mark.timeout(180)

# 56 completions and 8 chats (chat prompts carry the template's long system text, and the
# whole set must stay cheap on one core): every client's text, finish reason and token count
# must equal the offline engine's for its prompt.
NUM_CHATS = 8
MAX_TOKENS = 6
TOPICS = ["the sea", "a fox", "mountains", "bread", "the moon", "rain", "a robot", "music"]
PROMPTS = [f"{i}: {TOPICS[i % 8]} is" for i in range(64 - NUM_CHATS)]
CHATS = [[{"role": "user", "content": f"Say something about {TOPICS[i]}."}]
         for i in range(NUM_CHATS)]


@pytest.fixture(scope="module")
def server(served_engine) -> Iterator[LiveServer]:  # noqa: ANN001
    settings = ServerSettings(served_model_names=["demo"])
    with LiveServer(build_app(served_engine, settings, shutdown_engine=False)) as srv:
        yield srv


def test_64_streaming_clients_match_offline_greedy(server: LiveServer, demo_model_dir) -> None:  # noqa: ANN001
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    offline = LLM(model=str(demo_model_dir), dtype="float32", max_model_len=512,
                  kv_cache_memory_gb=0.1, num_threads=1)
    ref_completions = [o.outputs[0] for o in offline.generate(PROMPTS, greedy, use_tqdm=False)]
    ref_chats = [o.outputs[0] for o in offline.chat(CHATS, greedy, use_tqdm=False)]
    del offline

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                                timeout=120)

    async def completion(prompt: str) -> tuple[str, str | None, int]:
        text, reason, tokens = "", None, -1
        stream = await client.completions.create(
            model="demo", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
            stream_options={"include_usage": True})
        async for chunk in stream:
            for c in chunk.choices:
                assert reason is None, "text after the finish reason"
                text += c.text
                reason = c.finish_reason
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return text, reason, tokens

    async def chat(messages: list[dict]) -> tuple[str, str | None, int]:
        text, reason, tokens = "", None, -1
        stream = await client.chat.completions.create(
            model="demo", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
            stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            for c in chunk.choices:
                assert reason is None, "text after the finish reason"
                text += c.delta.content or ""
                reason = c.finish_reason
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return text, reason, tokens

    async def run_all() -> list[tuple[str, str | None, int]]:
        jobs = [completion(p) for p in PROMPTS] + [chat(m) for m in CHATS]
        try:
            return await asyncio.gather(*jobs)
        finally:
            await client.close()

    results = asyncio.run(run_all())
    for got, ref in zip(results, ref_completions + ref_chats, strict=True):
        assert got == (ref.text, ref.finish_reason, len(ref.token_ids))


def test_disconnect_mid_stream_frees_blocks_within_one_step(server: LiveServer,
                                                            served_engine) -> None:  # noqa: ANN001
    engine = served_engine
    aborts: list[int] = []
    real_abort = engine._abort

    def recording_abort(request_id: str) -> None:
        aborts.append(engine.stats().num_steps)
        real_abort(request_id)

    engine._abort = recording_abort
    try:
        u = urlparse(server.url)
        body = (b'{"model": "demo", "prompt": "Count: one, two,", "max_tokens": 200, '
                b'"ignore_eos": true, "stream": true}')
        with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            seen = sock.recv(4096)
            assert seen.startswith(b"HTTP/1.1 200"), seen
            while seen.count(b"data: ") < 3:  # a few tokens in: the request holds blocks
                more = sock.recv(4096)
                assert more, seen
                seen += more
            assert engine.stats().kv_cache_usage > 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            s = engine.stats()
            if aborts and s.num_unfinished_requests == 0 and s.kv_cache_usage == 0.0:
                break
            time.sleep(0.01)
    finally:
        engine._abort = real_abort
    s = engine.stats()
    assert aborts, "the disconnect did not abort the request"
    assert s.num_unfinished_requests == 0 and s.kv_cache_usage == 0.0, s
    assert s.num_steps - aborts[0] <= 1, f"blocks freed {s.num_steps - aborts[0]} steps late"
