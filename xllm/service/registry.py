"""The master's instance registry: who is alive, their load, their prefix caches.

One interface, :class:`InstanceRegistry`, two membership sources:

- :class:`EmbeddedRegistry` (default): instances register with the master over gRPC
  (``Master.Register``); the master assigns each registration a new incarnation id and an
  instance is alive while its heartbeats keep arriving before their deadline.
- :class:`~xllm.service.etcd_registry.EtcdRegistry` (``--etcd``): instances keep a key
  under an etcd lease (TTL about 2 s) and masters watch the keys; several masters elect one
  leader through etcd.

In both, load and prefix-cache reports reach the (leader) master as heartbeats
(``Master.Heartbeat``) and are applied by :meth:`InstanceRegistry.heartbeat`; a heartbeat
whose incarnation is not the current one is ignored. The deadline monitor marks an
instance dead at most ``monitor_period_s`` (0.1 s) after its deadline; every change of
membership is reported to the listeners as an :class:`InstanceEvent` (the master resumes a
dead instance's requests elsewhere).

All methods run on the master's asyncio event loop (one thread); none block.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from xllm.service.prefix_index import TieredPrefixIndex
from xllm.service.state import InstanceInfo, InstanceLoad, InstanceView
from xllm.service.tasks import stop_task

__all__ = [
    "EmbeddedRegistry",
    "HeartbeatResult",
    "HeartbeatStatus",
    "InstanceEvent",
    "InstanceRegistry",
]

_log = logging.getLogger(__name__)


class HeartbeatStatus(enum.IntEnum):  # the wire values of HeartbeatResponse.Status
    OK = 0
    UNKNOWN = 1  # not registered / not seen yet (embedded: register again)
    STALE = 2  # a newer incarnation of this instance id exists: the sender must stop


@dataclass(frozen=True, slots=True)
class HeartbeatResult:
    status: HeartbeatStatus
    resync_prefix_cache: bool = False


@dataclass(frozen=True, slots=True)
class InstanceEvent:
    """``up``: an incarnation became routable. ``down``: it is gone (``reason``: missed
    heartbeat deadline, lease lost, replaced by a new incarnation, deregistered)."""

    kind: str  # "up" | "down"
    view: InstanceView
    reason: str = ""


Listener = Callable[[InstanceEvent], None]


class InstanceRegistry:
    """Membership, liveness and load of the instances, as the master sees them.

    ``heartbeat_interval_s``: how often instances beat (told to them on registration);
    ``heartbeat_timeout_s``: the silence after which one is dead.
    """

    monitor_period_s = 0.1

    def __init__(self, heartbeat_interval_s: float = 0.25, heartbeat_timeout_s: float = 1.0):
        if not heartbeat_interval_s > 0:
            raise ValueError(f"heartbeat_interval_s must be > 0, got {heartbeat_interval_s}")
        if not heartbeat_timeout_s > heartbeat_interval_s:
            raise ValueError(
                f"heartbeat_timeout_s must exceed heartbeat_interval_s "
                f"({heartbeat_interval_s}), got {heartbeat_timeout_s}"
            )
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.index = TieredPrefixIndex()
        self._instances: dict[str, InstanceView] = {}
        self._routable: list[InstanceView] | None = []  # cached list; None = rebuild
        self._listeners: list[Listener] = []
        self._monitor: asyncio.Task[None] | None = None

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Starts the deadline monitor (and, in subclasses, membership sources)."""
        if self._monitor is None:
            self._monitor = asyncio.create_task(self._monitor_loop(), name="registry-monitor")

    async def close(self) -> None:
        if self._monitor is not None:
            await stop_task(self._monitor)
            self._monitor = None

    @property
    def is_leader(self) -> bool:
        """Whether this master routes (and so receives heartbeats). Embedded: always."""
        return True

    # ---- queries -----------------------------------------------------------------------

    def routable(self) -> list[InstanceView]:
        """The live instances, in registration order (a cached list: do not modify)."""
        if self._routable is None:
            self._routable = list(self._instances.values())
        return self._routable

    def get(self, instance_id: str) -> InstanceView | None:
        return self._instances.get(instance_id)

    def subscribe(self, listener: Listener) -> None:
        """Calls ``listener(event)`` on the event loop for every up/down event."""
        self._listeners.append(listener)

    # ---- heartbeats --------------------------------------------------------------------

    def heartbeat(
        self,
        instance_id: str,
        incarnation_id: int,
        seq: int,
        load: InstanceLoad,
        added: Iterable[int] = (),
        evicted: Iterable[int] = (),
        full: bool = False,
        now: float | None = None,
        admitted: Iterable[int] = (),
        tiers: Iterable[tuple[str, Iterable[int], Iterable[int]]] = (),
    ) -> HeartbeatResult:
        """Applies one beat: extends the deadline, replaces the load, applies the prefix
        cache deltas (the pool's in ``added``/``evicted``, the tiers' below it in ``tiers``
        as (name, added, evicted)), and settles the dispatches the beat lists as ``admitted`` to the
        instance's engine (its load counts them now, so they are no longer in transit;
        what the master routed there and the beat does not list stays counted).

        Deltas chain by ``seq`` (+1 per beat, from 1); the first beat of an incarnation and
        every answer to a resync request must be ``full``. After a gap, or a delta without
        a full base, the delta is dropped and a resync is asked for on every beat until a
        full one arrives. A beat older than the last applied one only extends the deadline
        and settles its admitted dispatches (the newer load, taken after them, counts
        them too)."""
        view = self._instances.get(instance_id)
        if view is None or view.incarnation_id != incarnation_id:
            return HeartbeatResult(self._mismatch_status(view, incarnation_id))
        now = time.monotonic() if now is None else now
        view.last_heartbeat = now
        view.deadline = now + self.heartbeat_timeout_s
        for dispatch_id in admitted:  # ids of other masters (--etcd) are simply not booked
            view.settle(dispatch_id)
        if seq <= view.last_seq:  # duplicated or overtaken by a newer beat
            return HeartbeatResult(HeartbeatStatus.OK, view.needs_resync)
        in_order = seq == view.last_seq + 1 and view.last_seq > 0 and not view.needs_resync
        view.last_seq = seq
        view.load = load
        if load.role and load.role != view.info.role:  # a role switch, confirmed by the beat
            view.info = replace(view.info, role=load.role)
            self._routable = None
        if full:  # every tier: one a full beat leaves out holds nothing
            self.index.apply(view.slot, added, (), full=True)
            reported = {name: tier_added for name, tier_added, _ in tiers}
            for name in self.index.tiers:
                if name != "pool":
                    self.index.apply(view.slot, reported.get(name, ()), (), True, name)
            view.needs_resync = False
        elif in_order:
            self.index.apply(view.slot, added, evicted)
            for name, tier_added, tier_evicted in tiers:
                self.index.apply(view.slot, tier_added, tier_evicted, tier=name)
        else:
            view.needs_resync = True
        return HeartbeatResult(HeartbeatStatus.OK, view.needs_resync)

    def _mismatch_status(self, view: InstanceView | None, incarnation_id: int) -> HeartbeatStatus:
        return HeartbeatStatus.UNKNOWN

    # ---- membership (subclasses call these) ------------------------------------------------

    def _add(self, info: InstanceInfo, now: float | None = None) -> InstanceView:
        """Makes ``info`` the current incarnation of its id (replacing an older one)."""
        old = self._instances.get(info.instance_id)
        if old is not None:
            self._remove(old, "replaced by a new incarnation")
        now = time.monotonic() if now is None else now
        # The first beat is due one interval after registration; allow a full timeout.
        view = InstanceView(
            info, self.index.add_instance(), deadline=now + self.heartbeat_timeout_s
        )
        view.last_heartbeat = now
        self._instances[info.instance_id] = view
        self._routable = None
        _log.info("instance %s up (incarnation %d)", info.instance_id, info.incarnation_id)
        self._emit(InstanceEvent("up", view))
        return view

    def _remove(self, view: InstanceView, reason: str) -> None:
        if self._instances.get(view.instance_id) is not view:
            return  # already gone
        del self._instances[view.instance_id]
        self.index.remove_instance(view.slot)
        view.drop_in_transit()  # a later settle of its dispatches is a no-op
        self._routable = None
        _log.warning("instance %s down: %s", view.instance_id, reason)
        self._emit(InstanceEvent("down", view, reason))

    def _emit(self, event: InstanceEvent) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # one faulty listener must not stop membership changes
                _log.exception("registry listener failed on %s", event)

    def check_deadlines(self, now: float | None = None) -> list[InstanceView]:
        """Marks every instance past its deadline dead; returns them."""
        if not self._monitor_active():
            return []
        now = time.monotonic() if now is None else now
        dead = [v for v in self._instances.values() if v.deadline < now]
        for v in dead:
            self._remove(v, f"missed its heartbeat deadline by {now - v.deadline:.3f} s")
        return dead

    def _monitor_active(self) -> bool:
        return True

    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(self.monitor_period_s)
            self.check_deadlines()


