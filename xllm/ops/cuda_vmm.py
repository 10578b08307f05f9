"""VMM page pool on a CUDA device: the driver's virtual memory API behind VmmPool's interface.

``CudaVmmPool(reserve_bytes, page_bytes, device)`` reserves one virtual range of device
addresses (``cuMemAddressReserve``) and backs pages of it with physical memory on demand
(``cuMemCreate`` + ``cuMemMap`` + ``cuMemSetAccess``; ``cuMemUnmap`` gives a page back to the
device, the physical handle being released at once so unmapping frees it). ``tensor()`` is
a zero-copy torch view of the range (through ``__cuda_array_interface__``), so a KV cache
is one contiguous tensor per layer while the memory behind it grows and shrinks, as on the
CPU with :class:`xllm.ops.vmm.VmmPool`. The same contract: a page reads as zeros each time
it is mapped; only mapped pages may be touched (a kernel that reads an unmapped page faults
the context).

The driver is reached with ctypes (``libcuda.so.1``): no build step and no dependency; torch
initialises the device's primary context, which every call here makes current on its
thread. ``page_bytes`` must be a multiple of :func:`granularity` (2 MiB on current GPUs).
Not yet run on a GPU: ``tests/test_cuda.py`` holds its checks (``bench/device_check.sh``).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from xllm.ops.vmm import _check_dtype, _view_geometry

if TYPE_CHECKING:
    import torch

__all__ = ["CudaVmmPool", "granularity", "supported"]

_ALLOCATION_TYPE_PINNED = 1
_LOCATION_TYPE_DEVICE = 1
_ACCESS_READWRITE = 3
_GRANULARITY_MINIMUM = 0
_ATTRIBUTE_VMM_SUPPORTED = 102  # CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _AllocationProp(ctypes.Structure):  # CUmemAllocationProp
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int),
                ("location", _Location), ("win32HandleMetaData", ctypes.c_void_p),
                ("allocFlags", _AllocFlags)]


class _AccessDesc(ctypes.Structure):  # CUmemAccessDesc
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


_driver: ctypes.CDLL | None = None
_driver_lock = threading.Lock()
_contexts: dict[int, ctypes.c_void_p] = {}  # device -> its primary context


def _cuda() -> ctypes.CDLL:
    global _driver
    with _driver_lock:
        if _driver is None:
            lib = ctypes.CDLL("libcuda.so.1")
            u64, size = ctypes.c_uint64, ctypes.c_size_t
            for name, args in (
                ("cuInit", [ctypes.c_uint]),
                ("cuDeviceGet", [ctypes.POINTER(ctypes.c_int), ctypes.c_int]),
                ("cuDeviceGetAttribute", [ctypes.POINTER(ctypes.c_int), ctypes.c_int,
                                          ctypes.c_int]),
                ("cuDevicePrimaryCtxRetain", [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]),
                ("cuCtxSetCurrent", [ctypes.c_void_p]),
                ("cuMemGetAllocationGranularity", [ctypes.POINTER(size),
                                                   ctypes.POINTER(_AllocationProp),
                                                   ctypes.c_int]),
                ("cuMemAddressReserve", [ctypes.POINTER(u64), size, size, u64, u64]),
                ("cuMemAddressFree", [u64, size]),
                ("cuMemCreate", [ctypes.POINTER(u64), size, ctypes.POINTER(_AllocationProp),
                                 u64]),
                ("cuMemRelease", [u64]),
                ("cuMemMap", [u64, size, size, u64, u64]),
                ("cuMemUnmap", [u64, size]),
                ("cuMemSetAccess", [u64, size, ctypes.POINTER(_AccessDesc), size]),
                ("cuMemsetD8_v2", [u64, ctypes.c_ubyte, size]),
                ("cuCtxSynchronize", []),
                ("cuGetErrorString", [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]),
            ):
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = args, ctypes.c_int
            _check(lib, lib.cuInit(0), "cuInit")
            _driver = lib
        return _driver


def _check(lib: ctypes.CDLL, status: int, what: str) -> None:
    if status:
        text = ctypes.c_char_p()
        lib.cuGetErrorString(status, ctypes.byref(text))
        message = text.value.decode() if text.value else "unknown error"
        raise RuntimeError(f"{what} failed: CUDA driver error {status} ({message})")


def _prop(device: int) -> _AllocationProp:
    prop = _AllocationProp()
    prop.type = _ALLOCATION_TYPE_PINNED
    prop.location = _Location(_LOCATION_TYPE_DEVICE, device)
    return prop


def _current(device: int) -> ctypes.CDLL:
    """The driver, with ``device``'s primary context (torch's) current on this thread."""
    import torch

    torch.cuda.init()
    lib = _cuda()
    with _driver_lock:
        ctx = _contexts.get(device)
        if ctx is None:  # retained once, for the process's life (torch's context too)
            ctx = ctypes.c_void_p()
            _check(lib, lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), _handle(lib, device)),
                   "cuDevicePrimaryCtxRetain")
            _contexts[device] = ctx
    _check(lib, lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    return lib


def _handle(lib: ctypes.CDLL, device: int) -> int:
    """The driver's CUdevice for ordinal ``device``."""
    handle = ctypes.c_int()
    _check(lib, lib.cuDeviceGet(ctypes.byref(handle), device), "cuDeviceGet")
    return handle.value


