"""Structured outputs through xllm-server with the official openai client: response_format
(json_object, json_schema) and the structured_outputs extension (json, regex, choice,
grammar) on the demo model; bad specs get OpenAI-format 400s naming the parameter."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from live_server import openai_client

pytestmark = pytest.mark.timeout(240)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "hobbies": {"type": "array", "items": {"enum": ["chess", "tennis", "music", "maths"]},
                    "minItems": 1, "maxItems": 3},
        "retired": {"type": "boolean"},
    },
    "required": ["name", "age", "hobbies", "retired"],
    "additionalProperties": False,
}
PROMPTS = [f"Describe person number {i}, who likes {h}, as JSON." for i, h in
           enumerate(["chess", "tennis", "music", "maths"] * 5)]


@pytest.fixture(scope="module")
def client(served_engine) -> Iterator[openai.OpenAI]:  # noqa: ANN001
    with openai_client(served_engine) as c:
        yield c


def _chat(client: openai.OpenAI, prompt: str, **kw) -> object:  # noqa: ANN003
    return client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": prompt}], max_tokens=150, **kw)


def test_json_schema_outputs_validate(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                  "strict": True}}
    temps = [0.0, 1.0]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda ip: _chat(client, ip[1], response_format=fmt,
                                                 temperature=temps[ip[0] % 2], seed=ip[0]),
                                enumerate(PROMPTS)))
    assert len(replies) == 20
    for r in replies:
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_and_extension_kinds(client: openai.OpenAI) -> None:
    r = _chat(client, "Return a JSON object with a cat's name and age.", temperature=0,
              response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = _chat(client, "Is the sky blue?", temperature=0,
              extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}})
    assert r.choices[0].message.content in {"yes", "no", "maybe"}
    r = _chat(client, "Give me a date.", temperature=0.8, seed=3,
              extra_body={"structured_outputs": {"regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"}})
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", r.choices[0].message.content)
    grammar = 'root ::= "The answer is " digit digit? "."\ndigit ::= [0-9]'
    r = client.completions.create(model="demo", prompt="What is 6 times 7?", max_tokens=20,
                                  temperature=0, extra_body={"structured_outputs":
                                                             {"grammar": grammar}})
    assert re.fullmatch(r"The answer is [0-9]{1,2}\.", r.choices[0].text)
    r = _chat(client, "Describe a person.", temperature=0,
              extra_body={"structured_outputs": {"json": json.dumps(PERSON)}})
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_streamed_constrained_output_equals_the_whole(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    whole = _chat(client, PROMPTS[0], temperature=0, response_format=fmt)
    pieces = [c.choices[0].delta.content or "" for c in
              _chat(client, PROMPTS[0], temperature=0, response_format=fmt, stream=True)
              if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "strang"}}}}}},
     "response_format.json_schema.schema", "invalid JSON schema at properties/a/type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "needs json_schema.schema"),
    ({"extra_body": {"structured_outputs": {"regex": "[a-"}}}, "structured_outputs.regex",
     "invalid regex"),
    ({"extra_body": {"structured_outputs": {"grammar": "root ::= missing"}}},
     "structured_outputs.grammar", "invalid grammar"),
    ({"extra_body": {"structured_outputs": {}}}, "structured_outputs", "exactly one"),
    ({"extra_body": {"structured_outputs": {"choice": []}}}, None, "at least 1 item"),
    ({"response_format": {"type": "json_object"},
      "extra_body": {"structured_outputs": {"regex": "a"}}}, "structured_outputs", "not both"),
])
def test_bad_specs_are_400s(client: openai.OpenAI, body: dict, param: str | None,
                            message: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, "hi", **body)
    error = info.value.body
    assert message in error["message"], error
    if param is not None:
        assert error["param"] == param, error
