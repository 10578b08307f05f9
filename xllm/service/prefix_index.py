"""Cluster-wide prefix-cache index: which instances hold which KV blocks, by block hash.

Instances report their prefix cache as the chained block hashes of their block pool
(:mod:`xllm.ops.block_pool`), as deltas in each heartbeat. A block hash covers every token
before it, so "instance X holds hash h_k" means X holds the whole prefix up to block k,
and the longest cached prefix of a prompt on X is the first k with h_k missing on X.

The index maps each hash to a bitmask of instance *slots*, so matching a prompt against
every instance at once is one walk over the prompt's hashes (a dict lookup and an AND per
block), stopping where the last instance drops out -- cost independent of the number of
instances and of how much they cache. Slots are small ints handed out by
:meth:`add_instance` and reused after :meth:`remove_instance`.

Single-threaded: the master's event loop owns it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from xllm.ops.block_pool import ROOT_HASH, best_block_hashes

__all__ = ["TIERS", "PrefixIndex", "TieredPrefixIndex", "prompt_block_hashes"]

_hash = best_block_hashes()


def prompt_block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The hashes an engine would look up for this prompt: its full blocks, excluding the
    block holding the last token (the engine always recomputes that one to get logits;
    see KVCacheManager.get_computed_blocks)."""
    n = (len(token_ids) - 1) // block_size
    if n <= 0:
        return []
    return _hash(token_ids[: n * block_size], block_size, ROOT_HASH)


class PrefixIndex:
    def __init__(self) -> None:
        self._owners: dict[int, int] = {}  # block hash -> bitmask of slots holding it
        self._held: list[set[int] | None] = []  # slot -> hashes it holds (None = free slot)
        self._free_slots: list[int] = []

    def add_instance(self) -> int:
        """A new empty slot."""
        if self._free_slots:
            slot = self._free_slots.pop()
            self._held[slot] = set()
        else:
            slot = len(self._held)
            self._held.append(set())
        return slot

    def remove_instance(self, slot: int) -> None:
        """Forgets everything the slot held and frees it for reuse."""
        held = self._slot(slot)
        self._drop(slot, held)
        self._held[slot] = None
        self._free_slots.append(slot)

    def apply(
        self, slot: int, added: Iterable[int], evicted: Iterable[int], full: bool = False
    ) -> None:
        """Applies a heartbeat's delta. ``full``: ``added`` is the whole cache (a resync),
        replacing what the slot held; ``evicted`` is then ignored."""
        held = self._slot(slot)
        owners = self._owners
        bit = 1 << slot
        if full:
            new = set(added)
            self._drop(slot, held - new)
            for h in new - held:
                owners[h] = owners.get(h, 0) | bit
            self._held[slot] = new
            return
        for h in evicted:
            if h in held:
                held.discard(h)
                m = owners[h] & ~bit
                if m:
                    owners[h] = m
                else:
                    del owners[h]
        for h in added:
            if h not in held:
                held.add(h)
                owners[h] = owners.get(h, 0) | bit

    def num_blocks(self, slot: int) -> int:
        return len(self._slot(slot))

    def holds(self, slot: int, block_hash: int) -> bool:
        return block_hash in self._slot(slot)

    def match(self, hashes: Sequence[int]) -> dict[int, int]:
        """Slot -> number of leading blocks of ``hashes`` it holds, for every slot holding
        at least the first one."""
        owners = self._owners
        if not hashes:
            return {}
        mask = owners.get(hashes[0], 0)
        out: dict[int, int] = {}
        depth = 1
        for h in hashes[1:]:
            m = owners.get(h, 0) & mask
            if m != mask:
                dropped = mask & ~m
                while dropped:
                    low = dropped & -dropped
                    out[low.bit_length() - 1] = depth
                    dropped ^= low
                if not m:
                    return out
                mask = m
            depth += 1
        while mask:
            low = mask & -mask
            out[low.bit_length() - 1] = depth
            mask ^= low
        return out

    def match_tiers(self, hashes: Sequence[int]) -> dict[int, tuple[int, int, int]]:
        """:meth:`match` as (pool, cpu, disk) counts, for an index of the pool alone."""
        return {slot: (depth, 0, 0) for slot, depth in self.match(hashes).items()}

    def _slot(self, slot: int) -> set[int]:
        held = self._held[slot] if 0 <= slot < len(self._held) else None
        if held is None:
            raise ValueError(f"slot {slot} is not an instance in this index")
        return held

    def _drop(self, slot: int, hashes: Iterable[int]) -> None:
        owners = self._owners
        bit = ~(1 << slot)
        for h in hashes:
            m = owners[h] & bit
            if m:
                owners[h] = m
            else:
                del owners[h]


