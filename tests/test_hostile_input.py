"""The server probed as a hostile client would: text that is not Unicode (lone UTF-16
surrogates), bodies over the limit, prompts too large to tokenize, and a hypothesis pass of
JSON requests built from such strings, control characters and huge values. No answer may be
a 5xx or a dropped connection, and the server must stay healthy."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlparse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_server import LiveServer

from xllm.api.app import build_app
from xllm.api.settings import ServerSettings

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def server(served_engine):  # noqa: ANN001, ANN201
    app = build_app(served_engine, ServerSettings(served_model_names=["demo"],
                                                  max_tokens_limit=2, max_n=2),
                    shutdown_engine=False)
    with LiveServer(app) as srv:
        yield srv


def _post(url: str, path: str, body: bytes | object, headers: dict | None = None,
          timeout: float = 60) -> tuple[int, dict]:
    """POSTs raw bytes (a generator: chunked); returns (status, decoded JSON body)."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("POST", path, body=body,
                     headers={"content-type": "application/json", **(headers or {})},
                     encode_chunked=not isinstance(body, bytes))
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def _healthy(url: str) -> bool:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    finally:
        conn.close()


def _json(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=True).encode()  # surrogates as \\udXXX escapes


@pytest.mark.parametrize("path, body, where", [
    ("/v1/chat/completions", {"model": "demo", "messages": [
        {"role": "user", "content": "hi \ud800"}], "max_tokens": 1}, "messages[0].content"),
    ("/v1/completions", {"model": "demo", "prompt": "\udfff", "max_tokens": 1}, "prompt"),
    ("/v1/completions", {"model": "demo", "prompt": "hi", "stop": ["a\ud83d"],
                         "max_tokens": 1}, "stop[0]"),
    ("/v1/chat/completions", {"model": "demo", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]},
     "messages[0].content[0].text"),
])
def test_lone_surrogates_are_a_400_naming_the_field(server, path: str, body: dict,  # noqa: ANN001
                                                     where: str) -> None:
    status, answer = _post(server.url, path, _json(body))
    assert status == 400, answer
    assert answer["error"]["code"] == "invalid_unicode"
    assert answer["error"]["message"].startswith(where)


def test_surrogate_pairs_are_text(server) -> None:  # noqa: ANN001
    status, answer = _post(server.url, "/v1/completions",
                           _json({"model": "demo", "prompt": "a \U0001F600", "max_tokens": 1}))
    assert status == 200, answer


def test_bodies_over_the_limit_get_a_413_not_a_reset(server) -> None:  # noqa: ANN001
    big = _json({"model": "demo", "prompt": "a" * 11_000_000, "max_tokens": 1})
    status, answer = _post(server.url, "/v1/completions", big)
    assert status == 413 and answer["error"]["code"] == "request_too_large"

    def chunks():  # no content-length: the limit is found while reading
        for i in range(0, len(big), 1 << 20):
            yield big[i:i + (1 << 20)]

    status, answer = _post(server.url, "/v1/completions", chunks())
    assert status == 413 and answer["error"]["code"] == "request_too_large"
    assert _healthy(server.url)


def test_a_prompt_that_cannot_fit_is_refused_before_tokenizing(server) -> None:  # noqa: ANN001
    body = _json({"model": "demo", "prompt": "word " * 1_000_000, "max_tokens": 1})
    status, answer = _post(server.url, "/v1/completions", body)
    assert status == 400 and "bytes of text" in answer["error"]["message"], answer
    status, answer = _post(server.url, "/v1/chat/completions", _json(
        {"model": "demo", "messages": [{"role": "user", "content": "word " * 1_000_000}]}))
    assert status == 400 and "bytes of text" in answer["error"]["message"], answer


# ------------------------------------------------------------------ the hypothesis pass

# Joined from a list, not st.text: text() draws from the union of the alphabets weighted by
# their sizes, where 2048 surrogates among a million code points almost never come up.
_NASTY_TEXT = st.lists(st.one_of(
    st.characters(categories=["Cs"]),  # lone surrogates (hypothesis leaves them out by default)
    st.characters(max_codepoint=0x1F),  # control characters
    st.characters(min_codepoint=0x20, max_codepoint=0x10FFFF, exclude_categories=["Cs"]),
), max_size=40).map("".join)
_HUGE = st.one_of(st.integers(min_value=-(10 ** 30), max_value=10 ** 30),
                  st.floats(allow_nan=False), st.just(1e308), st.just(-1e308))
_SCALAR = st.one_of(st.none(), st.booleans(), _HUGE, _NASTY_TEXT)
_VALUE = st.recursive(_SCALAR, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(_NASTY_TEXT, inner, max_size=3)),
    max_leaves=8)
_MESSAGE = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "system", "assistant", "tool"]), _NASTY_TEXT),
     "content": st.one_of(_NASTY_TEXT, _VALUE)})
