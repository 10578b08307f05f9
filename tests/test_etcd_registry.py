"""The etcd-backed registry against a real etcd (Debian's etcd-server) on 127.0.0.1:
leased instance keys and their expiry, incarnations, and leader failover between two
masters, one of them SIGKILLed. Each test module run starts one etcd on free ports with a
temporary data dir and stops it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from etcd_server import ETCD, free_port, run_etcd

from xllm.service.registry import HeartbeatStatus, InstanceEvent
from xllm.service.state import Capacity, InstanceInfo, InstanceLoad

pytestmark = [
    pytest.mark.skipif(ETCD is None, reason="etcd binary not found (apt-get install etcd-server)"),
    pytest.mark.skipif(sys.version_info < (3, 11), reason="etcd3aio needs Python >= 3.11"),
    pytest.mark.timeout(60),
]


@pytest.fixture(scope="module")
def etcd_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with run_etcd(tmp_path_factory.mktemp("etcd")) as endpoint:
        yield endpoint


def info(name: str) -> InstanceInfo:
    return InstanceInfo(name, f"127.0.0.1:{free_port()}", model="demo", capacity=Capacity(8))


async def _wait_for(cond, timeout: float) -> float:  # type: ignore[no-untyped-def]
    """Seconds until cond() is true (polled every 20 ms); TimeoutError after timeout."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


def test_instance_lease_registration_and_expiry(etcd_endpoint: str) -> None:
    from xllm.service.etcd_registry import EtcdInstanceLease, EtcdRegistry, connect

    async def run() -> None:
        master = EtcdRegistry(etcd_endpoint, "127.0.0.1:1", prefix="/t1")
        events: list[InstanceEvent] = []
        master.subscribe(events.append)
        await master.start()
        inst_client = await connect(etcd_endpoint)
        agent = EtcdInstanceLease(inst_client, prefix="/t1", lease_ttl_s=2)
        try:
            await _wait_for(lambda: master.is_leader, 5)
            inc1 = await agent.register(info("a"))
            await _wait_for(lambda: master.get("a") is not None, 3)
            v = master.get("a")
            assert v is not None and v.incarnation_id == inc1 and v.info.model == "demo"
            r = master.heartbeat("a", inc1, 1, InstanceLoad(num_running=2), added=[7], full=True)
            assert r.status is HeartbeatStatus.OK and master.index.match([7]) == {v.slot: 1}

            # a restart: a new lease, the same key -> a new incarnation; old beats ignored
            inc2 = await agent.register(info("a"))
            await _wait_for(
                lambda: (w := master.get("a")) is not None and w.incarnation_id == inc2, 3
            )
            assert master.heartbeat("a", inc1, 2, InstanceLoad()).status is HeartbeatStatus.UNKNOWN

            # a crash: keepalives stop, the lease expires (TTL 2 s), the key goes
            lease = agent._lease
            assert lease is not None and lease._task is not None
            lease._task.cancel()
            expiry = lease.renewed + lease.ttl_s  # the lease's deadline
            for seq in range(1, 100):  # keep beating so only the lease can kill it
                master.heartbeat("a", inc2, seq, InstanceLoad(), full=True)
                if master.get("a") is None:
                    break
                await asyncio.sleep(0.05)
            late = time.monotonic() - expiry
            # out of routing within 1 s of the deadline (etcd checks expiry every 0.5 s)
            assert master.get("a") is None and late < 1.0, late
            print(f"lease expiry noticed {late:+.2f} s after its deadline")
            assert events[-1].kind == "down" and "lease" in events[-1].reason
            lease.alive = False  # already gone on the server: nothing to revoke
        finally:
            await agent.close()
            await inst_client.close()
            await master.close()

    asyncio.run(run())


def test_leader_revokes_silent_instance(etcd_endpoint: str) -> None:
    from xllm.service.etcd_registry import EtcdInstanceLease, EtcdRegistry, connect

    async def run() -> None:
        master = EtcdRegistry(
            etcd_endpoint, "127.0.0.1:1", "/t2", heartbeat_interval_s=0.1, heartbeat_timeout_s=0.5
        )
        await master.start()
        client = await connect(etcd_endpoint)
        agent = EtcdInstanceLease(client, prefix="/t2")
        try:
            await _wait_for(lambda: master.is_leader, 5)
            inc = await agent.register(info("b"))
            await _wait_for(lambda: master.get("b") is not None, 3)
            master.heartbeat("b", inc, 1, InstanceLoad(), full=True)
            # silence: the leader marks it dead and revokes its lease -> the agent learns it
            await _wait_for(lambda: master.get("b") is None, 3)
            await _wait_for(lambda: not agent.alive, 3)
        finally:
            await agent.close()
            await client.close()
            await master.close()

    asyncio.run(run())


_LEADER_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from xllm.service.etcd_registry import EtcdRegistry

    async def main():
        reg = EtcdRegistry(sys.argv[1], "leader:1", prefix="/t3")
        await reg.start()
        while not reg.is_leader:
            await asyncio.sleep(0.02)
        print("leader", flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


def test_standby_takes_over_when_leader_is_killed(etcd_endpoint: str, tmp_path: Path) -> None:
    from xllm.service.etcd_registry import EtcdRegistry

    script = tmp_path / "leader.py"
    script.write_text(_LEADER_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, str(script), etcd_endpoint], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert proc.stdout is not None
        # The first line the child prints once it leads (a dev install may print a rebuild
        # notice before it; EOF means the child died).
        line = proc.stdout.readline()
        while line and line.strip() != "leader":
            line = proc.stdout.readline()
        assert line.strip() == "leader"

        async def run() -> float:
            standby = EtcdRegistry(etcd_endpoint, "standby:2", prefix="/t3")
            await standby.start()
            try:
                assert standby.election is not None
                await _wait_for(lambda: standby.election.is_leader is False, 1)
                await asyncio.sleep(0.5)
                assert not standby.is_leader
                assert await standby.election.leader_address() == "leader:1"
                os.kill(proc.pid, signal.SIGKILL)
                took = await _wait_for(lambda: standby.is_leader, 8)
                assert await standby.election.leader_address() == "standby:2"
                return took
            finally:
                await standby.close()

        took = asyncio.run(run())
        assert took < 5.0, took
    finally:
        proc.kill()
        proc.wait(5)