class EmbeddedRegistry(InstanceRegistry):
    """Membership held in the master itself: ``Master.Register`` calls :meth:`register`.

    Incarnation ids are the registration's wall-clock nanoseconds (kept strictly
    increasing), so they also grow across master restarts and an old incarnation's beats
    can be told apart from a new one's: the old one is told STALE and stops.
    """

    def __init__(self, heartbeat_interval_s: float = 0.25, heartbeat_timeout_s: float = 1.0):
        super().__init__(heartbeat_interval_s, heartbeat_timeout_s)
        self._last_incarnation = 0

    def register(self, info: InstanceInfo, now: float | None = None) -> InstanceView:
        """Registers a (re)started instance under a new incarnation id; an existing
        incarnation of the same instance id goes down ("replaced")."""
        incarnation = max(time.time_ns(), self._last_incarnation + 1)
        self._last_incarnation = incarnation
        info = InstanceInfo(
            instance_id=info.instance_id,
            address=info.address,
            model=info.model,
            role=info.role,
            capacity=info.capacity,
            incarnation_id=incarnation,
        )
        return self._add(info, now)

    def deregister(self, instance_id: str, incarnation_id: int) -> bool:
        """A clean shutdown; ignored (False) unless it names the current incarnation."""
        view = self._instances.get(instance_id)
        if view is None or view.incarnation_id != incarnation_id:
            return False
        self._remove(view, "deregistered")
        return True

    def _mismatch_status(self, view: InstanceView | None, incarnation_id: int) -> HeartbeatStatus:
        if view is not None and incarnation_id < view.incarnation_id:
            return HeartbeatStatus.STALE
        return HeartbeatStatus.UNKNOWN
