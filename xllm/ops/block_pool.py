"""KV block pool with prefix cache, and the chained block hash it keys on.

Two implementations with one interface (see :class:`BlockPoolProtocol`):

- ``BlockPool``: the native pool, ``xllm._C.BlockPool`` (C++, csrc/memory/block_pool.*).
- :class:`PyBlockPool`: a pure-Python twin, the reference the tests and the
  benchmark hold the native one against.

The design is vLLM v1's BlockPool. ``num_blocks`` blocks exist from the start,
each with a ref count and an optional 64-bit hash; block 0 is the null block
that pads block tables and is never allocated, freed or cached. Every block with
ref count 0 sits in one LRU free list (cached or not); ``allocate`` pops its
head, ``free`` appends a request's blocks at its tail last block first, so a
request's tail (the least likely to be shared) is evicted first. A free block
keeps its hash so a later request with the same prefix can revive it with
``touch``; the hash is dropped only when ``allocate`` hands the block out again
(lazy eviction). A block carries a hash exactly when the cache maps that hash to
it; caching a hash that already names another block leaves the new block
uncached. Every call checks all its arguments before changing anything and
raises ValueError naming the bad one.

Block hashes chain: a block's hash covers its parent's hash, its token ids and an
``extra`` key (LoRA id, multimodal content hash, ...; fold several into one with
``hash_block_tokens(0, keys)``), starting from the fixed :data:`ROOT_HASH`, so
hashes agree across processes and machines. The mixing is one lane of xxHash64
(its round and merge per 64-bit word, then its avalanche). A 64-bit hash can
collide (about n**2 / 2**65 for n distinct blocks): where the scheduler still
has a cached block's tokens it should confirm a hit against them.

This module and ``xllm._C`` import no torch: the scheduler uses them. When the
native module is missing, ``BlockPool``, ``hash_block_tokens`` and
``block_hashes`` raise ImportError when used, not when this module is imported.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

__all__ = [
    "ROOT_HASH",
    "BlockPool",
    "BlockPoolProtocol",
    "PyBlockPool",
    "block_hashes",
    "confirm_chain",
    "hash_block_tokens",
    "make_block_pool",
    "py_block_hashes",
    "py_hash_block_tokens",
]

_MASK = (1 << 64) - 1
_P1 = 0x9E3779B185EBCA87
_P2 = 0xC2B2AE3D27D4EB4F
_P3 = 0x165667B19E3779F9
_P4 = 0x85EBCA77C2B2AE63
_P5 = 0x27D4EB2F165667C5
_WORD_MIN = -(1 << 63)  # words: any int that fits in 64 bits, signed or unsigned


def _avalanche(h: int) -> int:
    h ^= h >> 33
    h = (h * _P2) & _MASK
    h ^= h >> 29
    h = (h * _P3) & _MASK
    return h ^ (h >> 32)


ROOT_HASH: int = _avalanche((0x786C6C6D2D6B7600 + _P5) & _MASK)
"""Parent hash of a sequence's first block (a fixed seed, "xllm-kv")."""


# ---- argument checks (each error names the argument and, in a list, the index) ----


def _where(name: str, index: int | None) -> str:
    return name if index is None else f"{name}[{index}]"


def _index(value: Any, name: str, index: int | None = None) -> int:
    """An int-like value (int, numpy int, anything with __index__) as an int."""
    if type(value) is int:
        return value
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(
            f"{_where(name, index)} must be an int, got {type(value).__name__}"
        ) from None


def _seq(values: Iterable[Any], name: str) -> Sequence[Any]:
    if isinstance(values, (list, tuple)):
        return values
    try:
        return list(values)
    except TypeError:
        raise ValueError(
            f"{name} must be a sequence of ints, got {type(values).__name__}"
        ) from None


def _uint64(value: Any, name: str, index: int | None = None) -> int:
    v = _index(value, name, index)
    if not 0 <= v <= _MASK:
        raise ValueError(f"{_where(name, index)} must be in [0, 2**64), got {v}")
    return v


def _word(value: Any, name: str, index: int | None = None) -> int:
    v = _index(value, name, index)
    if not _WORD_MIN <= v <= _MASK:
        raise ValueError(f"{_where(name, index)} must be in [-2**63, 2**64)")
    return v & _MASK


def _words(values: Iterable[Any], name: str) -> list[int]:
    seq = _seq(values, name)
    try:  # fast path: plain ints in range, checked in C by min/max
        if not seq or (min(seq) >= _WORD_MIN and max(seq) <= _MASK):
            if all(type(t) is int for t in seq):
                return [t & _MASK for t in seq]
    except TypeError:
        pass
    return [_word(t, name, i) for i, t in enumerate(seq)]


