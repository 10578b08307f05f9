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
"""

from __future__ import annotations

from collections.abc import Sequence

from xllm.ops.block_pool import BlockPool
from xllm.ops.vmm import VmmPool

__all__ = ["CpuTier", "Tier"]

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
        self.checksums = [0] * (num_slots + 1)
        self.contents: list[Content | None] = [None] * (num_slots + 1)
        # counters (read by metrics)
        self.hit_blocks = 0
        self.bytes_written = 0
        self.bytes_read = 0
        self.corrupt_blocks = 0

    @property
    def num_blocks(self) -> int:
        """Blocks the tier holds now."""
        return self.index.num_cached_blocks

    def lookup(self, hashes: Sequence[int], parent: int, tokens: Sequence[int],
               start: int, block_size: int) -> list[int]:
        """Slots of the longest chain of ``hashes`` the tier holds whose content matches
        ``tokens`` (block ``i`` of the chain covers ``tokens[start + i * bs : ...]``)."""
        slots = self.index.lookup(hashes)
        contents = self.contents
        n = 0
        for i, slot in enumerate(slots):
            entry = contents[slot]
            lo = start + i * block_size
            if entry is None or entry[0] != parent or entry[1] != tuple(tokens[lo:lo + block_size]):
                break
            parent = hashes[i]
            n += 1
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
        for slot, checksum, content in zip(slots, checksums, contents, strict=True):
            self.checksums[slot] = checksum
            self.contents[slot] = content
        self.index.cache_blocks(slots, hashes)
        self.index.free(slots)
        self.bytes_written += len(slots) * self.slot_bytes

    def discard(self, slots: Sequence[int]) -> None:
        """Returns reserved slots unwritten."""
        if slots:
            self.index.free(slots)


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
