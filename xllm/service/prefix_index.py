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

__all__ = ["PrefixIndex", "prompt_block_hashes"]

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