def _hashes(values: Iterable[Any], name: str) -> Sequence[int]:
    seq = _seq(values, name)
    for h in seq:
        if type(h) is not int or not 0 <= h <= _MASK:
            return [_uint64(v, name, i) for i, v in enumerate(seq)]
    return seq


def _check_distinct(ids: Sequence[int]) -> None:
    """retire/restore take each block once (their native twins check it likewise)."""
    if len(set(ids)) != len(ids):
        seen: set[int] = set()
        for i, b in enumerate(ids):
            if b in seen:
                raise ValueError(f"blocks[{i}] = {b} appears twice")
            seen.add(b)


# ---- chained block hash --------------------------------------------------------------


def _absorb(h: int, w: int) -> int:
    """xxHash64's round (zero accumulator) of word w, merged into state h."""
    k = (w * _P2) & _MASK
    h ^= ((((k << 31) | (k >> 33)) & _MASK) * _P1) & _MASK
    return ((((h << 27) | (h >> 37)) & _MASK) * _P1 + _P4) & _MASK


def _hash_words(parent: int, words: Sequence[int], start: int, stop: int, extra: int) -> int:
    """Hash of words[start:stop] chained to parent: seeded with the word count, then
    parent, each token and extra absorbed in order, then xxHash64's avalanche."""
    m, p1, p2, p4 = _MASK, _P1, _P2, _P4
    h = _absorb((_P5 + 8 * (stop - start + 2)) & m, parent)
    for i in range(start, stop):  # _absorb inlined: this loop is the twin's hot path
        k = (words[i] * p2) & m
        h ^= ((((k << 31) | (k >> 33)) & m) * p1) & m
        h = ((((h << 27) | (h >> 37)) & m) * p1 + p4) & m
    return _avalanche(_absorb(h, extra))


def py_hash_block_tokens(parent_hash: int, token_ids: Iterable[int], extra: int = 0) -> int:
    """Chained hash of one block: its parent's hash, its token ids and an extra key."""
    parent = _uint64(parent_hash, "parent_hash")
    key = _word(extra, "extra")
    words = _words(token_ids, "token_ids")
    return _hash_words(parent, words, 0, len(words), key)


def py_block_hashes(
    token_ids: Iterable[int], block_size: int, parent_hash: int = ROOT_HASH, extra: int = 0
) -> list[int]:
    """Chained hashes of every full block of ``token_ids`` (a partial tail block gets none)."""
    bs = _index(block_size, "block_size")
    if bs < 1:
        raise ValueError(f"block_size must be >= 1, got {bs}")
    parent = _uint64(parent_hash, "parent_hash")
    key = _word(extra, "extra")
    words = _words(token_ids, "token_ids")
    out: list[int] = []
    for start in range(0, len(words) - bs + 1, bs):
        parent = _hash_words(parent, words, start, start + bs, key)
        out.append(parent)
    return out


# ---- the interface -----------------------------------------------------------------


class BlockPoolProtocol(Protocol):
    """What the scheduler relies on; both pools implement it exactly alike."""

    @property
    def num_blocks(self) -> int: ...
    @property
    def num_free_blocks(self) -> int: ...
    @property
    def num_cached_blocks(self) -> int: ...
    def allocate(self, n: int) -> list[int] | None:
        """Pops n blocks off the free-list head (ref count 1, hash dropped); None, changing
        nothing, when fewer than n are free."""

    def free(self, blocks: Sequence[int]) -> None:
        """Decrements ref counts; blocks reaching 0 join the free-list tail, last block first."""

    def touch(self, blocks: Sequence[int]) -> None:
        """Increments ref counts (prefix-cache hit), taking free blocks off the free list."""

    def lookup(self, hashes: Sequence[int]) -> list[int]:
        """Blocks of the longest cached prefix of hashes; counts queries and hits only."""

    def cache_blocks(self, blocks: Sequence[int], hashes: Sequence[int]) -> None:
        """Records full, in-use blocks' hashes."""

    def ref_count(self, block: int) -> int: ...
    def block_hash(self, block: int) -> int | None: ...
    def free_block_ids(self) -> list[int]:
        """The free list in eviction order (head first)."""

    def reset_prefix_cache(self) -> bool:
        """Drops every hash; refused (False) while any block is in use."""

    @property
    def num_retired_blocks(self) -> int: ...
    def retire(self, blocks: Sequence[int]) -> list[int]:
        """Takes free blocks out of service (out of the free list, hashes dropped: their memory
        may be unmapped); returns the hashes it dropped."""

    def restore(self, blocks: Sequence[int]) -> None:
        """Returns retired blocks to the free-list head, in the given order."""

    def is_retired(self, block: int) -> bool: ...
    def set_events(self, on: bool) -> None:
        """Starts (or stops) noting every hash the cache gains or loses."""

    def drain_events(self) -> tuple[list[int], list[int]]:
        """(added, evicted): the net change of the cached hashes since the previous drain,
        each sorted."""

    def cached_hashes(self) -> list[int]:
        """Every cached hash, in block id order."""

    def prefix_cache_stats(self, reset: bool = False) -> tuple[int, int]:
        """(queried blocks, hit blocks) counted by lookup; reset=True zeroes them after."""


