"""The paged KV cache's memory, mapped on demand over the native VMM page pool.

Each attention layer has a key and a value tensor ``[num_blocks, num_kv_heads, block_size,
head_size]`` (the layout of :mod:`xllm.ops.kv_cache`; MLA has one tensor per layer, read as
both), so block ``b`` occupies ``segment_bytes`` bytes at ``b * segment_bytes`` of each of the
``tensors_per_layer * num_layers`` *regions*. All regions live in one
:class:`~xllm.ops.vmm.VmmPool` reservation sized for the pool's ceiling; a *page group*
``g`` is page ``g`` of every region, which holds blocks ``[g * blocks_per_group, (g + 1) *
blocks_per_group)`` of every layer. Groups are mapped as
blocks come into use and unmapped when their blocks are all free, so the attention kernels
see one contiguous tensor per layer while the memory behind it grows and shrinks.

A page is a whole number of segments and of system pages, about ``target_page_bytes``
(2 MiB) large. torch is imported only by :meth:`KVMemory.tensors`; the scheduler's side
(:mod:`xllm.kvcache.pool`) maps and unmaps without it.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from xllm.ops.vmm import VmmPool

if TYPE_CHECKING:
    import torch

__all__ = ["KVMemory", "PeerMemory"]

DEFAULT_TARGET_PAGE_BYTES = 2 << 20


class KVMemory:
    """Reserved address space for ``num_blocks`` KV blocks of ``num_layers`` layers; page
    groups mapped on demand. Thread-safe as the VMM pool is (one mutex)."""

    def __init__(self, num_blocks: int, num_layers: int, segment_bytes: int,
                 target_page_bytes: int = DEFAULT_TARGET_PAGE_BYTES,
                 tensors_per_layer: int = 2, blocks_per_group: int | None = None,
                 cuda_device: int | None = None) -> None:
        """``blocks_per_group``: groups of exactly that many blocks where that is a whole
        number of system pages (a tensor-parallel worker's, to match rank 0's groups), else
        pages of about ``target_page_bytes``. ``cuda_device``: the memory is that CUDA
        device's, through the driver's VMM API (:class:`~xllm.ops.cuda_vmm.CudaVmmPool`;
        pages a whole number of its allocation granularity), not host memory; its regions
        are then device addresses."""
        for name, value in (("num_blocks", num_blocks), ("num_layers", num_layers),
                            ("segment_bytes", segment_bytes),
                            ("target_page_bytes", target_page_bytes),
                            ("tensors_per_layer", tensors_per_layer)):
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.cuda_device = cuda_device
        if cuda_device is None:
            system_page = mmap.PAGESIZE
        else:
            from xllm.ops.cuda_vmm import granularity

            system_page = granularity(cuda_device)
        unit = math.lcm(segment_bytes, system_page)
        self.page_bytes = unit * max(1, target_page_bytes // unit)
        if blocks_per_group and blocks_per_group * segment_bytes % system_page == 0:
            self.page_bytes = blocks_per_group * segment_bytes
        self.blocks_per_group = self.page_bytes // segment_bytes
        self.num_blocks = num_blocks
        self.num_layers = num_layers
        self.segment_bytes = segment_bytes
        if tensors_per_layer not in (1, 2):
            raise ValueError(f"tensors_per_layer must be 1 or 2, got {tensors_per_layer}")
        self.tensors_per_layer = tensors_per_layer
        self.num_regions = tensors_per_layer * num_layers
        self.num_groups = -(-num_blocks // self.blocks_per_group)
        self.region_bytes = self.num_groups * self.page_bytes
        if cuda_device is None:
            self.vmm = VmmPool(self.region_bytes * self.num_regions, self.page_bytes)
        else:
            from xllm.ops.cuda_vmm import CudaVmmPool

            self.vmm = CudaVmmPool(self.region_bytes * self.num_regions, self.page_bytes,
                                   cuda_device)
        base = self.vmm.address
        self.regions = [base + r * self.region_bytes for r in range(self.num_regions)]
        self._mapped = [False] * self.num_groups
        self.num_mapped_groups = 0
        self.version = 0  # counts maps and unmaps (a follower syncs when it changes)

    def group_blocks(self, group: int) -> range:
        """The block ids group ``group`` holds (the last group may be short)."""
        start = group * self.blocks_per_group
        return range(start, min(start + self.blocks_per_group, self.num_blocks))

    def is_mapped(self, group: int) -> bool:
        return self._mapped[group]

    def _offsets(self, group: int) -> list[int]:
        page = group * self.page_bytes
        return [r * self.region_bytes + page for r in range(self.num_regions)]

    def map_group(self, group: int) -> None:
        """Backs group ``group`` of every region with zeroed memory."""
        if self._mapped[group]:
            raise ValueError(f"page group {group} is already mapped")
        self.vmm.map_pages(self._offsets(group))
        self._mapped[group] = True
        self.num_mapped_groups += 1
        self.version += 1

    def unmap_group(self, group: int) -> None:
        """Returns group ``group``'s memory to the OS; its blocks must not be touched until it
        is mapped again."""
        if not self._mapped[group]:
            raise ValueError(f"page group {group} is not mapped")
        self.vmm.unmap_pages(self._offsets(group))
        self._mapped[group] = False
        self.num_mapped_groups -= 1
        self.version += 1

    def mapped_groups(self) -> list[bool]:
        """Whether each page group is mapped (a copy)."""
        return list(self._mapped)

    def follow(self, mapped: Sequence[bool], blocks_per_group: int) -> tuple[int, int]:
        """Maps exactly the groups that hold a block of another memory's mapped groups (the
        same block ids in groups of ``blocks_per_group``): a tensor-parallel worker's share
        of the pool follows rank 0's, whose segments (heads) and so groups differ. Returns
        (groups mapped, groups unmapped)."""
        state = np.asarray(mapped, dtype=bool)
        if blocks_per_group < 1 or len(state) != -(-self.num_blocks // blocks_per_group):
            raise ValueError(f"{len(state)} groups of {blocks_per_group} blocks do not cover "
                             f"this memory's {self.num_blocks} blocks")
        covered = np.concatenate(([0], np.cumsum(state)))
        g = np.arange(self.num_groups)
        first = g * self.blocks_per_group // blocks_per_group
        last = (np.minimum((g + 1) * self.blocks_per_group, self.num_blocks) - 1) \
            // blocks_per_group
        want = (covered[last + 1] - covered[first]) > 0
        have = np.asarray(self._mapped, dtype=bool)
        for group in np.flatnonzero(have & ~want).tolist():
            self.unmap_group(group)
        grow = np.flatnonzero(want & ~have).tolist()
        for group in grow:
            self.map_group(group)
        return len(grow), int((have & ~want).sum())

    @property
    def mapped_bytes(self) -> int:
        return self.num_mapped_groups * self.page_bytes * self.num_regions

    @property
    def reserved_bytes(self) -> int:
        return self.region_bytes * self.num_regions

    def tensors(self, shape: tuple[int, ...], dtype: torch.dtype) -> list[tuple[torch.Tensor,
                                                                              torch.Tensor]]:
        """Per layer (key_cache, value_cache) views of ``shape`` over the regions (no copy); with
        one tensor per layer the pair is that view twice."""
        elems = math.prod(shape)
        if shape[0] != self.num_blocks or elems * dtype.itemsize != (
                self.num_blocks * self.segment_bytes):
            raise ValueError(f"shape {shape} of {dtype} does not cover {self.num_blocks} blocks "
                             f"of {self.segment_bytes} bytes")
        views = [self.vmm.tensor(dtype, shape, offset=r * self.region_bytes)
                 for r in range(self.num_regions)]
        n = self.tensors_per_layer
        return [(views[n * i], views[n * i + n - 1]) for i in range(self.num_layers)]


_VMM_MEMFD = "/memfd:xllm-vmm (deleted)"  # what /proc/<pid>/fd/<fd> of a VmmPool reads


class PeerMemory:
    """Another process's KV memory mapped into this one (same host: a peer instance's, or a
    tensor-parallel worker's share of the pool), cached by the memfd's
    identity: (pid, fd) and its inode, since a closed fd number is soon reused by another
    memfd (a restarted engine in the same process). Callers keep the returned mapping
    object referenced while they copy: a cache eviction on another thread then drops only
    the cache's reference, never unmapping memory a copy is using."""

    _cache: dict[tuple[int, int, int], tuple[mmap.mmap, int]] = {}

    @classmethod
    def regions(cls, pid: int, fd: int, region_bytes: int, num_regions: int
                ) -> tuple[mmap.mmap, list[int]]:
        path = f"/proc/{pid}/fd/{fd}"
        key = (pid, fd, os.stat(path).st_ino)
        entry = cls._cache.get(key)
        size = region_bytes * num_regions
        if entry is None or entry[0].size() < size:
            # Only an xllm KV memory (a VMM pool's memfd): a request can never make this
            # process write into some other file another process has open.
            if os.readlink(path) != _VMM_MEMFD:
                raise PermissionError(f"{path} is not an xllm KV memory")
            handle = os.open(path, os.O_RDWR)
            try:
                if os.fstat(handle).st_ino != key[2]:
                    raise OSError(f"{path} changed while it was opened")
                mm = mmap.mmap(handle, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(handle)
            base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
            if len(cls._cache) > 16:  # peers come and go: keep a few
                cls._cache.clear()
            cls._cache[key] = entry = (mm, base)
        mm, base = entry
        return mm, [base + r * region_bytes for r in range(num_regions)]

    @classmethod
    def parts(cls, parts: Sequence[tuple[int, int, int]], num_regions: int
              ) -> tuple[list[mmap.mmap], list[int]]:
        """:meth:`regions` of several memories, (pid, memfd, region bytes) each, in order:
        their mappings and every one's ``num_regions`` regions after the one before's."""
        mappings, regions = [], []
        for pid, fd, region_bytes in parts:
            mapping, addresses = cls.regions(pid, fd, region_bytes, num_regions)
            mappings.append(mapping)
            regions += addresses
        return mappings, regions
