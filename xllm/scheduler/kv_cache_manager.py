"""KVCacheManager: a request's KV blocks and the prefix cache, over the native block pool.

The scheduler sees result values only: the cached prefix of a request
(:class:`ComputedBlocks`), the blocks a step allocated, or ``None`` when the pool is short
(nothing changed; the scheduler preempts and retries). The pool's ids, ref counts and LRU
order stay inside :mod:`xllm.ops.block_pool`.

Prefix caching (vLLM v1): every *full* block of a request's tokens has a chained hash
(parent hash, block tokens), kept on the request and extended incrementally. After a step,
blocks that became full are registered with ``cache_blocks``; a new request's hashes are
looked up and the longest cached prefix is shared (ref count + 1) instead of recomputed.
The hit is capped at ``num_tokens - 1`` rounded down to a block boundary: the last token
must run through the model so there are logits to sample. A request asking for prompt
logprobs takes no hit until its prompt has been scored (it needs every position's logits);
its blocks are still registered for others.

Collisions: a 64-bit hash can collide, so each registered block's (parent hash, tokens) is
kept here by block id, and a hit is confirmed against the request's own tokens and parent
hash before it is used (O(hit tokens), once per admission). Entries are dropped when the
pool hands the block out again, so they always describe the block's current content.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from xllm.ops.block_pool import ROOT_HASH, BlockPoolProtocol, best_block_hashes, confirm_chain
from xllm.scheduler.request import Request

if TYPE_CHECKING:
    from xllm.kvcache.store import KVStore, TierHit

__all__ = ["ComputedBlocks", "KVCacheManager", "NO_COMPUTED_BLOCKS"]


@dataclass(frozen=True, slots=True)
class ComputedBlocks:
    """A cached prefix: pool blocks whose KV a request can share, then blocks a tier below
    the pool holds (loaded into new pool blocks at admission), and the tokens of both."""

    block_ids: tuple[int, ...]
    num_tokens: int
    tier_hits: tuple[TierHit, ...] = ()


NO_COMPUTED_BLOCKS = ComputedBlocks((), 0)


class KVCacheManager:
    """Allocates, shares, caches and frees requests' KV blocks. One owner (the scheduler's
    thread); a request's blocks live in ``request.block_ids`` in position order."""

    def __init__(
        self,
        block_pool: BlockPoolProtocol,
        block_size: int,
        enable_prefix_caching: bool = True,
        store: KVStore | None = None,
        window: int = 0,
    ) -> None:
        if type(block_size) is not int or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        if type(window) is not int or window < 0:
            raise ValueError(f"window must be an integer >= 0 (0: none), got {window!r}")
        self.pool = block_pool
        # The tiers below the pool (xllm.kvcache), when the engine has any.
        self.store = store if store is not None and store.tiers else None
        self.block_size = block_size
        # Every layer's sliding window (0: none): release_outside_window frees older blocks.
        self.window = window
        self.enable_prefix_caching = enable_prefix_caching
        self._num_usable = block_pool.num_blocks - 1
        self._hash = best_block_hashes()
        # block id -> (parent hash, token ids) of a block registered in the prefix cache.
        self._block_content: dict[int, tuple[int, tuple[int, ...]]] = {}
        # request id -> how many leading blocks of request.block_ids are registered.
        self._num_registered: dict[str, int] = {}
        # request id -> (its full blocks, their hashes): held for a peer (see hold()). Set
        # and cleared on the engine thread; read (never changed) by the gRPC servicer.
        self.holds: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self.queried_tokens = 0  # prefix-cache stats, counted once per admission
        self.hit_tokens = 0

    # ---- metrics ---------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Share of usable blocks held by requests (free cached blocks count as free)."""
        return 1.0 - self.pool.num_free_blocks / self._num_usable

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    # ---- prefix cache ------------------------------------------------------------------

    def _extend_hashes(self, request: Request, num_full_blocks: int) -> list[int]:
        """request.block_hashes covering at least num_full_blocks blocks (hashes only the new
        ones, in one native call)."""
        hashes = request.block_hashes
        have = len(hashes)
        if num_full_blocks > have:
            bs = self.block_size
            parent = hashes[-1] if have else ROOT_HASH
            tokens = request.all_token_ids[have * bs : num_full_blocks * bs]
            hashes.extend(self._hash(tokens, bs, parent))
        return hashes

    def get_computed_blocks(self, request: Request) -> ComputedBlocks:
        """The longest cached prefix of request's tokens that it may share: whole blocks,
        confirmed against its tokens, never reaching its last token. Changes no ref count
        (``allocate_slots`` takes the blocks)."""
        if not self.enable_prefix_caching:
            return NO_COMPUTED_BLOCKS
        if _runs_whole_prompt(request):
            # Prompt logprobs need the logits of every prompt position, mean pooling its hidden
            # states, and a cached block's positions are never run. (Once it has outputs, its
            # prompt was scored already.)
            return NO_COMPUTED_BLOCKS
        if self.store is not None and self.store.prefetching(request.request_id):
            self.store.wait_prefetch(request.request_id)  # its prefix is landing: take it
        bs = self.block_size
        max_blocks = (request.num_tokens - 1) // bs
        if max_blocks <= 0:
            return NO_COMPUTED_BLOCKS
        hashes = self._extend_hashes(request, max_blocks)
        return self.find_prefix(hashes[:max_blocks], request.all_token_ids)

    def find_prefix(self, hashes: list[int], tokens: list[int]) -> ComputedBlocks:
        """The longest leading part of the chain ``hashes`` (block ``i`` holding
        ``tokens[i * bs : (i + 1) * bs]``) held in the pool and then in the tiers, every
        block confirmed against its tokens. Changes no ref count."""
        bs = self.block_size
        max_blocks = len(hashes)
        hits = self.pool.lookup(hashes)
        if not hits and self.store is None:
            return NO_COMPUTED_BLOCKS
        n = confirm_chain(hits, self._block_content.get, hashes, ROOT_HASH, tokens, 0, bs)
        parent = hashes[n - 1] if n else ROOT_HASH
        store = self.store
        if store is not None and n < max_blocks:
            tier_hits = store.lookup(hashes[n:max_blocks], parent, tokens, n * bs)
            if tier_hits:
                m = sum(len(h.slots) for h in tier_hits)
                return ComputedBlocks(tuple(hits[:n]), (n + m) * bs, tuple(tier_hits))
        return ComputedBlocks(tuple(hits[:n]), n * bs)

    def prefetch(self, request: Request, min_free_blocks: int = 0) -> bool:
        """Starts loading the part of a waiting request's prefix that only the tiers hold
        into reserved pool blocks, while steps run; when it lands the blocks join the prefix
        cache, and the request's admission takes them as a pool hit (waiting for the load if
        it is still going). Only while the pool keeps ``min_free_blocks`` free beside it.
        Returns whether a prefetch started."""
        store = self.store
        if store is None or not self.enable_prefix_caching:
            return False
        if _runs_whole_prompt(request):
            return False
        bs = self.block_size
        max_blocks = (request.num_tokens - 1) // bs
        if max_blocks <= 0:
            return False
        hashes = self._extend_hashes(request, max_blocks)[:max_blocks]
        found = self.find_prefix(hashes, request.all_token_ids)
        if not found.tier_hits:
            return False
        start = len(found.block_ids)
        m = sum(len(h.slots) for h in found.tier_hits)
        if self.pool.num_free_blocks - m < min_free_blocks:
            return False
        blocks = self.reserve_blocks(m)
        if blocks is None:
            return False
        tokens = request.all_token_ids
        contents = [(hashes[i - 1] if i else ROOT_HASH, tuple(tokens[i * bs:(i + 1) * bs]))
                    for i in range(start, start + m)]
        chain = hashes[start:start + m]
        store.prefetch(request.request_id, found.tier_hits, blocks,
                       lambda ok: self.adopt_blocks(blocks, chain, contents, ok))
        return True

    # ---- holds: a finished prefill's blocks kept for a decode instance -------------------

    def hold(self, request: Request, keep_rest: bool = False) -> None:
        """Instead of freeing a finished request's blocks: keeps its registered (full)
        blocks pinned under its id, with their hashes, for a peer to fetch
        (:attr:`holds`, readable from other threads); frees the rest -- or, with
        ``keep_rest``, leaves them to the request for a later free() (a step in flight
        still writes them)."""
        registered = self._num_registered.pop(request.request_id, 0)
        blocks = request.block_ids
        if request.num_released_blocks:
            # Its head left the pool with the sliding window: a peer could not take the prefix
            # from its start, so nothing is held (a decode instance recomputes).
            registered = 0
            blocks = blocks[request.num_released_blocks:]
            request.num_released_blocks = 0
        if blocks[registered:] and not keep_rest:
            self.pool.free(blocks[registered:])
        if registered:
            self.holds[request.request_id] = (tuple(blocks[:registered]),
                                              tuple(request.block_hashes[:registered]))
        request.block_ids = blocks[registered:] if keep_rest else []

    def release_hold(self, request_id: str) -> bool:
        """Lets go of a hold: its blocks join the free list (still cached)."""
        entry = self.holds.pop(request_id, None)
        if entry is None:
            return False
        self.pool.free(list(entry[0]))
        return True

    # ---- blocks from outside (a peer instance) --------------------------------------------

    def reserve_blocks(self, n: int) -> list[int] | None:
        """n free blocks held outside any request (ref count 1), to be filled from a peer
        and then adopted; None when the pool is short."""
        blocks = self.pool.allocate(n)
        if blocks is None:
            return None
        content = self._block_content
        for b in blocks:
            content.pop(b, None)
        if self.store is not None:
            self.store.claim(blocks)
        return blocks

    def adopt_blocks(self, blocks: list[int], hashes: list[int],
                     contents: list[tuple[int, tuple[int, ...]]], num_filled: int) -> None:
        """Registers the first num_filled reserved blocks (filled and checked) in the prefix
        cache under their hashes and content, and frees all of them: the filled ones stay
        cached (a request for this prompt takes them as a pool hit), the rest are empty."""
        if num_filled and self.enable_prefix_caching:
            content = self._block_content
            for b, entry in zip(blocks[:num_filled], contents, strict=False):
                content[b] = entry
            self.pool.cache_blocks(blocks[:num_filled], hashes[:num_filled])
        if blocks:
            self.pool.free(blocks)  # tail first into the free list: the head evicted last

    def load_tier_hits(self, request: Request, computed: ComputedBlocks) -> int:
        """Loads computed's tier hits into the blocks allocate_slots gave request after its
        pool hits; returns the prefix tokens now in the pool (fewer than computed.num_tokens
        when a block failed its checksum: the rest is recomputed)."""
        if not computed.tier_hits:
            return computed.num_tokens
        assert self.store is not None
        start = len(computed.block_ids)
        m = sum(len(h.slots) for h in computed.tier_hits)
        loaded = self.store.load(computed.tier_hits, request.block_ids[start:start + m])
        self.hit_tokens -= (m - loaded) * self.block_size  # counted in full at admission
        return (start + loaded) * self.block_size

    def cache_full_blocks(self, requests: Iterable[Request]) -> None:
        """Registers the blocks that became full of computed tokens since the last call, for
        all requests at once (one native call). Call after a step, while they hold them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        registered = self._num_registered
        content = self._block_content
        blocks: list[int] = []
        hashes: list[int] = []
        for request in requests:
            num_full = request.num_computed_tokens // bs
            done = max(registered.get(request.request_id, 0), request.num_released_blocks)
            if num_full <= done:
                continue
            req_hashes = self._extend_hashes(request, num_full)
            tokens = request.all_token_ids
            ids = request.block_ids
            parent = req_hashes[done - 1] if done else ROOT_HASH
            for i in range(done, num_full):
                content[ids[i]] = (parent, tuple(tokens[i * bs : (i + 1) * bs]))
                parent = req_hashes[i]
            blocks.extend(ids[done:num_full])
            hashes.extend(req_hashes[done:num_full])
            registered[request.request_id] = num_full
        if blocks:
            self.pool.cache_blocks(blocks, hashes)

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached block; refused (False) while any block is in use."""
        if not self.pool.reset_prefix_cache():
            return False
        self._block_content.clear()
        return True

    # ---- allocation --------------------------------------------------------------------

    def _num_new_blocks(
        self, request: Request, num_new_tokens: int, computed: ComputedBlocks
    ) -> int:
        total = (request.num_computed_tokens + request.num_inflight_tokens + computed.num_tokens
                 + num_new_tokens)
        held = len(request.block_ids) + len(computed.block_ids)
        return max(0, -(-total // self.block_size) - held)

    def num_blocks_needed(
        self,
        request: Request,
        num_new_tokens: int,
        computed: ComputedBlocks = NO_COMPUTED_BLOCKS,
    ) -> int:
        """Free blocks that allocate_slots would consume: new blocks, plus the prefix-hit
        blocks that sit (cached, unused) in the free list."""
        evictable = sum(1 for b in computed.block_ids if self.pool.ref_count(b) == 0)
        return self._num_new_blocks(request, num_new_tokens, computed) + evictable

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed: ComputedBlocks | None = None,
    ) -> list[int] | None:
        """Makes request.block_ids cover num_computed_tokens + num_inflight_tokens (+ the
        prefix hit) + num_new_tokens tokens. ``computed`` (from get_computed_blocks) is given
        exactly once, when a waiting request is admitted: its blocks are shared (ref count +
        1) and the admission counts in the prefix-cache stats. Returns the newly allocated
        block ids, or None -- with nothing changed -- when the pool has too few free blocks."""
        if type(num_new_tokens) is not int or num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be an integer >= 0, got {num_new_tokens!r}")
        admission = computed is not None
        if computed is None:
            computed = NO_COMPUTED_BLOCKS
        elif computed.block_ids and request.block_ids:
            raise ValueError(
                f"computed blocks can only start a request that holds no blocks; request "
                f"{request.request_id!r} holds {len(request.block_ids)}"
            )
        hits = computed.block_ids
        num_new = self._num_new_blocks(request, num_new_tokens, computed)
        pool = self.pool
        # Fast path: fits even if every hit block had to come off the free list; only when
        # tight ask the pool which hit blocks are free (one call per hit block).
        if num_new + len(hits) > pool.num_free_blocks:
            if self.num_blocks_needed(request, num_new_tokens, computed) > pool.num_free_blocks:
                return None
        if hits:
            pool.touch(hits)
            request.block_ids.extend(hits)
            self._num_registered[request.request_id] = len(hits)
        new_blocks = pool.allocate(num_new) if num_new else []
        if new_blocks is None:  # cannot happen after the check above; never leave a half state
            if hits:
                pool.free(hits)
                del request.block_ids[-len(hits) :]
            raise RuntimeError("block pool refused an allocation it had room for")
        if new_blocks:
            content = self._block_content
            for b in new_blocks:  # the pool evicted whatever b held: forget its content
                content.pop(b, None)
            if self.store is not None:
                self.store.claim(new_blocks)
            request.block_ids.extend(new_blocks)
        if admission:
            self.queried_tokens += request.num_tokens
            self.hit_tokens += computed.num_tokens
        return new_blocks

    def free(self, request: Request, preempted: bool = False) -> None:
        """Returns request's blocks to the pool at once, last block first (so its tail is
        evicted before its shareable prefix); they stay in the prefix cache until reused.
        With tiers below the pool, its full blocks are written down first (in the background)
        -- for a preempted request only when that costs less than recomputing them (a swap:
        its readmission then loads them as a prefix hit)."""
        registered = self._num_registered.pop(request.request_id, 0)
        if request.num_released_blocks:  # the head is gone (sliding window): no tier write
            del request.block_ids[:request.num_released_blocks]
            request.num_released_blocks = 0
            registered = 0
        if request.block_ids:
            store = self.store
            if store is not None and registered and preempted:
                if store.swap_cheaper(registered, registered * self.block_size):
                    store.num_swapped += 1
                else:
                    store.num_recomputed += 1
                    registered = 0
            if store is not None and registered:
                # Written down to the tiers before the pool can evict them (in the background).
                blocks = request.block_ids[:registered]
                content = self._block_content
                store.offer(blocks, request.block_hashes[:registered],
                            [content[b] for b in blocks])
            self.pool.free(request.block_ids)
            request.block_ids = []


    def release_outside_window(self, request: Request) -> int:
        """Gives back request's blocks that lie wholly before every key its next queries can
        see (a query at position p sees (p - window, p], and the next one is at
        num_computed_tokens or later); their entries in block_ids become the null block 0,
        which the attention kernels never read there. They stay in the prefix cache until
        reused. Returns how many were released."""
        if not self.window:
            return 0
        first_key = request.num_computed_tokens - self.window + 1
        n = min(first_key // self.block_size, len(request.block_ids)) if first_key > 0 else 0
        done = request.num_released_blocks
        if n <= done:
            return 0
        ids = request.block_ids
        self.pool.free(ids[done:n])
        ids[done:n] = [0] * (n - done)
        request.num_released_blocks = n
        return n - done


def _runs_whole_prompt(request: Request) -> bool:
    """Whether every prompt position must run (no prefix-cache hit): prompt logprobs and
    mean pooling need each position's output, until the request has sampled."""
    p = request.sampling_params
    return (p.prompt_logprobs is not None or p.pooling == "mean") and not request.output_token_ids
