"""KV blocks between instances over the Mooncake transfer engine (optional transport).

``xllm-server --kv-mooncake tcp|rdma`` (with ``--master``/``--etcd``): the instance starts a
Mooncake ``TransferEngine`` (package ``mooncake-transfer-engine-non-cuda`` on CPU hosts) and
registers its KV pool's memory and its CPU tier's slots with it. A peer that fetches a
prefix from it then reads the blocks itself, one-sided, straight from that memory:

- **The server** (:func:`describe`) pins the blocks as for a gRPC stream and answers
  FetchBlocks with a descriptor instead of bytes: its engine's session, and per block the
  address of its first segment and the distance between its segments (a pool block's
  segments lie one region apart; a CPU-tier slot holds them back to back), with each
  block's checksum (pool blocks summed in place, one read pass; tier slots' stored sums).
  Disk-tier blocks cannot be read remotely: they follow as ordinary gRPC chunks. An empty
  chunk ends the stream, and the server keeps its pins until the client hangs up (bounded).
- **The client** (:meth:`MooncakeTransport.receive`) reads the blocks into a landing buffer
  registered with its own engine -- a run of pool blocks with consecutive ids as one read
  per region, a slot as one read -- then copies them into its reserved pool blocks,
  summing them on the way (``kv_copy_blocks``; slots: ``kv_scatter_blocks``, which checks
  as it copies). A block whose sum differs, a read that fails or times out, ends the fetch
  there: the rest is recomputed. Nothing from the network is written into the pool before
  it has been summed and compared; the pool itself is registered only on the serving side.

The engine listens on every interface of its host and lets any peer that reaches its port
read (and write) the memory it registered: run it on a trusted network only. Tests run it
inside a network namespace of their own (``unshare -n``, ``lo`` up).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from xllm import _C
from xllm.kvcache.parts import staged_regions
from xllm.kvcache.store import KVStore
from xllm.kvcache.tiers import DiskTier
from xllm.kvcache.transfer import leading_matches

__all__ = ["DESCRIBE_BYTES", "MooncakeTransport", "describe", "mooncake_available"]

_log = logging.getLogger(__name__)

# Mooncake's TCP transport queues at most 1024 transfers (64 KiB slices) per peer and fails
# a batch it cannot queue: every batch stays well below that.
MAX_BATCH_ENTRIES = 256
MAX_BATCH_BYTES = 16 << 20
LANDING_BYTES = 32 << 20  # the client's registered landing buffer (a fetch goes in rounds)
DESCRIBE_BYTES = 32 << 20  # the server describes (and sums) a fetch's blocks in pieces
TRANSFER_TIMEOUT_S = 5


def mooncake_available() -> str | None:
    """None when the Mooncake transfer engine imports, else why not."""
    try:
        from mooncake.engine import TransferEngine  # noqa: F401
    except ImportError as e:  # the package, or libibverbs it links against
        return str(e)
    return None


class MooncakeTransport:
    """One Mooncake transfer engine: the serving side's registered KV memory, and the
    client side's landing buffer and reads. ``host`` is the address peers reach this
    instance at; ``protocol`` Mooncake's transport ("tcp", or "rdma" where there are RDMA
    devices)."""

    def __init__(self, host: str, protocol: str = "tcp", device: str = "") -> None:
        why = mooncake_available()
        if why is not None:
            raise ValueError(f"--kv-mooncake needs the Mooncake transfer engine (pip install "
                             f"mooncake-transfer-engine-non-cuda; it links libibverbs1): {why}")
        from mooncake.engine import TransferEngine

        # A read from a peer that stalls fails after this many seconds (Mooncake's default is
        # 30, its least 5): the blocks are recomputed rather than waited for.
        os.environ.setdefault("MC_TRANSFER_TIMEOUT", str(TRANSFER_TIMEOUT_S))
        self._engine = TransferEngine()
        if self._engine.initialize(host, "P2PHANDSHAKE", protocol, device) != 0:
            raise RuntimeError(f"the Mooncake transfer engine did not start ({protocol} on "
                               f"{host})")
        self.session = f"{host}:{self._engine.get_rpc_port()}"
        self._registered: list[int] = []
        self._landing = mmap.mmap(-1, LANDING_BYTES)
        self.landing = ctypes.addressof(ctypes.c_char.from_buffer(self._landing))
        self.landing_bytes = LANDING_BYTES
        self._register(self.landing, LANDING_BYTES)
        self._lock = threading.Lock()  # one fetch in the landing buffer at a time
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="xllm-mooncake-copy")
        self.failed_reads = 0

    def _register(self, address: int, nbytes: int) -> None:
        if self._engine.register_memory(address, nbytes) != 0:
            raise RuntimeError(f"Mooncake could not register {nbytes} bytes at {address:#x}")
        self._registered.append(address)

    def serve(self, store: KVStore) -> None:
        """Lets peers read this instance's KV pool and CPU tier (once the engine is loaded;
        under tensor parallelism on one host, the workers' shares mapped here too)."""
        memory = store.host_memory
        if memory is None:
            raise ValueError("--kv-mooncake serves the KV pool on host memory mapped on demand "
                             "(the CPU engine's); this engine's pool is not")
        self._register(memory.vmm.address, memory.vmm.reserved_bytes)
        for mapping in store.parts_mappings():
            self._register(ctypes.addressof(ctypes.c_char.from_buffer(mapping)), len(mapping))
        if store.cpu is not None:
            self._register(store.cpu.memory.address, store.cpu.memory.reserved_bytes)

    def read(self, session: str, dsts: np.ndarray, srcs: np.ndarray, lengths: np.ndarray
             ) -> bool:
        """Reads ``lengths[i]`` bytes at the peer's ``srcs[i]`` into ``dsts[i]`` here, in
        batches the transport can queue; False at the first batch that fails."""
        i, n = 0, len(dsts)
        while i < n:
            j = i + 1
            total = int(lengths[i])
            while j < n and j - i < MAX_BATCH_ENTRIES and total + int(lengths[j]) <= \
                    MAX_BATCH_BYTES:
                total += int(lengths[j])
                j += 1
            rc = self._engine.batch_transfer_sync_read(
                session, dsts[i:j].tolist(), srcs[i:j].tolist(), lengths[i:j].tolist())
            if rc != 0:
                self.failed_reads += 1
                return False
            i = j
        return True

    def receive(self, store: KVStore, plan: Any, first: int, session: str,
                addresses: list[int], strides: list[int], checksums: list[int]) -> bool:
        """Lands the described blocks in ``plan``'s reserved blocks (any thread: they are
        reserved). Each block has an address and a stride per part of this layout (its
        segments in the peer's memory: part ``p``'s ``q``-th at ``address + q * stride``).
        Returns whether all arrived whole; ``plan.filled`` counts those that did."""
        at = first - plan.first
        count = len(checksums)
        c = store.config
        parts = c.distinct_parts
        if at != plan.filled or at + count > len(plan.blocks) or \
                len(strides) != count * parts or len(addresses) != count * parts:
            return False
        half = self.landing_bytes // 2
        per_round = max(1, half // c.block_bytes)
        segs = np.asarray([c.part_segment(p) for p in range(parts)], dtype=np.int64)
        offsets = np.asarray([c.part_offset(p) for p in range(parts)], dtype=np.int64)
        addr = np.asarray(addresses, dtype=np.int64).reshape(count, parts)
        stride = np.asarray(strides, dtype=np.int64).reshape(count, parts)
        # A slot holds a block's segments back to back, every part's (one read); pool
        # segments lie a region apart.
        contiguous_at = ((stride == segs[None, :]).all(axis=1)
                         & (addr == addr[:, :1] + offsets[None, :]).all(axis=1)
                         & (c.num_regions > 1))
        # Rounds alternate between the landing buffer's halves: one is read into while the
        # other is copied out on the copier thread.
        copying: Future[int] | None = None
        expected = 0
        with self._lock:
            i, n = 0, 0
            while i < count:
                # A round: blocks of one form (contiguous slots, or segments apart).
                contiguous = bool(contiguous_at[i])
                k = 1
                while k < per_round and i + k < count and contiguous_at[i + k] == contiguous:
                    k += 1
                landing = self.landing + (n % 2) * half
                read = self._read_round(session, landing, addr[i:i + k], stride[i:i + k],
                                        contiguous, c, segs)
                if copying is not None:
                    ok = copying.result()
                    plan.filled += ok
                    copying = None
                    if ok < expected:
                        return False
                if not read:
                    return False
                copying = self._copier.submit(
                    self._land, store, landing, contiguous, plan.blocks[at + i:at + i + k],
                    checksums[i:i + k])
                expected = k
                i += k
                n += 1
            if copying is not None:
                ok = copying.result()
                plan.filled += ok
                return ok == expected
        return True

    def _read_round(self, session: str, landing: int, addr: np.ndarray, stride: np.ndarray,
                    contiguous: bool, c: Any, segs: np.ndarray) -> bool:
        """Reads a round of ``k`` blocks (``addr``, ``stride``: [k, parts]) into the landing
        half: block after block when contiguous, else region-major (``[region][block]``,
        every part's regions in rank order, each its part's segment long)."""
        k = len(addr)
        if contiguous:  # one read per block, landing block after block
            block = c.block_bytes
            dsts = landing + np.arange(k, dtype=np.int64) * block
            return self.read(session, dsts, addr[:, 0], np.full(k, block, dtype=np.int64))
        # Segments a region apart: a run of blocks with consecutive ids on the peer is one
        # read per region.
        per = c.part_regions
        dsts, srcs, nbytes = [], [], []
        base = landing
        for p, seg in enumerate(segs.tolist()):
            a, st = addr[:, p], stride[:, p]
            brk = np.ones(k, dtype=bool)
            brk[1:] = (a[1:] != a[:-1] + seg) | (st[1:] != st[:-1])
            starts = np.flatnonzero(brk)
            lens = np.diff(np.append(starts, k))
            r = np.arange(per, dtype=np.int64)[:, None]
            srcs.append((a[starts][None, :] + r * st[starts][None, :]).ravel())
            dsts.append((base + (r * k + starts[None, :]) * seg).ravel())
            nbytes.append(np.broadcast_to(lens[None, :] * seg, (per, len(starts))).ravel())
            base += per * k * seg
        return self.read(session, np.concatenate(dsts), np.concatenate(srcs),
                         np.concatenate(nbytes))

    @staticmethod
    def _land(store: KVStore, landing: int, contiguous: bool, targets: list[int],
              sums: list[int]) -> int:
        """A landed round into its pool blocks (every part: store.land), summed on the way;
        the leading blocks whose sums match."""
        c = store.config
        k = len(targets)

        def copy(regions: list[int], ids: list[int]) -> int:
            if contiguous:
                return _C.kv_scatter_blocks(landing, c.block_bytes, list(range(k)), sums,
                                            regions, c.segments_arg, ids)
            staged = staged_regions(landing, c.segments, k)  # (the round's layout)
            return leading_matches(_C.kv_copy_blocks(staged, list(range(k)), regions, ids,
                                                     c.segments_arg), sums)

        with store.off_thread_copy() as allowed:
            # (a round, half the landing buffer, is within a chunk of the store's staging)
            return store.land(targets, copy, replicate=False) if allowed else 0

    def close(self) -> None:
        self._copier.shutdown(wait=True)
        for address in self._registered:
            self._engine.unregister_memory(address)
        self._registered.clear()


def describe(store: KVStore, sources: list[tuple[Any, int]]
             ) -> tuple[list[int], list[int], list[int]]:
    """The leading ``sources`` (pinned) a peer can read with Mooncake -- pool blocks and
    CPU-tier slots, up to the first disk-tier block -- as (first segment addresses and
    strides between segments: one of each per part of a block, block after block;
    checksums: one a block). Nothing where a part of the blocks is on another host. Any
    thread."""
    c = store.config
    n = next((i for i, (place, _) in enumerate(sources) if isinstance(place, DiskTier)),
             len(sources))
    addresses: list[int] = []
    strides: list[int] = []
    sums: list[int] = []
    # Every part of a block must lie in this process's memory (not behind a PartLink; a
    # latent cache's replicas need not: a block is this rank's part).
    remote = store.link is not None and not c.replicated
    if n == 0 or store.host_memory is None or not store.whole or remote:
        return addresses, strides, sums
    parts, per = c.distinct_parts, c.part_regions
    # Each part's first region, the distance between its regions, its segment, and where
    # its segments start in a tier slot.
    bases = [store.regions[p * per] for p in range(parts)]
    gaps = [store.regions[p * per + 1] - bases[p] if per > 1 else 0 for p in range(parts)]
    segs = [c.part_segment(p) for p in range(parts)]
    offsets = [c.part_offset(p) for p in range(parts)]
    with store.off_thread_copy() as allowed:
        if not allowed:
            return addresses, strides, sums
        i = 0
        while i < n:
            place = sources[i][0]
            j = i
            while j < n and sources[j][0] is place:
                j += 1
            ids = [s for _, s in sources[i:j]]
            if place == "pool":
                for b in ids:
                    addresses.extend(bases[p] + b * segs[p] for p in range(parts))
                    strides.extend(gaps)
                sums.extend(_C.kv_blocks_checksums(store.regions, c.segments_arg, ids))
            else:  # a CPU-tier slot: the block's segments back to back, part after part
                for s in ids:
                    addresses.extend(place.address + s * place.slot_bytes + offsets[p]
                                     for p in range(parts))
                    strides.extend(segs)
                sums.extend(place.checksums[s] for s in ids)
            i = j
    return addresses, strides, sums
