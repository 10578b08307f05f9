"""``xllm-server`` (also ``xllm serve``): the OpenAI-compatible server on uvicorn.

The engine starts loading at once on its thread while the socket opens, so ``/health``
answers 503 during the load. One log line says where the server listens once it is ready.
SIGTERM/SIGINT: stop accepting connections, let in-flight requests finish for up to
``--grace-period`` seconds (then cancel them, which aborts their engine requests), stop the
engine, exit 0. A second SIGINT forces the exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Generator, Sequence
from types import FrameType

import uvicorn

from xllm.api.app import build_app
from xllm.api.settings import ServerSettings
from xllm.config import EngineConfig, add_engine_options, engine_config_from_args
from xllm.engine.async_engine import READY, STOPPED, AsyncEngine

__all__ = ["add_server_options", "main", "run_server", "settings_from_args"]

logger = logging.getLogger("xllm.server")


def add_server_options(parser: argparse.ArgumentParser) -> None:
    d = ServerSettings()
    g = parser.add_argument_group("server options")
    g.add_argument("--host", default=d.host, help="address to bind (default: loopback only)")
    g.add_argument("--port", type=int, default=d.port, help="0 picks a free port")
    g.add_argument("--api-key", default=os.environ.get("XLLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $XLLM_API_KEY)")
    g.add_argument("--served-model-name", nargs="+", dest="served_model_names", default=[],
                   metavar="NAME", help="model name(s) clients use (default: the --model value)")
    g.add_argument("--max-request-body-bytes", type=int, default=d.max_request_body_bytes)
    g.add_argument("--max-waiting-requests", type=int, default=d.max_waiting_requests,
                   help="answer 503 while more requests than this wait to start")
    g.add_argument("--max-tokens-limit", type=int, default=d.max_tokens_limit,
                   help="cap on new tokens per completion (default: the context length)")
    g.add_argument("--max-n", type=int, default=d.max_n,
                   help="cap on completions per prompt (n)")
    g.add_argument("--reasoning-parser", metavar="NAME",
                   help="split chat answers into reasoning_content (<think>...</think>) and "
                        "content: deepseek_r1 or qwen3 (default: no split)")
    g.add_argument("--tool-call-parser", metavar="NAME",
                   help="read tool calls under tool_choice auto in this format: hermes (qwen), "
                        "llama3_json, mistral or deepseek_v3 (default: the format the chat "
                        "template shows, if any)")
    g.add_argument("--embedding-pooling", default=d.embedding_pooling, choices=("last", "mean"),
                   help="/v1/embeddings pools the prompt's final hidden states so: the last "
                        "token's (decoder embedding models' usual choice) or their mean")
    g.add_argument("--grace-period", type=float, default=d.grace_period_s, dest="grace_period_s",
                   help="seconds in-flight requests may take to finish on SIGTERM/SIGINT")
    g.add_argument("--access-log", action="store_true", help="log every HTTP request")
    g.add_argument("--log-level", default=d.log_level,
                   choices=["debug", "info", "warning", "error"])
    c = parser.add_argument_group("cluster options (an instance of xllm-master)")
    c.add_argument("--master", metavar="HOST:PORT",
                   help="register with this xllm-master's gRPC address and serve Generate")
    c.add_argument("--etcd", metavar="HOST:PORT", help="register in this etcd instead")
    c.add_argument("--grpc-port", type=int, default=0,
                   help="port of the gRPC Instance service (0 picks a free one)")
    c.add_argument("--instance-id", help="stable id in the cluster (default: host:grpc-port)")
    c.add_argument("--role", default="mixed", choices=("mixed", "prefill", "decode"),
                   help="what the master sends here: everything (mixed), prompts and their "
                        "first token (prefill), or the decoding of prompts a prefill "
                        "instance computed (decode); see docs/cluster.md")
    c.add_argument("--kv-mooncake", choices=("tcp", "rdma"), default=None, metavar="PROTOCOL",
                   help="serve and fetch KV blocks between instances on other hosts over the "
                        "Mooncake transfer engine (tcp or rdma; needs "
                        "mooncake-transfer-engine-non-cuda). It listens on every interface "
                        "and lets peers read the registered KV memory: trusted networks "
                        "only (docs/kvcache.md)")
    c.add_argument("--profile-speed", action="store_true",
                   help="before registering, profile prompt and decode step times (~10 s) "
                        "to seed the speed model reported to the master's PD planner "
                        "(it is refined from the instance's own steps either way)")


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(
        host=args.host, port=args.port, served_model_names=list(args.served_model_names),
        api_key=args.api_key, max_request_body_bytes=args.max_request_body_bytes,
        max_waiting_requests=args.max_waiting_requests, max_tokens_limit=args.max_tokens_limit,
        max_n=args.max_n, reasoning_parser=args.reasoning_parser,
        tool_call_parser=args.tool_call_parser, embedding_pooling=args.embedding_pooling,
        grace_period_s=args.grace_period_s, access_log=args.access_log, log_level=args.log_level)


class _Server(uvicorn.Server):
    """uvicorn's server, except that a handled SIGTERM/SIGINT ends in exit status 0: uvicorn
    re-raises the signal after its graceful shutdown, which would kill the process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        elif not self.should_exit:
            logger.info("%s: finishing in-flight requests (up to %.0f s), then exiting",
                        signal.Signals(sig).name, self.config.timeout_graceful_shutdown or 0)
        self.should_exit = True