TIERS = ("pool", "cpu", "disk")


class TieredPrefixIndex:
    """Which instance holds each block in which tier: one :class:`PrefixIndex` per tier
    (``pool``, ``cpu``, ``disk``; docs/kvcache.md), the same slot in each.

    :meth:`match_tiers` finds, per instance, what its engine would find: the longest prefix
    in its pool, continued in its CPU tier, continued on its disk (the lookup order of
    ``KVStore.lookup``), as (pool, cpu, disk) block counts. :meth:`match` is their sum, and
    ``apply`` without a tier is the pool's, so the policies that only count blocks read it
    like a plain :class:`PrefixIndex`.
    """

    def __init__(self) -> None:
        self.tiers = {name: PrefixIndex() for name in TIERS}

    def add_instance(self) -> int:
        slots = {index.add_instance() for index in self.tiers.values()}
        assert len(slots) == 1, "the tiers' indexes must hand out the same slots"
        return slots.pop()

    def remove_instance(self, slot: int) -> None:
        for index in self.tiers.values():
            index.remove_instance(slot)

    def apply(self, slot: int, added: Iterable[int], evicted: Iterable[int],
              full: bool = False, tier: str = "pool") -> None:
        index = self.tiers.get(tier)
        if index is None:
            raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
        index.apply(slot, added, evicted, full)

    def num_blocks(self, slot: int, tier: str = "pool") -> int:
        return self.tiers[tier].num_blocks(slot)

    def blocks_per_tier(self, slot: int) -> dict[str, int]:
        return {name: index.num_blocks(slot) for name, index in self.tiers.items()}

    def holds(self, slot: int, block_hash: int, tier: str = "pool") -> bool:
        return self.tiers[tier].holds(slot, block_hash)

    def match(self, hashes: Sequence[int]) -> dict[int, int]:
        """Slot -> leading blocks of ``hashes`` it holds in any tier (as its engine finds
        them), for every slot holding at least the first one."""
        return {slot: sum(counts) for slot, counts in self.match_tiers(hashes).items()}

    def match_tiers(self, hashes: Sequence[int]) -> dict[int, tuple[int, int, int]]:
        """Slot -> (pool, cpu, disk) blocks of the longest prefix of ``hashes`` it holds:
        first in its pool, then in its CPU tier, then on its disk. One walk for all slots,
        over bitmasks of the slots in each phase."""
        if not hashes:
            return {}
        owners = [self.tiers[name]._owners for name in TIERS]
        h0 = hashes[0]
        # phase[k]: the slots whose chain continues in tier k; all start in the pool's
        phases = [owners[0].get(h0, 0) | owners[1].get(h0, 0) | owners[2].get(h0, 0), 0, 0]
        ends: dict[int, list[int]] = {}  # slot -> [pool end, cpu end, disk end]
        n = len(hashes)
        for i, h in enumerate(hashes):
            if not (phases[0] | phases[1] | phases[2]):
                break
            for k in range(3):  # a slot leaving tier k tries tier k + 1 at the same block
                out = phases[k] & ~owners[k].get(h, 0)
                if out:
                    phases[k] ^= out
                    for slot in _bits(out):
                        ends.setdefault(slot, [n, n, n])[k] = i
                    if k < 2:
                        phases[k + 1] |= out
        for slot in _bits(phases[0] | phases[1] | phases[2]):  # still matching at the end
            ends.setdefault(slot, [n, n, n])
        # A phase's end defaults to n, the prompt's end, when the slot never left it (and so
        # never entered the phases after it: their ends are n too).
        return {slot: (p, c - p, d - c) for slot, (p, c, d) in ends.items()}


def _bits(mask: int) -> list[int]:
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out
