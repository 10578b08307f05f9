"""KVCacheManager: exact block ids for allocation and prefix hits, the num_tokens - 1 cap,
hit confirmation against tokens (injected collisions), allocation failure as a value with no
side effects, tail-first free, and prefix-cache stats, on the native pool and its twin."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from xllm.ops import block_pool as bp
from xllm.sampling_params import SamplingParams
from xllm.scheduler import NO_COMPUTED_BLOCKS, ComputedBlocks, KVCacheManager, Request

BS = 4
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["native", "python"])
def make(request: pytest.FixtureRequest) -> Callable[..., KVCacheManager]:
    native = request.param == "native"

    def build(num_blocks: int, prefix: bool = True) -> KVCacheManager:
        return KVCacheManager(bp.make_block_pool(num_blocks, native=native), BS, prefix)

    return build


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=8))


def admit(kv: KVCacheManager, r: Request) -> ComputedBlocks:
    """What the scheduler does for a waiting request: look up, take the hit, compute the rest."""
    hit = kv.get_computed_blocks(r)
    assert kv.allocate_slots(r, r.num_tokens - hit.num_tokens, hit) is not None
    r.num_computed_tokens = r.num_tokens
    kv.cache_full_blocks([r])
    return hit


def pool_state(kv: KVCacheManager) -> tuple:
    pool = kv.pool
    ids = range(1, pool.num_blocks)
    return (
        pool.free_block_ids(),
        [pool.ref_count(b) for b in ids],
        [pool.block_hash(b) for b in ids],
        kv.queried_tokens,
        kv.hit_tokens,
    )


def test_allocation_exact_ids_and_growth(make: Callable[..., KVCacheManager]) -> None:
    kv = make(8)
    r = req("a", list(range(10)))
    assert kv.allocate_slots(r, 10) == [1, 2, 3]
    r.num_computed_tokens = 10
    assert kv.allocate_slots(r, 1) == []  # position 10 still fits in block 3
    r.num_computed_tokens = 12
    assert kv.allocate_slots(r, 1) == [4]
    assert r.block_ids == [1, 2, 3, 4]
    assert kv.usage == pytest.approx(4 / 7)


def test_prefix_hit_exact_blocks_and_partial_tail_not_shared(
    make: Callable[..., KVCacheManager],
) -> None:
    kv = make(10)
    prompt = list(range(100, 110))  # 10 tokens: 2 full blocks + a partial one
    a = req("a", prompt)
    assert admit(kv, a) == NO_COMPUTED_BLOCKS
    assert a.block_ids == [1, 2, 3]
    assert a.block_hashes == bp.py_block_hashes(prompt, BS)
    b = req("b", prompt)
    hit = admit(kv, b)
    assert hit == ComputedBlocks((1, 2), 8)
    assert b.block_ids == [1, 2, 4]  # the partial tail block is b's own
    assert [kv.pool.ref_count(x) for x in (1, 2, 3, 4)] == [2, 2, 1, 1]
    assert (kv.queried_tokens, kv.hit_tokens) == (20, 8)
    assert kv.prefix_cache_hit_rate == pytest.approx(0.4)


def test_hit_capped_below_last_token(make: Callable[..., KVCacheManager]) -> None:
    kv = make(10)
    prompt = list(range(8))  # exactly 2 full blocks
    admit(kv, req("a", prompt))
    # The whole prompt is cached, but the last token must run through the model.
    assert kv.get_computed_blocks(req("b", prompt)) == ComputedBlocks((1,), 4)
    assert kv.get_computed_blocks(req("c", prompt + [99])) == ComputedBlocks((1, 2), 8)
    assert kv.get_computed_blocks(req("d", prompt[:4])) == NO_COMPUTED_BLOCKS
    assert kv.get_computed_blocks(req("e", [0, 1, 2, 9, 4, 5, 6, 7, 8])) == NO_COMPUTED_BLOCKS


def test_hit_on_free_cached_blocks_revives_them(make: Callable[..., KVCacheManager]) -> None:
    kv = make(6)
    prompt = list(range(13))
    a = req("a", prompt)
    admit(kv, a)
    assert a.block_ids == [1, 2, 3, 4]
    kv.free(a)
    assert kv.pool.free_block_ids() == [5, 4, 3, 2, 1]  # tail first: a's last block goes first
    b = req("b", prompt)
    assert admit(kv, b) == ComputedBlocks((1, 2, 3), 12)
    assert b.block_ids == [1, 2, 3, 5]
    assert kv.pool.free_block_ids() == [4]


def test_allocation_failure_changes_nothing(make: Callable[..., KVCacheManager]) -> None:
    kv = make(6)  # 5 usable
    prompt = list(range(13))  # 4 blocks
    a = req("a", prompt)
    admit(kv, a)
    kv.free(a)
    other = req("x", [7] * 4)
    assert kv.allocate_slots(other, 4) == [5]  # the one uncached free block
    # b would share 3 free cached blocks and need 1 more: 4 free blocks wanted, 4 free.
    before = pool_state(kv)
    b = req("b", prompt + [1, 2, 3, 4])  # 17 tokens: 3-block hit + 2 new blocks = 5 > 4
    hit = kv.get_computed_blocks(b)
    assert hit == ComputedBlocks((1, 2, 3), 12)
    assert kv.num_blocks_needed(b, 5, hit) == 5
    assert kv.allocate_slots(b, 5, hit) is None
    assert pool_state(kv) == before
    assert b.block_ids == []
    c = req("c", prompt)
    hit = kv.get_computed_blocks(c)
    assert kv.num_blocks_needed(c, 1, hit) == 4
    assert kv.allocate_slots(c, 1, hit) == [4]  # the evicted block's slot, hits revived


def test_collision_rejected_by_token_check(make: Callable[..., KVCacheManager]) -> None:
    """Make the pool answer a lookup with a block holding other tokens (what a 64-bit hash
    collision looks like) and check the hit is refused."""
    kv = make(10)
    a = req("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    admit(kv, a)  # blocks 1, 2 cached under a's hashes
    b = req("b", [1, 2, 3, 4, 50, 60, 70, 80, 9])
    hb = bp.py_block_hashes(b.all_token_ids, BS)
    # Pretend b's second block hashed like a's block 2 would: cache a spare block (holding
    # a's tokens) under b's hash.
    spare = req("s", [5, 6, 7, 8, 0])
    kv.allocate_slots(spare, 5)
    kv.pool.cache_blocks([spare.block_ids[0]], [hb[1]])
    kv._block_content[spare.block_ids[0]] = (hb[0], (5, 6, 7, 8))
    assert kv.pool.lookup(hb[:2]) == [1, spare.block_ids[0]]
    assert kv.get_computed_blocks(b) == ComputedBlocks((1,), 4)
    # Same tokens but a different parent hash: refused too.
    kv._block_content[spare.block_ids[0]] = (12345, (50, 60, 70, 80))
    assert kv.get_computed_blocks(b) == ComputedBlocks((1,), 4)
    kv._block_content[spare.block_ids[0]] = (hb[0], (50, 60, 70, 80))
    assert kv.get_computed_blocks(b) == ComputedBlocks((1, spare.block_ids[0]), 8)


def test_reused_block_forgets_old_content(make: Callable[..., KVCacheManager]) -> None:
    kv = make(4)  # 3 usable
    a = req("a", list(range(9)))
    admit(kv, a)
    kv.free(a)
    assert set(kv._block_content) == {1, 2}
    x = req("x", [5] * 12)
    assert kv.allocate_slots(x, 12) == [3, 2, 1]  # evicts a's cached blocks
    assert kv._block_content == {}
    assert kv.get_computed_blocks(req("b", list(range(9)))) == NO_COMPUTED_BLOCKS


def test_cache_full_blocks_incremental_and_batched(make: Callable[..., KVCacheManager]) -> None:
    kv = make(12)
    a, b = req("a", list(range(6))), req("b", list(range(50, 53)))
    kv.allocate_slots(a, 6)
    kv.allocate_slots(b, 3)
    a.num_computed_tokens, b.num_computed_tokens = 3, 3
    kv.cache_full_blocks([a, b])
    assert kv.pool.num_cached_blocks == 0  # nothing full yet
    a.num_computed_tokens = 6
    for t in (60, 61):  # b decodes: its first block fills at 4 computed tokens
        b.append_output_token(t)
    kv.allocate_slots(b, 1)
    b.num_computed_tokens = 4
    kv.cache_full_blocks([a, b])
    assert kv.pool.num_cached_blocks == 2
    assert kv.pool.block_hash(a.block_ids[0]) == bp.py_block_hashes(range(6), BS)[0]
    assert kv.pool.block_hash(b.block_ids[0]) == bp.py_block_hashes([50, 51, 52, 60], BS)[0]
    kv.cache_full_blocks([a, b])  # idempotent
    assert kv.pool.num_cached_blocks == 2


def test_prefix_caching_disabled(make: Callable[..., KVCacheManager]) -> None:
    kv = make(10, prefix=False)
    prompt = list(range(9))
    admit(kv, req("a", prompt))
    assert kv.pool.num_cached_blocks == 0
    assert kv.get_computed_blocks(req("b", prompt)) == NO_COMPUTED_BLOCKS
    assert kv.prefix_cache_hit_rate == 0.0


def test_argument_errors(make: Callable[..., KVCacheManager]) -> None:
    kv = make(10)
    a = req("a", list(range(9)))
    admit(kv, a)
    with pytest.raises(ValueError, match="num_new_tokens"):
        kv.allocate_slots(a, -1)
    with pytest.raises(ValueError, match="computed blocks can only start"):
        kv.allocate_slots(a, 1, ComputedBlocks((1,), 4))
    with pytest.raises(ValueError, match="block_size"):
        KVCacheManager(bp.PyBlockPool(4), 0)


def test_free_then_reset_prefix_cache(make: Callable[..., KVCacheManager]) -> None:
    kv = make(10)
    a = req("a", list(range(9)))
    admit(kv, a)
    assert not kv.reset_prefix_cache()  # refused while a holds blocks
    kv.free(a)
    assert a.block_ids == [] and kv.pool.num_free_blocks == 9
    assert kv.reset_prefix_cache()
    assert kv.get_computed_blocks(req("b", list(range(9)))) == NO_COMPUTED_BLOCKS


def test_works_on_the_python_pool_without_native_module() -> None:
    """Without xllm._C the scheduler still runs on PyBlockPool with the Python hash."""
    code = """
import sys
sys.modules["xllm._C"] = None  # import of the native module fails
from xllm.ops import block_pool as bp
from xllm.sampling_params import SamplingParams
from xllm.scheduler import Request, Scheduler, SchedulerConfig
cfg = SchedulerConfig(num_blocks=16, max_model_len=64, block_size=4)
s = Scheduler(cfg, bp.PyBlockPool(16))
s.add_request(Request("a", list(range(9)), SamplingParams(max_tokens=2)))
s.add_request(Request("b", list(range(9)), SamplingParams(max_tokens=2), share_prefix_with="a"))
while s.has_unfinished_requests():
    out = s.schedule()
    s.update_from_output(out, [[1] if x.samples else [] for x in out.scheduled])
assert s.prefix_cache_hit_rate > 0
try:
    Scheduler(cfg)
except ImportError as e:
    assert "could not be imported" in str(e)
else:
    raise AssertionError("native pool without xllm._C")
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
