"""What the master knows about an instance: who it is (:class:`InstanceInfo`, fixed per
incarnation), its last reported load (:class:`InstanceLoad`), and the live record routing
reads (:class:`InstanceView`). Plain dataclasses; conversion to and from the gRPC messages
of :mod:`xllm.service.proto` lives here so the registry and routing never touch protobuf.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from xllm.engine.speed_model import OnlineSpeedModel, SpeedModel
from xllm.service.proto import master_pb2

__all__ = ["ROLES", "Capacity", "InstanceInfo", "InstanceLoad", "InstanceView", "SpareCapacity"]

# Role names as the CLI and the rest of Python spell them, and their wire values.
ROLES: dict[str, int] = {
    "mixed": master_pb2.INSTANCE_ROLE_MIXED,
    "prefill": master_pb2.INSTANCE_ROLE_PREFILL,
    "decode": master_pb2.INSTANCE_ROLE_DECODE,
}
_ROLE_NAMES = {v: k for k, v in ROLES.items()}


@dataclass(frozen=True, slots=True)
class Capacity:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    num_kv_blocks: int = 0
    block_size: int = 16
    max_model_len: int = 0

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"capacity.max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.block_size < 1:
            raise ValueError(f"capacity.block_size must be >= 1, got {self.block_size}")


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """An instance as it registered. ``incarnation_id`` is 0 until the registry assigns it."""

    instance_id: str
    address: str
    model: str = ""
    role: str = "mixed"
    capacity: Capacity = field(default_factory=Capacity)
    incarnation_id: int = 0

    def __post_init__(self) -> None:
        if not self.instance_id or "/" in self.instance_id:
            raise ValueError(
                f"instance_id must be a non-empty string without '/', got {self.instance_id!r}"
            )
        if not self.address:
            raise ValueError(f"address of instance {self.instance_id!r} must be host:port")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {sorted(ROLES)}, got {self.role!r}")

    def to_proto(self) -> master_pb2.InstanceInfo:
        c = self.capacity
        return master_pb2.InstanceInfo(
            instance_id=self.instance_id,
            incarnation_id=self.incarnation_id,
            address=self.address,
            model=self.model,
            role=ROLES[self.role],  # type: ignore[arg-type]
            capacity=master_pb2.Capacity(
                max_num_seqs=c.max_num_seqs,
                max_num_batched_tokens=c.max_num_batched_tokens,
                num_kv_blocks=c.num_kv_blocks,
                block_size=c.block_size,
                max_model_len=c.max_model_len,
            ),
        )

    @classmethod
    def from_proto(cls, msg: master_pb2.InstanceInfo) -> InstanceInfo:
        """Raises ValueError (naming the field) on an incomplete or invalid registration."""
        c = msg.capacity
        role = _ROLE_NAMES.get(msg.role, "mixed" if msg.role == 0 else None)
        if role is None:
            raise ValueError(f"role: unknown instance role {msg.role}")
        return cls(
            instance_id=msg.instance_id,
            address=msg.address,
            model=msg.model,
            role=role,
            capacity=Capacity(
                max_num_seqs=c.max_num_seqs or 256,
                max_num_batched_tokens=c.max_num_batched_tokens or 8192,
                num_kv_blocks=c.num_kv_blocks,
                block_size=c.block_size or 16,
                max_model_len=c.max_model_len,
            ),
            incarnation_id=msg.incarnation_id,
        )


def _speed_from_proto(msg: master_pb2.SpeedModel) -> SpeedModel | None:
    """None for a malformed model (wrong lengths, not finite): the planner goes without."""
    s = msg.step
    try:
        return SpeedModel.from_dict({
            "ttft_coef": msg.ttft_coef, "tpot_coef": msg.tpot_coef,
            "step": {"knot_ms": s.knot_ms, "sample_ms": s.sample_ms, "attn_ms": s.attn_ms,
                     "ctx_ms": s.ctx_ms} if msg.HasField("step") else None})
    except ValueError:
        return None


def speed_to_proto(online: OnlineSpeedModel) -> master_pb2.SpeedModel | None:
    """An engine's online speed model as a LoadReport carries it (None: not fitted yet)."""
    model = online.model
    if model is None:
        return None
    n_prefill, n_decode = online.num_samples
    s = model.step
    return master_pb2.SpeedModel(
        ttft_coef=model.ttft_coef, tpot_coef=model.tpot_coef, prefill_samples=n_prefill,
        decode_samples=n_decode, step_samples=online.num_step_samples,
        step=None if s is None else master_pb2.StepCost(
            knot_ms=s.knot_ms, sample_ms=s.sample_ms, attn_ms=s.attn_ms, ctx_ms=s.ctx_ms))


