"""A real cluster over etcd: one etcd, two ``xllm-master --etcd`` and two ``xllm-server
--etcd`` processes on loopback (instances with 4 seats each). In file order:

1. offline admission: a backlog of offline requests waits at the master for spare capacity
   while an online request goes straight through; every request ends with the greedy text;
2. an instance is SIGKILLed while streams run: every stream finishes with the greedy text,
   and both masters take the instance out of routing within 1 s of its lease deadline;
3. the leader master is SIGKILLed: the standby (which already served) leads within 5 s
   and serves on.

Every process is stopped at the end (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from etcd_server import ETCD, run_etcd
from live_server import greedy_texts

pytestmark = [
    pytest.mark.skipif(ETCD is None, reason="etcd binary not found (apt-get install etcd-server)"),
    pytest.mark.skipif(sys.version_info < (3, 11), reason="etcd3aio needs Python >= 3.11"),
    pytest.mark.timeout(240),
]

ENGINE = ["--dtype", "float32", "--max-model-len", "256", "--num-threads", "1"]
INSTANCE = [*ENGINE, "--kv-cache-memory-gb", "0.1", "--max-num-seqs", "4"]
LEASE_TTL_S = 2.0  # EtcdInstanceLease's default


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    url: str = ""

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(15)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)


@dataclass
class Cluster:
    etcd: str
    masters: list[Proc]
    instances: list[Proc]
    model: str


def _start(name: str, args: list[str], logs: Path) -> Proc:
    log = logs / f"{name}.log"
    with log.open("wb") as sink:
        popen = subprocess.Popen(
            [sys.executable, "-m", *args],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return Proc(name, popen, log)


def _wait(cond, timeout: float, what: str, procs: list[Proc]) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        for p in procs:
            if p.popen.poll() is not None:
                raise AssertionError(f"{p.name} exited:\n{p.text()[-3000:]}")
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.text()[-1500:]}" for p in procs)
            raise AssertionError(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.1)


def _get(url: str, path: str) -> object:
    try:
        return requests.get(url + path, timeout=2).json()
    except (requests.RequestException, ValueError):
        return None


def _start_master(name: str, etcd: str, model: str, logs: Path) -> Proc:
    m = _start(
        name,
        [
            "xllm.service.master_server",
            "--etcd",
            etcd,
            "--port",
            "0",
            "--model",
            model,
            "--log-level",
            "info",
            *ENGINE,
        ],
        logs,
    )

    def up() -> bool:
        text = m.text()
        if "xllm-master serving" not in text:
            return False
        m.url = text.split("xllm-master serving", 1)[1].split(" on ", 1)[1].split()[0]
        return True

    _wait(up, 90, f"{name} to serve", [m])
    return m


@pytest.fixture(scope="module")
def cluster(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp("cluster")
    model = str(demo_model_dir)
    procs: list[Proc] = []
    with run_etcd(logs) as etcd:
        try:
            # The instances load their model while the masters start.
            for i in range(2):
                procs.append(
                    _start(
                        f"instance{i}",
                        [
                            "xllm.api.server",
                            "--etcd",
                            etcd,
                            "--port",
                            "0",
                            "--model",
                            model,
                            "--instance-id",
                            f"inst{i}",
                            "--log-level",
                            "info",
                            *INSTANCE,
                        ],
                        logs,
                    )
                )
            a = _start_master("master-a", etcd, model, logs)
            procs.append(a)
            _wait(
                lambda: (_get(a.url, "/cluster/status") or {}).get("is_leader"),
                30,
                "master-a to lead",
                procs,
            )
            b = _start_master("master-b", etcd, model, logs)
            procs.append(b)
            for m in (a, b):
                _wait(
                    lambda m=m: len(_get(m.url, "/cluster/instances") or []) == 2,
                    150,
                    f"2 instances at {m.name}",
                    procs,
                )
            yield Cluster(etcd, [a, b], procs[:2], model)
        finally:
            for p in reversed(procs):
                p.stop()


def _complete(
    url: str,
    model: str,
    prompt: str,
    max_tokens: int,
    *,
    offline: bool = False,
    progress: list[int] | None = None,
    i: int = 0,
) -> tuple[str, str | None, float]:
    """Streams a completion; (text, finish_reason, monotonic time it finished)."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "offline": offline,
    }
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
                if progress is not None:
                    progress[i] += 1
    return text, finish, time.monotonic()


