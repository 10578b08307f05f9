"""xllm-master end to end: a master with 3 spawned instances; one is SIGKILLed while 16
streams run and every stream still completes with the offline greedy text; bad input gets
the same OpenAI-format errors as xllm-server. Loopback only; every process is stopped."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from live_server import LiveServer, greedy_texts

from xllm.benchmarks.cluster import children

pytestmark = pytest.mark.timeout(240)

ENGINE_ARGS = [
    "--dtype", "float32", "--max-model-len", "256", "--kv-cache-memory-gb", "0.25",
    "--num-threads", "1",
]
MAX_TOKENS = 32  # long enough that every stream is under way before the first ends
PROMPTS = [f"Question {i}: name a colour and a number between {i} and {i + 7}." for i in range(16)]


@contextlib.contextmanager
def _running_master(model_dir: Path, log: Path, extra: list[str], n: int,
                    ready: Callable[[list[dict]], bool] | None = None
                    ) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """``xllm-master`` with ``extra`` flags, once ``n`` instances are listed (and
    ``ready(instances)``, when given); stopped with everything it spawned on exit."""
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "xllm.service.master_server", "--port", "0", *extra,
             "--model", str(model_dir), "--log-level", "info", *ENGINE_ARGS],
            stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = None
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None:
            text = log.read_text(errors="replace")
            if url is None and "xllm-master serving" in text:
                url = text.split("xllm-master serving", 1)[1].split(" on ", 1)[1].split()[0]
            if url is not None:
                try:
                    views = requests.get(f"{url}/cluster/instances", timeout=2).json()
                    if len(views) == n and (ready is None or ready(views)):
                        break
                except requests.RequestException:
                    pass
            time.sleep(0.2)
        else:
            raise AssertionError(f"the master did not come up:\n{log.read_text()[-4000:]}")
        assert url is not None
        yield proc, url, log
    finally:
        spawned = children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        for pid in spawned:  # the master stops them; make sure of it
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def master(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    log = tmp_path_factory.mktemp("master") / "master.log"
    with _running_master(demo_model_dir, log, ["--spawn", "3"], 3) as running:
        yield running


# Three streams in four are constrained (a grammar that never ends, so each runs to its
# length): a stream resumed on another instance goes on in its grammar's state.
CONSTRAINT = "root ::= [a-z ] root"


def _constrained(i: int) -> bool:
    return i % 4 != 0


def _expected(served_engine, prompts: list[str]) -> list[str]:  # noqa: ANN001
    from xllm.structured import GrammarSpec

    specs = [GrammarSpec("grammar", CONSTRAINT) if _constrained(i) else None
             for i in range(len(prompts))]
    return greedy_texts(served_engine, prompts, MAX_TOKENS, specs)


def _stream(url: str, model: str, prompt: str, progress: list[int],
            i: int) -> tuple[str, str | None]:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True}
    if _constrained(i):
        body["structured_outputs"] = {"grammar": CONSTRAINT}
    text, finish = "", None
    with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=120) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            for choice in event["choices"]:
                text += choice["text"]
                finish = choice["finish_reason"] or finish
                progress[i] += 1
    return text, finish


def test_sigkill_one_of_three_instances_mid_stream(master, served_engine,  # noqa: ANN001
                                                    demo_model_dir: Path) -> None:
    proc, url, log = master
    expected = _expected(served_engine, PROMPTS)
    victims = children(proc.pid)
    assert len(victims) == 3
    # Spawned instances run 10 nicer than the master (--spawn-nice's default), every thread.
    for pid in victims:
        for task in Path(f"/proc/{pid}/task").iterdir():
            nice = int((task / "stat").read_text().rsplit(")", 1)[1].split()[16])
            assert nice == min(19, os.getpriority(os.PRIO_PROCESS, proc.pid) + 10), pid
    model = str(demo_model_dir)
    progress = [0] * len(PROMPTS)
    started = time.monotonic()
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(_stream, url, model, p, progress, i)
                   for i, p in enumerate(PROMPTS)]
        # Kill once every stream is under way (and none is finished).
        deadline = time.monotonic() + 90
        while min(progress) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert max(progress) < MAX_TOKENS, "too late to kill: a stream already finished"
        os.kill(victims[0], signal.SIGKILL)
        results = [f.result(timeout=120) for f in futures]
    elapsed = time.monotonic() - started
    for i, ((text, finish), want) in enumerate(zip(results, expected, strict=True)):
        assert finish == "length"
        assert text == want
        if _constrained(i):
            assert re.fullmatch("[a-z ]+", text), text
    logged = log.read_text(errors="replace")
    assert "resuming" in logged, logged[-3000:]
    # The dead instance is out of routing within the heartbeat deadline (+ monitor period).
    deadline = time.monotonic() + 5
    while len(requests.get(f"{url}/cluster/instances", timeout=2).json()) != 2:
        assert time.monotonic() < deadline, "the killed instance is still routable"
        time.sleep(0.1)
    print(f"16 streams with one SIGKILL: {elapsed:.1f} s")


BAD_BODIES: list[tuple[str, object]] = [
    ("/v1/completions", "{not json"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "bogus": 1}),
    ("/v1/completions", {"model": "nope", "prompt": "hi"}),
    ("/v1/completions", {"model": "M", "prompt": "hi", "temperature": 7}),
    ("/v1/completions", {"model": "M", "prompt": [10**9]}),
    ("/v1/completions", {"model": "M", "prompt": "hi", "max_tokens": 100000}),
    ("/v1/completions", {"model": "M", "prompt": "word " * 400}),
    ("/v1/completions", {"model": "M"}),
    ("/v1/chat/completions", {"model": "M", "messages": []}),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 2}),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "robot", "content": "x"}]}),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "\ud800"}]}),
    ("/v1/completions", {"model": "M", "prompt": "word " * 400_000}),  # refused by its bytes
    ("/v1/completions", {"model": "M", "prompt": "hi",
                         "structured_outputs": {"json": {"type": "objekt"}}}),
    ("/v1/completions", {"model": "M", "prompt": "hi", "structured_outputs": {"regex": "(a"}}),
    ("/v1/completions", {"model": "M", "prompt": "hi",
                         "structured_outputs": {"regex": "a", "choice": ["a"]}}),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema"}}),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"},
                              "structured_outputs": {"regex": "a"}}),
    ("/v1/nothing", {}),
]


def test_bad_input_gets_the_same_errors_as_xllm_server(master, served_engine,  # noqa: ANN001
                                                        demo_model_dir: Path) -> None:
    from xllm.api.app import build_app
    from xllm.api.settings import ServerSettings

    _, url, _ = master
    model = str(demo_model_dir)
    app = build_app(served_engine, ServerSettings(served_model_names=[model]),
                    shutdown_engine=False)
    with LiveServer(app) as server:
        for path, body in BAD_BODIES:
            if isinstance(body, dict) and body.get("model") == "M":
                body = {**body, "model": model}
            content = body if isinstance(body, str) else json.dumps(body)
            headers = {"content-type": "application/json"}
            want = requests.post(server.url + path, data=content, headers=headers, timeout=30)
            got = requests.post(url + path, data=content, headers=headers, timeout=30)
            assert want.status_code >= 400, (path, body)
            assert (got.status_code, got.json()) == (want.status_code, want.json()), (path, body)
    # logit_bias travels to the instances (the proto's map): +100 makes the token every pick.
    token = served_engine.engine.tokenizer.encode(" fox", add_special_tokens=False)[0]
    got = requests.post(url + "/v1/completions", timeout=60, json={
        "model": model, "prompt": "Hello", "max_tokens": 3, "temperature": 0,
        "logit_bias": {str(token): 100}})
    assert got.status_code == 200 and got.json()["choices"][0]["text"] == " fox" * 3, got.text
    # Prompt logprobs: xllm-server computes them; the master's cluster does not yet, and says so.
    for extra, param in (({"echo": True, "logprobs": 1}, "echo"), ({"prompt_logprobs": 0},
                                                                    "prompt_logprobs")):
        body = {"model": model, "prompt": "hi", "max_tokens": 1, **extra}
        got = requests.post(url + "/v1/completions", json=body, timeout=30)
        assert got.status_code == 400 and got.json()["error"]["param"] == param, got.text


def test_operators_switch_roles_by_hand(master, served_engine,  # noqa: ANN001
                                        demo_model_dir: Path) -> None:
    """POST /cluster/role: an instance switches role and the master routes by it at once
    (1 prefill + 1 decode: PD, with the same greedy text); bad input gets 4xx errors."""
    _, url, _ = master
    views = requests.get(f"{url}/cluster/instances", timeout=5).json()
    assert len(views) >= 2
    a, b = views[0]["instance_id"], views[1]["instance_id"]
    for body, status in (({"instance_id": a, "role": "boss"}, 400),
                         ({"instance_id": "nobody", "role": "decode"}, 404),
                         ({"instance_id": a, "role": "decode", "drain_timeout_s": -1}, 400)):
        r = requests.post(f"{url}/cluster/role", json=body, timeout=10)
        assert r.status_code == status and "error" in r.json(), (body, r.text)
    try:
        for iid, role in ((a, "prefill"), (b, "decode")):
            r = requests.post(f"{url}/cluster/role", json={"instance_id": iid, "role": role},
                              timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["role"] == role and r.json()["seconds"] >= 0
        roles = {v["instance_id"]: v["role"]
                 for v in requests.get(f"{url}/cluster/instances", timeout=5).json()}
        assert roles[a] == "prefill" and roles[b] == "decode"
        progress = [0]
        text, finish = _stream(url, str(demo_model_dir), PROMPTS[0], progress, 0)
        assert (text, finish) == (_expected(served_engine, PROMPTS[:1])[0], "length")
        metrics = requests.get(f"{url}/metrics", timeout=5).text
        assert "xllm_master_pd_handoffs_total 1.0" in metrics
        assert "xllm_master_role_switches_total 2.0" in metrics
        assert requests.get(f"{url}/cluster/pd", timeout=5).json()["policy"] == "static"
    finally:
        for iid in (a, b):
            requests.post(f"{url}/cluster/role", json={"instance_id": iid, "role": "mixed"},
                          timeout=60)


def test_dynamic_pd_from_the_command_line(demo_model_dir: Path, served_engine,  # noqa: ANN001
                                          tmp_path: Path) -> None:
    """xllm-master --pd-policy dynamic --spawn 2: the spawned instances profile their
    speed before registering and report the fitted models; the planner runs its rounds
    (/cluster/pd says what it decided and why) while requests are served exactly."""
    extra = ["--spawn", "2", "--pd-policy", "dynamic", "--slo-ttft-ms", "3000",
             "--slo-tpot-ms", "50", "--pd-interval", "0.5", "--pd-min-dwell", "0"]
    with _running_master(demo_model_dir, tmp_path / "master.log", extra, 2,
                         ready=lambda views: all(v["load"]["speed"] for v in views)
                         ) as (_, url, log):
        for v in requests.get(f"{url}/cluster/instances", timeout=5).json():
            speed = v["load"]["speed"]
            assert len(speed["ttft_coef"]) == 3 and len(speed["tpot_coef"]) == 3
        assert "speed profile taken" in log.read_text(errors="replace")
        progress = [0]
        text, finish = _stream(url, str(demo_model_dir), PROMPTS[1], progress, 0)
        assert (text, finish) == (_expected(served_engine, PROMPTS[1:2])[0], "length")
        deadline = time.monotonic() + 10
        pd = requests.get(f"{url}/cluster/pd", timeout=5).json()
        while pd["last"] is None or pd["last"]["reason"] == "no traffic yet":
            assert time.monotonic() < deadline, pd
            time.sleep(0.2)
            pd = requests.get(f"{url}/cluster/pd", timeout=5).json()
        assert pd["policy"] == "dynamic" and pd["slo_tpot_ms"] == 50
        assert pd["last"]["traffic"]["rate"] > 0 and pd["last"]["reason"]


def test_reasoning_parser_through_the_master(demo_model_dir: Path, served_engine,  # noqa: ANN001
                                             tmp_path: Path) -> None:
    """--reasoning-parser on xllm-master splits answers as xllm-server does: the demo writes
    no </think>, so under deepseek_r1 the whole answer is reasoning_content."""
    body = {"model": str(demo_model_dir), "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "Name a colour."}]}
    with _running_master(demo_model_dir, tmp_path / "master.log",
                         ["--spawn", "1", "--reasoning-parser", "deepseek_r1"], 1) as (_, url, _):
        got = requests.post(url + "/v1/chat/completions", json=body, timeout=60).json()
    message = got["choices"][0]["message"]
    from xllm.api.app import build_app
    from xllm.api.settings import ServerSettings

    app = build_app(served_engine, ServerSettings(served_model_names=[str(demo_model_dir)]),
                    shutdown_engine=False)
    with LiveServer(app) as server:
        plain = requests.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    text = plain["choices"][0]["message"]["content"]
    assert text and message["reasoning_content"] == text and message["content"] is None


def test_agent_api_through_the_master(demo_model_dir: Path, served_engine,  # noqa: ANN001
                                      tmp_path: Path) -> None:
    """Tool calls (required, named, auto with --tool-call-parser), JSON-schema outputs and
    embeddings through xllm-master answer as xllm-server does (greedy: the same text, the
    same calls; ids aside)."""
    import jsonschema
    from test_server_structured import PERSON
    from test_server_tools import HERMES_CALL, SCHEMAS, TOOLS

    from xllm.api.app import build_app
    from xllm.api.settings import ServerSettings

    model = str(demo_model_dir)
    chat = {"model": model, "temperature": 0, "max_tokens": 120,
            "messages": [{"role": "user", "content": "What is the weather in Rome?"}]}
    bodies = [
        {**chat, "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False},
        {**chat, "tools": TOOLS, "tool_choice": {"type": "function",
                                                 "function": {"name": "search"}}},
        {**chat, "tools": TOOLS, "structured_outputs": {"regex": HERMES_CALL}},
        {**chat, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
        {**chat, "response_format": {"type": "json_schema", "json_schema": {
            "name": "person", "schema": PERSON}}},
    ]

    def answers(url: str) -> list:
        out = []
        for body in bodies:
            r = requests.post(url + "/v1/chat/completions", json=body, timeout=60)
            got = r.json()
            for choice in got.get("choices", []):
                for call in choice["message"]["tool_calls"]:
                    call.pop("id")
            out.append((r.status_code, got.get("choices", got.get("error"))))
        for stream in (False, True):  # a streamed named call: name first, then arguments
            r = requests.post(url + "/v1/chat/completions", timeout=60, stream=stream,
                              json={**bodies[1], "stream": stream})
            out.append(r.text.count('"name":"search"') if stream else r.status_code)
        emb = requests.post(url + "/v1/embeddings", timeout=60, json={
            "model": model, "input": ["first text", "second"]}).json()
        out.append([d["embedding"] for d in emb["data"]])
        return out

    settings = ServerSettings(served_model_names=[model], tool_call_parser="hermes")
    with LiveServer(build_app(served_engine, settings, shutdown_engine=False)) as server:
        want = answers(server.url)
    with _running_master(demo_model_dir, tmp_path / "master.log",
                         ["--spawn", "1", "--tool-call-parser", "hermes"], 1) as (_, url, _):
        got = answers(url)
    for i in (0, 1, 2):
        assert got[i][0] == 200 and got[i][1][0]["finish_reason"] in ("tool_calls", "stop")
        for call in got[i][1][0]["message"]["tool_calls"]:
            fn = call["function"]
            jsonschema.validate(json.loads(fn["arguments"]), SCHEMAS[fn["name"]])
    assert got[3][0] == 400 and got[3][1]["param"] == "tool_choice"
    jsonschema.validate(json.loads(got[4][1][0]["message"]["content"]), PERSON)
    assert got[-2] == 1  # the streamed call's name came once
    assert got[:-1] == want[:-1]
    for a, b in zip(got[-1], want[-1], strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5