# ---- the pure-Python twin -------------------------------------------------------------


class PyBlockPool:
    """Pure-Python block pool: the reference for the native ``BlockPool``, same interface and
    behaviour (including which block every call picks), O(1) per block.

    The free list is intrusive and doubly linked over ``_prev``/``_next`` index lists, with
    sentinels at ``num_blocks`` (head) and ``num_blocks + 1`` (tail); -1 means "not in the
    free list".
    """

    def __init__(self, num_blocks: int) -> None:
        n = _index(num_blocks, "num_blocks")
        if n < 2:
            raise ValueError(
                f"num_blocks must be >= 2 (block 0 is the reserved null block), got {n}"
            )
        if n > (1 << 31) - 3:
            raise ValueError(f"num_blocks must be < 2**31 - 2, got {n}")
        self._n = n
        self._head, self._tail = n, n + 1
        self._ref = [0] * n
        self._hash: list[int | None] = [None] * n
        self._cache: dict[int, int] = {}
        # A fresh pool hands out 1, 2, 3, ...: blocks 1..n-1 linked in id order, the
        # null block 0 left out for good.
        self._next = [-1] + list(range(2, n)) + [self._tail, 1, -1]
        self._prev = [-1, self._head] + list(range(1, n - 1)) + [-1, n - 1]
        self._num_free = n - 1
        self._retired = [False] * n
        self._num_retired = 0
        self._events = False
        self._changes: dict[int, bool] = {}
        self._queries = 0
        self._hits = 0

    def __repr__(self) -> str:
        return (
            f"PyBlockPool(num_blocks={self._n}, free={self._num_free}, cached={len(self._cache)})"
        )

    @property
    def num_blocks(self) -> int:
        return self._n

    @property
    def num_free_blocks(self) -> int:
        return self._num_free

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cache)

    def _block_ids(self, blocks: Iterable[Any], name: str) -> Sequence[int]:
        seq = _seq(blocks, name)
        n = self._n
        for b in seq:
            if type(b) is not int or not 0 < b < n:
                return [self._block_id(v, name, i) for i, v in enumerate(seq)]
        return seq

    def _block_id(self, value: Any, name: str, index: int | None = None) -> int:
        b = _index(value, name, index)
        if b == 0:
            raise ValueError(
                f"{_where(name, index)} is the null block 0, which is never allocated, "
                "freed or cached"
            )
        if not 0 < b < self._n:
            raise ValueError(f"{_where(name, index)} = {b} is not a block id in [1, {self._n})")
        return b

    def _unlink(self, b: int) -> None:
        prv, nxt = self._prev, self._next
        before, after = prv[b], nxt[b]
        nxt[before] = after
        prv[after] = before
        prv[b] = nxt[b] = -1

    def allocate(self, n: int) -> list[int] | None:
        count = _index(n, "n")
        if count < 0:
            raise ValueError(f"n must be >= 0, got {count}")
        if count > self._num_free:
            return None
        prv, nxt, ref, hashes, cache = self._prev, self._next, self._ref, self._hash, self._cache
        head = self._head
        out = []
        for _ in range(count):
            b = nxt[head]
            after = nxt[b]
            nxt[head] = after
            prv[after] = head
            prv[b] = nxt[b] = -1
            h = hashes[b]
            if h is not None:  # lazy eviction of the least recently freed cached block
                if cache.get(h) == b:
                    del cache[h]
                hashes[b] = None
                if self._events:
                    self._changes[h] = False
            ref[b] = 1
            out.append(b)
        self._num_free -= count
        return out

    def free(self, blocks: Sequence[int]) -> None:
        ids = self._block_ids(blocks, "blocks")
        ref = self._ref
        # Decrement first (a block may appear as often as it is held), undoing the
        # decrements on the first over-free so a failed call changes nothing.
        for i, b in enumerate(ids):
            if ref[b] == 0:
                for j in range(i):
                    ref[ids[j]] += 1
                raise ValueError(f"blocks[{i}] = {b} is already free (ref count 0)")
            ref[b] -= 1
        # Tail-first: the request's last block is evicted before its shareable prefix.
        prv, nxt, tail = self._prev, self._next, self._tail
        added = 0
        for b in reversed(ids):
            if ref[b] == 0 and nxt[b] < 0:
                last = prv[tail]
                nxt[last] = b
                prv[b] = last
                nxt[b] = tail
                prv[tail] = b
                added += 1
        self._num_free += added

    def touch(self, blocks: Sequence[int]) -> None:
        ids = self._block_ids(blocks, "blocks")
        for i, b in enumerate(ids):
            if self._retired[b]:
                raise ValueError(f"blocks[{i}] = {b} is retired")
        ref = self._ref
        for b in ids:
            if ref[b] == 0:
                self._unlink(b)
                self._num_free -= 1
            ref[b] += 1

    def lookup(self, hashes: Sequence[int]) -> list[int]:
        keys = _hashes(hashes, "hashes")
        cache = self._cache
        out = []
        for h in keys:
            b = cache.get(h)
            if b is None:
                break
            out.append(b)
        self._queries += len(keys)
        self._hits += len(out)
        return out

    def cache_blocks(self, blocks: Sequence[int], hashes: Sequence[int]) -> None:
        ids = self._block_ids(blocks, "blocks")
        keys = _hashes(hashes, "hashes")
        if len(ids) != len(keys):
            raise ValueError(
                f"blocks and hashes must have the same length, got {len(ids)} and {len(keys)}"
            )
        ref, block_hash, cache = self._ref, self._hash, self._cache
        for i, (b, h) in enumerate(zip(ids, keys, strict=True)):
            if ref[b] == 0:
                raise ValueError(
                    f"blocks[{i}] = {b} is free (ref count 0); cache a block while a request "
                    "holds it"
                )
            old = block_hash[b]
            if old is not None and old != h:
                raise ValueError(
                    f"blocks[{i}] = {b} is already cached under hash {old}, not hashes[{i}] = "
                    f"{h} (a full block's tokens never change)"
                )
        # The same block listed twice with two hashes is only seen while applying; undo
        # this call's entries before raising.
        added: list[int] = []
        for i, (b, h) in enumerate(zip(ids, keys, strict=True)):
            old = block_hash[b]
            if old is not None:
                if old == h:
                    continue
                for a in added:
                    del cache[block_hash[a]]  # type: ignore[index]
                    block_hash[a] = None
                raise ValueError(
                    f"blocks[{i}] = {b} appears earlier in blocks with hash {old}, not "
                    f"hashes[{i}] = {h}"
                )
            if h not in cache:  # a hash that already names another block leaves b uncached
                cache[h] = b
                block_hash[b] = h
                added.append(b)
        if self._events:
            for b in added:
                self._changes[block_hash[b]] = True  # type: ignore[index]

    def ref_count(self, block: int) -> int:
        return self._ref[self._block_id(block, "block")]

    def block_hash(self, block: int) -> int | None:
        return self._hash[self._block_id(block, "block")]

    def free_block_ids(self) -> list[int]:
        nxt, tail = self._next, self._tail
        out = []
        b = nxt[self._head]
        while b != tail:
            out.append(b)
            b = nxt[b]
        return out

    def reset_prefix_cache(self) -> bool:
        # Like vLLM: a block in use may be shared through its hash right now.
        if self._num_free + self._num_retired != self._n - 1:
            return False
        if self._events:
            for h in self._cache:
                self._changes[h] = False
        self._cache.clear()
        self._hash = [None] * self._n
        return True

    @property
    def num_retired_blocks(self) -> int:
        return self._num_retired

    def is_retired(self, block: int) -> bool:
        return self._retired[self._block_id(block, "block")]

    def retire(self, blocks: Sequence[int]) -> list[int]:
        ids = self._block_ids(blocks, "blocks")
        retired, ref = self._retired, self._ref
        for i, b in enumerate(ids):
            if retired[b]:
                raise ValueError(f"blocks[{i}] = {b} is already retired")
            if ref[b]:
                raise ValueError(
                    f"blocks[{i}] = {b} is in use (ref count {ref[b]}); retire only free blocks"
                )
        _check_distinct(ids)
        evicted = []
        for b in ids:
            retired[b] = True
            self._unlink(b)
            self._num_free -= 1
            h = self._hash[b]
            if h is not None:
                del self._cache[h]
                self._hash[b] = None
                evicted.append(h)
                if self._events:
                    self._changes[h] = False
        self._num_retired += len(ids)
        return evicted

    def set_events(self, on: bool) -> None:
        self._events = bool(on)
        if not on:
            self._changes.clear()

    def drain_events(self) -> tuple[list[int], list[int]]:
        added = sorted(h for h, present in self._changes.items() if present)
        evicted = sorted(h for h, present in self._changes.items() if not present)
        self._changes.clear()
        return added, evicted

    def cached_hashes(self) -> list[int]:
        return [h for h in self._hash if h is not None]

    def restore(self, blocks: Sequence[int]) -> None:
        ids = self._block_ids(blocks, "blocks")
        retired = self._retired
        for i, b in enumerate(ids):
            if not retired[b]:
                raise ValueError(f"blocks[{i}] = {b} is not retired")
        _check_distinct(ids)
        prv, nxt, head = self._prev, self._next, self._head
        for b in reversed(ids):  # linked at the head last first: ids[0] ends up first
            retired[b] = False
            first = nxt[head]
            prv[first] = b
            nxt[b] = first
            prv[b] = head
            nxt[head] = b
        self._num_free += len(ids)
        self._num_retired -= len(ids)

    def prefix_cache_stats(self, reset: bool = False) -> tuple[int, int]:
        stats = (self._queries, self._hits)
        if reset:
            self._queries = self._hits = 0
        return stats


