"""Block pool benchmark: the native pool (xllm._C.BlockPool) against its pure-Python twin.

Every row times the public Python-facing calls, as the scheduler makes them, so the
per-call conversion of Python lists is part of the native time.
"""

from __future__ import annotations

import random

from bench.ops.common import Row, compare
from xllm.ops.block_pool import (
    BlockPool,
    BlockPoolProtocol,
    PyBlockPool,
    block_hashes,
    py_block_hashes,
)

REFERENCE = "PyBlockPool (pure Python, O(1) per block)"
NUM_BLOCKS = 4096
BLOCK_SIZE = 16


def _allocate_free(pool: BlockPoolProtocol, n: int):
    def step() -> None:
        blocks = pool.allocate(n)
        assert blocks is not None
        pool.free(blocks)

    return step


def _allocate_cache_free(pool: BlockPoolProtocol, hashes: list[int]):
    # Steady state of a prefix-cached pool: every block allocate() pops still carries
    # the hash cached the round before, so each allocation also evicts.
    def step() -> None:
        blocks = pool.allocate(len(hashes))
        assert blocks is not None
        pool.cache_blocks(blocks, hashes)
        pool.free(blocks)

    return step


def _prefix_hit(pool: BlockPoolProtocol, hashes: list[int]):
    # A request whose whole prompt prefix is cached in free blocks: find them, take
    # them (off the free list), and give them back when it finishes.
    blocks = pool.allocate(len(hashes))
    assert blocks is not None
    pool.cache_blocks(blocks, hashes)
    pool.free(blocks)

    def step() -> None:
        hit = pool.lookup(hashes)
        assert len(hit) == len(hashes)
        pool.touch(hit)
        pool.free(hit)

    return step


def run(quick: bool) -> list[Row]:
    timer = {"min_time": 0.01, "repeat": 3} if quick else {"min_time": 0.05, "repeat": 5}
    rng = random.Random(0)
    prompt = [rng.randrange(150_000) for _ in range(4096)]
    hashes = py_block_hashes(prompt, BLOCK_SIZE)  # 256 chained hashes
    rows = [
        compare(
            "allocate+free",
            f"1000 blocks, pool {NUM_BLOCKS}",
            _allocate_free(BlockPool(NUM_BLOCKS), 1000),
            _allocate_free(PyBlockPool(NUM_BLOCKS), 1000),
            REFERENCE,
            min_ratio=5,
            **timer,
        ),
        compare(
            "allocate+cache_blocks+free",
            f"{len(hashes)} blocks, each evicting a cached one",
            _allocate_cache_free(BlockPool(len(hashes) + 1), hashes),
            _allocate_cache_free(PyBlockPool(len(hashes) + 1), hashes),
            REFERENCE,
            **timer,
        ),
        compare(
            "lookup+touch+free",
            f"{len(hashes)}-block cached prefix, pool {NUM_BLOCKS}",
            _prefix_hit(BlockPool(NUM_BLOCKS), hashes),
            _prefix_hit(PyBlockPool(NUM_BLOCKS), hashes),
            REFERENCE,
            **timer,
        ),
    ]
    assert block_hashes(prompt, BLOCK_SIZE) == hashes  # the two agree before we time them
    rows.append(
        compare(
            "block_hashes",
            f"{len(prompt)} tokens, block size {BLOCK_SIZE}",
            lambda: block_hashes(prompt, BLOCK_SIZE),
            lambda: py_block_hashes(prompt, BLOCK_SIZE),
            "py_block_hashes (pure Python, same hash bit for bit)",
            **timer,
        )
    )
    return rows
