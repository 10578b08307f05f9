"""KV block pool with prefix cache: the native pool and its pure-Python twin, held to the
same exact block ids, free-list order and eviction order, and to each other."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from xllm.ops import block_pool as bp

Pool = bp.BlockPoolProtocol
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["native", "python"])
def make(request: pytest.FixtureRequest) -> Callable[[int], Pool]:
    native = request.param == "native"
    return lambda n: bp.make_block_pool(n, native=native)


def state(pool: Pool) -> tuple:
    """Everything observable about a pool (stats read without resetting)."""
    ids = range(1, pool.num_blocks)
    return (
        pool.num_free_blocks,
        pool.num_cached_blocks,
        pool.free_block_ids(),
        [pool.ref_count(b) for b in ids],
        [pool.block_hash(b) for b in ids],
        pool.prefix_cache_stats(),
        pool.num_retired_blocks,
        [pool.is_retired(b) for b in ids],
    )


# ---- exact behaviour --------------------------------------------------------------------


def test_fresh_pool_allocates_in_id_order(make: Callable[[int], Pool]) -> None:
    pool = make(10)
    assert (pool.num_blocks, pool.num_free_blocks, pool.num_cached_blocks) == (10, 9, 0)
    assert pool.free_block_ids() == list(range(1, 10))
    assert pool.allocate(3) == [1, 2, 3]
    assert pool.allocate(2) == [4, 5]
    assert pool.allocate(0) == []
    assert pool.num_free_blocks == 4
    assert pool.free_block_ids() == [6, 7, 8, 9]
    assert [pool.ref_count(b) for b in range(1, 10)] == [1] * 5 + [0] * 4


def test_free_appends_tail_first(make: Callable[[int], Pool]) -> None:
    pool = make(10)
    a = pool.allocate(4)
    b = pool.allocate(2)
    assert (a, b) == ([1, 2, 3, 4], [5, 6])
    pool.free(a)
    assert pool.free_block_ids() == [7, 8, 9, 4, 3, 2, 1]
    pool.free(b)
    assert pool.free_block_ids() == [7, 8, 9, 4, 3, 2, 1, 6, 5]
    # LRU: the least recently freed go first, a request's last block before its first.
    assert pool.allocate(5) == [7, 8, 9, 4, 3]
    assert pool.free_block_ids() == [2, 1, 6, 5]


def test_lazy_eviction_order(make: Callable[[int], Pool]) -> None:
    pool = make(6)
    hashes = bp.py_block_hashes(list(range(48)), 16)
    req = pool.allocate(3)
    assert req == [1, 2, 3]
    pool.cache_blocks(req, hashes)
    assert pool.num_cached_blocks == 3
    pool.free(req)
    assert pool.free_block_ids() == [4, 5, 3, 2, 1]
    # Free but cached: still found, and still carrying its hash.
    assert pool.lookup(hashes) == [1, 2, 3]
    assert pool.block_hash(3) == hashes[2]
    assert pool.allocate(2) == [4, 5]  # uncached blocks go first, nothing evicted
    assert pool.lookup(hashes) == [1, 2, 3]
    assert pool.allocate(1) == [3]  # the request's last block is evicted first
    assert pool.block_hash(3) is None
    assert pool.num_cached_blocks == 2
    assert pool.lookup(hashes) == [1, 2]
    assert pool.allocate(1) == [2]
    assert pool.lookup(hashes) == [1]
    assert pool.lookup(hashes[1:]) == []  # stops at the first miss
    assert pool.block_hash(1) == hashes[0]


def test_touch_revives_cached_free_block(make: Callable[[int], Pool]) -> None:
    pool = make(8)
    hashes = [11, 22, 33]
    req = pool.allocate(3)
    pool.cache_blocks(req, hashes)
    pool.free(req)
    assert pool.free_block_ids() == [4, 5, 6, 7, 3, 2, 1]
    hit = pool.lookup(hashes[:2])
    assert hit == [1, 2]
    pool.touch(hit)
    assert [pool.ref_count(b) for b in hit] == [1, 1]
    assert pool.free_block_ids() == [4, 5, 6, 7, 3]  # taken out of the middle and the tail
    assert pool.num_free_blocks == 5
    assert pool.block_hash(1) == 11 and pool.lookup(hashes) == [1, 2, 3]
    # A new request shares the prefix, adds its own block, then both finish.
    own = pool.allocate(1)
    assert own == [4]
    pool.touch([1])
    assert pool.ref_count(1) == 2
    pool.free([1, 2])
    assert pool.ref_count(1) == 1 and pool.free_block_ids() == [5, 6, 7, 3, 2]
    pool.free([1, 4])
    assert pool.free_block_ids() == [5, 6, 7, 3, 2, 4, 1]


def test_shared_blocks_survive_free(make: Callable[[int], Pool]) -> None:
    pool = make(5)
    a = pool.allocate(2)
    pool.touch([a[0], a[0]])  # two more holders of block 1
    assert pool.ref_count(1) == 3
    pool.free(a)
    assert (pool.ref_count(1), pool.ref_count(2)) == (2, 0)
    assert pool.free_block_ids() == [3, 4, 2]
    pool.free([1, 1])  # a block may appear as often as it is held
    assert pool.ref_count(1) == 0
    assert pool.free_block_ids() == [3, 4, 2, 1]


def test_allocate_failure_changes_nothing(make: Callable[[int], Pool]) -> None:
    pool = make(6)
    pool.cache_blocks(pool.allocate(2), [7, 8])
    pool.free([1])
    before = state(pool)
    assert pool.allocate(pool.num_free_blocks + 1) is None
    assert state(pool) == before
    assert pool.allocate(pool.num_free_blocks) == [3, 4, 5, 1]
    assert pool.allocate(1) is None
    assert pool.num_free_blocks == 0 and pool.lookup([7]) == []


def test_cache_blocks_duplicates(make: Callable[[int], Pool]) -> None:
    pool = make(6)
    a, b = pool.allocate(2)
    pool.cache_blocks([a], [99])
    pool.cache_blocks([a], [99])  # same block, same hash: nothing to do
    pool.cache_blocks([b], [99])  # the hash names block a already: b stays uncached
    assert pool.block_hash(b) is None and pool.num_cached_blocks == 1
    assert pool.lookup([99]) == [a]
    pool.cache_blocks([b, b], [5, 5])
    assert pool.block_hash(b) == 5 and pool.num_cached_blocks == 2


def test_reset_prefix_cache(make: Callable[[int], Pool]) -> None:
    pool = make(5)
    req = pool.allocate(2)
    pool.cache_blocks(req, [1, 2])
    pool.free(req[1:])
    assert pool.reset_prefix_cache() is False  # block 1 is in use
    assert pool.lookup([1, 2]) == [1, 2]
    pool.free(req[:1])
    order = pool.free_block_ids()
    assert pool.reset_prefix_cache() is True
    assert pool.num_cached_blocks == 0 and pool.lookup([1]) == []
    assert pool.block_hash(1) is None and pool.block_hash(2) is None
    assert pool.free_block_ids() == order


def test_prefix_cache_stats(make: Callable[[int], Pool]) -> None:
    pool = make(5)
    pool.cache_blocks(pool.allocate(2), [10, 20])
    assert pool.lookup([10, 20, 30, 40]) == [1, 2]
    assert pool.lookup([30]) == []
    assert pool.prefix_cache_stats() == (5, 2)
    assert pool.prefix_cache_stats(reset=True) == (5, 2)
    assert pool.prefix_cache_stats() == (0, 0)


def test_accepts_tuples_iterables_and_index_ints(make: Callable[[int], Pool]) -> None:
    class Idx:
        def __init__(self, v: int) -> None:
            self.v = v

        def __index__(self) -> int:
            return self.v

    pool = make(6)
    pool.allocate(Idx(3))
    pool.touch((1, Idx(2)))
    pool.free(iter([1, 2]))
    pool.cache_blocks(range(1, 3), (Idx(7), 8))
    assert pool.lookup(x for x in [7, 8]) == [1, 2]
    assert pool.ref_count(Idx(1)) == 1


# ---- errors: ValueError naming the argument, nothing changed ----------------------------

BAD_CALLS: list[tuple[str, Callable[[Pool], object], str]] = [
    ("free null", lambda p: p.free([0]), r"blocks\[0\].*null block"),
    ("free already free", lambda p: p.free([3]), r"blocks\[0\].*already free"),
    ("free over-free", lambda p: p.free([2, 1, 2]), r"blocks\[2\].*already free"),
    ("free out of range", lambda p: p.free([1, 8]), r"blocks\[1\]"),
    ("free negative", lambda p: p.free([-1]), r"blocks\[0\]"),
    ("free float", lambda p: p.free([1.0]), r"blocks\[0\].*int"),
    ("free not a sequence", lambda p: p.free(None), r"blocks"),
    ("touch null", lambda p: p.touch([1, 0]), r"blocks\[1\].*null block"),
    ("touch out of range", lambda p: p.touch([3, 8]), r"blocks\[1\]"),
    ("touch huge", lambda p: p.touch([2**70]), r"blocks\[0\]"),
    ("cache out of range", lambda p: p.cache_blocks([1, 9], [5, 6]), r"blocks\[1\]"),
    ("cache null", lambda p: p.cache_blocks([0], [5]), r"blocks\[0\]"),
    ("cache free block", lambda p: p.cache_blocks([3], [5]), r"blocks\[0\].*free"),
    ("cache length", lambda p: p.cache_blocks([1, 2], [5]), r"same length"),
    ("cache rehash", lambda p: p.cache_blocks([1], [6]), r"blocks\[0\].*already cached"),
    ("cache dup", lambda p: p.cache_blocks([2, 2], [7, 8]), r"blocks\[1\]"),
    ("cache bad hash", lambda p: p.cache_blocks([2], [-1]), r"hashes\[0\]"),
    ("lookup negative", lambda p: p.lookup([5, -1]), r"hashes\[1\]"),
    ("lookup too big", lambda p: p.lookup([2**64]), r"hashes\[0\]"),
    ("lookup str", lambda p: p.lookup(["a"]), r"hashes\[0\]"),
    ("allocate negative", lambda p: p.allocate(-1), r"\bn\b"),
    ("allocate float", lambda p: p.allocate(1.5), r"\bn\b"),
    ("ref_count null", lambda p: p.ref_count(0), r"block\b"),
    ("ref_count range", lambda p: p.ref_count(8), r"block\b"),
    ("block_hash range", lambda p: p.block_hash(-3), r"block\b"),
]


@pytest.mark.parametrize("call,pattern", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_errors_change_nothing(
    make: Callable[[int], Pool], call: Callable[[Pool], object], pattern: str
) -> None:
    pool = make(8)
    pool.allocate(2)  # blocks 1, 2 held; block 1 cached under 5
    pool.cache_blocks([1], [5])
    pool.lookup([5])
    before = state(pool)
    with pytest.raises(ValueError, match=pattern):
        call(pool)
    assert state(pool) == before


@pytest.mark.parametrize("num_blocks", [1, 0, -4])
def test_too_few_blocks(make: Callable[[int], Pool], num_blocks: int) -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        make(num_blocks)


@pytest.mark.parametrize("native", [True, False])
def test_hash_argument_errors(native: bool) -> None:
    one = bp.hash_block_tokens if native else bp.py_hash_block_tokens
    many = bp.block_hashes if native else bp.py_block_hashes
    with pytest.raises(ValueError, match="block_size"):
        many([1, 2, 3], 0)
    with pytest.raises(ValueError, match="parent_hash"):
        many([1, 2, 3], 1, parent_hash=-1)
    with pytest.raises(ValueError, match="parent_hash"):
        one(2**64, [1])
    with pytest.raises(ValueError, match=r"token_ids\[1\]"):
        one(0, [1, 2**64])
    with pytest.raises(ValueError, match=r"token_ids\[0\]"):
        one(0, [-(2**63) - 1])
    with pytest.raises(ValueError, match=r"token_ids\[2\]"):
        one(0, [1, 2, "x"])
    with pytest.raises(ValueError, match="extra"):
        one(0, [1], extra=2**64)


def test_retire_and_restore(make: Callable[[int], Pool]) -> None:
    """Retired blocks leave service (their hashes dropped and returned); restored ones are
    handed out first, before cached free blocks."""
    pool = make(8)
    a = pool.allocate(4)
    assert a == [1, 2, 3, 4]
    pool.cache_blocks(a, [11, 12, 13, 14])
    pool.free(a)
    assert pool.retire([2, 5]) == [12]
    assert pool.num_retired_blocks == 2 and pool.num_free_blocks == 5
    assert pool.is_retired(2) and not pool.is_retired(3)
    assert pool.lookup([11, 12]) == [1]
    with pytest.raises(ValueError, match="retired"):
        pool.touch([2])
    with pytest.raises(ValueError, match="already retired"):
        pool.retire([5])
    b = pool.allocate(1)
    with pytest.raises(ValueError, match="in use"):
        pool.retire(b)
    with pytest.raises(ValueError, match="appears twice"):
        pool.retire([7, 7])
    assert not pool.is_retired(7)
    with pytest.raises(ValueError, match="not retired"):
        pool.restore([3])
    pool.restore([5, 2])
    assert pool.num_retired_blocks == 0
    assert pool.free_block_ids()[:2] == [5, 2]
    pool.free(b)
    # a pool whose only non-free blocks are retired may reset its prefix cache
    pool.retire([5])
    assert pool.reset_prefix_cache()


# ---- the two implementations agree ------------------------------------------------------


def _random_op(rng: random.Random, pool_size: int, held: list[list[int]], hashes: list[int]):
    """One random call, as (name, args); mostly valid, sometimes not."""
    r = rng.random()
    if r < 0.22:
        return "allocate", (rng.choice([0, 1, 1, 2, 3, 5, pool_size // 2, pool_size]),)
    if r < 0.52 and held:
        return "free", (held.pop(rng.randrange(len(held))),)
    if r < 0.66:
        start = rng.choice([0, 0, 8, 16]) + rng.randrange(3)
        tail = [rng.randrange(2**64)] * rng.randrange(2)
        return "lookup", (hashes[start : start + rng.randrange(0, 6)] + tail,)
    if r < 0.74:
        blocks = [rng.randrange(1, pool_size) for _ in range(rng.randrange(1, 4))]
        held.append(blocks)  # revives free blocks, cached or not; freed later like a request
        return "touch", (blocks,)
    if r < 0.86 and held:
        blocks = rng.choice(held)  # cached as a chain, so later lookups of it hit
        start = min(rng.choice([0, 0, 8, 16]), len(hashes) - len(blocks))
        return "cache_blocks", (blocks, hashes[start : start + len(blocks)])
    if r < 0.90:  # garbage ids: null, out of range, already free
        return "free", ([rng.randrange(-1, pool_size + 1) for _ in range(rng.randrange(1, 4))],)
    if r < 0.915:  # mostly free blocks (valid), sometimes held or retired ones (refused)
        return "retire", ([rng.randrange(1, pool_size) for _ in range(rng.randrange(1, 3))],)
    if r < 0.925:
        return "restore", ([rng.randrange(1, pool_size) for _ in range(rng.randrange(1, 3))],)
    if r < 0.928:
        return "reset_prefix_cache", ()
    if r < 0.94:
        return rng.choice(["drain_events", "cached_hashes"]), ()
    if r < 0.96:
        return "prefix_cache_stats", (rng.random() < 0.5,)
    return rng.choice(["ref_count", "block_hash"]), (rng.randrange(0, pool_size + 1),)


@pytest.mark.parametrize("seed", range(4))
def test_native_matches_python_on_random_operations(seed: int) -> None:
    rng = random.Random(seed)
    pool_size = [2, 9, 17, 64][seed % 4]
    native, python = bp.BlockPool(pool_size), bp.PyBlockPool(pool_size)
    for pool in (native, python):
        pool.set_events(True)
    # A listener applying the drained deltas holds exactly the cached hashes.
    listener: set[int] = set()
    held: list[list[int]] = []
    hashes = [rng.randrange(2**64) for _ in range(80)]
    for step in range(2500):
        name, args = _random_op(rng, pool_size, held, hashes)
        results = []
        for pool in (native, python):
            try:
                results.append(("ok", getattr(pool, name)(*args)))
            except ValueError:
                results.append(("ValueError", None))
        assert results[0] == results[1], f"step {step}: {name}{args}"
        if name == "drain_events":
            added, evicted = results[0][1]
            listener.difference_update(evicted)
            listener.update(added)
            assert listener == set(native.cached_hashes()), f"step {step}"
        if name == "allocate" and results[0][1]:
            held.append(results[0][1])
        if step % 50 == 0:
            assert state(native) == state(python), f"step {step}"
    assert state(native) == state(python)


def test_randomized_against_a_model() -> None:
    """Free-list order and ref counts against a plain list model (O(n), obviously right)."""
    rng = random.Random(7)
    n = 33
    pool = bp.BlockPool(n)
    free_list, ref = list(range(1, n)), [0] * n
    for _ in range(3000):
        if rng.random() < 0.5:
            k = rng.randrange(0, 6)
            got = pool.allocate(k)
            if k > len(free_list):
                assert got is None
                continue
            expected, free_list = free_list[:k], free_list[k:]
            assert got == expected
            for b in got:
                ref[b] = 1
        else:
            in_use = [b for b in range(1, n) if ref[b] > 0]
            blocks = rng.sample(in_use, min(len(in_use), rng.randrange(0, 4)))
            if rng.random() < 0.3:
                pool.touch(blocks)
                for b in blocks:
                    if ref[b] == 0:
                        free_list.remove(b)
                    ref[b] += 1
            else:
                pool.free(blocks)
                for b in blocks:
                    ref[b] -= 1
                free_list += [b for b in reversed(blocks) if ref[b] == 0]
        assert pool.free_block_ids() == free_list
    assert [pool.ref_count(b) for b in range(1, n)] == ref[1:]


@pytest.mark.parametrize("seed", range(3))
def test_colliding_hashes_survive_eviction(seed: int) -> None:
    """Many hashes landing in the same few slots of the native pool's hash table, around its
    wrap-around point, cached and evicted in random order: every lookup still agrees with
    the Python twin's dict. (The native table has 2 * num_blocks slots, rounded up to a power
    of two, and puts key k at slot (k * P1 mod 2**64) >> (64 - log2(slots)).)"""
    rng = random.Random(seed)
    num_blocks, bits = 16, 5
    inverse = pow(bp._P1, -1, 2**64)

    def key_at(slot: int) -> int:
        product = (slot << (64 - bits)) | rng.randrange(1 << (64 - bits))
        return product * inverse % 2**64

    keys = [key_at(rng.choice([30, 31, 31, 0, 1])) for _ in range(60)]
    native, python = bp.BlockPool(num_blocks), bp.PyBlockPool(num_blocks)
    for _ in range(40):
        k = rng.randrange(1, num_blocks)
        chosen = rng.sample(keys, k)
        order = rng.sample(range(k), k)
        for pool in (native, python):
            blocks = pool.allocate(k)  # evicts whatever those blocks held
            assert blocks is not None
            pool.cache_blocks(blocks, chosen)
            pool.free([blocks[i] for i in order])
        assert native.free_block_ids() == python.free_block_ids()
        for key in keys:
            assert native.lookup([key]) == python.lookup([key])
        assert native.num_cached_blocks == python.num_cached_blocks


# ---- chained block hash -----------------------------------------------------------------


def test_hash_native_equals_python_bit_for_bit() -> None:
    rng = random.Random(3)
    assert bp.ROOT_HASH == bp._native.ROOT_HASH
    assert bp.hash_block_tokens(0, []) == bp.py_hash_block_tokens(0, [])
    for _ in range(200):
        tokens = [rng.randrange(-(2**63), 2**64) for _ in range(rng.randrange(0, 70))]
        parent, extra = rng.randrange(2**64), rng.randrange(-(2**63), 2**64)
        assert bp.hash_block_tokens(parent, tokens, extra) == bp.py_hash_block_tokens(
            parent, tokens, extra
        )
        bs = rng.randrange(1, 20)
        expected = bp.py_block_hashes(tokens, bs, parent, extra)
        assert bp.block_hashes(tokens, bs, parent, extra) == expected
        assert len(expected) == len(tokens) // bs
    # A token as a signed or unsigned 64-bit word is one word.
    assert bp.hash_block_tokens(1, [-1]) == bp.hash_block_tokens(1, [2**64 - 1])
    assert bp.py_hash_block_tokens(1, [-1]) == bp.hash_block_tokens(1, [2**64 - 1])


@pytest.mark.parametrize("native", [True, False])
def test_hash_is_chained(native: bool) -> None:
    one = bp.hash_block_tokens if native else bp.py_hash_block_tokens
    many = bp.block_hashes if native else bp.py_block_hashes
    tokens = list(range(100, 100 + 16 * 6 + 5))  # 6 full blocks and a partial one
    hashes = many(tokens, 16)
    assert len(hashes) == 6 and len(set(hashes)) == 6
    parent = bp.ROOT_HASH
    for i, h in enumerate(hashes):  # block_hashes is hash_block_tokens chained from the root
        parent = one(parent, tokens[16 * i : 16 * (i + 1)])
        assert h == parent
    changed = many([tokens[0] + 1] + tokens[1:], 16)
    assert all(a != b for a, b in zip(hashes, changed, strict=True))  # every later block
    late = tokens[:50] + [7] + tokens[51:]
    assert many(late, 16)[:3] == hashes[:3]
    assert all(a != b for a, b in zip(many(late, 16)[3:], hashes[3:], strict=True))
    assert all(a != b for a, b in zip(many(tokens, 16, extra=1), hashes, strict=True))
    assert many(tokens, 16, parent_hash=1) != hashes
    assert one(5, [1, 2], extra=3) != one(5, [1, 2], extra=4)
    assert one(5, [1, 2]) != one(5, [1, 2, 0])  # length is part of the hash
    assert many(tokens[:15], 16) == []
    assert many((t for t in tokens), 16) == hashes  # any iterable of ints


# ---- import discipline ------------------------------------------------------------------


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_module_imports_no_torch() -> None:
    res = _run(
        "import sys, xllm.ops.block_pool as m; m.BlockPool(4); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    assert res.returncode == 0, res.stderr


def test_missing_native_fails_on_use_not_import() -> None:
    res = _run(
        "import sys; sys.modules['xllm._C'] = None\n"
        "import xllm.ops.block_pool as m\n"
        "assert m.make_block_pool(4, native=False).allocate(1) == [1]\n"
        "assert m.py_block_hashes([1, 2], 2)\n"
        "for use in (lambda: m.BlockPool(4), lambda: m.make_block_pool(4),\n"
        "            lambda: m.hash_block_tokens(0, [1]), lambda: m.block_hashes([1], 1)):\n"
        "    try:\n"
        "        use()\n"
        "    except ImportError as e:\n"
        "        assert 'PyBlockPool' in str(e), e\n"
        "    else:\n"
        "        raise AssertionError('no ImportError')\n"
    )
    assert res.returncode == 0, res.stderr
