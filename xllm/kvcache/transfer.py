"""KV blocks between instances (the FetchBlocks RPC of instance.proto).

**Server side** (:func:`export_blocks`, holding the engine's scheduler state -- between
steps, or beside one while its model computes: ``AsyncEngine.call_beside_step`` -- so
nothing moves the blocks while they are read): finds the longest leading part of the
requested chain it holds -- in its pool, then its tiers, each block confirmed against the
tokens, as its own prefix cache does -- and either writes the blocks straight into the
client's KV memory (same host: the client's memfd mapped through ``/proc/<pid>/fd/<fd>``;
one copy, from the pool with :func:`xllm._C.kv_copy_blocks`, from the CPU tier checked on
the way, from disk by ``preadv``), or pins them and gathers them chunk by chunk as the
stream goes (gRPC).

**Client side** (:func:`plan_fetch`, :func:`receive_chunk`, :func:`finish_fetch`):
holding the engine's scheduler state (beside a computing step), it reserves pool blocks
for the part of the prompt the peer has and this instance lacks, when fetching costs less
than recomputing (bytes over the measured transfer rate, plus a round trip, against tokens
over the measured prompt speed); the chunks are checked as they land (streamed: checked
while copied in; same host: the checksums the server computed, against the blocks in
place); then (beside the step again) it adopts the leading blocks that arrived whole into
the prefix cache and frees the rest. The request that follows takes them as an ordinary
pool hit. A peer that dies, stalls or sends a bad block costs only the blocks after it:
they are recomputed.
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass, field
from typing import Any

from xllm import _C
from xllm.kvcache.memory import PeerMemory
from xllm.kvcache.parts import PartsUnavailable
from xllm.kvcache.store import KVStore
from xllm.kvcache.tiers import DiskTier
from xllm.ops.block_pool import ROOT_HASH, best_block_hashes

__all__ = ["Export", "FetchPlan", "export_blocks", "export_held", "finish_fetch", "gather_chunk",
           "locate_held", "plan_fetch", "pull_blocks", "receive_chunk", "release_export"]

_hash = best_block_hashes()
MIN_FETCH_BLOCKS = 2  # fewer are cheaper to recompute than to ask for
ROUND_TRIP_S = 0.002  # an RPC's fixed cost in the fetch-or-recompute comparison
DEFAULT_RATES = {"shm": 4e9, "grpc": 1e9, "mooncake": 1e9}  # bytes/s until measured


# ---- the server ---------------------------------------------------------------------------


@dataclass
class Export:
    """What the server holds of a requested chain: ``count`` blocks from ``first``. Same
    host: already written into the client's memory, with their ``checksums``. Streamed:
    ``sources`` are pinned (pool blocks and tier slots held, so nothing reuses them) and
    :func:`gather_chunk` reads them chunk by chunk while earlier chunks travel;
    :func:`release_export` unpins them (on the engine thread) when the stream ends."""

    first: int
    count: int
    checksums: list[int]
    sources: list[tuple[Any, int]] | None = None  # streamed: (place, id) per block
    own_pins: bool = False  # the export pinned its sources (else a hold keeps them)


Parts = list[tuple[int, int, int]]  # (pid, memfd, region bytes) of each part of a KV memory


def map_parts(store: KVStore, parts: Parts) -> tuple[list[object], list[int]]:
    """Another instance's KV memory on this host, mapped here: the mappings (kept referenced
    while copying) and its regions, every part's in rank order, as ``store.regions`` lists
    this instance's. OSError when a part cannot be mapped or the parts are not this
    layout's."""
    c = store.config
    if len(parts) != c.distinct_parts:
        raise OSError(f"a KV memory of {len(parts)} parts; this layout has {c.distinct_parts}")
    return PeerMemory.parts(parts, c.part_regions)


