"""VMM page pool: map/unmap of 2 MiB pages against plain allocation of the same memory.

What each side includes (all timed from Python, so both pay one interpreter call
per operation):

- native map+unmap: ``map_page`` + ``unmap_page`` on a 1 GiB reservation
  (mmap MAP_SHARED|MAP_FIXED of the memfd range; mmap PROT_NONE back over it;
  fallocate PUNCH_HOLE), the mutex and the GIL release. No memory is touched,
  so no page is allocated: this is the bookkeeping cost of growing and
  shrinking a KV cache by one page.
- reference ``torch.empty(2 MiB)`` + free: glibc serves 2 MiB either with an
  mmap and a munmap per call or from heap memory it keeps, depending on its
  dynamic mmap threshold (strace in a fresh process on the dev machine: one
  mmap + one munmap per call); no page is touched either way.
- map+touch+unmap: the same plus a write to every 4 KiB of the page, so the
  kernel allocates and zeroes 512 pages and frees them on unmap: the real cost
  when a KV page is used. Its reference ``torch.zeros(2 MiB)`` is a memset
  (on all torch threads) of either a fresh mmap (the same 512 faults) or heap
  memory glibc kept resident; the row reports the page faults per call that
  each side really took, so you can tell which.
- batch rows: one ``map_pages`` + one ``unmap_pages`` call for 64 pages,
  divided by 64; the reference is 64 sequential ``torch.empty`` + free.

Plain preallocation itself (one torch.zeros of the whole cache) costs nothing
per page: the price is that it holds all of its memory all the time.
"""

from __future__ import annotations

import resource
from collections.abc import Callable

import torch

from bench.ops.common import Row, compare
from xllm.ops.vmm import VmmPool

PAGE = 2 << 20
RESERVE = 1 << 30
BATCH = 64
TARGET_S = 20e-6  # the target per map+unmap pair


def _cycler(pool: VmmPool, stride_pages: int) -> list[int]:
    # Rotate over many pages, as a cache does, rather than hammering one.
    return [i * stride_pages * PAGE for i in range(pool.num_pages // stride_pages)]


def _faults_per_call(fn: Callable[[], object], calls: int = 20) -> float:
    """Minor page faults per call: whether memory was freshly faulted in or reused."""
    fn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def _pair_row(pool: VmmPool, quick: bool) -> Row:
    offsets = _cycler(pool, 1)
    state = {"i": 0}

    def native() -> None:
        off = offsets[state["i"] % len(offsets)]
        state["i"] += 1
        pool.map_page(off)
        pool.unmap_page(off)

    def reference() -> None:
        t = torch.empty(PAGE, dtype=torch.uint8)
        del t

    row = compare(
        "vmm map+unmap",
        "2 MiB page, 1 GiB reserved",
        native,
        reference,
        "torch.empty(2 MiB)+free (glibc heap reuse or mmap+munmap; no page touched)",
        min_time=0.02 if quick else 0.05,
    )
    row.target, row.met = "<= 20 us", row.native_s <= TARGET_S
    row.note = "native = map_page+unmap_page: 3 syscalls, untouched page, memory returned"
    return row


def _touch_row(pool: VmmPool, quick: bool) -> Row:
    view = pool.tensor()
    offsets = _cycler(pool, 1)
    state = {"i": 0}

    def native() -> None:
        off = offsets[state["i"] % len(offsets)]
        state["i"] += 1
        pool.map_page(off)
        view[off : off + PAGE : 4096].fill_(1)  # first touch of each 4 KiB
        pool.unmap_page(off)

    def reference() -> None:
        t = torch.zeros(PAGE, dtype=torch.uint8)
        del t

    row = compare(
        "vmm map+touch+unmap",
        "2 MiB page, 1 write per 4 KiB",
        native,
        reference,
        "torch.zeros(2 MiB)+free",
        min_time=0.02 if quick else 0.05,
        repeat=3 if quick else 5,
    )
    native_faults, ref_faults = _faults_per_call(native), _faults_per_call(reference)
    row.extra = {"native_faults_per_call": native_faults, "reference_faults_per_call": ref_faults}
    reused = "reused resident heap memory" if ref_faults < 64 else "faulted fresh pages"
    row.note = (
        f"page faults/call: native {native_faults:.0f}, reference {ref_faults:.0f} "
        f"(it {reused}); native touches 1 byte per 4 KiB on one thread and returns the memory "
        "on unmap; no target set"
    )
    return row


def _batch_row(pool: VmmPool, stride_pages: int, quick: bool) -> Row:
    offsets = _cycler(pool, stride_pages)[:BATCH]

    def native() -> None:
        pool.map_pages(offsets)
        pool.unmap_pages(offsets)

    def reference() -> None:
        for _ in range(BATCH):
            t = torch.empty(PAGE, dtype=torch.uint8)
            del t

    layout = "contiguous" if stride_pages == 1 else f"every {stride_pages}nd page"
    row = compare(
        f"vmm map_pages+unmap_pages ({layout})",
        f"{BATCH} x 2 MiB pages, per page",
        native,
        reference,
        f"{BATCH} x torch.empty(2 MiB)+free, per page",
        min_time=0.02 if quick else 0.05,
    )
    row.native_s /= BATCH
    row.reference_s /= BATCH
    row.target, row.met = "<= 20 us", row.native_s <= TARGET_S
    row.note = (
        "contiguous pages map with one mmap per call"
        if stride_pages == 1
        else "scattered: one mmap per page to map; unmap covers the unmapped gaps with one "
        "PROT_NONE mmap + one punch"
    )
    return row


def run(quick: bool) -> list[Row]:
    pool = VmmPool(RESERVE, PAGE)
    rows = [
        _pair_row(pool, quick),
        _touch_row(pool, quick),
        _batch_row(pool, 1, quick),
        _batch_row(pool, 2, quick),
    ]
    # The timings mean nothing if pages leaked: everything must be back.
    if pool.physical_bytes or pool.resident_bytes():
        raise RuntimeError(
            f"vmm benchmark leaked pages: {pool!r}, {pool.resident_bytes()} resident"
        )
    pool.release()
    return rows
