"""Two network namespaces joined by a veth pair: "two hosts" on one machine, for the tests
and benchmarks of ranks and instances on other hosts (needs root and ``ip netns``)."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
from collections.abc import Iterator


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, timeout=10, capture_output=True)


@contextlib.contextmanager
def two_namespaces(prefix: str = "xllm") -> Iterator[tuple[tuple[str, str], tuple[str, str]]]:
    """((namespace, address), (namespace, address)) of two namespaces on one /24 of
    10.213.X, each with its end of the pair and ``lo`` up; removed afterwards (which removes
    the pair). OSError or SubprocessError where they cannot be made (nothing left behind)."""
    tag = f"{os.getpid() % 10000}{random.randrange(100)}"
    a, b = f"{prefix}-a{tag}", f"{prefix}-b{tag}"
    net = f"10.213.{random.randrange(1, 250)}"
    made = []
    try:
        for ns in (a, b):
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("link", "add", f"xva{tag}", "type", "veth", "peer", "name", f"xvb{tag}")
        for ns, dev, host in ((a, f"xva{tag}", 1), (b, f"xvb{tag}", 2)):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{net}.{host}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield (a, f"{net}.1"), (b, f"{net}.2")
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], timeout=10, capture_output=True)