def supported(device: int = 0) -> bool:
    """Whether this process can use the driver's virtual memory API on ``device``."""
    try:
        lib = _cuda()
        value = ctypes.c_int()
        if lib.cuDeviceGetAttribute(ctypes.byref(value), _ATTRIBUTE_VMM_SUPPORTED,
                                    _handle(lib, device)):
            return False
        return bool(value.value)
    except (OSError, RuntimeError):
        return False


def granularity(device: int = 0) -> int:
    """The page size unit ``cuMemCreate`` takes on ``device`` (bytes)."""
    lib = _current(device)
    out = ctypes.c_size_t()
    prop = _prop(device)
    _check(lib, lib.cuMemGetAllocationGranularity(ctypes.byref(out), ctypes.byref(prop),
                                                  _GRANULARITY_MINIMUM),
           "cuMemGetAllocationGranularity")
    return out.value


class _DeviceRange:
    """What ``__cuda_array_interface__`` reads: ``nbytes`` bytes at a device address (a
    reference to the pool keeps its range reserved while a view lives)."""

    def __init__(self, pool: CudaVmmPool, address: int, nbytes: int) -> None:
        self.pool = pool
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1",
                                         "data": (address, False), "version": 3,
                                         "strides": None, "stream": None}


class CudaVmmPool:
    """``reserve_bytes`` of device address space on CUDA device ``device``, mapped page by
    page (see the module docstring). Thread-safe (one lock)."""

    def __init__(self, reserve_bytes: int, page_bytes: int, device: int = 0) -> None:
        if type(reserve_bytes) is not int or type(page_bytes) is not int or page_bytes < 1:
            raise ValueError("reserve_bytes and page_bytes must be positive integers")
        unit = granularity(device)
        if page_bytes % unit:
            raise ValueError(f"page_bytes {page_bytes} is not a multiple of the device's "
                             f"allocation granularity {unit}")
        if reserve_bytes < page_bytes or reserve_bytes % page_bytes:
            raise ValueError(f"reserve_bytes {reserve_bytes} must be a positive multiple of "
                             f"page_bytes {page_bytes}")
        self.device = device
        self.page_bytes = page_bytes
        self.reserved_bytes = reserve_bytes
        self._lock = threading.Lock()
        self._mapped: set[int] = set()
        lib = _current(device)
        address = ctypes.c_uint64()
        _check(lib, lib.cuMemAddressReserve(ctypes.byref(address), reserve_bytes, 0, 0, 0),
               "cuMemAddressReserve")
        self.address = address.value
        self.released = False

    def _page(self, offset: int) -> int:
        if type(offset) is not int or offset < 0 or offset >= self.reserved_bytes \
                or offset % self.page_bytes:
            raise ValueError(f"offset {offset!r} is not a page of this pool "
                             f"({self.page_bytes}-byte pages, {self.reserved_bytes} bytes)")
        return offset

    def map_pages(self, offsets: Iterable[int]) -> None:
        """Backs the pages at these byte offsets with zeroed device memory (all or none)."""
        pages = [self._page(o) for o in offsets]
        with self._lock:
            if self.released:
                raise ValueError("this CudaVmmPool was released")
            if len(set(pages)) != len(pages) or any(p in self._mapped for p in pages):
                raise ValueError("a page is already mapped (or named twice)")
            lib = _current(self.device)
            prop = _prop(self.device)
            access = _AccessDesc(_Location(_LOCATION_TYPE_DEVICE, self.device),
                                 _ACCESS_READWRITE)
            done: list[int] = []
            try:
                for page in pages:
                    handle = ctypes.c_uint64()
                    _check(lib, lib.cuMemCreate(ctypes.byref(handle), self.page_bytes,
                                                ctypes.byref(prop), 0), "cuMemCreate")
                    at = self.address + page
                    status = lib.cuMemMap(at, self.page_bytes, 0, handle.value, 0)
                    lib.cuMemRelease(handle.value)  # freed once unmapped
                    _check(lib, status, "cuMemMap")
                    done.append(page)
                    _check(lib, lib.cuMemSetAccess(at, self.page_bytes, ctypes.byref(access),
                                                   1), "cuMemSetAccess")
                    _check(lib, lib.cuMemsetD8_v2(at, 0, self.page_bytes), "cuMemsetD8")
            except BaseException:
                for page in done:
                    lib.cuMemUnmap(self.address + page, self.page_bytes)
                raise
            self._mapped.update(pages)

    def unmap_pages(self, offsets: Iterable[int]) -> None:
        """Gives these pages' memory back to the device; waits for the device's work first
        (a kernel in flight may still read them)."""
        pages = [self._page(o) for o in offsets]
        with self._lock:
            if any(p not in self._mapped for p in pages):
                raise ValueError("a page is not mapped")
            lib = _current(self.device)
            _check(lib, lib.cuCtxSynchronize(), "cuCtxSynchronize")
            for page in pages:
                _check(lib, lib.cuMemUnmap(self.address + page, self.page_bytes), "cuMemUnmap")
                self._mapped.discard(page)

    def mapped_offsets(self) -> list[int]:
        with self._lock:
            return sorted(self._mapped)

    @property
    def physical_bytes(self) -> int:
        return len(self._mapped) * self.page_bytes

    def tensor(self, dtype: torch.dtype | None = None, shape: Sequence[int] | None = None,
               offset: int = 0) -> torch.Tensor:
        """A device tensor aliasing the reservation from byte ``offset`` (no copy); it keeps
        this pool alive. Only touch elements in mapped pages."""
        import torch

        dtype = _check_dtype(dtype)
        if self.released:
            raise ValueError("this CudaVmmPool was released; create a new one")
        dims, count = _view_geometry(self.reserved_bytes, dtype.itemsize, shape, offset)
        nbytes = max(count * dtype.itemsize, 1)
        raw = torch.as_tensor(_DeviceRange(self, self.address + offset, nbytes),
                              device=f"cuda:{self.device}")
        return raw[:count * dtype.itemsize].view(dtype).view(dims)

    def release(self) -> None:
        """Unmaps every page and frees the range; views must not be used after this."""
        with self._lock:
            if self.released:
                return
            lib = _current(self.device)
            lib.cuCtxSynchronize()
            for page in self._mapped:
                lib.cuMemUnmap(self.address + page, self.page_bytes)
            self._mapped.clear()
            lib.cuMemAddressFree(self.address, self.reserved_bytes)
            self.released = True

    def __del__(self) -> None:
        try:
            if not getattr(self, "released", True):
                self.release()
        except Exception:  # noqa: BLE001 (interpreter shutdown: the driver may be gone)
            pass