def export_blocks(engine: Any, hashes: list[int], tokens: list[int], first: int,
                  layout: str, shm: tuple[Parts, list[int]] | None) -> Export:
    """With the engine's scheduler state (see plan_fetch). ``hashes``: the chain from the
    prompt's first block; ``first``: where the client's wanted part starts; ``shm``: where
    the client's KV memory is (its parts) and the client blocks to fill, for the same-host
    path. A layout mismatch exports nothing."""
    store: KVStore = engine.kv_store
    export = _export(engine, store, hashes, tokens, first, layout, shm)
    store.peer_blocks_served += export.count
    return export


def _export(engine: Any, store: KVStore, hashes: list[int], tokens: list[int], first: int,
            layout: str, shm: tuple[Parts, list[int]] | None) -> Export:
    kv = engine.scheduler.kv
    if layout != store.layout_key() or first >= len(hashes) or not store.whole:
        return Export(first, 0, [])
    found = kv.find_prefix(hashes, tokens)
    held = found.num_tokens // kv.block_size
    if held <= first:
        return Export(first, 0, [])
    # (source, index) per wanted block: ("pool", block) or (tier, slot)
    sources: list[tuple[Any, int]] = [("pool", b) for b in found.block_ids]
    for hit in found.tier_hits:
        sources.extend((hit.tier, s) for s in hit.slots)
    sources = sources[first:held]
    shipped = _ship(store, sources, first, shm)
    if shipped is not None:
        return shipped
    _pin(engine, sources, +1)
    return Export(first, len(sources), [], sources, own_pins=True)


def _ship(store: KVStore, sources: list[tuple[Any, int]], first: int,
          shm: tuple[Parts, list[int]] | None) -> Export | None:
    """Same host: the sources written straight into the client's memory (every part of it,
    under tensor parallelism); None when there is no such client or its memory cannot be
    mapped (permissions, gone): stream instead."""
    if shm is None:
        return None
    parts, dst_blocks = shm
    try:
        mappings, dst = map_parts(store, parts)
    except OSError:
        return None
    export = _export_shm(store, sources[:len(dst_blocks)], dst, dst_blocks, first)
    del mappings  # referenced until the copy is done
    return export


def _held_blocks(held: tuple[tuple[int, ...], tuple[int, ...]], hashes: list[int],
                 first: int) -> list[int]:
    """The held blocks of ``hashes`` from ``first``: as far as the hold's chain matches."""
    blocks, held_hashes = held
    n = 0
    limit = min(len(blocks), len(hashes))
    while n < limit and held_hashes[n] == hashes[n]:
        n += 1
    return list(blocks[first:n])


def locate_held(store: KVStore, held: tuple[tuple[int, ...], tuple[int, ...]],
                hashes: list[int], first: int, layout: str) -> list[int]:
    """The held blocks a same-host client may copy itself (pull): those of ``hashes``
    from ``first`` that match the hold's chain, in order ([] on a layout mismatch, or
    where this memory's parts are not known: store.memory_parts)."""
    if layout != store.layout_key() or store.memory_parts() is None:
        return []
    out = _held_blocks(held, hashes, first)
    store.peer_blocks_served += len(out)
    return out


def export_held(store: KVStore, held: tuple[tuple[int, ...], tuple[int, ...]],
                hashes: list[int], first: int, layout: str,
                shm: tuple[Parts, list[int]] | None) -> Export:
    """Like :func:`export_blocks`, from a finished prefill's held blocks (pinned until the
    hold is released), without the engine thread: any thread, so a busy prefill instance
    serves its decode instance at once. The chain must match the held hashes."""
    if layout != store.layout_key() or not store.whole:
        return Export(first, 0, [])
    sources: list[tuple[Any, int]] = [("pool", b) for b in _held_blocks(held, hashes, first)]
    if not sources:
        return Export(first, 0, [])
    export = _ship(store, sources, first, shm) or Export(first, len(sources), [], sources)
    store.peer_blocks_served += export.count
    return export


