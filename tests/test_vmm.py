"""VMM page pool: the native pool against plain preallocation, memory really returned, errors."""

from __future__ import annotations

import errno
import gc
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from xllm.ops.vmm import DEFAULT_PAGE_BYTES, PreallocatedPagePool, VmmPool

MIB = 1 << 20
SYS_PAGE = os.sysconf("SC_PAGESIZE")


def _rss_shmem() -> int:
    """This process's resident shared memory (memfd pages it has mapped), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssShmem:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssShmem in /proc/self/status")


def _kernel_view(pool: VmmPool) -> list[int]:
    """Offsets the kernel really has memfd-mapped in the pool, from /proc/self/maps.

    Also checks that the whole range is still reserved (every byte covered by
    either a shared memfd mapping or a PROT_NONE one), so a bookkeeping bug
    fails here instead of crashing the test process when a page is touched.
    """
    lo, hi = pool.address, pool.address + pool.reserved_bytes
    mapped: set[int] = set()
    covered = 0
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        start, end = max(start, lo), min(end, hi)
        if start >= end:
            continue
        covered += end - start
        if fields[1] == "rw-s" and "memfd:xllm-vmm" in line:
            mapped.update(range(start - lo, end - lo, pool.page_bytes))
        else:
            assert fields[1] == "---p", f"unexpected mapping in the reservation: {line}"
    assert covered == pool.reserved_bytes, "part of the reservation was lost"
    return sorted(mapped)


def _page(view: torch.Tensor, pool: VmmPool | PreallocatedPagePool, offset: int) -> torch.Tensor:
    return view[offset : offset + pool.page_bytes]


# Asserts never name a whole-range view: on failure pytest would print it, and
# printing reads its first and last elements, which may sit in unmapped pages.

# ---------------------------------------------------------------- behaviour vs the reference


@pytest.mark.parametrize("seed", range(4))
def test_random_ops_match_preallocation(seed: int) -> None:
    """Random map/unmap/write sequences leave the same mapped set and bytes as the reference."""
    rng = random.Random(seed)
    page = rng.choice([SYS_PAGE, 2 * SYS_PAGE, 64 * 1024, DEFAULT_PAGE_BYTES])
    num_pages = rng.randint(4, 24)
    native = VmmPool(num_pages * page, page)
    ref = PreallocatedPagePool(num_pages * page, page)
    nv, rv = native.tensor(), ref.tensor()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(60):
        mapped = [o // page for o in ref.mapped_offsets()]
        free = [p for p in range(num_pages) if p not in mapped]
        op = rng.choice(["map", "unmap", "map_batch", "unmap_batch", "write", "bad"])
        if op == "map" and free:
            off = rng.choice(free) * page
            native.map_page(off)
            ref.map_page(off)
        elif op == "unmap" and mapped:
            off = rng.choice(mapped) * page
            native.unmap_page(off)
            ref.unmap_page(off)
        elif op in ("map_batch", "unmap_batch"):
            pool_pages = free if op == "map_batch" else mapped
            batch = [p * page for p in rng.sample(pool_pages, rng.randint(0, len(pool_pages)))]
            getattr(native, op.replace("_batch", "_pages"))(batch)
            getattr(ref, op.replace("_batch", "_pages"))(batch)
        elif op == "write" and mapped:
            off = rng.choice(mapped) * page
            start = off + rng.randrange(page)
            length = rng.randint(1, off + page - start)
            data = torch.randint(0, 256, (length,), dtype=torch.uint8, generator=gen)
            nv[start : start + length] = data
            rv[start : start + length] = data
        elif op == "bad" and mapped and free:
            # A batch with one already-mapped page changes nothing in either pool.
            batch = [rng.choice(free) * page, rng.choice(mapped) * page]
            for pool in (native, ref):
                with pytest.raises(ValueError, match="already mapped"):
                    pool.map_pages(batch)
        assert native.mapped_offsets() == ref.mapped_offsets() == _kernel_view(native)
        assert native.physical_bytes == ref.physical_bytes
        for off in native.mapped_offsets():
            # numpy's compare: several times faster than torch.equal on bytes.
            same = np.array_equal(_page(nv, native, off).numpy(), _page(rv, ref, off).numpy())
            assert same, f"page at {off} differs"


def test_data_survives_other_pages_and_remap_is_zeroed() -> None:
    pool = VmmPool(16 * MIB, 2 * MIB)
    view = pool.tensor()
    pool.map_pages([0, 2 * MIB, 4 * MIB, 6 * MIB])
    keep = torch.randint(0, 256, (2 * MIB,), dtype=torch.uint8)
    view[2 * MIB : 4 * MIB] = keep
    view[4 * MIB : 6 * MIB] = 7
    for _ in range(3):  # churn the neighbours, including merges and splits of mappings
        pool.unmap_pages([0, 4 * MIB, 6 * MIB])
        pool.map_pages([6 * MIB, 0, 4 * MIB, 8 * MIB])
        pool.unmap_page(8 * MIB)
    assert _kernel_view(pool) == [0, 2 * MIB, 4 * MIB, 6 * MIB]
    kept = torch.equal(view[2 * MIB : 4 * MIB], keep)
    assert kept
    # A remapped page comes back zeroed: unmap returned its memory, nothing survives.
    nonzero = int(view[4 * MIB : 6 * MIB].count_nonzero())
    assert nonzero == 0


def test_batch_unmap_spares_mapped_neighbours() -> None:
    """A batch unmap spans gaps of unmapped pages in one syscall but never a mapped page."""
    page = 64 * 1024
    pool = VmmPool(200 * page, page)
    view = pool.tensor()
    pool.map_pages(list(range(0, 140 * page, page)))
    for p in range(140):
        view[p * page : (p + 1) * page] = p % 251 + 1
    pool.unmap_pages([0, 2 * page, 4 * page])  # 1 and 3 stay
    pool.unmap_page(page)
    pool.unmap_pages([6 * page, 3 * page, 8 * page])  # 4 is a gap; 5 and 7 stay
    # A long run of unmapped pages between two batch members, then a mapped one.
    pool.unmap_pages([p * page for p in range(10, 130)])
    pool.unmap_pages([9 * page, 131 * page, 133 * page])
    expected = {p: p % 251 + 1 for p in (5, 7, 130, 132, *range(134, 140))}
    assert [o // page for o in pool.mapped_offsets()] == sorted(expected)
    assert pool.mapped_offsets() == _kernel_view(pool)
    for p, value in expected.items():
        ok = bool((view[p * page : (p + 1) * page] == value).all())
        assert ok, f"page {p} lost its data"
    pool.map_pages([0, 4 * page, 131 * page])
    zeros = [int(view[p * page : (p + 1) * page].count_nonzero()) for p in (0, 4, 131)]
    assert zeros == [0, 0, 0]


def test_tensor_views_alias_one_memory() -> None:
    pool = VmmPool(8 * MIB, 2 * MIB)
    pool.map_page(2 * MIB)
    halves = pool.tensor(torch.float16, shape=(4, 256), offset=2 * MIB + 64)
    halves.copy_(torch.arange(1024, dtype=torch.float16).view(4, 256))
    raw = bytes(memoryview(pool)[2 * MIB + 64 : 2 * MIB + 64 + 2048])
    written = halves.numpy().tobytes()
    assert raw == written
    assert pool.as_tensor(torch.int32).shape == (8 * MIB // 4,)
    assert pool.tensor(torch.uint8, shape=(0, 3), offset=8 * MIB).numel() == 0
    assert pool.tensor().data_ptr() == pool.address


# ---------------------------------------------------------------- memory really comes back


def test_unmap_returns_memory() -> None:
    page, n = 2 * MIB, 12
    pool = VmmPool(32 * page, page)
    assert pool.address % (2 * MIB) == 0  # huge-page aligned, so THP can back it
    view = pool.tensor()
    offsets = [i * 2 * page for i in range(n)]  # scattered: every other page
    base_resident, base_shmem = pool.resident_bytes(), _rss_shmem()
    pool.map_pages(offsets)
    # Mapping alone takes nothing: memory comes on first touch.
    assert pool.resident_bytes() == base_resident
    assert pool.physical_bytes == n * page
    for off in offsets:
        view[off : off + page : SYS_PAGE] = 1  # touch every 4 KiB
    assert pool.resident_bytes() - base_resident == n * page
    grew = _rss_shmem() - base_shmem
    assert 0.9 * n * page <= grew <= 1.1 * n * page + 4 * MIB, grew
    pool.unmap_pages(offsets[: n // 2])
    assert pool.resident_bytes() - base_resident == (n - n // 2) * page
    for off in offsets[n // 2 :]:
        pool.unmap_page(off)
    assert pool.resident_bytes() == base_resident == 0
    assert pool.physical_bytes == 0
    assert _rss_shmem() - base_shmem <= 0.1 * n * page + 4 * MIB


def test_release_returns_memory_and_keeps_range_reserved() -> None:
    with VmmPool(8 * MIB, 2 * MIB) as pool:
        pool.map_pages([0, 2 * MIB])
        pool.tensor()[: 4 * MIB] = 3
        assert pool.resident_bytes() == 4 * MIB
    assert pool.released and pool.physical_bytes == 0 and pool.resident_bytes() == 0
    assert pool.mapped_offsets() == [] and not pool.is_mapped(0)
    pool.release()  # idempotent
    with pytest.raises(ValueError, match="released"):
        pool.map_page(0)
    with pytest.raises(ValueError, match="released"):
        pool.unmap_pages([])
    with pytest.raises(ValueError, match="released"):
        pool.tensor()
    with pytest.raises(BufferError):
        memoryview(pool)


# ---------------------------------------------------------------- errors


def test_mapping_past_the_reservation_is_refused() -> None:
    pool = VmmPool(64 * MIB, 2 * MIB)
    with pytest.raises(ValueError) as info:
        pool.map_page(64 * MIB)
    msg = str(info.value)
    assert "mapping past the reservation is refused" in msg
    assert str(64 * MIB) in msg and str(2 * MIB) in msg and "offset" in msg
    with pytest.raises(ValueError, match=r"offsets\[1\].*past the reservation"):
        pool.map_pages([0, 1 << 40])
    assert pool.mapped_offsets() == []


@pytest.mark.parametrize(
    ("reserve", "page", "arg"),
    [
        (0, 2 * MIB, "reserve_bytes"),
        (-2 * MIB, 2 * MIB, "reserve_bytes"),
        (3 * MIB, 2 * MIB, "reserve_bytes"),
        (4 * MIB, 0, "page_bytes"),
        (4 * MIB, -4096, "page_bytes"),
        (4 * MIB, SYS_PAGE + 1, "page_bytes"),
        ((1 << 63) - 1, SYS_PAGE, "reserve_bytes"),
    ],
)
def test_bad_sizes(reserve: int, page: int, arg: str) -> None:
    with pytest.raises(ValueError, match=arg):
        VmmPool(reserve, page)


def test_bad_offsets_and_states() -> None:
    pool = VmmPool(16 * MIB, 2 * MIB)
    pool.map_page(0)
    cases = [
        (lambda: pool.map_page(-2 * MIB), r"offset must be >= 0"),
        (lambda: pool.map_page(MIB), r"offset must be a multiple of page_bytes \(2097152\)"),
        (lambda: pool.map_page(0), r"offset = 0 is already mapped"),
        (lambda: pool.unmap_page(2 * MIB), r"offset = 2097152 is not mapped"),
        (lambda: pool.unmap_page(16 * MIB), r"unmapping past the reservation"),
        (lambda: pool.is_mapped(3), r"offset must be a multiple"),
        (lambda: pool.map_pages([2 * MIB, 4 * MIB, 2 * MIB]), r"offsets\[2\] repeats offsets\[0\]"),
        (lambda: pool.map_pages([2 * MIB, 0]), r"offsets\[1\] = 0 is already mapped"),
        (lambda: pool.map_pages([2 * MIB, 5]), r"offsets\[1\] must be a multiple"),
        (lambda: pool.unmap_pages([0, 2 * MIB]), r"offsets\[1\] = 2097152 is not mapped"),
        (lambda: pool.tensor("float32"), r"dtype must be a torch.dtype"),
        (lambda: pool.tensor(torch.float32, offset=2), r"offset must be a multiple of the dtype"),
        (lambda: pool.tensor(offset=17 * MIB), r"offset must lie in"),
        (lambda: pool.tensor(shape=(17 * MIB,)), r"needs 17825792 bytes"),
        (lambda: pool.tensor(shape=(-1, 4)), r"negative"),
        (lambda: pool.tensor(torch.int64, offset=8 * MIB - 4 + 8), r"multiple of the dtype"),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            call()
    # Nothing above changed the pool.
    assert pool.mapped_offsets() == [0] and pool.physical_bytes == 2 * MIB


def test_syscall_failures_raise_oserror() -> None:
    with pytest.raises(OSError) as info:  # far beyond any user address space
        VmmPool(1 << 62, 2 * MIB)
    assert info.value.errno == errno.ENOMEM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.dup(0)
    os.close(lowest_free)
    # New fds take the lowest free number, which must stay below the soft limit.
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        with pytest.raises(OSError, match="memfd_create") as info:
            VmmPool(4 * MIB, 2 * MIB)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert info.value.errno == errno.EMFILE


# ---------------------------------------------------------------- lifetime and faults


def test_pool_outlives_its_tensor_views() -> None:
    def make() -> tuple[torch.Tensor, weakref.ref]:
        pool = VmmPool(8 * MIB, 2 * MIB)
        pool.map_page(4 * MIB)
        return pool.tensor(torch.float32, offset=4 * MIB, shape=(512, 1024)), weakref.ref(pool)

    view, pool_ref = make()
    gc.collect()
    assert pool_ref() is not None  # the view holds the pool
    sub = view[100:102]
    del view
    gc.collect()
    assert pool_ref() is not None  # a slice holds it too (through the storage)
    sub.fill_(2.5)
    total = float(sub.sum())
    assert total == 2.5 * 2048
    del sub
    gc.collect()
    assert pool_ref() is None  # and the last view lets it go


def _child(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)


@pytest.mark.parametrize(
    "touch",
    ["pool.unmap_page(0); mv[10] = 1", "pool.release(); mv[10]", "mv[2 * 2**20 + 5] = 1"],
    ids=["after-unmap", "after-release", "never-mapped"],
)
def test_touching_an_unmapped_page_faults(touch: str) -> None:
    # Documented contract: SIGSEGV, never silent access to other memory. A child
    # process (no torch import, so it is quick) takes the fault.
    code = (
        "from xllm import _C\n"
        "pool = _C.VmmPool(8 * 2**20, 2 * 2**20); pool.map_page(0)\n"
        "mv = memoryview(pool); mv[10] = 1\n" + touch + "\nprint('survived')\n"
    )
    result = _child(code)
    assert result.returncode == -signal.SIGSEGV, result.stderr.decode()[-2000:]
    assert b"survived" not in result.stdout


# ---------------------------------------------------------------- scale and threads


def test_many_pages_stay_fast() -> None:
    pool = VmmPool(1 << 30, 2 * MIB)  # 1 GiB virtual, 512 pages
    rng = random.Random(0)
    offsets = [i * 2 * MIB for i in range(pool.num_pages)]
    start = time.perf_counter()
    for off in offsets[:300]:
        pool.map_page(off)
    rng.shuffle(offsets)
    for off in sorted(offsets[:400]):
        if pool.is_mapped(off):
            pool.unmap_page(off)
    scattered = [o for o in offsets[:400] if not pool.is_mapped(o)][:256]
    pool.map_pages(scattered)
    mapped = pool.mapped_offsets()
    pool.unmap_pages(mapped)
    elapsed = time.perf_counter() - start
    assert pool.physical_bytes == 0 and pool.resident_bytes() == 0
    assert len(mapped) == len(set(mapped)) and len(mapped) >= 256
    # About 1,000 map/unmap calls: ~10 ms on a quiet machine; 2 s allows heavy load.
    assert elapsed < 2.0, f"{elapsed:.3f} s"


def test_concurrent_map_unmap() -> None:
    page, threads, rounds = 64 * 1024, 4, 150
    pool = VmmPool(threads * 8 * page, page)
    view = pool.tensor()
    errors: list[BaseException] = []

    def worker(tid: int) -> None:
        try:
            mine = [(tid * 8 + i) * page for i in range(8)]
            for r in range(rounds):
                off = mine[r % 8]
                pool.map_page(off)
                nonzero = int(view[off : off + page].count_nonzero())
                assert nonzero == 0, f"page {off} not zeroed on map"
                view[off : off + page] = tid + 1
                first = int(view[off])
                assert first == tid + 1
                if r % 3 == 0:
                    pool.unmap_pages([off])
                else:
                    pool.unmap_page(off)
        except BaseException as e:  # reported on the main thread
            errors.append(e)

    pool_threads = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in pool_threads:
        t.start()
    for t in pool_threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in pool_threads), "workers hung"
    assert errors == []
    assert pool.physical_bytes == 0 and pool.resident_bytes() == 0

    # Racing for one page: exactly one thread maps it.
    wins: list[int] = []
    barrier = threading.Barrier(threads)

    def racer(tid: int) -> None:
        barrier.wait(timeout=10)
        try:
            pool.map_page(0)
            wins.append(tid)
        except ValueError:
            pass

    racers = [threading.Thread(target=racer, args=(t,)) for t in range(threads)]
    for t in racers:
        t.start()
    for t in racers:
        t.join(timeout=30)
    assert len(wins) == 1 and pool.mapped_offsets() == [0]


def test_the_cuda_pool_speaks_the_driver_s_struct_layouts() -> None:
    """The CUDA VMM pool calls the driver through ctypes: its structs must have the driver
    headers' layout (cuda.h, 64-bit): CUmemAllocationProp is 32 bytes with its location at 8,
    the win32 pointer at 16 and allocFlags at 24; CUmemAccessDesc 12 bytes, flags at 8.
    Without a driver (this machine), the pool says it is not supported instead of failing."""
    import ctypes

    from xllm.ops import cuda_vmm

    prop, desc = cuda_vmm._AllocationProp, cuda_vmm._AccessDesc
    assert ctypes.sizeof(prop) == 32 and ctypes.sizeof(desc) == 12
    assert (prop.location.offset, prop.win32HandleMetaData.offset,
            prop.allocFlags.offset) == (8, 16, 24)
    assert desc.flags.offset == 8 and ctypes.sizeof(cuda_vmm._Location) == 8
    import torch

    if not torch.cuda.is_available():
        assert cuda_vmm.supported(0) is False
