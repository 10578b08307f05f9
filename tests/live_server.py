"""A uvicorn server on a free loopback port, in a thread of the test process (bounded)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.types import ASGIApp


class LiveServer:
    """``with LiveServer(app) as srv: srv.url``; stops (and joins) on exit."""

    def __init__(self, app: ASGIApp, start_timeout: float = 30.0) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="live-server", daemon=True)
        self._start_timeout = start_timeout
        self.url = ""

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(15)
        assert not self._thread.is_alive(), "the test server did not stop"


@contextlib.contextmanager
def openai_client(served_engine: Any, timeout: float = 120,  # noqa: ANN401
                  **settings: Any) -> Iterator[Any]:
    """The official openai client of an xllm-server (model name "demo", ``settings`` as
    ServerSettings' fields) around ``served_engine``, live for the block."""
    import openai

    from xllm.api.app import build_app
    from xllm.api.settings import ServerSettings

    app = build_app(served_engine, ServerSettings(served_model_names=["demo"], **settings),
                    shutdown_engine=False)
    with LiveServer(app) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0,
                            timeout=timeout)


def greedy_texts(served_engine, prompts: list[str], max_tokens: int,  # noqa: ANN001
                 structured: list | None = None) -> list[str]:
    """What ``served_engine`` (an AsyncEngine) answers each prompt, greedily, ignoring EOS
    (and, where ``structured[i]`` is a GrammarSpec, constrained by it): the reference a
    cluster's streamed texts must equal."""
    import asyncio

    from xllm.sampling_params import SamplingParams

    async def one(p: str, spec: object) -> str:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                structured=spec)  # type: ignore[arg-type]
        text = ""
        async for out in served_engine.generate(p, params):
            text = out.outputs[0].text
        return text

    async def run() -> list[str]:
        specs = structured or [None] * len(prompts)
        return list(await asyncio.gather(*(one(p, s) for p, s in zip(prompts, specs,
                                                                       strict=True))))

    return asyncio.run(run())
