"""KVStore: the KV cache as one store of blocks -- the pool, its memory and the tiers below.

The scheduler's :class:`~xllm.scheduler.kv_cache_manager.KVCacheManager` keeps requests'
blocks in :attr:`KVStore.pool`; the store adds what lies outside the pool:

- **Memory on demand** (CPU): the pool is an
  :class:`~xllm.kvcache.pool.OnDemandBlockPool` over a :class:`~xllm.kvcache.memory.KVMemory`
  when ``on_demand`` is set; ``maintain(now)`` unmaps idle page groups.
- **Write-back to the CPU tier.** When a request frees its blocks, the full blocks it
  registered in the prefix cache are *offered*: those the tier lacks get slots at once
  (evicting the tier's least recently used blocks) and a background thread copies them
  out with their checksums (native, the GIL released); the slots are published when the
  copy is done. Copying at free time, not at eviction, keeps the copy off the step: the
  pool evicts from the head of its free list while freed blocks join its tail, so a copy
  has long finished when its block is handed out again; ``claim(blocks)`` waits for it in
  the rare case it has not.
- **Lookups across tiers.** ``lookup`` continues a pool hit in the tiers (content
  confirmed like a pool hit); ``load`` copies the hits into freshly allocated pool blocks
  before the step that needs them, checking each block's checksum: a block that fails it
  (and every block after it) is recomputed instead.

Torch-free on the host: the store works on raw addresses through ``xllm._C``; the runner
gets torch views of the pool's memory from :meth:`KVStore.kv_caches`. A KV cache in device
memory (a GPU engine) is reached through torch instead: whole blocks are gathered into a
staging area in (pinned) host memory and landed from one (:meth:`KVStore.readable`,
:meth:`KVStore.land`), so tiers, checksums and peers see the same bytes as on the CPU.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from xllm import _C
from xllm.kvcache.memory import KVMemory
from xllm.kvcache.parts import PartLink, PartsUnavailable, staged_regions
from xllm.kvcache.pool import DEFAULT_IDLE_SECONDS, OnDemandBlockPool
from xllm.kvcache.tiers import Content, CpuTier, DiskTier, Tier
from xllm.ops.block_pool import BlockPool, BlockPoolProtocol

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# A whole-block copy's staging area with parts on other hosts or in device memory (bytes;
# per copying thread).
STAGING_BYTES = 32 << 20
_CORRUPT, _UNREACHABLE = -2, -1000  # a load's errors besides I/O's (negative errno)
_RATE_WEIGHT = 0.2  # running averages of measured rates: weight of the newest sample
_MIN_PREFILL_SAMPLE = 64  # prompt tokens a step must compute to measure the prompt speed

__all__ = ["LOAD_BUCKETS", "KVStore", "KVStoreConfig", "KVStoreStats", "TierHit", "TierStats"]


@dataclass(frozen=True)
class KVStoreConfig:
    num_blocks: int
    num_layers: int
    num_kv_heads: int
    block_size: int
    head_size: int  # elements of a cache row (an int8 row's scale included: kv_row_width)
    dtype_bytes: int
    on_demand: bool = True  # memory mapped as blocks come into use
    # The pool's memory is this CUDA device's (on demand through the driver's VMM API, else
    # one allocation); None: host memory.
    cuda_device: int | None = None
    idle_seconds: float = DEFAULT_IDLE_SECONDS
    cpu_tier_bytes: int = 0
    disk_tier_dir: str | None = None
    disk_tier_bytes: int = 0
    # What the KV bytes depend on beyond the shape (model files, dtypes, weight format): a
    # disk tier written under another identity is never read (xllm.kvcache.tiers.DiskTier).
    identity: tuple[tuple[str, str], ...] = ()
    # 2: a key and a value tensor per layer; 1: one tensor read as both (MLA's latent rows,
    # ModelConfig.kv_cache_geometry).
    tensors_per_layer: int = 2
    # Ranks whose heads make up a block (tensor parallelism: num_kv_heads is this rank's
    # share). The store reaches the other ranks' parts only once they are attached
    # (attach_parts: their memory mapped here); a block's bytes are then all parts' in rank
    # order, each part's segments as long as its heads (part_heads).
    parts: int = 1
    # The KV heads of each part, in rank order (an uneven split: parts of 2 and 1 heads);
    # () when every part holds num_kv_heads.
    part_heads: tuple[int, ...] = ()
    # Every part holds the same bytes (MLA's latent rows, which each rank computes whole): a
    # block is one part's bytes, read from this rank's and written into every part, so its
    # layout is a one-rank instance's (they exchange blocks, and share a disk tier).
    replicated: bool = False

    @property
    def distinct_parts(self) -> int:
        """Parts whose bytes a block concatenates (1 when replicated)."""
        return 1 if self.replicated else self.parts

    @property
    def segment_bytes(self) -> int:
        """One block of one layer's key (or value) cache (this rank's part)."""
        return self.num_kv_heads * self.block_size * self.head_size * self.dtype_bytes

    @functools.cached_property
    def segments(self) -> tuple[int, ...]:
        """Each region's segment, every part's regions in rank order."""
        heads = self.part_heads or (self.num_kv_heads,) * self.distinct_parts
        unit = self.block_size * self.head_size * self.dtype_bytes
        return tuple(h * unit for h in heads for _ in range(self.part_regions))

    @property
    def segments_arg(self) -> int | list[int]:
        """``segment_bytes`` for the native block copies: one size, or one per region."""
        return self.segment_bytes if self.distinct_parts == 1 else list(self.segments)

    @functools.cached_property
    def block_bytes(self) -> int:
        """One block of every layer, keys and values (of every part)."""
        return sum(self.segments)

    def layout(self) -> dict[str, Any]:
        """What the KV bytes depend on: a disk tier's directory and a peer's layout key are
        fingerprints of it."""
        layout = {"identity": dict(self.identity), "block_size": self.block_size,
                  "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
                  "head_size": self.head_size, "dtype_bytes": self.dtype_bytes,
                  "tensors_per_layer": self.tensors_per_layer}
        if self.distinct_parts > 1:  # (absent for one part: earlier runs' fingerprints hold)
            layout["parts"] = self.parts
            layout["part_heads"] = list(self.part_heads)
        return layout

    @property
    def part_regions(self) -> int:
        """One part's per-layer key and value tensors (or its one latent tensor a layer)."""
        return self.tensors_per_layer * self.num_layers

    @property
    def num_regions(self) -> int:
        """Per-layer key and value tensors (or the one latent tensor), of every distinct
        part."""
        return self.part_regions * self.distinct_parts

    def part_segment(self, rank: int) -> int:
        """The segment of rank ``rank``'s part (every rank's when replicated)."""
        if self.replicated:
            return self.segment_bytes
        return self.segments[rank * self.part_regions]

    def part_bytes(self, rank: int) -> int:
        """Rank ``rank``'s part of one block (all its regions' segments)."""
        return self.part_segment(rank) * self.part_regions

    def part_offset(self, rank: int) -> int:
        """Where rank ``rank``'s part starts in a block's bytes (a tier slot)."""
        return sum(self.part_bytes(r) for r in range(rank))