@dataclass(slots=True)
class InstanceLoad:
    """The load an instance last reported (``LoadReport`` in master.proto)."""

    num_waiting: int = 0
    num_running: int = 0
    num_waiting_prefill_tokens: int = 0
    kv_usage: float = 0.0
    ttft_ms: float = 0.0
    tpot_ms: float = 0.0
    prefill_tokens_per_s: float = 0.0
    num_offline_running: int = 0
    role: str = ""  # the role the instance reports serving ("" = as registered)
    cpu_tier_load_bytes_per_s: float = 0.0  # measured; 0 = no such tier, or unmeasured
    disk_tier_load_bytes_per_s: float = 0.0
    kv_block_bytes: int = 0
    speed: SpeedModel | None = None  # its fitted speed model (PD planning), once it has one

    def tier_weights(self, block_size: int) -> tuple[float, float]:
        """What a block held in the CPU tier and on disk is worth against one in the pool
        (1.0): the share of its recompute time a load saves, from this instance's measured
        prompt speed and tier bandwidths; 0.9 and 0.5 until measured."""
        tps, nbytes = self.prefill_tokens_per_s, self.kv_block_bytes
        if tps <= 0 or nbytes <= 0:
            return 0.9, 0.5
        recompute = block_size / tps
        out = []
        for rate, default in ((self.cpu_tier_load_bytes_per_s, 0.9),
                              (self.disk_tier_load_bytes_per_s, 0.5)):
            out.append(max(0.0, 1.0 - nbytes / rate / recompute) if rate > 0 else default)
        return out[0], out[1]

    @classmethod
    def from_proto(cls, msg: master_pb2.LoadReport) -> InstanceLoad:
        return cls(
            num_waiting=msg.num_waiting,
            num_running=msg.num_running,
            num_waiting_prefill_tokens=msg.num_waiting_prefill_tokens,
            kv_usage=min(max(msg.kv_usage, 0.0), 1.0),
            ttft_ms=max(msg.ttft_ms, 0.0),
            tpot_ms=max(msg.tpot_ms, 0.0),
            prefill_tokens_per_s=max(msg.prefill_tokens_per_s, 0.0),
            num_offline_running=msg.num_offline_running,
            cpu_tier_load_bytes_per_s=max(msg.cpu_tier_load_bytes_per_s, 0.0),
            disk_tier_load_bytes_per_s=max(msg.disk_tier_load_bytes_per_s, 0.0),
            kv_block_bytes=msg.kv_block_bytes,
            role=_ROLE_NAMES.get(msg.role, ""),
            speed=_speed_from_proto(msg.speed) if msg.HasField("speed") else None,
        )


@dataclass(frozen=True, slots=True)
class SpareCapacity:
    """When an instance has room for offline work (``xllm-master --offline-max-kv-usage``,
    ``--offline-max-waiting``): a free seat, at most ``max_waiting`` requests queued in its
    scheduler, and KV usage under ``max_kv_usage`` counting the prompts routed to it since
    its last report. Online work is never held to this: the instance preempts offline
    requests for it."""

    max_kv_usage: float = 0.9
    max_waiting: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.max_kv_usage <= 1.0:
            raise ValueError(f"max_kv_usage must be in (0, 1], got {self.max_kv_usage}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")

    def admits(self, view: InstanceView) -> bool:
        load, cap = view.load, view.info.capacity
        if load.num_waiting > self.max_waiting:
            return False
        if load.num_running + load.num_waiting + view.pending_requests >= cap.max_num_seqs:
            return False
        kv = load.kv_usage
        if cap.num_kv_blocks:  # what the prompts routed since the last report will take
            kv += view.pending_prefill_tokens / (cap.num_kv_blocks * cap.block_size)
        return kv < self.max_kv_usage


@dataclass(slots=True)
class InstanceView:
    """The registry's live record of one incarnation; routing reads it, the registry writes
    it.

    ``in_transit`` holds the dispatches the master sent here that the instance's load does
    not include yet (dispatch id -> the uncached prompt tokens booked for it), so a burst
    between two heartbeats does not all land on the instance that looked idlest.
    ``pending_requests`` / ``pending_prefill_tokens`` are its running sums (routing reads
    them per decision: kept up to date by :meth:`book` / :meth:`settle`, never summed).
    A dispatch leaves the set when a heartbeat lists it as admitted to the engine (that
    beat's load counts it), or when its stream yields a first message, ends or fails."""

    info: InstanceInfo
    slot: int  # the instance's bit in the registry's PrefixIndex
    load: InstanceLoad = field(default_factory=InstanceLoad)
    pending_requests: int = 0
    pending_prefill_tokens: int = 0
    in_transit: dict[int, int] = field(default_factory=dict)
    last_seq: int = 0  # heartbeat sequence number last applied (0 = none yet)
    needs_resync: bool = False  # a prefix-cache delta was lost: wait for a full report
    last_heartbeat: float = field(default_factory=time.monotonic)
    deadline: float = float("inf")  # monotonic time after which it is dead

    @property
    def instance_id(self) -> str:
        return self.info.instance_id

    @property
    def incarnation_id(self) -> int:
        return self.info.incarnation_id

    def book(self, dispatch_id: int, prefill_tokens: int) -> None:
        """Counts a dispatch routed here as in transit until :meth:`settle` (a repeated id
        is booked once)."""
        if dispatch_id in self.in_transit:
            return
        self.in_transit[dispatch_id] = prefill_tokens
        self.pending_requests += 1
        self.pending_prefill_tokens += prefill_tokens

    def settle(self, dispatch_id: int) -> bool:
        """The dispatch is no longer in transit (the load counts it, or it started, ended or
        failed); False when it was not (or no longer) booked here."""
        tokens = self.in_transit.pop(dispatch_id, None)
        if tokens is None:
            return False
        self.pending_requests -= 1
        self.pending_prefill_tokens -= tokens
        return True

    def drop_in_transit(self) -> None:
        """Forgets every dispatch in transit (the incarnation is gone)."""
        self.in_transit.clear()
        self.pending_requests = self.pending_prefill_tokens = 0

    def work(self) -> float:
        """Load in requests: queued ones (reported waiting + in transit) count twice, each
        one delaying a new arrival's prefill; running ones once."""
        return 2.0 * (self.load.num_waiting + self.pending_requests) + self.load.num_running

    def load_score(self) -> float:
        """Normalised load: :meth:`work` over the instance's seats, plus its KV usage."""
        return self.work() / self.info.capacity.max_num_seqs + self.load.kv_usage

    def has_spare_capacity(self, rule: SpareCapacity | None = None) -> bool:
        """Where offline work may go (see :class:`SpareCapacity`; default: its defaults)."""
        return (rule or _DEFAULT_SPARE).admits(self)


_DEFAULT_SPARE = SpareCapacity()
