"""VMM page pool: one reserved virtual range, fixed-size pages mapped in on demand.

The CPU counterpart of CUDA virtual memory management (cuMemAddressReserve,
cuMemCreate, cuMemMap), as xLLM's xTensor does on NPU/GPU: a KV cache can be one
contiguous tensor over the whole reservation while the memory behind it grows
and shrinks page by page with demand.

``VmmPool`` is the native pool (``xllm._C.VmmPool``: memfd + mmap(MAP_FIXED),
see ``csrc/memory/vmm.h``) plus ``tensor()``, a zero-copy torch view of the
range. ``PreallocatedPagePool`` is the reference: the same interface over one
plain ``torch.zeros`` of the whole size, which holds all of its memory all the
time ("plain preallocation"); tests check the native pool against it and the
benchmark times against the same route.

Contract for callers:

- A page reads as zeros each time it is mapped (first map or remap).
- Only touch mapped pages. Reading or writing an unmapped page through a view
  (or any page after ``release()``) raises SIGSEGV and kills the process; it is
  never silently redirected to other memory, because the range stays reserved
  until the pool object is destroyed.
- A view keeps the pool alive: ``tensor()``/``memoryview(pool)`` hold a
  reference, so dropping the pool object while views exist is safe.

torch is imported only inside ``tensor()``, so the scheduler side can use the
pool without paying for torch.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from xllm import _C

if TYPE_CHECKING:
    import torch

DEFAULT_PAGE_BYTES = 2 << 20


def _view_geometry(
    reserved: int, itemsize: int, shape: Sequence[int] | None, offset: int
) -> tuple[tuple[int, ...], int]:
    """Checks a view request; returns (shape, element count)."""
    try:
        offset = operator.index(offset)
    except TypeError:
        raise ValueError(f"offset must be an int, got {type(offset).__name__}") from None
    if not 0 <= offset <= reserved:
        raise ValueError(f"offset must lie in [0, reserved_bytes = {reserved}], got {offset}")
    if offset % itemsize:
        raise ValueError(
            f"offset must be a multiple of the dtype's size ({itemsize} bytes), got {offset}"
        )
    available = reserved - offset
    if shape is None:
        if available % itemsize:
            raise ValueError(
                f"the {available} bytes past offset {offset} are not a whole number "
                f"of {itemsize}-byte elements; pass shape="
            )
        return (available // itemsize,), available // itemsize
    try:
        dims = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise ValueError(f"shape must be a sequence of ints, got {shape!r}") from None
    if any(d < 0 for d in dims):
        raise ValueError(f"shape must not have negative sizes, got {dims}")
    count = math.prod(dims)
    if count * itemsize > available:
        raise ValueError(
            f"shape {dims} needs {count * itemsize} bytes but only {available} "
            f"bytes of the reservation lie past offset {offset}"
        )
    return dims, count


def _check_dtype(dtype: object) -> torch.dtype:
    import torch

    if dtype is None:
        return torch.uint8
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype, got {dtype!r}")
    return dtype


class VmmPool(_C.VmmPool):
    """Native VMM page pool with a zero-copy torch view.

    ``VmmPool(reserve_bytes, page_bytes=2 MiB)``; see ``xllm._C.VmmPool`` for
    map_page/unmap_page/map_pages/unmap_pages/is_mapped/mapped_offsets,
    physical_bytes/resident_bytes()/reserved_bytes/page_bytes/address and
    release(). Every method is thread-safe.
    """

    def tensor(
        self, dtype: torch.dtype | None = None, shape: Sequence[int] | None = None, offset: int = 0
    ) -> torch.Tensor:
        """A tensor aliasing the reservation from byte ``offset`` (no copy).

        dtype defaults to uint8; shape defaults to 1-D over everything past
        ``offset``. The tensor keeps this pool alive. Only touch elements that
        lie in mapped pages: anything else raises SIGSEGV. Writes are seen by
        every other view of the pool at once (one memory, no copies).
        """
        import torch

        dtype = _check_dtype(dtype)
        if self.released:
            raise ValueError("this VmmPool was released; create a new one")
        dims, count = _view_geometry(self.reserved_bytes, dtype.itemsize, shape, offset)
        if count == 0:
            # frombuffer refuses count=0; an empty slice of a real view still
            # references the pool like any other view.
            return torch.frombuffer(self, dtype=torch.uint8, count=1)[:0].view(dtype).view(dims)
        return torch.frombuffer(self, dtype=dtype, count=count, offset=offset).view(dims)

    as_tensor = tensor


class PreallocatedPagePool:
    """Reference: the same page interface over one plain preallocated tensor.

    All ``reserve_bytes`` are allocated (zeroed) up front and stay held; map and
    unmap are bookkeeping plus zeroing a page on map, so a mapped page reads as
    zeros exactly like the native pool's. Touching an unmapped page here does
    not fault, it is just memory nobody promised to keep. Not thread-safe.
    """

    def __init__(self, reserve_bytes: int, page_bytes: int = DEFAULT_PAGE_BYTES) -> None:
        import torch

        if page_bytes <= 0:
            raise ValueError(f"page_bytes must be positive, got {page_bytes}")
        if reserve_bytes <= 0 or reserve_bytes % page_bytes:
            raise ValueError(
                f"reserve_bytes must be a positive multiple of page_bytes "
                f"({page_bytes}), got {reserve_bytes}"
            )
        self.reserved_bytes = reserve_bytes
        self.page_bytes = page_bytes
        self.num_pages = reserve_bytes // page_bytes
        self._memory = torch.zeros(reserve_bytes, dtype=torch.uint8)
        self._mapped: set[int] = set()

    def _page(self, offset: int, name: str) -> int:
        if offset < 0 or offset % self.page_bytes:
            raise ValueError(
                f"{name} must be a non-negative multiple of page_bytes "
                f"({self.page_bytes}), got {offset}"
            )
        if offset > self.reserved_bytes - self.page_bytes:
            raise ValueError(
                f"{name} = {offset} plus page_bytes {self.page_bytes} runs past the "
                f"reservation of {self.reserved_bytes} bytes"
            )
        return offset // self.page_bytes

    def _check_batch(self, offsets: Iterable[int], want_mapped: bool) -> list[int]:
        pages: list[int] = []
        for i, off in enumerate(offsets):
            page = self._page(off, f"offsets[{i}]")
            if (page in self._mapped) != want_mapped:
                state = "is not mapped" if want_mapped else "is already mapped"
                raise ValueError(f"offsets[{i}] = {off} {state}")
            pages.append(page)
        if len(set(pages)) != len(pages):
            raise ValueError("offsets must not repeat a page")
        return pages

    def map_page(self, offset: int) -> None:
        self.map_pages([offset])

    def unmap_page(self, offset: int) -> None:
        self.unmap_pages([offset])

    def map_pages(self, offsets: Iterable[int]) -> None:
        for page in self._check_batch(offsets, want_mapped=False):
            start = page * self.page_bytes
            self._memory[start : start + self.page_bytes].zero_()
            self._mapped.add(page)

    def unmap_pages(self, offsets: Iterable[int]) -> None:
        for page in self._check_batch(offsets, want_mapped=True):
            self._mapped.discard(page)

    def is_mapped(self, offset: int) -> bool:
        return self._page(offset, "offset") in self._mapped

    def mapped_offsets(self) -> list[int]:
        return [p * self.page_bytes for p in sorted(self._mapped)]

    @property
    def physical_bytes(self) -> int:
        return len(self._mapped) * self.page_bytes

    def resident_bytes(self) -> int:
        """Preallocation holds the whole range whether pages are mapped or not."""
        return self.reserved_bytes

    def tensor(
        self, dtype: torch.dtype | None = None, shape: Sequence[int] | None = None, offset: int = 0
    ) -> torch.Tensor:
        dtype = _check_dtype(dtype)
        dims, count = _view_geometry(self.reserved_bytes, dtype.itemsize, shape, offset)
        flat = self._memory[offset : offset + count * dtype.itemsize]
        return flat.view(dtype).view(dims)

    as_tensor = tensor