# Load-latency histogram buckets (seconds): a few blocks take microseconds, a long prefix from
# disk milliseconds.
LOAD_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


@dataclass(frozen=True, slots=True)
class TierStats:
    """Counters of one tier since start (a snapshot)."""

    name: str
    blocks: int  # held now
    capacity_blocks: int
    hit_blocks: int
    bytes_written: int
    bytes_read: int
    corrupt_blocks: int


@dataclass(frozen=True, slots=True)
class KVStoreStats:
    """What /metrics shows of the store (a snapshot, cheap to take every step)."""

    mapped_bytes: int = 0
    reserved_bytes: int = 0
    tiers: tuple[TierStats, ...] = ()
    load_buckets: tuple[int, ...] = ()  # cumulative counts per LOAD_BUCKETS bound, then +Inf
    load_sum: float = 0.0
    preemptions_swapped: int = 0
    preemptions_recomputed: int = 0
    peer_blocks_fetched: int = 0
    peer_blocks_served: int = 0
    peer_fetches: int = 0
    peer_fetch_seconds: float = 0.0  # summed over fetches (plan to adoption)
    block_bytes: int = 0  # one block's K and V over all layers (peer blocks x this = bytes)
    peer_blocks_by_path: tuple[tuple[str, int], ...] = ()  # fetched: shm, grpc, mooncake


@dataclass(frozen=True, slots=True)
class TierHit:
    """Blocks of a prefix found in a tier: its slots, in chain order."""

    tier: Tier
    slots: tuple[int, ...]


class _Worker:
    """One background thread running ``fn(item)`` for queued items in order; results land
    in ``done`` as (item, result, seconds) for the engine thread to pick up (KVStore.poll).
    A failed item's result is None."""

    def __init__(self, name: str, fn: Callable[[Any], Any]) -> None:
        self._fn = fn
        self._name = name
        self._items: deque = deque()
        self.done: deque = deque()
        self._cv = threading.Condition()
        self._busy = 0  # items queued or running
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: Any) -> None:
        with self._cv:
            self._items.append(item)
            self._busy += 1
            self._cv.notify_all()

    def wait_idle(self) -> None:
        with self._cv:
            while self._busy:
                self._cv.wait()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._items and not self._closed:
                    self._cv.wait()
                if not self._items:
                    return  # closed, and everything queued has run
                item = self._items.popleft()
            t0 = time.perf_counter()
            try:
                result = self._fn(item)
            except Exception:  # noqa: BLE001 - a failed copy moves nothing; it is recomputed
                logger.exception("%s: a KV copy failed; its blocks are recomputed", self._name)
                result = None
            self.done.append((item, result, time.perf_counter() - t0))
            with self._cv:
                self._busy -= 1
                self._cv.notify_all()


