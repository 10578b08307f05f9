"""Tiers below the KV pool: stores of whole blocks addressed by their chained prefix hash.

A tier holds ``num_slots`` block-sized slots. Its index is a native
:class:`~xllm.ops.block_pool.BlockPool` over slot ids (slot 0 unused): ``lookup`` finds
the longest chain of cached hashes, the free list is the tier's LRU order, and a write
reserves slots by ``allocate`` (evicting the least recently used) and publishes them with
``cache_blocks`` once the bytes are in. Every slot rests with its hash, a checksum of its
bytes and its block's content key (parent hash and token ids), against which a hit is
confirmed like a pool hit (a 64-bit hash can collide).

:class:`CpuTier`: slots in host memory beside the pool, on a VMM reservation whose pages
are mapped up front but filled by the OS only as slots are first written.
:class:`DiskTier`: slots in a file, kept across restarts of the same model.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path

from xllm import _C
from xllm.ops.block_pool import BlockPool, confirm_chain
from xllm.ops.vmm import VmmPool

__all__ = ["CpuTier", "DiskTier", "Tier"]

Content = tuple[int, tuple[int, ...]]  # (parent hash, token ids) of a block


class Tier:
    """Index and metadata of one tier; subclasses own the bytes."""

    name = "tier"

    def __init__(self, num_slots: int, slot_bytes: int) -> None:
        if num_slots < 1:
            raise ValueError(f"the {self.name} tier holds no block: each needs {slot_bytes} "
                             "bytes; give it more room")
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.index = BlockPool(num_slots + 1)
        self.hashes = [0] * (num_slots + 1)
        self.checksums = [0] * (num_slots + 1)
        self.contents: list[Content | None] = [None] * (num_slots + 1)
        # counters (read by metrics)
        self.hit_blocks = 0
        self.bytes_written = 0
        self.bytes_read = 0
        self.corrupt_blocks = 0
        self.load_bps: float | None = None  # measured by the store's loads

    @property
    def num_blocks(self) -> int:
        """Blocks the tier holds now."""
        return self.index.num_cached_blocks

    def lookup(self, hashes: Sequence[int], parent: int, tokens: Sequence[int],
               start: int, block_size: int) -> list[int]:
        """Slots of the longest chain of ``hashes`` the tier holds whose content matches
        ``tokens`` (block ``i`` of the chain covers ``tokens[start + i * bs : ...]``)."""
        slots = self.index.lookup(hashes)
        n = confirm_chain(slots, self.contents.__getitem__, hashes, parent, tokens, start,
                          block_size)
        return slots[:n]

    def refresh(self, slots: Sequence[int]) -> None:
        """Marks slots most recently used (a chain's tail stays nearer eviction)."""
        if slots:
            self.index.touch(slots)
            self.index.free(slots)

    def reserve(self, n: int) -> list[int]:
        """Up to n slots for writing (each evicts the least recently used block); they stay
        invisible to lookups until published."""
        n = min(n, self.index.num_free_blocks)
        return self.index.allocate(n) if n else []

    def publish(self, slots: Sequence[int], hashes: Sequence[int], checksums: Sequence[int],
                contents: Sequence[Content]) -> None:
        """Makes written slots visible under their hashes (a hash the tier already holds
        leaves the duplicate slot free) and puts them at the LRU tail, a chain's last block
        nearest eviction."""
        for slot, h, checksum, content in zip(slots, hashes, checksums, contents, strict=True):
            self.hashes[slot] = h
            self.checksums[slot] = checksum
            self.contents[slot] = content
        self.index.cache_blocks(slots, hashes)
        self.index.free(slots)
        self.bytes_written += len(slots) * self.slot_bytes

    def discard(self, slots: Sequence[int]) -> None:
        """Returns reserved slots unwritten."""
        if slots:
            self.index.free(slots)

    def forget(self, slot: int) -> None:
        """Drops a published slot (it failed its checksum): out of the index for good, first
        in line for reuse."""
        self.index.retire([slot])
        self.index.restore([slot])
        self.contents[slot] = None

    def close(self) -> None:
        pass


class CpuTier(Tier):
    """Blocks in host memory: one reservation of num_slots slots."""

    name = "cpu"

    def __init__(self, capacity_bytes: int, slot_bytes: int) -> None:
        super().__init__(capacity_bytes // slot_bytes, slot_bytes)
        page = 2 << 20
        size = -(-(self.num_slots + 1) * slot_bytes // page) * page
        self.memory = VmmPool(size, page)
        # Mapped up front: a memfd page takes memory only once written.
        self.memory.map_pages(range(0, size, page))
        self.address = self.memory.address


class DiskTier(Tier):
    """Blocks in files under ``directory``, kept across restarts of the same model.

    The tier lives in ``directory/xllm-kv-<layout>/``, where ``<layout>`` fingerprints what the
    bytes depend on (the model's config and weight files, dtypes, weight format, block size
    and shape): a directory left by another model, block size or dtype is another
    subdirectory, never read into this cache. Inside: ``blocks.bin`` (slot ``s`` at
    ``s * slot_bytes``, a sparse file), ``index.bin`` (one fixed record per slot: hash,
    checksum, parent hash, token ids; written after the slot's bytes, so a torn write fails
    its checksum and is recomputed) and ``layout.json``. On start the index is read back:
    blocks written by an earlier run of the same layout are hits.

    I/O errors never fail a request: a failed write leaves its slots unpublished, a failed
    or short read ends the hit there (the rest is recomputed), a full disk just stops
    blocks from being written down.
    """

    name = "disk"
    _MAGIC = 0x786B7631  # "xkv1"

    def __init__(self, directory: str, capacity_bytes: int, slot_bytes: int, block_size: int,
                 layout: dict) -> None:

        super().__init__(capacity_bytes // slot_bytes, slot_bytes)
        self.block_size = block_size
        self.record = struct.Struct(f"<IIQQQ{block_size}q")
        key = json.dumps(layout, sort_keys=True)
        root = Path(directory)
        self.path = root / f"xllm-kv-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "layout.json").write_text(key + "\n")
            self.fd = os.open(self.path / "blocks.bin", os.O_RDWR | os.O_CREAT, 0o644)
            self.index_fd = os.open(self.path / "index.bin", os.O_RDWR | os.O_CREAT, 0o644)
            os.ftruncate(self.fd, (self.num_slots + 1) * slot_bytes)
        except OSError as e:
            raise ValueError(f"the disk tier's directory {directory!r} cannot be used: "
                             f"{e.strerror or e}; give a writable directory") from None
        self.read_errors = 0
        self.write_errors = 0
        self._restore_index()

    def _restore_index(self) -> None:

        size = self.record.size
        data = os.pread(self.index_fd, (self.num_slots + 1) * size, 0)
        slots, hashes = [], []
        for slot in range(1, min(self.num_slots + 1, len(data) // size)):
            magic, ntok, h, checksum, parent, *tokens = self.record.unpack_from(data, slot * size)
            if magic != self._MAGIC or ntok != self.block_size:
                continue
            slots.append(slot)
            hashes.append(h)
            self.hashes[slot] = h
            self.checksums[slot] = checksum
            self.contents[slot] = (parent, tuple(tokens))
        held = self.index.allocate(self.num_slots)
        assert held is not None
        if slots:
            self.index.cache_blocks(slots, hashes)
        self.index.free(held)

    # ---- the writer thread's side (bytes only; the index changes on the engine thread) ----

    def write(self, slots: Sequence[int], src: memoryview, src_offsets: Sequence[int],
              hashes: Sequence[int], checksums: Sequence[int],
              contents: Sequence[Content]) -> bool:
        """Writes blocks already in one piece (a CPU tier's slots: ``slot_bytes`` at
        ``src[src_offsets[i]:]``), then their index records. False when anything failed (the
        caller leaves the slots unpublished)."""
        sb = self.slot_bytes
        try:
            for slot, off in zip(slots, src_offsets, strict=True):
                if os.pwrite(self.fd, src[off:off + sb], slot * sb) != sb:
                    raise OSError("short write")
        except OSError:
            self.write_errors += 1
            return False
        return self._write_records(slots, hashes, checksums, contents)

    def write_blocks(self, slots: Sequence[int], regions: Sequence[int],
                     segment_bytes: int | Sequence[int],
                     blocks: Sequence[int], hashes: Sequence[int],
                     contents: Sequence[Content]) -> list[int] | None:
        """Writes pool blocks straight from the KV cache (one pwritev each, checksummed on the
        way), then their index records; their checksums, or None when anything failed."""
        sb = self.slot_bytes
        sums, err = _C.kv_disk_write(self.fd, [s * sb for s in slots], regions, segment_bytes,
                                     blocks)
        if err:
            self.write_errors += 1
            return None
        return sums if self._write_records(slots, hashes, sums, contents) else None

    def _write_records(self, slots: Sequence[int], hashes: Sequence[int],
                       checksums: Sequence[int], contents: Sequence[Content]) -> bool:
        try:
            for slot, h, checksum, (parent, tokens) in zip(slots, hashes, checksums, contents,
                                                           strict=True):
                rec = self.record.pack(self._MAGIC, len(tokens), h, checksum, parent, *tokens)
                os.pwrite(self.index_fd, rec, slot * self.record.size)
        except (OSError, struct.error):
            self.write_errors += 1
            return False
        return True

    # ---- the engine thread's side -----------------------------------------------------------

    def read_blocks(self, slots: Sequence[int], regions: Sequence[int],
                    segment_bytes: int | Sequence[int],
                    blocks: Sequence[int]) -> tuple[int, bool]:
        """Reads slots straight into pool blocks (one preadv each), checking each block's
        checksum. Returns (leading blocks intact, whether the first failure was a checksum
        mismatch rather than an I/O error or a short read)."""
        sb = self.slot_bytes
        done, err = _C.kv_disk_read(self.fd, [s * sb for s in slots],
                                    [self.checksums[s] for s in slots], regions, segment_bytes,
                                    blocks)
        if err and err != -2:
            self.read_errors += 1
        return done, err == -2

    def forget(self, slot: int) -> None:
        """Drops a slot that failed its check (its record too, so a restart skips it)."""

        super().forget(slot)
        try:
            os.pwrite(self.index_fd, bytes(self.record.size), slot * self.record.size)
        except OSError:
            pass

    def close(self) -> None:

        for fd in (self.fd, self.index_fd):
            try:
                os.close(fd)
            except OSError:
                pass