# ---- the native pool, re-exported --------------------------------------------------

try:
    from xllm import _C as _native
except ImportError as exc:  # the scheduler must still import; fail on use instead
    _native = None
    _native_error: ImportError | None = exc
else:
    _native_error = None


def _missing_native() -> ImportError:
    err = ImportError(
        "xllm._C (the native module) could not be imported, so the native block pool and "
        f"block hash are unavailable ({_native_error}). Build it (pip install -e . or cmake "
        "--build), or use PyBlockPool / make_block_pool(..., native=False) and "
        "py_hash_block_tokens / py_block_hashes."
    )
    err.__cause__ = _native_error
    return err


if _native is not None:
    BlockPool = _native.BlockPool
    hash_block_tokens = _native.hash_block_tokens
    block_hashes = _native.block_hashes
else:

    class BlockPool:  # type: ignore[no-redef]
        """Stands in for the native pool when xllm._C is missing: raises on use."""

        def __init__(self, num_blocks: int) -> None:
            raise _missing_native()

    def hash_block_tokens(  # type: ignore[misc]
        parent_hash: int, token_ids: Sequence[int], extra: int = 0
    ) -> int:
        raise _missing_native()

    def block_hashes(  # type: ignore[misc]
        token_ids: Sequence[int], block_size: int, parent_hash: int = ROOT_HASH, extra: int = 0
    ) -> list[int]:
        raise _missing_native()


