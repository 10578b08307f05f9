"""The etcd-backed registry (``--etcd``): leased instance keys, watched by the masters, and
leader election among the masters.

Key layout under ``prefix`` (default ``/xllm``):

- ``{prefix}/instances/{instance_id}`` -> serialized ``InstanceInfo``, attached to the
  instance's lease (TTL ``lease_ttl_s``, about 2 s). The lease id is the incarnation: a
  restarted instance grants a new lease and puts the key again, so heartbeats still
  carrying the old lease id are ignored; when a process dies its lease expires and etcd
  deletes the key, which every master's watch sees.
- ``{prefix}/leader/{lease_id:016x}`` -> a master's address, attached to that master's
  lease. The key with the lowest create revision is the leader; each standby watches the
  key just ahead of it and re-checks when it is deleted, so a dead leader is replaced one
  lease TTL (plus etcd's expiry check) after its last keepalive.

Leases are kept alive every ``ttl / 4`` seconds; one whose keepalive fails for a whole TTL,
or that etcd reports expired, is lost (``on_lost`` runs).

Every master serves: instances send their heartbeats (load, prefix-cache deltas) to every
master listed under ``{prefix}/leader/`` (re-read every ``MASTER_REFRESH_S``), so each one
routes on fresh load. The leader owns the cluster-wide duty: it applies heartbeat deadlines,
and an instance it finds silent past its deadline gets its lease revoked - the key's
deletion takes it out of every master's routing at once, and the instance learns it must
register again. Standbys apply no deadlines (a partition between one standby and an
instance must not split the cluster's view); they rely on the leader and on lease expiry.

Client: etcd3aio (grpc.aio; the older ``etcd3`` package does not work with protobuf >= 4).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from xllm.service.proto import master_pb2
from xllm.service.registry import InstanceRegistry
from xllm.service.state import InstanceInfo
from xllm.service.tasks import stop_task, wait_at_most

__all__ = [
    "MASTER_REFRESH_S",
    "EtcdInstanceLease",
    "EtcdLease",
    "EtcdLeaderElection",
    "EtcdRegistry",
    "connect",
    "master_addresses",
]

_log = logging.getLogger(__name__)
_PUT, _DELETE = 0, 1  # mvccpb.Event.EventType
# How often an instance re-reads the list of masters it beats to: a new master receives an
# instance's beats within this (plus one beat interval).
MASTER_REFRESH_S = 1.0


async def connect(endpoint: str) -> Any:
    """An open etcd3aio client for ``host:port``."""
    try:
        import etcd3aio
    except ImportError as exc:  # a Python < 3.11 install, or a stripped environment
        raise ImportError(
            "--etcd needs the etcd3aio package (Python >= 3.11): pip install etcd3aio"
        ) from exc
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"etcd endpoint must be HOST:PORT, got {endpoint!r}")
    client = etcd3aio.Etcd3Client([endpoint], rpc_max_attempts=1)
    await client.connect()
    return client


def _range_end(prefix: bytes) -> bytes:
    from etcd3aio import prefix_range_end

    return prefix_range_end(prefix)


async def master_addresses(client: Any, prefix: str = "/xllm", timeout: float = 2.0) -> list[str]:
    """The gRPC addresses of the masters (every election candidate), the leader first."""
    key = f"{prefix.rstrip('/')}/leader/".encode()
    resp = await client.kv.get(key, range_end=_range_end(key), timeout=timeout)
    return [kv.value.decode() for kv in sorted(resp.kvs, key=lambda kv: kv.create_revision)]


class EtcdLease:
    """A lease kept alive in the background until :meth:`revoke` or loss."""

    def __init__(self, client: Any, ttl_s: int, on_lost: Callable[[], None] | None = None) -> None:
        if ttl_s < 1:
            raise ValueError(f"lease ttl_s must be an integer >= 1, got {ttl_s}")
        self._client = client
        self.ttl_s = ttl_s
        self.id = 0
        self.alive = False
        self.renewed = 0.0  # monotonic time of the last grant/keepalive: expiry is ttl after
        self._on_lost = on_lost
        self._task: asyncio.Task[None] | None = None

    async def grant(self) -> int:
        self.renewed = time.monotonic()
        resp = await self._client.lease.grant(self.ttl_s, timeout=self.ttl_s)
        self.id, self.alive = int(resp.ID), True
        self._task = asyncio.create_task(self._keepalive(), name=f"etcd-lease-{self.id:x}")
        return self.id

    async def _keepalive(self) -> None:
        interval = self.ttl_s / 4
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            try:
                sent = time.monotonic()
                call = self._client.lease.keep_alive(self.id)
                try:
                    resp = await wait_at_most(call.read(), interval)
                finally:
                    call.cancel()
                if resp.TTL <= 0:
                    break  # expired (or revoked) on the server
                last_ok = self.renewed = sent
            except Exception as exc:  # etcd unreachable: keep trying for one TTL
                if time.monotonic() - last_ok >= self.ttl_s:
                    _log.warning("lease %x: no keepalive for %d s (%s)", self.id, self.ttl_s, exc)
                    break
        self.alive = False
        if self._on_lost is not None:
            self._on_lost()

    async def revoke(self) -> None:
        """Stops the keepalive and deletes the lease (and its keys) now."""
        if self._task is not None:
            await stop_task(self._task)
            self._task = None
        if self.alive:
            self.alive = False
            with contextlib.suppress(Exception):
                await self._client.lease.revoke(self.id, timeout=self.ttl_s)


class EtcdInstanceLease:
    """The instance side: keeps ``{prefix}/instances/{id}`` under a lease. ``register``
    returns the incarnation id (the lease id); ``alive`` turns False when the lease is lost
    (e.g. the master revoked it), after which the instance registers again."""

    def __init__(self, client: Any, prefix: str = "/xllm", lease_ttl_s: int = 2) -> None:
        self._client = client
        self._prefix = prefix.rstrip("/")
        self._ttl = lease_ttl_s
        self._lease: EtcdLease | None = None

    @property
    def alive(self) -> bool:
        return self._lease is not None and self._lease.alive

    async def register(self, info: InstanceInfo) -> int:
        await self.close()
        lease = EtcdLease(self._client, self._ttl)
        incarnation = await lease.grant()
        msg = info.to_proto()
        msg.incarnation_id = incarnation
        key = f"{self._prefix}/instances/{info.instance_id}"
        await self._client.kv.put(key, msg.SerializeToString(), lease=incarnation)
        self._lease = lease
        return incarnation

    async def close(self) -> None:
        """A clean shutdown: the key goes at once, not after the TTL."""
        if self._lease is not None:
            await self._lease.revoke()
            self._lease = None


class EtcdLeaderElection:
    """One candidate in ``{prefix}/leader/``. ``is_leader`` while it holds the lowest key;
    ``on_change(is_leader)`` runs on every change. Losing the lease ends leadership and the
    candidate campaigns again with a new lease."""

    def __init__(
        self,
        client: Any,
        address: str,
        prefix: str = "/xllm",
        lease_ttl_s: int = 2,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self._client = client
        self._address = address
        self._dir = f"{prefix.rstrip('/')}/leader/".encode()
        self._ttl = lease_ttl_s
        self._on_change = on_change
        self.is_leader = False
        self._task: asyncio.Task[None] | None = None
        self._lease: EtcdLease | None = None
        self._lost = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="etcd-election")

    async def leader_address(self) -> str | None:
        resp = await self._client.kv.get(self._dir, range_end=_range_end(self._dir))
        kvs = sorted(resp.kvs, key=lambda kv: kv.create_revision)
        return kvs[0].value.decode() if kvs else None

    def _set(self, leader: bool) -> None:
        if leader != self.is_leader:
            self.is_leader = leader
            _log.warning("master %s is %s", self._address, "leader" if leader else "standby")
            if self._on_change is not None:
                self._on_change(leader)

    async def _run(self) -> None:
        while True:
            self._lost.clear()
            try:
                self._lease = EtcdLease(self._client, self._ttl, on_lost=self._lost.set)
                lease_id = await self._lease.grant()
                key = self._dir + f"{lease_id:016x}".encode()
                await self._client.kv.put(key, self._address.encode(), lease=lease_id)
                await self._campaign(key)
                self._set(True)
                await self._lost.wait()
            except asyncio.CancelledError:
                raise
            except Exception:
                _log.exception("leader election: retrying")
            self._set(False)
            if self._lease is not None:
                await self._lease.revoke()
            await asyncio.sleep(self._ttl / 4)

    async def _campaign(self, key: bytes) -> None:
        """Returns when ``key`` is the oldest candidate; raises if our lease is lost."""
        while True:
            resp = await self._client.kv.get(self._dir, range_end=_range_end(self._dir))
            kvs = sorted(resp.kvs, key=lambda kv: kv.create_revision)
            mine = next((i for i, kv in enumerate(kvs) if kv.key == key), None)
            if mine is None:
                raise RuntimeError("election key vanished: lease lost")
            if mine == 0:
                return
            ahead = kvs[mine - 1].key
            watch = self._client.watch.watch(ahead, start_revision=resp.header.revision + 1)
            lost = asyncio.ensure_future(self._lost.wait())
            try:
                async for ev in _until(watch, lost):
                    if any(e.type == _DELETE for e in ev.events):
                        break
            finally:
                lost.cancel()
            if self._lost.is_set():
                raise RuntimeError("lease lost while campaigning")

    async def close(self) -> None:
        """Resigns (the key is deleted at once, so a standby takes over immediately)."""
        if self._task is not None:
            await stop_task(self._task)
            self._task = None
        if self._lease is not None:
            await self._lease.revoke()
        self._set(False)


async def _until(stream: Any, stop: asyncio.Future[Any]) -> Any:
    """Items of the async iterator ``stream`` until ``stop`` completes."""
    it = stream.__aiter__()
    try:
        while True:
            nxt = asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({nxt, stop}, return_when=asyncio.FIRST_COMPLETED)
            if nxt not in done:
                nxt.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await nxt
                return
            try:
                yield nxt.result()
            except StopAsyncIteration:
                return
    finally:
        with contextlib.suppress(Exception):
            await it.aclose()


class EtcdRegistry(InstanceRegistry):
    """Membership from etcd (instances' leased keys), leadership through etcd.

    ``address``: this master's gRPC address, published while it leads (instances send their
    heartbeats to the leader). Heartbeats are applied like the embedded registry's; an
    incarnation that does not match the key's lease is ignored (UNKNOWN: the watch may not
    have delivered a brand-new registration yet, so the sender keeps beating).
    """

    def __init__(
        self,
        endpoint: str,
        address: str,
        prefix: str = "/xllm",
        lease_ttl_s: int = 2,
        heartbeat_interval_s: float = 0.25,
        heartbeat_timeout_s: float = 1.0,
    ) -> None:
        super().__init__(heartbeat_interval_s, heartbeat_timeout_s)
        self.endpoint = endpoint
        self.address = address
        self.prefix = prefix.rstrip("/")
        self.lease_ttl_s = lease_ttl_s
        self.client: Any = None
        self.election: EtcdLeaderElection | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._leader_listeners: list[Callable[[bool], None]] = []
        self._revocations: set[asyncio.Task[None]] = set()  # held so they are not collected
        self._started = time.monotonic()

    @property
    def is_leader(self) -> bool:
        return self.election is not None and self.election.is_leader

    def subscribe_leadership(self, listener: Callable[[bool], None]) -> None:
        self._leader_listeners.append(listener)

    async def start(self) -> None:
        self._started = time.monotonic()
        self.client = await connect(self.endpoint)
        key = f"{self.prefix}/instances/".encode()
        resp = await self.client.kv.get(key, range_end=_range_end(key))
        for kv in resp.kvs:
            self._put(kv)
        self._watcher = asyncio.create_task(
            self._watch(key, resp.header.revision + 1), name="etcd-registry-watch"
        )
        self.election = EtcdLeaderElection(
            self.client, self.address, self.prefix, self.lease_ttl_s, self._leadership
        )
        self.election.start()
        await super().start()

    async def close(self) -> None:
        await super().close()
        if self.election is not None:
            await self.election.close()
        if self._watcher is not None:
            await stop_task(self._watcher)
            self._watcher = None
        if self.client is not None:
            await self.client.close()
            self.client = None

    def _leadership(self, leader: bool) -> None:
        if leader:
            # A standby has been receiving every instance's beats: its deadlines are true.
            # Only a master that just started may lead before instances have found it (its
            # election key, then their next re-read of the masters, then a beat).
            grace = self._started + 2 * MASTER_REFRESH_S + self.heartbeat_timeout_s
            for v in self._instances.values():
                v.deadline = max(v.deadline, grace)
        for listener in self._leader_listeners:
            listener(leader)

    def _monitor_active(self) -> bool:
        return self.is_leader

    def _put(self, kv: Any) -> None:
        try:
            msg = master_pb2.InstanceInfo.FromString(kv.value)
            msg.incarnation_id = kv.lease
            info = InstanceInfo.from_proto(msg)
        except Exception as exc:  # a foreign or corrupt key must not stop the registry
            _log.warning("ignoring etcd key %r: %s", kv.key, exc)
            return
        old = self._instances.get(info.instance_id)
        if old is None or old.incarnation_id != info.incarnation_id:
            self._add(info)

    async def _watch(self, key: bytes, revision: int) -> None:
        async for resp in self.client.watch.watch(
            key, range_end=_range_end(key), start_revision=revision
        ):
            for ev in resp.events:
                if ev.type == _PUT:
                    self._put(ev.kv)
                elif ev.type == _DELETE:
                    instance_id = ev.kv.key[len(key) :].decode()
                    view = self._instances.get(instance_id)
                    if view is not None:
                        self._remove(view, "its etcd lease expired or was revoked")

    def check_deadlines(self, now: float | None = None) -> list[Any]:
        dead = super().check_deadlines(now)
        for v in dead:  # tell the instance: revoke its lease, so it registers anew
            task = asyncio.get_running_loop().create_task(self._revoke(v.incarnation_id))
            self._revocations.add(task)
            task.add_done_callback(self._revocations.discard)
        return dead

    async def _revoke(self, lease_id: int) -> None:
        with contextlib.suppress(Exception):
            await self.client.lease.revoke(lease_id, timeout=self.lease_ttl_s)
