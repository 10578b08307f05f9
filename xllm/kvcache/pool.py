"""OnDemandBlockPool: the block pool over memory that is mapped as blocks come into use.

It presents the whole ceiling (``num_blocks`` blocks) to the scheduler, as the plain pool
does, but only the blocks of mapped page groups (:class:`~xllm.kvcache.memory.KVMemory`)
are in service; the rest are *retired* in the native pool (out of the free list, never
handed out). ``allocate`` maps the lowest unmapped groups when the free blocks in service
fall short, so memory grows only when live requests need it: cached free blocks are reused
(evicted, least recently used first) before more memory is mapped.

``maintain(now)`` gives memory back: when at least a group's worth of blocks beyond the
``keep_free_blocks`` watermark (default 0) has stayed free for ``idle_seconds``, the groups whose
blocks are all free are retired (dropping their cached hashes, reported to
``on_evict``) and unmapped, highest group first. ``before_unmap(blocks)`` runs first so
nothing still reads them (a tier's write-back). Torch-free: the scheduler owns it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from xllm.kvcache.memory import KVMemory
from xllm.ops.block_pool import BlockPool

__all__ = ["OnDemandBlockPool"]

DEFAULT_IDLE_SECONDS = 5.0


class OnDemandBlockPool:
    """:class:`~xllm.ops.block_pool.BlockPoolProtocol` over a :class:`KVMemory`."""

    def __init__(self, memory: KVMemory, *, idle_seconds: float = DEFAULT_IDLE_SECONDS,
                 keep_free_blocks: int | None = None,
                 before_unmap: Callable[[Sequence[int]], None] | None = None,
                 on_evict: Callable[[list[int]], None] | None = None) -> None:
        if idle_seconds < 0:
            raise ValueError(f"idle_seconds must be >= 0, got {idle_seconds}")
        self.memory = memory
        self.idle_seconds = idle_seconds
        self.keep_free_blocks = 0 if keep_free_blocks is None else keep_free_blocks
        self.before_unmap = before_unmap
        self.on_evict = on_evict
        inner = self._inner = BlockPool(memory.num_blocks)
        # Group 0 (it holds the null block) is mapped for good; the rest start retired.
        memory.map_group(0)
        rest = list(range(min(memory.blocks_per_group, memory.num_blocks), memory.num_blocks))
        if rest:
            inner.retire(rest)
        self._idle_since: float | None = None
        self._last_call: float | None = None
        # The calls that need no wrapping go straight to the native pool.
        self.free = inner.free
        self.touch = inner.touch
        self.lookup = inner.lookup
        self.cache_blocks = inner.cache_blocks
        self.ref_count = inner.ref_count
        self.block_hash = inner.block_hash
        self.free_block_ids = inner.free_block_ids
        self.reset_prefix_cache = inner.reset_prefix_cache
        self.prefix_cache_stats = inner.prefix_cache_stats
        self.is_retired = inner.is_retired
        self.set_events = inner.set_events
        self.drain_events = inner.drain_events
        self.cached_hashes = inner.cached_hashes

    def __repr__(self) -> str:
        return (f"OnDemandBlockPool(num_blocks={self.num_blocks}, "
                f"mapped_groups={self.memory.num_mapped_groups}/{self.memory.num_groups}, "
                f"free={self.num_free_blocks})")

    @property
    def num_blocks(self) -> int:
        return self._inner.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Free blocks up to the ceiling: in service, or retired and mappable."""
        inner = self._inner
        return inner.num_free_blocks + inner.num_retired_blocks

    @property
    def num_cached_blocks(self) -> int:
        return self._inner.num_cached_blocks

    @property
    def num_retired_blocks(self) -> int:
        return self._inner.num_retired_blocks

    def allocate(self, n: int) -> list[int] | None:
        inner = self._inner
        if n > inner.num_free_blocks:
            if n > inner.num_free_blocks + inner.num_retired_blocks:
                return None
            self._grow(n - inner.num_free_blocks)
        return inner.allocate(n)

    def _grow(self, need: int) -> None:
        """Maps the lowest unmapped groups until ``need`` more blocks are in service."""
        memory = self.memory
        restored: list[int] = []
        for group in range(memory.num_groups):
            if need <= 0:
                break
            if memory.is_mapped(group):
                continue
            memory.map_group(group)
            blocks = memory.group_blocks(group)
            restored.extend(blocks)
            need -= len(blocks)
        self._inner.restore(restored)  # in one call: handed out in id order

    def maintain(self, now: float, busy: bool = False) -> float | None:
        """Releases idle page groups when they are due; returns the seconds until the next
        call would release something, or None when nothing is waiting to be released.
        ``busy``: called before a step. Work that resumes after a pause with no upkeep (an
        offline engine between two batches) restarts the clock instead of releasing the
        memory it is about to use."""
        last, self._last_call = self._last_call, now
        if busy and (last is None or now - last > self.idle_seconds):
            self._idle_since = None
        spare = self._inner.num_free_blocks - self.keep_free_blocks
        if spare < self.memory.blocks_per_group:
            self._idle_since = None
            return None
        if self._idle_since is None:
            self._idle_since = now
        wait = self._idle_since + self.idle_seconds - now
        if wait > 0:
            return wait
        self._idle_since = None
        self.release(spare)
        return None

    def release(self, max_blocks: int | None = None) -> int:
        """Unmaps page groups whose blocks are all free, highest first, returning at most
        ``max_blocks`` blocks' worth (default: every such group but group 0). Returns the
        number of groups unmapped."""
        memory = self.memory
        bpg = memory.blocks_per_group
        budget = self._inner.num_free_blocks if max_blocks is None else max_blocks
        free_count = [0] * memory.num_groups
        for b in self._inner.free_block_ids():  # an idle path: once per release
            free_count[b // bpg] += 1
        released = 0
        for group in range(memory.num_groups - 1, 0, -1):
            blocks = memory.group_blocks(group)
            if budget < len(blocks):
                break
            if not memory.is_mapped(group) or free_count[group] != len(blocks):
                continue
            if self.before_unmap is not None:
                self.before_unmap(blocks)
            evicted = self._inner.retire(blocks)
            memory.unmap_group(group)
            if evicted and self.on_evict is not None:
                self.on_evict(evicted)
            budget -= len(blocks)
            released += 1
        return released
