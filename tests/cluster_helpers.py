"""An in-process cluster for tests: a real master (registry, gRPC Master service, router,
ClusterEngine) and real instances (AsyncEngines behind InstanceRuntimes), on one event loop,
loopback only, everything stopped on exit."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc

from xllm.config import EngineConfig
from xllm.engine.async_engine import AsyncEngine
from xllm.service.instance import InstanceRuntime
from xllm.service.master import ClusterEngine, MasterServicer, ModelFacts
from xllm.service.proto import master_pb2_grpc
from xllm.service.registry import EmbeddedRegistry
from xllm.service.routing import Router


@contextlib.contextmanager
def engines(config: EngineConfig, n: int) -> Iterator[list[AsyncEngine]]:
    """n started AsyncEngines of one config (loaded in parallel), shut down on exit."""
    started = [AsyncEngine(config) for _ in range(n)]
    try:
        for e in started:
            e.start()
        for e in started:
            assert e.wait_ready(120), e.error
        yield started
    finally:
        for e in started:
            e.shutdown()


@contextlib.asynccontextmanager
async def cluster(members: Sequence[tuple[AsyncEngine, str]], policy: str = "least_load",
                  block_size: int = 16, beat_s: float = 0.1,
                  max_model_len: int = 512, pd: Any = None
                  ) -> AsyncIterator[tuple[EmbeddedRegistry, Any]]:
    """A master over ``members`` ((engine, role) each); yields (registry, ClusterEngine)
    once every instance has registered and beaten."""
    reg = EmbeddedRegistry(heartbeat_interval_s=beat_s, heartbeat_timeout_s=5.0)
    server = grpc.aio.server()
    master_pb2_grpc.add_MasterServicer_to_server(MasterServicer(reg), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await reg.start()
    runtimes = [InstanceRuntime(e, master=f"127.0.0.1:{port}", etcd=None, role=role)
                for e, role in members]
    for r in runtimes:
        await r.start()
    facts = ModelFacts(tokenizer=None, model_config=None, default_max_model_len=max_model_len,
                       registry=reg)
    engine = ClusterEngine(None, facts, reg, Router(policy, block_size), pd=pd)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while len(reg.routable()) < len(members) or any(v.last_seq == 0
                                                        for v in reg.routable()):
            assert loop.time() < deadline, "the instances never registered and beat"
            await asyncio.sleep(0.02)
        yield reg, engine
    finally:
        await engine.close()
        for r in runtimes:
            await r.close(0.5)
        await reg.close()
        await server.stop(0.5)
