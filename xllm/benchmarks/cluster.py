"""A local cluster for benchmarks and tests: ``xllm-master --spawn N`` on loopback.

:class:`LocalCluster` starts the master in its own session (so it and every instance it
spawns form one process group), waits until all N instances are routable, finds the
master's and the instances' HTTP URLs in their "serving ... on URL" log lines, maps each
instance process to the ports it listens on (to kill a chosen one), and on exit stops the
master -- which stops its instances -- and then SIGKILLs whatever of the group is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from xllm.benchmarks.http_client import HTTPError, get_json

__all__ = ["InstanceProcess", "LocalCluster", "children", "listening_ports"]

_MASTER_LINE = re.compile(r"xllm-master serving .* on (http://\S+)")
_INSTANCE_LINE = re.compile(r"xllm-server \S+ serving .* on (http://\S+)")


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return sorted(out)


def listening_ports(pid: int) -> set[int]:
    """TCP ports process ``pid`` listens on: its socket inodes matched against the LISTEN
    rows of /proc/net/tcp{,6}."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if len(cols) > 9 and cols[3] == "0A" and cols[9] in inodes:  # 0A = LISTEN
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


@dataclass(frozen=True)
class InstanceProcess:
    url: str  # HTTP base URL (its /metrics)
    pid: int
    ports: frozenset[int]  # every port it listens on: HTTP and the gRPC Instance service

    @property
    def instance_id(self) -> str | None:
        """Its id in the master's registry (host:gRPC port, the default), when it listens
        on exactly one port besides HTTP."""
        http = int(self.url.rsplit(":", 1)[1])
        others = sorted(self.ports - {http})
        return f"127.0.0.1:{others[0]}" if len(others) == 1 else None


class LocalCluster:
    """``xllm-master --spawn num_instances --policy policy`` plus ``master_args`` (engine
    options for the instances and the master's own), logging to ``log_path``. Use as
    ``async with``; ``url`` is the master's base URL and ``instance_urls`` the instances'.
    Instances get ``OMP_NUM_THREADS=1`` unless ``env`` says otherwise."""

    def __init__(
        self,
        num_instances: int,
        policy: str,
        master_args: list[str],
        log_path: Path,
        *,
        start_timeout_s: float = 300.0,
        env: dict[str, str] | None = None,
    ) -> None:
        if num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {num_instances}")
        self.num_instances = num_instances
        self.policy = policy
        self.master_args = list(master_args)
        self.log_path = Path(log_path)
        self.start_timeout_s = start_timeout_s
        self.env = {"OMP_NUM_THREADS": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.instance_urls: list[str] = []

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    async def start(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "xllm.service.master_server",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--spawn",
            str(self.num_instances),
            "--policy",
            self.policy,
            "--log-level",
            "info",
            *self.master_args,
        ]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as sink:
            self.proc = subprocess.Popen(
                cmd,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            )
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"xllm-master exited with {self.proc.returncode}:\n"
                        f"{self.log_text()[-3000:]}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the cluster was not up after {self.start_timeout_s:.0f}"
                        f" s:\n{self.log_text()[-3000:]}"
                    )
                text = self.log_text()
                m = _MASTER_LINE.search(text)
                self.instance_urls = _INSTANCE_LINE.findall(text)
                if m and len(self.instance_urls) >= self.num_instances:
                    self.url = m.group(1)
                    with contextlib.suppress(HTTPError, OSError, ValueError):
                        live = await get_json(self.url + "/cluster/instances")
                        if len(live) == self.num_instances:
                            return
                await asyncio.sleep(0.2)
        except BaseException:
            await self.stop()
            raise

    def instances(self) -> list[InstanceProcess]:
        """The spawned instances still running, in the order they came up."""
        if self.proc is None:
            return []
        ports = {pid: listening_ports(pid) for pid in children(self.proc.pid)}
        out = []
        for url in self.instance_urls:
            http = int(url.rsplit(":", 1)[1])
            for pid, held in ports.items():
                if http in held:
                    out.append(InstanceProcess(url, pid, frozenset(held)))
        return out

    async def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the master (it stops its instances), then SIGKILL to whatever of its
        process group is left, so nothing outlives the cluster."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait, 5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group is ours: start_new_session

    async def __aenter__(self) -> LocalCluster:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
