"""AsyncEngine behaviour (slow readers, loading, faults) and the xllm-server process (ready
line, graceful SIGTERM)."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import read_ready_port
from live_server import LiveServer

from xllm.api.app import build_app
from xllm.api.settings import ServerSettings
from xllm.config import EngineConfig
from xllm.engine.async_engine import AsyncEngine, EngineDeadError
from xllm.engine.llm_engine import LLMEngine
from xllm.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(120)


def test_slow_reader_coalesces_and_stalls_nobody(served_engine) -> None:  # noqa: ANN001
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    async def run() -> None:
        slow = served_engine.generate("Once upon a time", params)
        fast = served_engine.generate("Once upon a time", params)
        # The fast reader finishes while the slow one has not read anything.
        fast_outputs = [out async for out in fast]
        assert fast_outputs[-1].finished and len(fast_outputs) >= 2
        outputs = [out async for out in slow]
        # Everything the slow reader missed arrives merged, nothing lost or repeated.
        assert len(outputs) == 1 and outputs[0].finished
        text, ids = outputs[0].deltas[0]
        assert ids == outputs[0].outputs[0].token_ids == fast_outputs[-1].outputs[0].token_ids
        assert text == outputs[0].outputs[0].text

    asyncio.run(run())


def test_calls_beside_the_step_run_while_the_model_computes(served_engine) -> None:  # noqa: ANN001
    """call_beside_step (a KV fetch's plan and adoption) does not wait for the step to end:
    it runs while the model computes. Here the model waits (up to 5 s) for the call to have
    run; the engine's own thread-only calls keep working, and a busy engine lets them in
    at every step."""
    runner = served_engine.engine.runner
    real_run = runner.run
    in_model = threading.Event()
    beside_ran = threading.Event()
    waited: list[bool] = []

    def run(step):  # noqa: ANN001, ANN202
        if not waited:  # the first step only
            in_model.set()
            waited.append(beside_ran.wait(5.0))
        return real_run(step)

    def beside(engine: LLMEngine) -> int:
        beside_ran.set()
        return engine.scheduler.kv.num_free_blocks

    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)

    async def main() -> None:
        stream = served_engine.generate("Once upon a time", params)
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, in_model.wait, 10.0)
        free = await asyncio.wait_for(
            asyncio.wrap_future(served_engine.call_beside_step(beside)), 3.0)
        assert free > 0
        # While it steps, calls beside the step and on its thread both get in, every time.
        for _ in range(5):
            await asyncio.wait_for(asyncio.wrap_future(served_engine.call_beside_step(
                lambda e: e.scheduler.kv.num_free_blocks)), 3.0)
            await asyncio.wait_for(asyncio.wrap_future(served_engine.call_on_engine_thread(
                lambda e: len(e.scheduler.requests))), 3.0)
        outs = [o async for o in stream]
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 24

    runner.run = run
    try:
        asyncio.run(main())
    finally:
        del runner.run
    assert waited == [True]  # the call ran inside the first step's model time


def test_loading_then_fault_turns_health_503_and_fails_requests(demo_model_dir) -> None:  # noqa: ANN001
    release = threading.Event()
    steps = {"n": 0}

    def factory() -> LLMEngine:
        release.wait(30)  # "loading" until the test has seen the 503
        engine = LLMEngine(EngineConfig(model=str(demo_model_dir), max_model_len=128,
                                        kv_cache_memory_gb=0.05, num_threads=1),
                           progress=False)
        real_step = engine.step

        def faulty_step():  # noqa: ANN202
            steps["n"] += 1
            if steps["n"] == 3:
                raise RuntimeError("injected fault")
            return real_step()

        engine.step = faulty_step  # type: ignore[method-assign]
        return engine

    engine = AsyncEngine(EngineConfig(model=str(demo_model_dir)), engine_factory=factory)
    engine.start()
    settings = ServerSettings(served_model_names=["demo"])
    with LiveServer(build_app(engine, settings)) as srv:
        port = int(srv.url.rsplit(":", 1)[1])
        assert _get(port, "/health")[0] == 503
        status, body = _post(port, "/v1/completions", {"model": "demo", "prompt": "hi"})
        assert status == 503 and "loading" in body["error"]["message"]
        release.set()
        assert engine.wait_ready(60)
        assert _get(port, "/health")[0] == 200
        status, body = _post(port, "/v1/completions", {"model": "demo", "prompt": "Hello",
                                                       "max_tokens": 10, "ignore_eos": True})
        assert status == 503 and "injected fault" in body["error"]["message"]
        assert _get(port, "/health")[0] == 503
        status, _ = _post(port, "/v1/completions", {"model": "demo", "prompt": "again"})
        assert status == 503  # refused at once, not hanging

    async def late() -> None:
        with pytest.raises(EngineDeadError):
            engine.generate("x", SamplingParams())
        with pytest.raises(EngineDeadError):  # nothing runs beside a failed engine's step
            engine.call_beside_step(lambda e: e.scheduler.kv.num_free_blocks)

    asyncio.run(late())


def _get(port: int, path: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def _post(port: int, path: str, body: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def test_server_process_ready_line_and_graceful_sigterm(demo_model_dir) -> None:  # noqa: ANN001
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "xllm.api.server", "--model", str(demo_model_dir), "--port", "0",
         "--max-model-len", "128", "--kv-cache-memory-gb", "0.05", "--num-threads", "1",
         "--grace-period", "30"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines: list[str] = []
    try:
        port = read_ready_port(proc, lines, timeout=90)
        assert _get(port, "/health")[0] == 200
        # A stream in flight when SIGTERM arrives still finishes.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        body = {"model": str(demo_model_dir), "prompt": "One, two,", "max_tokens": 12,
                "ignore_eos": True, "stream": True, "temperature": 0}
        conn.request("POST", "/v1/completions", json.dumps(body),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        first = resp.readline()
        assert first.startswith(b"data: "), first
        proc.send_signal(signal.SIGTERM)
        rest = resp.read().decode()
        conn.close()
        events = [e for e in (first.decode() + rest).split("\n\n") if e.strip()]
        assert events[-1] == "data: [DONE]"
        texts = [json.loads(e[6:])["choices"] for e in events[:-1]]
        assert sum(1 for c in texts for choice in c if choice["finish_reason"]) == 1
        assert proc.wait(60) == 0
        err = proc.stderr.read()
        lines.append(err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log = "".join(lines)
    assert len(re.findall(r"on http://", log)) == 1, log  # exactly one "listening" line
    with pytest.raises(OSError):
        _get(port, "/health")  # the port is closed