_COMMON = {"model": st.one_of(st.just("demo"), _NASTY_TEXT),
           "max_tokens": st.one_of(st.just(1), _HUGE, _VALUE),
           "temperature": st.one_of(st.just(0.0), _HUGE, _VALUE),
           "stop": st.one_of(st.none(), _NASTY_TEXT, st.lists(_NASTY_TEXT, max_size=3), _VALUE),
           "logprobs": st.one_of(st.none(), _VALUE), "n": st.one_of(st.just(1), _HUGE),
           "seed": st.one_of(st.none(), _HUGE), "extra": _VALUE}
# Agent fields: tools, tool choices and specs for constrained decoding, each a grammar the
# engine compiles when it validates (a regex or grammar of control characters, a schema of
# nested junk must be a 400, never a 500 from the grammar engine).
_SCHEMA = st.one_of(_VALUE, st.fixed_dictionaries(
    {"type": st.sampled_from(["object", "string", "array", "integer"])},
    optional={"properties": st.dictionaries(_NASTY_TEXT, _VALUE, max_size=2),
              "pattern": _NASTY_TEXT, "enum": st.lists(_SCALAR, max_size=3),
              "maxLength": _HUGE, "items": _VALUE}))
_TOOL = st.fixed_dictionaries(
    {"type": st.one_of(st.just("function"), _NASTY_TEXT),
     "function": st.fixed_dictionaries({"name": st.one_of(st.just("f"), _NASTY_TEXT)},
                                       optional={"parameters": _SCHEMA,
                                                 "description": _NASTY_TEXT})})
_AGENT = {
    "tools": st.one_of(st.lists(_TOOL, max_size=2), _VALUE),
    "tool_choice": st.one_of(st.sampled_from(["none", "auto", "required"]), _VALUE,
                             st.just({"type": "function", "function": {"name": "f"}})),
    "response_format": st.one_of(_VALUE, st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "json_object", "json_schema"])},
        optional={"json_schema": st.fixed_dictionaries({"name": _NASTY_TEXT},
                                                       optional={"schema": _SCHEMA})})),
    "structured_outputs": st.one_of(_VALUE, st.dictionaries(
        st.sampled_from(["json", "regex", "choice", "grammar", "json_object"]),
        st.one_of(_NASTY_TEXT, _SCHEMA, st.lists(_NASTY_TEXT, max_size=3)), max_size=2)),
}
_CHAT = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(_MESSAGE, min_size=1, max_size=3), _VALUE)},
    optional={**_COMMON, **_AGENT})
_EMBEDDINGS = st.fixed_dictionaries(
    {"input": st.one_of(_NASTY_TEXT, st.lists(_NASTY_TEXT, max_size=3),
                        st.lists(st.integers(-5, 10 ** 12), max_size=4), _VALUE)},
    optional={"model": st.one_of(st.just("demo"), _NASTY_TEXT),
              "encoding_format": st.one_of(st.sampled_from(["float", "base64"]), _VALUE),
              "dimensions": st.one_of(st.just(576), _HUGE)})
_COMPLETION = st.fixed_dictionaries(
    {"prompt": st.one_of(_NASTY_TEXT, st.lists(_NASTY_TEXT, max_size=3),
                         st.lists(st.integers(-5, 10 ** 12), max_size=4), _VALUE)},
    optional={**_COMMON, "structured_outputs": _AGENT["structured_outputs"]})


# Well-formed requests whose text is hostile: they pass validation and reach the tokenizer,
# the chat template and the engine, where such text used to do harm.
_TEXT_ONLY_CHAT = st.fixed_dictionaries(
    {"model": st.just("demo"), "max_tokens": st.just(1),
     "messages": st.lists(st.fixed_dictionaries(
         {"role": st.sampled_from(["user", "system"]), "content": _NASTY_TEXT}),
         min_size=1, max_size=3)},
    optional={"stop": st.lists(_NASTY_TEXT, max_size=2)})
_TEXT_ONLY_COMPLETION = st.fixed_dictionaries(
    {"model": st.just("demo"), "max_tokens": st.just(1), "prompt": _NASTY_TEXT},
    optional={"stop": st.lists(_NASTY_TEXT, max_size=2), "echo": st.booleans()})


def test_hypothesis_requests_never_get_a_server_error(server) -> None:  # noqa: ANN001
    statuses: dict[int, int] = {}

    @given(request=st.one_of(st.tuples(st.just("/v1/chat/completions"), _CHAT),
                             st.tuples(st.just("/v1/completions"), _COMPLETION),
                             st.tuples(st.just("/v1/chat/completions"), _TEXT_ONLY_CHAT),
                             st.tuples(st.just("/v1/completions"), _TEXT_ONLY_COMPLETION),
                             st.tuples(st.just("/v1/embeddings"), _EMBEDDINGS)))
    @settings(max_examples=300, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def check(request: tuple[str, dict]) -> None:
        path, body = request
        status, answer = _post(server.url, path, _json(body))
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500, (status, answer, body)
        assert isinstance(answer, dict) and ("error" in answer or "choices" in answer
                                             or "data" in answer)

    check()
    assert statuses.get(400, 0) + statuses.get(422, 0) > 50, statuses
    assert statuses.get(200, 0) > 15, statuses  # hostile text reached the engine too
    assert _healthy(server.url)