def _pin(engine: Any, sources: list[tuple[Any, int]], sign: int) -> None:
    """Holds (+1) or lets go of (-1) the sources' pool blocks and tier slots."""
    for place, ids, _ in _runs(sources):
        index = engine.scheduler.kv.pool if place == "pool" else place.index
        (index.touch if sign > 0 else index.free)(ids)


def release_export(engine: Any, export: Export) -> None:
    """With the engine's scheduler state, once a streamed export is over (finished or
    abandoned)."""
    if export.sources and export.own_pins:
        _pin(engine, export.sources, -1)
    export.sources = None


def _runs(sources: list[tuple[Any, int]]) -> list[tuple[Any, list[int], int]]:
    """Consecutive sources from one place as (place, ids, offset in the chain part)."""
    runs: list[tuple[Any, list[int], int]] = []
    for i, (place, index) in enumerate(sources):
        if runs and runs[-1][0] is place:
            runs[-1][1].append(index)
        else:
            runs.append((place, [index], i))
    return runs


def _export_shm(store: KVStore, sources: list[tuple[Any, int]], dst: list[int],
                dst_blocks: list[int], first: int) -> Export:
    seg = store.config.segments_arg
    step = store.chunk_blocks
    sums: list[int] = []
    for place, ids, at in _runs(sources):
        target = dst_blocks[at:at + len(ids)]
        if place == "pool":
            try:
                for k in range(0, len(ids), step):
                    regions, src = store.readable(ids[k:k + step])
                    sums.extend(_C.kv_copy_blocks(regions, src, dst, target[k:k + step], seg))
            except PartsUnavailable:
                break
            continue
        checks = [place.checksums[s] for s in ids]
        if isinstance(place, DiskTier):
            ok, _ = place.read_blocks(ids, dst, seg, target)
        else:
            ok = _C.kv_scatter_blocks(place.address, place.slot_bytes, ids, checks, dst, seg,
                                      target)
        sums.extend(checks[:ok])
        if ok < len(ids):
            break
    return Export(first, len(sums), sums)


def gather_chunk(store: KVStore, export: Export, start: int, count: int
                 ) -> tuple[list[int], bytes]:
    """Blocks ``start .. start + count`` of a streamed export (pinned: any thread), back to
    back, with their checksums (computed for pool blocks, stored for tier slots: the client
    checks them). Ends early at a tier read that fails, and at once when the engine is
    closing."""
    with store.off_thread_copy() as allowed:
        if not allowed:
            return [], b""
        try:
            return _gather(store, export, start, count)
        except PartsUnavailable:  # a remote rank's part of a pool block: the stream ends
            return [], b""


def _gather(store: KVStore, export: Export, start: int, count: int
            ) -> tuple[list[int], bytes]:
    assert export.sources is not None
    cfg = store.config
    nbytes = cfg.block_bytes
    sources = export.sources[start:start + count]
    whole = len(sources) <= store.chunk_blocks
    if whole and all(place == "pool" for place, _ in sources):  # the usual chunk: one pass
        regions, ids = store.readable([b for _, b in sources])
        data_bytes, pool_sums = _C.kv_gather_bytes(regions, cfg.segments_arg, ids)
        return pool_sums, data_bytes
    data = bytearray(len(sources) * nbytes)
    base = ctypes.addressof(ctypes.c_char.from_buffer(data)) if data else 0
    sums: list[int] = []
    for place, ids, at in _runs(sources):
        if place == "pool":
            for k in range(0, len(ids), store.chunk_blocks):
                part = ids[k:k + store.chunk_blocks]
                regions, src = store.readable(part)
                sums.extend(_C.kv_gather_blocks(regions, cfg.segments_arg, src, base, nbytes,
                                                list(range(at + k, at + k + len(part)))))
            continue
        done = 0
        for k, slot in enumerate(ids):
            if isinstance(place, DiskTier):
                dst = memoryview(data)[(at + k) * nbytes:(at + k + 1) * nbytes]
                try:
                    if os.preadv(place.fd, [dst], slot * place.slot_bytes) != nbytes:
                        break
                except OSError:
                    break
            else:
                ctypes.memmove(base + (at + k) * nbytes, place.address + slot * place.slot_bytes,
                               nbytes)
            done += 1
        sums.extend(place.checksums[s] for s in ids[:done])
        if done < len(ids):
            break
    return sums, bytes(memoryview(data)[:len(sums) * nbytes])


