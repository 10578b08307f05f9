"""Tool calling through xllm-server with the official openai client, on the demo model:
required and named tool choices (constrained decoding: every call parses into its
function's schema), auto with a parser, streamed deltas that reassemble to the whole
answer, tool messages through the chat template, and OpenAI-format 400s."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from live_server import openai_client

from xllm.api.protocol import ChatCompletionRequest
from xllm.api.tools import template_messages

pytestmark = pytest.mark.timeout(300)

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 20},
                   "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"timezone": {"type": "string",
                                "pattern": "^[A-Z][a-z]{1,12}/[A-Z][a-z]{1,14}$"}},
    "required": ["timezone"], "additionalProperties": False,
}
SEARCH = {
    "type": "object",
    "properties": {"query": {"type": "string", "maxLength": 40},
                   "limit": {"type": "integer", "minimum": 1, "maximum": 10}},
    "required": ["query", "limit"], "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": n, "description": d, "parameters": p}}
         for n, d, p in (("get_weather", "The weather in a city", WEATHER),
                         ("get_time", "The time in a time zone", TIME),
                         ("search", "Search the web", SEARCH))]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
PROMPTS = [f"{q} (request {i})" for i, q in enumerate(
    ["What is the weather in Paris?", "What time is it in Tokyo?", "Find recipes for soup.",
     "Is it raining in Berlin?", "Search for the tallest mountain."] * 4)]


@pytest.fixture(scope="module")
def client(served_engine) -> Iterator[openai.OpenAI]:  # noqa: ANN001
    with openai_client(served_engine, tool_call_parser="hermes") as c:
        yield c


def _chat(client: openai.OpenAI, prompt: str, **kw):  # noqa: ANN003, ANN202
    kw.setdefault("max_tokens", 160)
    return client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": prompt}], tools=TOOLS, **kw)


def _check_calls(message) -> list[tuple[str, dict]]:  # noqa: ANN001
    calls = []
    for call in message.tool_calls:
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        assert call.id.startswith("call_") and call.type == "function"
        calls.append((call.function.name, arguments))
    return calls


def test_required_tool_calls_parse_into_their_schemas(client: openai.OpenAI) -> None:
    # One call each: the 135M demo model, free to add calls, often repeats one until
    # max_tokens (then the cut-off array is content, as any parser would leave it).
    def ask(i: int):  # noqa: ANN202
        return _chat(client, PROMPTS[i], tool_choice="required", temperature=(i % 2) * 0.9,
                     seed=i, parallel_tool_calls=False)

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(len(PROMPTS))))
    assert len(replies) == 20
    for r in replies:
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        assert len(_check_calls(choice.message)) == 1
    # Parallel calls allowed: each parses into its schema where the array completes.
    completed = 0
    for i in range(4):
        choice = _chat(client, PROMPTS[i], tool_choice="required", temperature=0).choices[0]
        if choice.finish_reason == "length":
            assert choice.message.tool_calls == [] and choice.message.content.startswith("[{")
            continue
        completed += 1
        assert choice.finish_reason == "tool_calls" and _check_calls(choice.message)
    assert completed


def test_named_tool_calls_parse_into_the_function_schema(client: openai.OpenAI) -> None:
    names = [t["function"]["name"] for t in TOOLS]

    def ask(i: int):  # noqa: ANN202
        choice = {"type": "function", "function": {"name": names[i % 3]}}
        return names[i % 3], _chat(client, PROMPTS[i], tool_choice=choice,
                                   temperature=(i % 2) * 0.9, seed=i)

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(len(PROMPTS))))
    for name, r in replies:
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice  # as OpenAI answers a named choice
        assert [n for n, _ in _check_calls(choice.message)] == [name]


def _reassemble(chunks) -> tuple[str | None, list[dict], str | None]:  # noqa: ANN001
    content, calls, finish = None, {}, None
    for chunk in chunks:
        for c in chunk.choices:
            if c.delta.content:
                content = (content or "") + c.delta.content
            for d in c.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                if d.id is not None:
                    assert call["id"] is None, "a call's id comes once"
                    call["id"] = d.id
                if d.function.name is not None:
                    assert call["name"] is None, "a call's name comes once"
                    call["name"] = d.function.name
                call["arguments"] += d.function.arguments or ""
            finish = c.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("tool_choice", [
    "required", {"type": "function", "function": {"name": "search"}}])
def test_streamed_tool_calls_reassemble_to_the_whole(client: openai.OpenAI,
                                                     tool_choice: object) -> None:
    kw = {"tool_choice": tool_choice, "temperature": 0, "parallel_tool_calls": False}
    for prompt in PROMPTS[:3]:
        whole = _chat(client, prompt, **kw).choices[0]
        assert whole.message.tool_calls
        content, calls, finish = _reassemble(_chat(client, prompt, stream=True, **kw))
        assert content == whole.message.content
        assert finish == whole.finish_reason
        assert [(c["name"], c["arguments"]) for c in calls] == [
            (t.function.name, t.function.arguments) for t in whole.message.tool_calls]
        assert all(c["id"].startswith("call_") for c in calls)


# The demo model does not write tool calls by itself: a regex makes it write one in the
# hermes format, after some content, and the auto parser reads it back.
HERMES_CALL = ('Let me check\\. <tool_call>\n\\{"name": "get_weather", "arguments": '
               '\\{"city": "[A-Z][a-z]{2,8}", "unit": "celsius"\\}\\}\n</tool_call>')


def test_auto_reads_calls_with_the_parser(client: openai.OpenAI) -> None:
    extra = {"structured_outputs": {"regex": HERMES_CALL}}
    whole = _chat(client, PROMPTS[0], temperature=0, extra_body=extra).choices[0]
    assert whole.finish_reason == "tool_calls"
    assert whole.message.content == "Let me check."
    assert [n for n, _ in _check_calls(whole.message)] == ["get_weather"]
    content, calls, finish = _reassemble(_chat(client, PROMPTS[0], temperature=0, stream=True,
                                               extra_body=extra))
    assert (content, finish) == ("Let me check.", "tool_calls")
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (t.function.name, t.function.arguments) for t in whole.message.tool_calls]
    # A plain answer stays content; tool_choice "none" never reads calls.
    plain = _chat(client, "Say hello.", temperature=0, max_tokens=8).choices[0]
    assert plain.message.tool_calls == [] and plain.message.content
    none = _chat(client, PROMPTS[0], temperature=0, tool_choice="none", extra_body=extra)
    assert none.choices[0].message.tool_calls == []
    assert none.choices[0].message.content.startswith("Let me check. <tool_call>")


def test_tool_messages_go_through_the_template(client: openai.OpenAI) -> None:
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather",
                         "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ]
    r = client.chat.completions.create(model="demo", messages=messages, tools=TOOLS,
                                       tool_choice="none", max_tokens=8, temperature=0)
    assert r.choices[0].message.content


QWEN_LIKE = (  # the shape of Qwen2.5's template: tools in the system turn, hermes calls
    "{%- if tools %}<|im_start|>system\nTools:\n{%- for tool in tools %}\n{{ tool | tojson }}"
    "{%- endfor %}<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{%- for call in message.tool_calls %}<tool_call>\n{\"name\": \"{{ call.function.name }}\","
    " \"arguments\": {{ call.function.arguments | tojson }}}\n</tool_call>{%- endfor %}"
    "<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}"
    "\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")


def test_template_messages_render_calls_and_results(served_engine) -> None:  # noqa: ANN001
    from xllm.api.tool_parsers import detect_parser
    from xllm.tokenizer.chat_template import render_chat_template

    req = ChatCompletionRequest.model_validate({"model": "demo", "tools": TOOLS, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"id": "call_9", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": "18C"}]})
    messages = template_messages(req)
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris",
                                                                     "unit": "celsius"}
    assert messages[2]["tool_call_id"] == "call_9"
    text = render_chat_template(QWEN_LIKE, messages, add_generation_prompt=True,
                                special_tokens={}, tools=[t for t in TOOLS])
    assert ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
            '"celsius"}}\n</tool_call>') in text
    assert "<tool_response>\n18C\n</tool_response>" in text and '"name": "search"' in text
    assert detect_parser(QWEN_LIKE) == "hermes"
    assert detect_parser(served_engine.engine.tokenizer.chat_template) is None


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"tool_choice": "required", "tools": None}, "tool_choice", "needs tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "not in tools"),
    ({"tool_choice": "sometimes"}, None, "tool_choice"),
    ({"tool_choice": "required", "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "nope"}}}}}]},
     "tools", "tools[0].function.parameters: invalid JSON schema at properties/a/type"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, None, "pattern"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "leave out response_format"),
])
def test_bad_tool_requests_are_400s(client: openai.OpenAI, body: dict, param: str | None,
                                    message: str) -> None:
    kw = {"tools": TOOLS, **body}
    if kw["tools"] is None:
        del kw["tools"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="demo", max_tokens=4, messages=[
            {"role": "user", "content": "hi"}], **kw)
    error = info.value.body
    assert message in error["message"], error
    if param is not None:
        assert error["param"] == param, error


def test_auto_without_a_known_format_is_a_400(served_engine) -> None:  # noqa: ANN001
    with openai_client(served_engine) as c:  # no --tool-call-parser
        with pytest.raises(openai.BadRequestError) as info:
            _chat(c, "hi", max_tokens=4)
        assert "--tool-call-parser" in info.value.body["message"]
        r = _chat(c, PROMPTS[0], tool_choice="required", parallel_tool_calls=False,
                  temperature=0)  # constrained: no parser needed
        assert r.choices[0].message.tool_calls