class KVStore:
    """The pool, its memory and the tiers of one engine (see the module docstring)."""

    def __init__(self, config: KVStoreConfig) -> None:
        self.config = config
        self.memory: KVMemory | None = None
        self.pool: BlockPoolProtocol
        if config.on_demand:
            self.memory = KVMemory(config.num_blocks, config.num_layers, config.segment_bytes,
                                   tensors_per_layer=config.tensors_per_layer,
                                   cuda_device=config.cuda_device)
            self.pool = OnDemandBlockPool(self.memory, idle_seconds=config.idle_seconds,
                                          before_unmap=self._before_unmap)
            # This rank's part (others attached); device memory is reached through torch.
            self.regions = list(self.memory.regions) if config.cuda_device is None else []
        else:
            self.pool = BlockPool(config.num_blocks)
            self.regions: list[int] = []  # set by kv_caches() from the tensors it makes
        self.replicas: list[list[int]] = []  # the other parts' regions, when replicas
        self._where: list[tuple[int, int, int]] = []  # the other parts' memfds (attach_parts)
        self._parts_memory: list[object] = []  # and their mappings here
        # The other parts on other hosts (attach_link), and each thread's staging area for
        # the whole blocks assembled from them.
        self.link: PartLink | None = None
        self._staging = threading.local()
        # This rank's part when it is not host memory (a KV cache on a GPU): its tensors in
        # region order, reached through torch copies (attach_device).
        self.device_part: list[torch.Tensor] | None = None
        self.tiers: list[Tier] = []
        self.cpu: CpuTier | None = None
        self.disk: DiskTier | None = None
        if config.cpu_tier_bytes:
            self.cpu = CpuTier(config.cpu_tier_bytes, config.block_bytes)
            self.tiers.append(self.cpu)
        if config.disk_tier_dir is not None:
            self.disk = DiskTier(config.disk_tier_dir, config.disk_tier_bytes,
                                 config.block_bytes, config.block_size, config.layout())
            self.tiers.append(self.disk)
        # Write-back jobs (pool blocks to a tier) and prefetch loads, each on its own thread.
        self._writer = _Worker("xllm-kv-writer", self._write) if self.tiers else None
        self._pending_blocks: dict[int, int] = {}  # pool block -> writes still reading it
        self._pending_hashes: set[int] = set()
        self._down_ok: dict[int, bool] = {}  # job id -> its write-down to disk succeeded
        self._loader: _Worker | None = None
        # key -> (hits, reserved blocks, done callback) of a prefetch in flight
        self._prefetching: dict[str, tuple[Sequence[TierHit], list[int],
                                           Callable[[int], None]]] = {}
        self.num_prefetches = 0
        # Measured rates for swap-or-recompute (None until measured): the top tier's write and
        # load bandwidth (bytes/s), the engine's prompt speed (tokens/s).
        self._write_bps: float | None = None
        self._load_bps: float | None = None
        self._prefill_tps: float | None = None
        self.events_enabled = False
        self.peer_bps: dict[str, float] = {}  # measured peer transfer rates by path
        self.peer_blocks_fetched = 0
        self.peer_blocks_served = 0
        self.peer_fetches = 0
        self.peer_blocks_by_path: dict[str, int] = {}  # blocks fetched, by the path they took
        self.peer_fetch_seconds = 0.0
        # Copies into or out of the KV memory on other threads (peer transfers): close()
        # waits for them, and refuses new ones, so the memory is never unmapped under one.
        self._copy_cv = threading.Condition()
        self._copies = 0
        self._closing = False
        # Overlap scheduling: steps started and ended. A preempted request's blocks go back
        # to the pool while a step in flight may still write them, so a load into fresh
        # blocks first waits for every step in flight to end (step_began / step_ended).
        self._steps_cv = threading.Condition()
        self._steps_begun = 0
        self._steps_ended = 0
        self.num_swapped = 0  # preemptions whose blocks went to a tier
        self.num_recomputed = 0  # preemptions left to recompute
        self._load_counts = [0] * (len(LOAD_BUCKETS) + 1)
        self._load_sum = 0.0
        self.num_loads = 0

    # ---- the runner's view ----------------------------------------------------------------

    def kv_caches(self, dtype: torch.dtype, device: torch.device | str = "cpu"
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (key_cache, value_cache): views of the memory mapped on demand (host, or
        a CUDA device's through the driver's VMM API), or plain zeroed tensors when memory is
        not on demand."""
        import torch

        from xllm.ops.kv_cache import Q8_SCALE_BYTES, allocate_kv_caches, kv_cache_shape

        c = self.config
        if dtype.itemsize != c.dtype_bytes:
            raise ValueError(f"dtype {dtype} is not {c.dtype_bytes} bytes per element")
        device = torch.device(device)
        if self.memory is not None:
            where = "cpu" if c.cuda_device is None else "cuda"
            if device.type != where or (device.index or 0) != (c.cuda_device or 0):
                raise ValueError(f"this store's memory on demand is on {where} "
                                 f"{c.cuda_device or ''}, not {device}")
            shape = kv_cache_shape(c.num_blocks, c.num_kv_heads, c.block_size, c.head_size)
            caches = self.memory.tensors(shape, dtype)
        else:
            head_size = c.head_size - (Q8_SCALE_BYTES if dtype == torch.int8 else 0)
            caches = allocate_kv_caches(c.num_layers, c.num_blocks, c.num_kv_heads,
                                        c.block_size, head_size, dtype, device,
                                        c.tensors_per_layer)
        tensors = [t for pair in caches for t in pair[:c.tensors_per_layer]]
        if device.type == "cpu":
            if self.memory is None:
                self.regions = [t.data_ptr() for t in tensors]
        elif c.parts == 1:  # (a device pool under TP is not whole: no tiers, no peers)
            self.attach_device(tensors)
        return caches

    def attach_device(self, tensors: Sequence[torch.Tensor]) -> None:
        """This rank's part is these tensors (``[num_blocks, ...]`` each, in region order:
        per layer its K then V, or its one latent cache), which the native copies cannot
        reach -- device memory. Whole-block copies (tiers, peers) then go through a staging
        area in host memory, pinned on CUDA, and torch copies between it and the tensors."""
        c = self.config
        if c.parts > 1:
            raise ValueError("a KV cache outside host memory takes no tensor-parallel parts "
                             "(KV tiers and peer blocks under tensor parallelism are "
                             "CPU-only)")
        if len(tensors) != c.part_regions:
            raise ValueError(f"attach_device needs {c.part_regions} tensors, got "
                             f"{len(tensors)}")
        for t in tensors:
            if (t.shape[0] != c.num_blocks or not t.is_contiguous()
                    or t[0].numel() * t.element_size() != c.segment_bytes):
                raise ValueError(f"attach_device: a tensor of shape {tuple(t.shape)} and "
                                 f"{t.dtype} is not {c.num_blocks} contiguous blocks of "
                                 f"{c.segment_bytes} bytes")
        self.device_part = list(tensors)

    def attach_parts(self, regions: Sequence[int], keep: Sequence[object] = (),
                     where: Sequence[tuple[int, int, int]] = ()) -> None:
        """The other ranks' parts of every block (tensor parallelism): their regions, mapped
        in this process, in rank order after this rank's; ``keep``: the mappings, referenced
        as long as the store; ``where``: each part's (pid, memfd, region bytes), for peers on
        this host that map them too. Tier copies then move whole blocks."""
        c = self.config
        mine = c.part_regions
        if self.memory is None or len(regions) != mine * (c.parts - 1):
            raise ValueError(f"attach_parts needs {mine * (c.parts - 1)} regions of the other "
                             f"{c.parts - 1} parts on memory on demand, got {len(regions)}")
        if c.replicated:  # blocks are read here and copied on to each replica
            self.replicas = [list(regions[i:i + mine]) for i in range(0, len(regions), mine)]
        else:
            self.regions = list(self.memory.regions) + list(regions)
            self._where = list(where)
        self._parts_memory = list(keep)

    def attach_link(self, link: PartLink) -> None:
        """The other ranks' parts on other hosts (tensor parallelism with ``tp_master``),
        served by their :class:`~xllm.kvcache.parts.PartServer`: whole blocks are assembled
        in a staging area (``readable``) and landed from one (``land``). Replicas (a latent
        cache) are only written: a block is this rank's part."""
        c = self.config
        if self.memory is None or c.parts < 2 or len(link.ranks) != c.parts - 1:
            raise ValueError(f"attach_link needs the {c.parts - 1} other parts' servers on "
                             "memory on demand")
        want = [c.part_bytes(r) for r in range(1, c.parts)]
        if list(link.part_bytes) != want:
            raise ValueError(f"the parts' block bytes {link.part_bytes} are not this "
                             f"layout's {want}")
        self.link = link

    def parts_mappings(self) -> list[object]:
        """The other parts' memories mapped in this process (attach_parts on one host; mmap
        objects): a transport that reads this memory in place registers them too."""
        return list(self._parts_memory)

    @property
    def host_memory(self) -> KVMemory | None:
        """The pool's memory when it is host memory mapped on demand (a memfd that peers on
        this host and Mooncake can map), else None (plain tensors, or a CUDA device's)."""
        memory = self.memory
        return memory if memory is not None and memory.cuda_device is None else None

    def memory_parts(self) -> list[tuple[int, int, int]] | None:
        """Where a block's parts are on this host, for a peer that maps them: (pid, memfd,
        region bytes) of this rank's memory, then of each other part's (not of replicas,
        which get what lands here); None when that is not known (memory not on demand,
        parts not attached)."""
        memory = self.host_memory
        if memory is None or not self.whole:
            return None
        if len(self._where) != self.config.distinct_parts - 1:  # (replicas never set it)
            return None
        return [(os.getpid(), memory.vmm.fd, memory.region_bytes), *self._where]

    def replicate(self, blocks: Sequence[int]) -> int:
        """Blocks written into this rank's part from outside the model (a tier's load, a
        peer's blocks): copied on to the other parts when they are replicas (any thread that
        holds the blocks reserved; pushed to ranks on other hosts). Returns how many blocks
        every part now holds: all of them, or 0 when a remote rank could not be written."""
        ids = list(blocks)
        if not ids:
            return 0
        seg = self.config.segment_bytes
        for replica in self.replicas:
            _C.kv_copy_blocks(self.regions, ids, replica, ids, seg)
        if self.link is not None and self.config.replicated:
            segs = [seg] * len(self.regions)
            for at in range(0, len(ids), self.chunk_blocks):
                part = ids[at:at + self.chunk_blocks]
                buf, staged = self._stage(len(part), segs)
                _C.kv_copy_blocks(self.regions, part, staged, list(range(len(part))), seg)
                regions = self._region_views(buf, 0, segs, len(part), len(part))
                try:
                    self.link.push(part, [regions] * len(self.link.ranks))
                except PartsUnavailable as e:
                    logger.warning("KV blocks not replicated to every rank (%s); recomputed", e)
                    return 0
        return len(ids)

    # ---- whole blocks with parts on other hosts ----------------------------------------------

    @property
    def staged(self) -> bool:
        """Whether whole blocks pass through a staging area (parts on other hosts, or this
        rank's part in device memory) rather than being reached in place."""
        return (self.link is not None or self.device_part is not None) and \
            not self.config.replicated

    @property
    def chunk_blocks(self) -> int:
        """Blocks a whole-block copy takes at once: unbounded where the store reaches every
        part in place, else as many as the staging area holds."""
        if not self.staged:
            return 1 << 30
        return max(1, STAGING_BYTES // self.config.block_bytes)

    def _stage(self, n: int, segments: Sequence[int]) -> tuple[np.ndarray, list[int]]:
        """This thread's staging area for ``n`` blocks of regions of ``segments``,
        region-major (the native copies' view of a pool of ``n`` blocks): the buffer and the
        regions' addresses. Pinned host memory when this rank's part is on a CUDA device
        (``self._staging.host``: the same bytes as a torch tensor)."""
        need = n * sum(segments)
        buf = getattr(self._staging, "buf", None)
        if buf is None or buf.size < need:
            size = max(need, 1)
            dev = self.device_part
            if dev is not None:
                import torch

                host = torch.empty(size, dtype=torch.uint8, pin_memory=dev[0].is_cuda)
                self._staging.host = host
                buf = host.numpy()
            else:
                buf = np.empty(size, dtype=np.uint8)
            self._staging.buf = buf
        return buf, staged_regions(buf.ctypes.data, segments, n)

    def _device_views(self, n: int, count: int) -> Iterator[tuple[torch.Tensor,
                                                                   torch.Tensor]]:
        """(device tensor, its first ``count`` blocks in this thread's staging area of ``n``
        blocks, as a host tensor of the same shape) per region of this rank's part."""
        assert self.device_part is not None
        host, seg, at = self._staging.host, self.config.segment_bytes, 0
        for t in self.device_part:
            yield t, host[at:at + count * seg].view(t.dtype).view(count, *t.shape[1:])
            at += n * seg

    def _device_out(self, blocks: Sequence[int], n: int) -> None:
        """Blocks of this rank's device part into the staging area (one gather and one copy
        to host per region; returns once the bytes are on the host)."""
        assert self.device_part is not None
        import torch

        idx = torch.tensor(list(blocks), dtype=torch.long).to(self.device_part[0].device)
        for t, host in self._device_views(n, len(blocks)):
            host.copy_(t.index_select(0, idx))

    def _device_in(self, blocks: Sequence[int], n: int) -> None:
        """The staging area's first blocks into blocks ``blocks`` of this rank's device part
        (returns once the copies are done: the staging area may be reused)."""
        assert self.device_part is not None
        import torch

        idx = torch.tensor(list(blocks), dtype=torch.long).to(self.device_part[0].device)
        for t, host in self._device_views(n, len(blocks)):
            t.index_copy_(0, idx, host.to(t.device))
        if self.device_part[0].is_cuda:
            torch.cuda.synchronize(self.device_part[0].device)

    @staticmethod
    def _region_views(buf: np.ndarray, start: int, segments: Sequence[int], n: int,
                      count: int) -> list[memoryview]:
        """The first ``count`` blocks of each region of a staging area of ``n`` blocks,
        for regions of ``segments`` from byte ``start``."""
        views, at, whole = [], start, memoryview(buf)
        for seg in segments:
            views.append(whole[at:at + count * seg])
            at += n * seg
        return views

    def _remote_views(self, buf: np.ndarray, n: int, count: int) -> list[list[memoryview]]:
        """Each remote part's regions in a whole-block staging area of ``n`` blocks (after
        this rank's), their first ``count`` blocks: what the link pulls into or pushes."""
        c, per = self.config, self.config.part_regions
        start, views = n * c.segment_bytes * per, []
        for rank in range(1, c.parts):
            segs = c.segments[rank * per:(rank + 1) * per]
            views.append(self._region_views(buf, start, segs, n, count))
            start += n * sum(segs)
        return views

    def readable(self, blocks: Sequence[int]) -> tuple[list[int], list[int]]:
        """Where whole blocks ``blocks`` (held; at most ``chunk_blocks``) can be read by the
        native copies: (regions, block ids). In place where this process reaches every part;
        with parts on other hosts, assembled in this thread's staging area (this rank's part
        copied, the others' pulled), valid until its next call. PartsUnavailable when a
        remote part cannot be read."""
        c = self.config
        if not self.staged:
            return self.regions, list(blocks)
        n = len(blocks)
        buf, staged = self._stage(n, c.segments)
        per = c.part_regions

        def this_part() -> None:  # (copied while the remote parts travel)
            if self.device_part is not None:
                self._device_out(blocks, n)
            else:
                _C.kv_copy_blocks(self.regions, list(blocks), staged[:per], list(range(n)),
                                  c.segment_bytes)

        if self.link is None:
            this_part()
        else:
            self.link.pull(blocks, self._remote_views(buf, n, n), meanwhile=this_part)
        return staged, list(range(n))

    def land(self, blocks: Sequence[int], copy: Callable[[list[int], list[int]], int],
             replicate: bool = True) -> int:
        """Writes whole blocks into ``blocks`` (reserved; at most ``chunk_blocks``) with
        ``copy(regions, ids)``, a native copy that returns how many leading blocks it wrote
        intact, and on to every part (replicas copied unless ``replicate`` is False -- a
        fetch replicates once all its chunks are in --, remote parts pushed from the staging
        area they were written to). Returns how many leading blocks landed whole: 0 when a
        remote part could not be written (they are recomputed)."""
        c = self.config
        if not self.staged:
            ok = copy(self.regions, list(blocks))
            return self.replicate(list(blocks)[:ok]) if ok and replicate else ok
        n = len(blocks)
        buf, staged = self._stage(n, c.segments)
        ok = copy(staged, list(range(n)))
        if not ok:
            return 0
        per, landed = c.part_regions, list(blocks)[:ok]

        def this_part() -> None:  # (copied while the remote parts' bytes go out)
            if self.device_part is not None:
                self._device_in(landed, n)
            else:
                _C.kv_copy_blocks(staged[:per], list(range(ok)), self.regions, landed,
                                  c.segment_bytes)

        if self.link is None:
            this_part()
            return ok
        try:
            self.link.push(landed, self._remote_views(buf, n, ok), meanwhile=this_part)
        except PartsUnavailable as e:
            logger.warning("KV blocks not written to every rank (%s); recomputed", e)
            return 0
        return ok

    @property
    def whole(self) -> bool:
        """Whether this store reaches every part of a block (always, without tensor
        parallelism; under it once the other ranks' parts are attached, or linked across
        hosts). Tier copies and blocks between instances need it."""
        c = self.config
        if self.link is not None or self.device_part is not None:
            return True
        return (len(self.regions) == c.num_regions
                and len(self.replicas) == (c.parts - 1 if c.replicated else 0))

    @property
    def single_part(self) -> bool:
        """Whether a block's bytes lie in this process's memory alone (no tensor
        parallelism, or parts that are replicas: what lands here is copied on to them)."""
        return self.config.distinct_parts == 1

    # ---- memory -------------------------------------------------------------------------------

    @property
    def mapped_bytes(self) -> int:
        """KV memory mapped now (the whole pool when memory is not on demand)."""
        if self.memory is not None:
            return self.memory.mapped_bytes
        return self.config.num_blocks * self.config.block_bytes

    def maintain(self, now: float | None = None, busy: bool = False) -> float | None:
        """Publishes finished writes and releases idle memory; returns seconds until the next
        call is due (None: nothing pending). ``busy``: called before a step."""
        self.poll()
        if isinstance(self.pool, OnDemandBlockPool):
            return self.pool.maintain(time.monotonic() if now is None else now, busy)
        return None

    def _before_unmap(self, blocks: Sequence[int]) -> None:
        if self._pending_blocks:
            self.flush()

    # ---- write-back ---------------------------------------------------------------------------

    def offer(self, blocks: Sequence[int], hashes: Sequence[int],
              contents: Sequence[Content]) -> None:
        """A request freed these registered blocks (a chain from its first block): the top
        tier gets those it lacks, copied in the background. With a CPU and a disk tier, the
        blocks the CPU tier evicts for them are written down to the disk first."""
        if not self.tiers or not blocks:
            return
        self.poll()
        top = self.tiers[0]
        have = len(top.index.lookup(hashes))
        if have:  # already there: refresh (keeps the head of a chain longer than its tail)
            top.refresh(top.index.lookup(hashes[:have]))
        pending = self._pending_hashes
        todo = [i for i in range(have, len(blocks)) if hashes[i] not in pending]
        if not todo:
            return
        slots = top.reserve(len(todo))
        if not slots:
            return
        down = self._write_down(top, slots) if top is self.cpu and self.disk else None
        todo = todo[:len(slots)]
        job_blocks = [blocks[i] for i in todo]
        job_hashes = [hashes[i] for i in todo]
        for b in job_blocks:
            self._pending_blocks[b] = self._pending_blocks.get(b, 0) + 1
        pending.update(job_hashes)
        assert self._writer is not None
        self._writer.submit((top, job_blocks, slots, job_hashes, [contents[i] for i in todo],
                             down))

    def _write_down(self, cpu: Tier, slots: Sequence[int]) -> tuple | None:
        """The blocks that reserving ``slots`` evicts from the CPU tier, with disk slots for
        those the disk lacks: (cpu slots, disk slots, hashes, checksums, contents)."""
        disk = self.disk
        assert disk is not None
        src, hashes, sums, contents = [], [], [], []
        for slot in slots:
            content = cpu.contents[slot]
            if content is None:
                continue
            cpu.contents[slot] = None  # the slot is being rewritten
            h = cpu.hashes[slot]
            if h in self._pending_hashes or disk.index.lookup([h]):
                continue
            src.append(slot)
            hashes.append(h)
            sums.append(cpu.checksums[slot])
            contents.append(content)
        if not src:
            return None
        disk_slots = disk.reserve(len(src))
        if not disk_slots:
            return None
        n = len(disk_slots)
        self._pending_hashes.update(hashes[:n])
        return src[:n], disk_slots, hashes[:n], sums[:n], contents[:n]

    def _write(self, job: tuple) -> list[int] | None:
        """The writer thread's part of a job: the bytes. Returns the new blocks' checksums."""
        tier, blocks, slots, hashes, contents, down = job
        c = self.config
        if down is not None:
            cpu_slots, disk_slots, d_hashes, d_sums, d_contents = down
            assert self.disk is not None and self.cpu is not None
            ok = self.disk.write(disk_slots, memoryview(self.cpu.memory),
                                 [s * self.cpu.slot_bytes for s in cpu_slots], d_hashes, d_sums,
                                 d_contents)
            self._down_ok[id(job)] = ok
        sums: list[int] = []
        step = self.chunk_blocks
        for at in range(0, len(blocks), step):
            try:
                regions, ids = self.readable(blocks[at:at + step])
            except PartsUnavailable as e:
                logger.warning("KV blocks not written to %s: %s", tier.name, e)
                return None
            if tier is self.cpu:
                sums += _C.kv_gather_blocks(regions, c.segments_arg, ids, tier.address,
                                            tier.slot_bytes, slots[at:at + step])
                continue
            assert isinstance(tier, DiskTier)  # straight from the pool to the disk
            part = tier.write_blocks(slots[at:at + step], regions, c.segments_arg, ids,
                                     hashes[at:at + step], contents[at:at + step])
            if part is None:
                return None
            sums += part
        return sums

    def poll(self) -> None:
        """Publishes the writes the background thread has finished and finishes the
        prefetches the loader has (engine thread only)."""
        loader = self._loader
        if loader is not None:
            while loader.done:
                self._finish_prefetch(*loader.done.popleft())
        writer = self._writer
        if writer is None:
            return
        done = writer.done
        while done:
            job, sums, seconds = done.popleft()
            tier, blocks, slots, hashes, contents, down = job
            if sums is not None and tier is self.tiers[0]:
                self._observe("_write_bps", len(blocks) * self.config.block_bytes, seconds)
            for b in blocks:
                left = self._pending_blocks[b] - 1
                if left:
                    self._pending_blocks[b] = left
                else:
                    del self._pending_blocks[b]
            self._pending_hashes.difference_update(hashes)
            if down is not None:
                _, disk_slots, d_hashes, d_sums, d_contents = down
                self._pending_hashes.difference_update(d_hashes)
                assert self.disk is not None
                if self._down_ok.pop(id(job), False):
                    self.disk.publish(disk_slots, d_hashes, d_sums, d_contents)
                else:
                    self.disk.discard(disk_slots)
            if sums is None:
                tier.discard(slots)
            else:
                tier.publish(slots, hashes, sums, contents)

    def flush(self) -> None:
        """Waits for every write in flight and publishes it."""
        if self._writer is not None:
            self._writer.wait_idle()
            self.poll()

    def claim(self, blocks: Sequence[int]) -> None:
        """Blocks just allocated will be written by the next step: wait for writes still
        reading them (rare: see the module docstring)."""
        pending = self._pending_blocks
        if pending and any(b in pending for b in blocks):
            self.flush()

    # ---- lookups and loads ----------------------------------------------------------------

    def lookup(self, hashes: Sequence[int], parent: int, tokens: Sequence[int], start: int
               ) -> list[TierHit]:
        """The blocks after a pool hit that the tiers hold, as hits in chain order: ``hashes``
        are the chain's next blocks, ``parent`` the hash before them, and block ``i``
        covers ``tokens[start + i * block_size:]``."""
        bs = self.config.block_size
        hits: list[TierHit] = []
        for tier in self.tiers:
            if not hashes:
                break
            slots = tier.lookup(hashes, parent, tokens, start, bs)
            if slots:
                hits.append(TierHit(tier, tuple(slots)))
                n = len(slots)
                parent = hashes[n - 1]
                hashes = hashes[n:]
                start += n * bs
        return hits

    def load(self, hits: Sequence[TierHit], blocks: Sequence[int]) -> int:
        """Copies the hits into ``blocks`` (fresh pool blocks, in chain order); returns how
        many leading blocks arrived intact (the rest must be recomputed)."""
        t0 = time.perf_counter()
        results = self._copy_hits(hits, blocks)
        return self._account_hits(hits, results, time.perf_counter() - t0)

    def step_began(self) -> None:
        """The engine started a step while the next one may be scheduled (overlap)."""
        with self._steps_cv:
            self._steps_begun += 1

    def step_ended(self) -> None:
        with self._steps_cv:
            self._steps_ended += 1
            self._steps_cv.notify_all()

    def _after_steps_in_flight(self) -> None:
        """Waits until every step begun so far has ended (at once without overlap)."""
        with self._steps_cv:
            target = self._steps_begun
            self._steps_cv.wait_for(lambda: self._steps_ended >= target)

    def _copy_hits(self, hits: Sequence[TierHit], blocks: Sequence[int]
                   ) -> list[tuple[int, int]]:
        """The bytes of the hits, in chain order into ``blocks`` (any thread, while the
        slots are held and the blocks reserved; once no step in flight can write them):
        (ok, err) per hit, stopping at the first that fell short."""
        self._after_steps_in_flight()
        results, at = [], 0
        for hit in hits:
            slots = list(hit.slots)
            ok, err = self._copy_in(hit.tier, slots, list(blocks[at:at + len(slots)]))
            results.append((ok, err))
            at += ok
            if ok < len(slots):
                break
        return results

    def _account_hits(self, hits: Sequence[TierHit], results: list[tuple[int, int]],
                      seconds: float) -> int:
        """A load's bookkeeping (engine thread); returns the blocks intact."""
        total = 0
        for hit, (ok, err) in zip(hits, results, strict=False):
            self._account(hit.tier, list(hit.slots), ok, err)
            total += ok
        self._observe_load(hits, total, seconds)
        return total

    def _observe_load(self, hits: Sequence[TierHit], done: int, seconds: float) -> None:
        if hits and hits[0].tier is self.tiers[0]:
            self._observe("_load_bps", done * self.config.block_bytes, seconds)
        if len(hits) == 1 and done:  # one tier: its own rate (the cluster's routing weights)
            tier = hits[0].tier
            rate = done * self.config.block_bytes / max(seconds, 1e-9)
            tier.load_bps = rate if tier.load_bps is None else (
                tier.load_bps + _RATE_WEIGHT * (rate - tier.load_bps))
        self.num_loads += 1
        self._load_sum += seconds
        self._load_counts[bisect.bisect_left(LOAD_BUCKETS, seconds)] += 1

    def _copy_in(self, tier: Tier, slots: list[int], target: list[int]) -> tuple[int, int]:
        """The bytes of a load, nothing else (any thread, while the slots are held and the
        targets reserved): (leading blocks intact, error: 0, _CORRUPT a failed checksum,
        _UNREACHABLE a remote rank's part not written, else an I/O failure)."""
        seg = self.config.segments_arg
        total, step = 0, self.chunk_blocks
        for at in range(0, len(slots), step):
            part = slots[at:at + step]
            sums = [tier.checksums[s] for s in part]
            err = 0

            def copy(regions: list[int], ids: list[int], part=part, sums=sums) -> int:  # noqa: ANN001
                nonlocal err
                if isinstance(tier, DiskTier):
                    ok, err = _C.kv_disk_read(tier.fd, [s * tier.slot_bytes for s in part],
                                              sums, regions, seg, ids)
                    return ok
                ok = _C.kv_scatter_blocks(tier.address, tier.slot_bytes, part, sums, regions,
                                          seg, ids)
                err = 0 if ok == len(part) else _CORRUPT
                return ok

            landed = self.land(target[at:at + step], copy)
            if landed < len(part) and not err:
                err = _UNREACHABLE  # read whole, but a remote rank's part was not written
            total += landed
            if landed < len(part):
                return total, err
        return total, 0

    def _account(self, tier: Tier, slots: list[int], ok: int, err: int) -> None:
        """A load's bookkeeping (engine thread): counters, LRU, a corrupt slot dropped."""
        if err == _CORRUPT:
            self._corrupt(tier, slots[ok])
        elif err == _UNREACHABLE:
            pass  # the tier's bytes are fine
        elif err and isinstance(tier, DiskTier):
            tier.read_errors += 1
        tier.hit_blocks += ok
        tier.bytes_read += ok * tier.slot_bytes
        tier.refresh(slots[:ok])

    # ---- prefetch: tier hits loaded while steps run ---------------------------------------

    def prefetch(self, key: str, hits: Sequence[TierHit], blocks: list[int],
                 done: Callable[[int], None]) -> None:
        """Loads ``hits`` into the reserved ``blocks`` on the loader thread while the engine
        steps; ``done(blocks intact)`` runs on the engine thread (from :meth:`poll`) when it
        is over. The hits' slots are held meanwhile, so no write reuses them."""
        for hit in hits:
            hit.tier.index.touch(list(hit.slots))
        if self._loader is None:
            self._loader = _Worker("xllm-kv-loader", self._run_prefetch)
        self._prefetching[key] = (hits, blocks, done)
        self._loader.submit(key)

    def prefetching(self, key: str) -> bool:
        return key in self._prefetching

    def wait_prefetch(self, key: str) -> None:
        """Blocks until the prefetch ``key`` is over and finished (engine thread)."""
        if key in self._prefetching:
            assert self._loader is not None
            self._loader.wait_idle()  # prefetches run in order; the ones before it are short
            self.poll()

    def _run_prefetch(self, key: str) -> list[tuple[int, int]]:
        """The loader thread's part: the copies."""
        hits, blocks, _ = self._prefetching[key]
        return self._copy_hits(hits, blocks)

    def _finish_prefetch(self, key: str, results: list[tuple[int, int]] | None,
                         seconds: float) -> None:
        hits, blocks, done = self._prefetching.pop(key)
        for hit in hits:  # let go of every held slot, then account as a load does
            hit.tier.index.free(list(hit.slots))
        total = self._account_hits(hits, results or [], seconds)
        self.num_prefetches += 1
        done(total)

    @staticmethod
    def _corrupt(tier: Tier, slot: int) -> None:
        """A slot that fails its check leaves the tier for good."""
        tier.corrupt_blocks += 1
        tier.forget(slot)

    # ---- swap or recompute ------------------------------------------------------------------

    def _observe(self, name: str, amount: float, seconds: float) -> None:
        """Folds a measured rate (per second) into a running average; tiny samples, whose
        time is mostly fixed costs, are skipped."""
        if seconds <= 0 or amount <= 0:
            return
        if name != "_prefill_tps" and amount < (1 << 20):
            return
        rate = amount / seconds
        old = getattr(self, name)
        setattr(self, name, rate if old is None else old + _RATE_WEIGHT * (rate - old))

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """The engine's measured prompt speed (a step's new prompt tokens over its time)."""
        if tokens >= _MIN_PREFILL_SAMPLE:
            self._observe("_prefill_tps", tokens, seconds)

    @property
    def prefill_tps(self) -> float | None:
        """The measured prompt speed (tokens/s), None until measured."""
        return self._prefill_tps

    def observe_peer(self, path: str, nbytes: int, seconds: float) -> None:
        """A peer transfer's rate (``path``: "shm", "grpc" or "mooncake"), for the fetch
        decision."""
        if seconds > 0 and nbytes >= (1 << 20):
            rate = nbytes / seconds
            old = self.peer_bps.get(path)
            self.peer_bps[path] = rate if old is None else old + _RATE_WEIGHT * (rate - old)

    @functools.cached_property
    def _layout_key(self) -> str:
        import hashlib
        import json

        key = json.dumps(self.config.layout(), sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:32]

    def layout_key(self) -> str:
        """A fingerprint of what this cache's bytes mean (model identity, dtypes, shape):
        peers exchange blocks only when theirs is the same. Computed once."""
        return self._layout_key

    def swap_cheaper(self, num_blocks: int, num_tokens: int) -> bool:
        """Whether writing a preempted request's blocks to the top tier and loading them back
        costs less than recomputing its tokens, from measured rates: bytes over the tier's
        write and load bandwidth against tokens over the prompt speed. Until a rate has been
        measured, the tier's copies are taken to win (they are memory copies)."""
        if not self.tiers or num_blocks == 0:
            return False
        prefill, write, load = self._prefill_tps, self._write_bps, self._load_bps
        if prefill is None or write is None or load is None:
            return True
        nbytes = num_blocks * self.config.block_bytes
        return nbytes / write + nbytes / load < num_tokens / prefill

    # ---- block events (the cluster's prefix index) --------------------------------------------

    def enable_events(self) -> None:
        """Starts noting, in the pool and every tier, each block hash gained or lost."""
        self.events_enabled = True
        self.pool.set_events(True)
        for tier in self.tiers:
            tier.index.set_events(True)

    def drain_events(self) -> dict[str, tuple[list[int], list[int]]]:
        """Tier name ("pool", "cpu", "disk") -> (added, evicted): the net change of the block
        hashes it holds since the previous drain. Publishes finished writes first."""
        self.poll()
        out = {"pool": self.pool.drain_events()}
        for tier in self.tiers:
            out[tier.name] = tier.index.drain_events()
        return out

    def cached_hashes(self) -> dict[str, list[int]]:
        """Tier name -> every block hash it holds now."""
        out = {"pool": self.pool.cached_hashes()}
        for tier in self.tiers:
            out[tier.name] = tier.index.cached_hashes()
        return out

    def load_rates(self) -> dict[str, float]:
        """Tier name -> its measured load bandwidth (bytes/s; 0 until measured)."""
        return {tier.name: tier.load_bps or 0.0 for tier in self.tiers}

    def stats(self) -> KVStoreStats:
        tiers = tuple(TierStats(t.name, t.num_blocks, t.num_slots, t.hit_blocks, t.bytes_written,
                                t.bytes_read, t.corrupt_blocks) for t in self.tiers)
        cumulative = tuple(itertools.accumulate(self._load_counts))
        reserved = (self.memory.reserved_bytes if self.memory is not None
                    else self.config.num_blocks * self.config.block_bytes)
        return KVStoreStats(self.mapped_bytes, reserved, tiers, cumulative, self._load_sum,
                            self.num_swapped, self.num_recomputed, self.peer_blocks_fetched,
                            self.peer_blocks_served, self.peer_fetches,
                            self.peer_fetch_seconds, self.config.block_bytes,
                            tuple(sorted(self.peer_blocks_by_path.items())))

    @contextlib.contextmanager
    def off_thread_copy(self) -> Iterator[bool]:
        """Around a copy into or out of the KV memory off the engine thread (a peer
        transfer): yields False once the store is closing (copy nothing), else True, and
        the memory stays mapped until the block ends."""
        with self._copy_cv:
            allowed = not self._closing
            self._copies += allowed
        try:
            yield allowed
        finally:
            if allowed:
                with self._copy_cv:
                    self._copies -= 1
                    self._copy_cv.notify_all()

    def close(self) -> None:
        with self._copy_cv:  # no peer copy may outlive the memory it touches
            self._closing = True
            self._copy_cv.wait_for(lambda: self._copies == 0, timeout=30.0)
        if self._loader is not None:
            self._loader.close()
        if self._writer is not None:
            self._writer.close()
        self.poll()
        for tier in self.tiers:
            tier.close()
        if self.link is not None:
            self.link.close()