def _listen_url(server: uvicorn.Server, host: str) -> str:
    port = server.servers[0].sockets[0].getsockname()[1] if server.servers else "?"
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


async def _serve(server: _Server, engine: AsyncEngine, settings: ServerSettings,
                 cluster: argparse.Namespace | None = None) -> int:
    runtime = None
    if cluster is not None and (cluster.master or cluster.etcd):
        from xllm.service.instance import InstanceRuntime

        runtime = InstanceRuntime(engine, master=cluster.master, etcd=cluster.etcd,
                                  host=settings.host, grpc_port=cluster.grpc_port,
                                  instance_id=cluster.instance_id,
                                  model=(settings.served_model_names or [engine.config.model])[0],
                                  role=getattr(cluster, "role", "mixed"),
                                  profile_speed=getattr(cluster, "profile_speed", False),
                                  kv_mooncake=getattr(cluster, "kv_mooncake", None))
        await runtime.start()
    try:
        return await _serve_http(server, engine, settings)
    finally:
        if runtime is not None:
            await runtime.close()


async def _serve_http(server: _Server, engine: AsyncEngine, settings: ServerSettings) -> int:
    task = asyncio.ensure_future(server.serve())
    # Startup only: wait for the socket and the model, then announce once.
    while not (server.started and engine.wait_ready(0)) and not task.done():
        if server.should_exit or engine.state not in ("loading", READY):
            break
        await asyncio.sleep(0.05)
    status = 0
    if engine.state == READY and server.started and not server.should_exit:
        names = ", ".join(settings.served_model_names)
        logger.info("xllm-server %s serving %s on %s", _version(), names,
                    _listen_url(server, settings.host))
    # An engine that fails later (a fault in a step, a tensor-parallel worker that died) is
    # not trusted again: requests get 503 meanwhile, and the server exits so that whatever
    # supervises it (the master, systemd) restarts it and resumes its requests elsewhere.
    while not task.done() and not server.should_exit and engine.state in ("loading", READY):
        await asyncio.sleep(0.1)
    if engine.state not in ("loading", READY, STOPPED) and not server.should_exit:
        logger.error("%s; exiting", engine.error)
        server.should_exit = True
        status = 1
    await task
    return status


def _version() -> str:
    import xllm

    return xllm.__version__


def run_server(config: EngineConfig, settings: ServerSettings,
               cluster: argparse.Namespace | None = None) -> int:
    """Serves until SIGTERM/SIGINT; the exit status (0 after a graceful stop)."""
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # uvicorn's own start-up lines would say "running" before the model is loaded.
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(
        logging.INFO if settings.access_log else logging.WARNING)
    engine = AsyncEngine(config)
    engine.start()
    app = build_app(engine, settings)
    uv_config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                               access_log=settings.access_log, lifespan="on",
                               timeout_graceful_shutdown=int(max(1, settings.grace_period_s)),
                               limit_concurrency=None)
    server = _Server(uv_config)
    try:
        return asyncio.run(_serve(server, engine, settings, cluster))
    finally:
        engine.shutdown()


def build_parser(prog: str = "xllm-server") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="OpenAI-compatible xllm server")
    add_server_options(parser)
    add_engine_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = engine_config_from_args(args)
        settings = settings_from_args(args)
    except ValueError as e:
        print(f"xllm-server: error: {e}", file=sys.stderr)
        return 2
    if args.master and args.etcd:
        print("xllm-server: error: give --master or --etcd, not both", file=sys.stderr)
        return 2
    return run_server(config, settings, args)


if __name__ == "__main__":
    sys.exit(main())