def confirm_chain(
    found: Sequence[int],
    content_of: Any,
    hashes: Sequence[int],
    parent: int,
    tokens: Sequence[int],
    start: int,
    block_size: int,
) -> int:
    """How many leading entries of ``found`` (the blocks or slots a lookup of ``hashes``
    returned) really hold that chain: ``content_of(entry)`` gives the (parent hash, token
    ids) stored with it, or None, and block ``i`` must hold ``tokens[start + i * bs :]``
    under ``parent`` (then ``hashes[i - 1]``). A 64-bit hash can collide; the tokens
    cannot."""
    n = 0
    for i, key in enumerate(found):
        entry = content_of(key)
        lo = start + i * block_size
        if entry is None or entry[0] != parent or entry[1] != tuple(tokens[lo : lo + block_size]):
            break
        parent = hashes[i]
        n += 1
    return n


def best_block_hashes():  # type: ignore[no-untyped-def]
    """The native chained hash; its bit-identical Python twin when xllm._C is missing."""
    try:
        block_hashes([], 1)
    except ImportError:
        return py_block_hashes
    return block_hashes


def make_block_pool(num_blocks: int, native: bool = True) -> BlockPoolProtocol:
    """The native pool (ImportError when xllm._C is missing), or the pure-Python twin."""
    return BlockPool(num_blocks) if native else PyBlockPool(num_blocks)