# ---- the client ---------------------------------------------------------------------------


def leading_matches(have: list[int], want: list[int]) -> int:
    """How many leading checksums agree (a fetch lands blocks up to the first that does not)."""
    return next((i for i, (a, b) in enumerate(zip(have, want, strict=True)) if a != b),
                len(want))


@dataclass
class FetchPlan:
    """A fetch this instance decided on: the chain, where its wanted part starts, and the
    reserved blocks that part lands in."""

    hashes: list[int]
    tokens: list[int]
    first: int
    blocks: list[int]
    layout: str
    shm: Parts | None  # where this instance's KV memory is (the same-host path), its parts
    filled: int = 0  # leading blocks arrived whole so far
    started: float = field(default_factory=time.perf_counter)  # reset when the copy starts

    @property
    def contents(self) -> list[tuple[int, tuple[int, ...]]]:
        bs = len(self.tokens) // len(self.hashes)
        out = []
        for i in range(self.first, self.first + len(self.blocks)):
            parent = self.hashes[i - 1] if i else ROOT_HASH
            out.append((parent, tuple(self.tokens[i * bs:(i + 1) * bs])))
        return out


def plan_fetch(engine: Any, prompt: list[int], peer_blocks: int, same_host: bool,
               force: bool = False, mooncake: bool = False) -> FetchPlan | None:
    """With the engine's scheduler state (on its thread, or beside a computing step:
    AsyncEngine.call_beside_step). Reserves pool blocks for the prompt blocks the peer holds
    beyond what this instance finds locally, when fetching them costs less than
    recomputing them (``force``: whatever the costs -- a decode instance taking over a
    prefill instance's request must not prefill it again; ``mooncake``: another host's
    blocks come over the Mooncake transfer engine, priced at its rate); None when it does
    not (or the pool is short)."""
    store: KVStore = engine.kv_store
    kv = engine.scheduler.kv
    if not kv.enable_prefix_caching or not store.whole:
        return None
    bs = kv.block_size
    wanted = min(peer_blocks, (len(prompt) - 1) // bs)
    if wanted < MIN_FETCH_BLOCKS:
        return None
    tokens = prompt[:wanted * bs]
    hashes = _hash(tokens, bs)
    local = kv.find_prefix(hashes, tokens).num_tokens // bs
    n = wanted - local
    if n < MIN_FETCH_BLOCKS:
        return None
    shm = store.memory_parts() if same_host else None
    if shm is not None:
        path = "shm"
    else:
        path = "mooncake" if mooncake else "grpc"
    rate = store.peer_bps.get(path) or DEFAULT_RATES[path]
    fetch_s = ROUND_TRIP_S + n * store.config.block_bytes / rate
    prefill = store.prefill_tps
    if not force and prefill is not None and fetch_s >= n * bs / prefill:
        return None
    blocks = kv.reserve_blocks(n)
    if blocks is None:
        return None
    return FetchPlan(hashes, tokens, local, blocks, store.layout_key(), shm)


def pull_blocks(store: KVStore, plan: FetchPlan, first: int, peer: Parts,
                blocks: list[int]) -> bool:
    """Same host, a held prefill: copies the peer's blocks (its memfds mapped here) into the
    reserved blocks, on this instance's core (any thread: the peer holds them pinned until
    released, the targets are reserved). Returns whether all arrived."""
    at = first - plan.first
    if at != plan.filled or at + len(blocks) > len(plan.blocks):
        return False
    try:
        mappings, src = map_parts(store, peer)
    except OSError:
        return False
    seg, step = store.config.segments_arg, store.chunk_blocks
    with store.off_thread_copy() as allowed:
        if not allowed:  # the engine is closing: its memory is going away
            return False
        for k in range(0, len(blocks), step):
            part = blocks[k:k + step]
            landed = store.land(plan.blocks[at + k:at + k + len(part)],
                                lambda regions, ids, part=part: len(
                                    _C.kv_copy_blocks(src, part, regions, ids, seg)),
                                replicate=False)  # (finish_fetch does)
            plan.filled += landed
            if landed < len(part):
                return False
    del mappings  # referenced until the copy is done
    return True


def receive_chunk(store: KVStore, plan: FetchPlan, first: int, count: int,
                  checksums: list[int], data: bytes, verify_in_place: bool = False) -> bool:
    """Lands one chunk (any thread: the blocks are reserved). Streamed bytes are checked
    while copied in; same-host blocks (no bytes: the peer wrote them) only when
    ``verify_in_place``. Returns whether every block of the chunk arrived whole (the fetch
    stops at the first that did not)."""
    with store.off_thread_copy() as allowed:
        return allowed and _receive(store, plan, first, count, checksums, data,
                                    verify_in_place)


def _receive(store: KVStore, plan: FetchPlan, first: int, count: int,
             checksums: list[int], data: bytes, verify_in_place: bool) -> bool:
    at = first - plan.first
    if at != plan.filled or count != len(checksums) or at + count > len(plan.blocks):
        return False
    targets = plan.blocks[at:at + count]
    seg = store.config.segments_arg
    if data:
        nbytes = store.config.block_bytes
        if len(data) != count * nbytes:
            return False
        # The bytes object's own buffer (read only here; no copy); data stays referenced.
        base = ctypes.cast(ctypes.c_char_p(bytes(data) if not isinstance(data, bytes)
                                           else data), ctypes.c_void_p).value
        ok, step = 0, store.chunk_blocks
        for k in range(0, count, step):
            n = min(step, count - k)
            landed = store.land(targets[k:k + n], lambda regions, ids, k=k, n=n:
                                _C.kv_scatter_blocks(base, nbytes, list(range(k, k + n)),
                                                     checksums[k:k + n], regions, seg, ids),
                                replicate=False)  # (finish_fetch does)
            ok += landed
            if landed < n:
                break
    elif verify_in_place:  # (same host: the store reaches every part in place)
        ok = leading_matches(_C.kv_blocks_checksums(store.regions, seg, targets), checksums)
    else:
        # Same host: the peer copied these in with one pass that summed them (tier blocks
        # checked against their stored checksums as they were read); re-reading them here
        # would cost as much as the copy, for a copy that never left memory.
        ok = count
    plan.filled += ok
    return ok == count


def finish_fetch(engine: Any, plan: FetchPlan, path: str) -> int:
    """With the engine's scheduler state: adopts the blocks that arrived whole, frees the
    rest; returns how many were adopted, and folds the transfer's rate (from the copy's
    start, not the plan's) into the store's measurements."""
    store: KVStore = engine.kv_store
    # (parts that are replicas get the bytes too; none arrived if a remote one could not)
    n = store.replicate(plan.blocks[:plan.filled]) if store.config.replicated else plan.filled
    engine.scheduler.kv.adopt_blocks(plan.blocks, plan.hashes[plan.first:], plan.contents, n)
    seconds = time.perf_counter() - plan.started
    if n:
        store.observe_peer(path, n * store.config.block_bytes, seconds)
    store.peer_blocks_fetched += n
    store.peer_blocks_by_path[path] = store.peer_blocks_by_path.get(path, 0) + n
    store.peer_fetches += 1
    store.peer_fetch_seconds += seconds
    return n
