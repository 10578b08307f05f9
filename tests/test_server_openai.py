"""xllm-server through the official openai client (and raw HTTP for what it cannot send)."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from urllib.parse import urlparse

import openai
import pytest
from live_server import LiveServer

from xllm.api.app import build_app
from xllm.api.settings import ServerSettings

pytestmark = pytest.mark.timeout(120)

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server(served_engine) -> Iterator[LiveServer]:  # noqa: ANN001
    settings = ServerSettings(served_model_names=["demo"], max_waiting_requests=2)
    with LiveServer(build_app(served_engine, settings, shutdown_engine=False)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=60)


def _raw(url: str, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict]:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data) if data else {}
    finally:
        conn.close()


def _post_huge(url: str, size: int, chunked: bool) -> tuple[int, dict]:
    """POSTs a body of ``size`` bytes (declared up front, or chunked) and reads the answer the
    server gives before it has all of it (it closes the connection after a 413)."""
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
        framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     f"application/json\r\n{framing}\r\n\r\n".encode())
        piece = b"x" * (1 << 16)
        try:
            for _ in range(size // len(piece)):
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        except OSError:
            pass  # the server answered and closed: read what it said
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < 10:
            more = sock.recv(1 << 16)
            if not more:
                break
            data += more
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    return status, json.loads(body[:body.rindex(b"}") + 1])


def _is_error_body(body: dict) -> bool:
    err = body.get("error", {})
    return set(err) == {"message", "type", "param", "code"} and bool(err["message"])


def test_models_health_version(server: LiveServer, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["demo"]
    assert _raw(server.url, "GET", "/health") == (200, {"status": "ok"})
    status, body = _raw(server.url, "GET", "/version")
    assert status == 200 and body["version"]


def test_completion_stream_matches_non_stream(client: openai.OpenAI, served_engine) -> None:  # noqa: ANN001
    extra = {"ignore_eos": True}
    full = client.completions.create(model="demo", prompt=PROMPT, max_tokens=8, temperature=0,
                                     extra_body=extra)
    choice = full.choices[0]
    assert choice.finish_reason == "length"
    n_prompt = len(served_engine.engine.tokenizer.encode(PROMPT))
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (n_prompt, 8)
    assert full.usage.total_tokens == n_prompt + 8
    chunks = list(client.completions.create(model="demo", prompt=PROMPT, max_tokens=8,
                                            temperature=0, stream=True, extra_body=extra,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_usage_reports_cached_prompt_tokens(client: openai.OpenAI, served_engine) -> None:  # noqa: ANN001
    prompt = "A long shared context about lighthouses and the ships they guide. " * 6
    n_prompt = len(served_engine.engine.tokenizer.encode(prompt))
    bs = served_engine.engine.config.block_size
    first = client.completions.create(model="demo", prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens == n_prompt
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    again = client.completions.create(model="demo", prompt=prompt, max_tokens=2, temperature=0)
    want = (n_prompt - 1) // bs * bs  # every full block but the one holding the last token
    assert want > 0 and again.usage.prompt_tokens_details.cached_tokens == want
    chunks = list(client.completions.create(model="demo", prompt=prompt, max_tokens=2,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == want


def test_chat_stream_matches_non_stream(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Name a color."}]
    full = client.chat.completions.create(model="demo", messages=messages, max_tokens=10,
                                          temperature=0)
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.completion_tokens >= 1
    stream = client.chat.completions.create(model="demo", messages=messages,
                                            max_completion_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_n_completions_and_seed(client: openai.OpenAI) -> None:
    kwargs = {"model": "demo", "prompt": PROMPT, "max_tokens": 6, "temperature": 1.0,
              "n": 3, "seed": 7, "extra_body": {"ignore_eos": True}}
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded
    assert a.usage.completion_tokens == 18
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {c.index: c.text for c in a.choices}
    # A batch of prompts: choice index = prompt index * n + completion index.
    batch = client.completions.create(model="demo", prompt=[PROMPT, "Hello"], n=2,
                                      max_tokens=2, temperature=0)
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]


def test_logprobs(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Say hi"}], max_tokens=5,
        temperature=0, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 5
    for entry in content:
        assert len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.token == entry.top_logprobs[0].token and entry.logprob <= 0
    assert "".join(e.token for e in content) == chat.choices[0].message.content
    comp = client.completions.create(model="demo", prompt=PROMPT, max_tokens=4,
                                     temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == comp.choices[0].text
    assert lp.text_offset[0] == 0 and all(len(t) <= 2 for t in lp.top_logprobs)


def test_stop_echo_and_extensions(client: openai.OpenAI) -> None:
    free = client.completions.create(model="demo", prompt=PROMPT, max_tokens=8, temperature=0)
    text = free.choices[0].text
    cut = text.find(".")
    assert cut > 0, f"the demo model's greedy continuation changed: {text!r}"
    stopped = client.completions.create(model="demo", prompt=PROMPT, max_tokens=8,
                                        temperature=0, stop=["."])
    assert stopped.choices[0].text == text[:cut]
    assert stopped.choices[0].finish_reason == "stop"
    echoed = client.completions.create(model="demo", prompt=PROMPT, max_tokens=3,
                                       temperature=0, echo=True)
    assert echoed.choices[0].text.startswith(PROMPT)
    ext = client.completions.create(
        model="demo", prompt=PROMPT, max_tokens=4, temperature=0.7, top_p=0.9,
        presence_penalty=0.5, frequency_penalty=0.5,
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 4,
                    "priority": 1, "offline": True})
    assert ext.usage.completion_tokens == 4


def test_logit_bias(client: openai.OpenAI, served_engine) -> None:  # noqa: ANN001
    """OpenAI's logit_bias: +100 on a token makes it every greedy pick, on both endpoints;
    bad keys, biases and token ids are 400s naming the field."""
    token = served_engine.engine.tokenizer.encode(" fox", add_special_tokens=False)[0]
    out = client.completions.create(model="demo", prompt="Hello", max_tokens=4, temperature=0,
                                    logit_bias={str(token): 100})
    assert out.choices[0].text == " fox" * 4
    chat = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
        temperature=0, logit_bias={str(token): 100})
    assert chat.choices[0].message.content == " fox" * 3
    vocab = served_engine.engine.model_config.vocab_size
    for bias, match in (({"abc": 1}, "token ids"), ({str(token): 101}, "[-100, 100]"),
                        ({str(vocab): 5}, "outside the vocabulary")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="demo", prompt="Hello", max_tokens=1,
                                      logit_bias=bias)
        assert match in e.value.body["message"], e.value.body


def test_bad_requests_get_openai_errors(server: LiveServer, client: openai.OpenAI,
                                        served_engine) -> None:  # noqa: ANN001
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt=PROMPT, temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-9", prompt=PROMPT)
    assert e.value.body["code"] == "model_not_found"
    limit = served_engine.engine.max_model_len
    long_prompt = list(range(100, 100 + limit + 5))
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt=long_prompt, max_tokens=1)
    assert str(limit) in e.value.message and str(limit + 5) in e.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="demo", messages=[], max_tokens=1)
    with pytest.raises(openai.BadRequestError) as e:  # unsupported OpenAI field: said so
        client.chat.completions.create(model="demo", max_tokens=1, functions=[{
            "name": "f", "parameters": {}}], messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["param"] == "functions"
    # What the client cannot send: malformed JSON, a non-object, a huge body.
    headers = {"Content-Type": "application/json"}
    for body in (b"{not json", b"[1, 2]", b'{"model": "demo", "prompt": 5}'):
        status, err = _raw(server.url, "POST", "/v1/completions", body, headers)
        assert status == 400 and _is_error_body(err), (body, status, err)
    for chunked in (False, True):
        status, err = _post_huge(server.url, 9 << 20, chunked)
        assert status == 413 and _is_error_body(err), chunked
    status, err = _raw(server.url, "GET", "/v1/nothing-here")
    assert status == 404 and _is_error_body(err)
    # Overload: more requests waiting to start than the server's bound (2).
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="demo", prompt=["a", "b", "c"], max_tokens=1)
    assert e.value.status_code == 503 and e.value.body["code"] == "overloaded"
    # ... and the server goes on serving.
    assert client.completions.create(model="demo", prompt="ok", max_tokens=1).choices


def test_metrics(server: LiveServer, client: openai.OpenAI) -> None:
    client.completions.create(model="demo", prompt=PROMPT, max_tokens=3, temperature=0,
                              extra_body={"ignore_eos": True})
    u = urlparse(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    assert resp.status == 200
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line and not line.startswith("#")}
    for name in ("xllm_num_requests_running", "xllm_num_requests_waiting",
                 "xllm_num_preemptions_total", "xllm_kv_cache_usage_ratio",
                 "xllm_prefix_cache_hit_rate", "xllm_time_per_output_token_seconds_count",
                 "xllm_e2e_request_latency_seconds_count", "xllm_kv_reserved_bytes"):
        assert name in values, name
    assert 0 < values["xllm_kv_mapped_bytes"] <= values["xllm_kv_reserved_bytes"]
    assert values["xllm_time_to_first_token_seconds_count"] >= 1
    assert values['xllm_request_success_total{finished_reason="length"}'] >= 1
    assert values["xllm_generation_tokens_total"] >= 3


def test_api_key(served_engine) -> None:  # noqa: ANN001
    settings = ServerSettings(served_model_names=["demo"], api_key="sekret")
    with LiveServer(build_app(served_engine, settings, shutdown_engine=False)) as srv:
        for key in ("wrong", ""):
            bad = openai.OpenAI(base_url=srv.url + "/v1", api_key=key or "x", max_retries=0,
                                default_headers={} if key else {"Authorization": ""})
            with pytest.raises(openai.AuthenticationError) as e:
                bad.models.list()
            assert e.value.body["code"] == "invalid_api_key"
        status, err = _raw(srv.url, "POST", "/v1/completions", b"{bad json")
        assert status == 401 and _is_error_body(err)  # the key is checked before the body
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(model="demo", prompt="hi", max_tokens=1).choices
        assert _raw(srv.url, "GET", "/health")[0] == 200  # probes need no key
