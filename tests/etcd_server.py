"""A real etcd (Debian's etcd-server) on free loopback ports with a temporary data dir, for
the tests of the etcd registry and of a cluster run with ``--etcd``; stopped on exit."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

ETCD = shutil.which("etcd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def run_etcd(data: Path, start_timeout: float = 15.0) -> Iterator[str]:
    """``with run_etcd(tmp_dir) as endpoint:`` -> ``"127.0.0.1:PORT"``."""
    if ETCD is None:
        raise RuntimeError("etcd binary not found (apt-get install etcd-server)")
    client, peer = free_port(), free_port()
    with (data / "etcd.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                ETCD,
                "--name=xllm-test",
                f"--data-dir={data / 'data'}",
                f"--listen-client-urls=http://127.0.0.1:{client}",
                f"--advertise-client-urls=http://127.0.0.1:{client}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=xllm-test=http://127.0.0.1:{peer}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"etcd exited: {(data / 'etcd.log').read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", client), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"etcd did not start in {start_timeout} s") from None
                time.sleep(0.05)
        yield f"127.0.0.1:{client}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