def test_offline_backlog_waits_at_the_master_and_online_goes_first(
    cluster: Cluster, served_engine
) -> None:  # noqa: ANN001
    leader = cluster.masters[0]
    offline_prompts = [
        f"Offline job {i}: summarise the number {i * 7} in words." for i in range(20)
    ]
    online_prompt = "Online question: what is the capital of Italy?"
    expected = greedy_texts(served_engine, offline_prompts, 12)
    (want_online,) = greedy_texts(served_engine, [online_prompt], 8)
    with ThreadPoolExecutor(len(offline_prompts) + 1) as pool:
        offline = [
            pool.submit(_complete, leader.url, cluster.model, p, 12, offline=True)
            for p in offline_prompts
        ]
        # 2 instances x 4 seats: at least 4 of the 20 must wait at the master. (With 12, a
        # CI run once saw the backlog never reach 4: a heartbeat that lands while routed
        # requests are still in transit clears the master's count of them, so it may admit
        # a few more than the free seats. That race is known, see docs/cluster.md.)
        deadline = time.monotonic() + 30
        while (_get(leader.url, "/cluster/status") or {}).get("offline_queued", 0) < 4:
            assert time.monotonic() < deadline, "the offline backlog never queued at the master"
            time.sleep(0.02)
        sent = time.monotonic()
        online = pool.submit(_complete, leader.url, cluster.model, online_prompt, 8)
        text, finish, online_done = online.result(timeout=120)
        results = [f.result(timeout=120) for f in offline]
    assert (text, finish) == (want_online, "length")
    for (got, fin, _), want in zip(results, expected, strict=True):
        assert (got, fin) == (want, "length")
    after = sum(done > online_done for _, _, done in results)
    # FIFO admission would have run the online request after 8 or more offline ones; here
    # it overtakes at least the 4 that were waiting at the master when it arrived.
    assert after >= 4, (after, online_done - sent)
    print(f"online request: {online_done - sent:.2f} s, finished before {after} of 20 offline")


def test_sigkill_one_instance_mid_stream(cluster: Cluster, served_engine) -> None:  # noqa: ANN001
    leader, standby = cluster.masters
    prompts = [f"Stream {i}: count the colours of a rainbow, then {i} more." for i in range(6)]
    max_tokens = 24
    expected = greedy_texts(served_engine, prompts, max_tokens)
    progress = [0] * len(prompts)
    victim = cluster.instances[0]
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [
            pool.submit(_complete, leader.url, cluster.model, p, max_tokens, progress=progress, i=i)
            for i, p in enumerate(prompts)
        ]
        deadline = time.monotonic() + 90
        while min(progress) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert 1 <= min(progress) and max(progress) < max_tokens, f"kill too late: {progress}"
        os.kill(victim.popen.pid, signal.SIGKILL)
        killed = time.monotonic()
        gone: dict[str, float] = {}
        while len(gone) < 2 and time.monotonic() - killed < LEASE_TTL_S + 3:
            for m in cluster.masters:
                ids = [v["instance_id"] for v in _get(m.url, "/cluster/instances") or []]
                if m.name not in gone and ids and "inst0" not in ids:
                    gone[m.name] = time.monotonic() - killed
            time.sleep(0.05)
        results = [f.result(timeout=120) for f in futures]
    victim.popen.wait(5)
    for (text, finish, _), want in zip(results, expected, strict=True):
        assert (text, finish) == (want, "length")
    assert "resuming" in leader.text(), leader.text()[-3000:]
    # The lease deadline is at most LEASE_TTL_S after the kill (the last keepalive came
    # before it); both masters must have dropped the instance within 1 s of it.
    assert set(gone) == {leader.name, standby.name}, gone
    assert max(gone.values()) <= LEASE_TTL_S + 1.0, gone
    print("instance out of routing after: " + ", ".join(f"{k} {v:.2f} s" for k, v in gone.items()))


def test_standby_takes_over_when_the_leader_master_dies(cluster: Cluster, served_engine) -> None:  # noqa: ANN001
    leader, standby = cluster.masters
    prompt = "Failover: name three planets."
    (want,) = greedy_texts(served_engine, [prompt], 8)
    # Every master serves: the standby already answers with fresh load from the instances.
    assert (_get(standby.url, "/cluster/status") or {}).get("is_leader") is False
    assert _complete(standby.url, cluster.model, prompt, 8)[:2] == (want, "length")
    os.kill(leader.popen.pid, signal.SIGKILL)
    killed = time.monotonic()
    while not (_get(standby.url, "/cluster/status") or {}).get("is_leader"):
        assert time.monotonic() - killed < 5.0, "the standby did not take over within 5 s"
        time.sleep(0.05)
    took = time.monotonic() - killed
    leader.popen.wait(5)
    assert _complete(standby.url, cluster.model, prompt, 8)[:2] == (want, "length")
    assert [v["instance_id"] for v in _get(standby.url, "/cluster/instances") or []] == ["inst1"]
    print(f"standby led {took:.2f} s after the leader's SIGKILL")
