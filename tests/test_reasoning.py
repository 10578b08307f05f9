"""--reasoning-parser: reasoning_content apart from content, streamed and not."""

from __future__ import annotations

import random

import openai
import pytest
from live_server import LiveServer

from xllm.api.app import build_app
from xllm.api.reasoning import ReasoningStream, parser_name, split
from xllm.api.settings import ServerSettings

# Outputs as each family writes them (DeepSeek-R1's template opens <think> in the prompt;
# Qwen3 opens it in the output, or writes none with thinking off).
RECORDED = [
    ("deepseek_r1", "Okay, 2 + 2: add them.\nThat is 4.\n</think>\n\nThe answer is **4**.",
     ("Okay, 2 + 2: add them.\nThat is 4.\n", "\n\nThe answer is **4**.")),
    ("deepseek_r1", "<think>\nshort\n</think>Done.", ("\nshort\n", "Done.")),
    ("deepseek_r1", "Still thinking when max_tokens ran o", ("Still thinking when max_tokens ran o",
                                                          None)),
    ("deepseek_r1", "</think>Straight to it.", (None, "Straight to it.")),
    ("qwen3", "<think>\nThe user greets me.\n</think>\n\nHello! How can I help?",
     ("\nThe user greets me.\n", "\n\nHello! How can I help?")),
    ("qwen3", "Hello! (thinking off)", (None, "Hello! (thinking off)")),
    ("qwen3", "<think>\ncut by length", ("\ncut by length", None)),
    ("qwen3", "Text that mentions </think> is content", (None,
                                                       "Text that mentions </think> is content")),
    ("qwen3", "<thi", (None, "<thi")),
    ("qwen3", "", (None, None)),
]


@pytest.mark.parametrize("parser, text, expected", RECORDED)
def test_recorded_outputs_split_alike_streamed_and_not(parser: str, text: str,
                                                       expected: tuple) -> None:
    assert split(parser, text) == expected
    rng = random.Random(len(text))
    for cuts in ([1] * len(text), [rng.randint(1, 6) for _ in range(len(text))]):
        stream, at, parts = ReasoningStream(parser), 0, ["", ""]
        for size in cuts:
            if at >= len(text):
                break
            piece = text[at:at + size]
            at += size
            reasoning, content = stream.feed(piece, final=at >= len(text))
            parts[0] += reasoning
            parts[1] += content
            assert "</think>" not in parts[0] and "<think>" not in parts[0]  # tags never leak
        if at < len(text) or not text:
            reasoning, content = stream.feed("", final=True)
            parts[0] += reasoning
            parts[1] += content
        assert (parts[0] or None, parts[1] or None) == expected, cuts[:8]


def test_parser_names() -> None:
    assert parser_name("DeepSeek-R1") == "deepseek_r1"
    with pytest.raises(ValueError, match="qwen3"):
        parser_name("llama")
    assert ServerSettings(reasoning_parser="deepseek-r1").reasoning_parser == "deepseek_r1"
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        ServerSettings(reasoning_parser="nope")


@pytest.mark.parametrize("parser", ["deepseek_r1", "qwen3"])
def test_server_splits_chat_answers(served_engine, parser: str) -> None:  # noqa: ANN001
    """The demo model writes no tags: under deepseek_r1 its whole answer is reasoning (no
    </think> came), under qwen3 all content; streamed deltas add up to the same fields."""
    messages = [{"role": "user", "content": "Name a colour."}]

    def run(settings: ServerSettings) -> tuple[object, list]:
        with LiveServer(build_app(served_engine, settings, shutdown_engine=False)) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0,
                                   timeout=60)
            whole = client.chat.completions.create(model="demo", messages=messages,
                                                   max_tokens=12, temperature=0)
            chunks = list(client.chat.completions.create(
                model="demo", messages=messages, max_tokens=12, temperature=0, stream=True))
        return whole.choices[0].message, chunks

    plain, _ = run(ServerSettings(served_model_names=["demo"]))
    message, chunks = run(ServerSettings(served_model_names=["demo"], reasoning_parser=parser))
    assert plain.content
    extra = message.model_extra or {}
    if parser == "deepseek_r1":
        assert extra.get("reasoning_content") == plain.content and message.content is None
    else:
        assert message.content == plain.content and extra.get("reasoning_content") is None
    streamed = {"reasoning_content": "", "content": ""}
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            streamed["content"] += delta.content or ""
            streamed["reasoning_content"] += (delta.model_extra or {}).get(
                "reasoning_content") or ""
    assert streamed["content"] == (message.content or "")
    assert streamed["reasoning_content"] == (extra.get("reasoning_content") or "")
