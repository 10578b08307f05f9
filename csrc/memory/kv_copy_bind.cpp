// Python binding of the KV block copies (csrc/memory/kv_copy.h).
//
// These take raw addresses (ints): the KV cache's regions and a tier's slot
// array. They are internal to xllm.kvcache, which owns both memories and
// checks every block id and slot against them before calling; a wrong address
// here is a crash, not an error. Copies run with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "common/tensor.h"
#include "memory/kv_copy.h"

namespace xllm {
namespace py = pybind11;

namespace {

void check_lengths(size_t blocks, size_t slots) {
  if (blocks != slots) fail("blocks and slots must have the same length, got ", blocks, " and ", slots);
}

template <class T>
std::vector<T*> as_pointers(const std::vector<uintptr_t>& addrs) {
  std::vector<T*> out(addrs.size());
  for (size_t i = 0; i < addrs.size(); ++i) {
    if (addrs[i] == 0) fail("regions[", i, "] is a null address");
    out[i] = reinterpret_cast<T*>(addrs[i]);
  }
  return out;
}

}  // namespace

void register_kv_copy(py::module_& m) {
  m.def(
      "kv_gather_blocks",
      [](const std::vector<uintptr_t>& regions, size_t segment_bytes,
         const std::vector<int64_t>& blocks, uintptr_t dst, size_t slot_bytes,
         const std::vector<int64_t>& slots) {
        check_lengths(blocks.size(), slots.size());
        if (slot_bytes < regions.size() * segment_bytes) fail("slot_bytes is smaller than a block");
        const auto ptrs = as_pointers<const uint8_t>(regions);
        std::vector<uint64_t> sums(blocks.size());
        {
          py::gil_scoped_release release;
          kv_gather_blocks(ptrs.data(), ptrs.size(), segment_bytes, blocks.data(), blocks.size(),
                           reinterpret_cast<uint8_t*>(dst), slot_bytes, slots.data(), sums.data());
        }
        return sums;
      },
      py::arg("regions"), py::arg("segment_bytes"), py::arg("blocks"), py::arg("dst"),
      py::arg("slot_bytes"), py::arg("slots"),
      "Copies KV blocks into tier slots; returns each block's checksum.");
  m.def(
      "kv_scatter_blocks",
      [](uintptr_t src, size_t slot_bytes, const std::vector<int64_t>& slots,
         const std::vector<uint64_t>& checksums, const std::vector<uintptr_t>& regions,
         size_t segment_bytes, const std::vector<int64_t>& blocks) {
        check_lengths(blocks.size(), slots.size());
        check_lengths(blocks.size(), checksums.size());
        if (slot_bytes < regions.size() * segment_bytes) fail("slot_bytes is smaller than a block");
        const auto ptrs = as_pointers<uint8_t>(regions);
        py::gil_scoped_release release;
        return kv_scatter_blocks(reinterpret_cast<const uint8_t*>(src), slot_bytes, slots.data(),
                                 checksums.data(), slots.size(), ptrs.data(), ptrs.size(),
                                 segment_bytes, blocks.data());
      },
      py::arg("src"), py::arg("slot_bytes"), py::arg("slots"), py::arg("checksums"),
      py::arg("regions"), py::arg("segment_bytes"), py::arg("blocks"),
      "Copies tier slots into KV blocks, checking each; returns how many leading blocks are "
      "intact.");
  m.def(
      "kv_disk_read",
      [](int fd, const std::vector<int64_t>& offsets, const std::vector<uint64_t>& checksums,
         const std::vector<uintptr_t>& regions, size_t segment_bytes,
         const std::vector<int64_t>& blocks) {
        check_lengths(blocks.size(), offsets.size());
        check_lengths(blocks.size(), checksums.size());
        const auto ptrs = as_pointers<uint8_t>(regions);
        DiskIoResult r;
        {
          py::gil_scoped_release release;
          r = kv_disk_read(fd, offsets.data(), checksums.data(), blocks.size(), ptrs.data(),
                           ptrs.size(), segment_bytes, blocks.data());
        }
        return py::make_tuple(r.done, r.error);
      },
      py::arg("fd"), py::arg("offsets"), py::arg("checksums"), py::arg("regions"),
      py::arg("segment_bytes"), py::arg("blocks"),
      "Reads KV blocks from a file, checking each; returns (blocks done, error): error 0, an "
      "errno, -1 for a short read, -2 for a failed checksum.");
  m.def(
      "kv_disk_write",
      [](int fd, const std::vector<int64_t>& offsets, const std::vector<uintptr_t>& regions,
         size_t segment_bytes, const std::vector<int64_t>& blocks) {
        check_lengths(blocks.size(), offsets.size());
        const auto ptrs = as_pointers<const uint8_t>(regions);
        std::vector<uint64_t> sums(blocks.size());
        DiskIoResult r;
        {
          py::gil_scoped_release release;
          r = kv_disk_write(fd, offsets.data(), blocks.size(), ptrs.data(), ptrs.size(),
                            segment_bytes, blocks.data(), sums.data());
        }
        sums.resize(r.done);
        return py::make_tuple(sums, r.error);
      },
      py::arg("fd"), py::arg("offsets"), py::arg("regions"), py::arg("segment_bytes"),
      py::arg("blocks"),
      "Writes KV blocks to a file; returns (checksums of the blocks written, error) as "
      "kv_disk_read.");
  m.def(
      "kv_block_checksum",
      [](uintptr_t addr, size_t nbytes, size_t segment_bytes) {
        if (segment_bytes == 0 || nbytes % segment_bytes) {
          fail("nbytes must be a positive multiple of segment_bytes");
        }
        const auto* p = reinterpret_cast<const uint8_t*>(addr);
        py::gil_scoped_release release;
        BlockChecksum c;
        for (size_t off = 0; off < nbytes; off += segment_bytes) c.update(p + off, segment_bytes);
        return c.digest();
      },
      py::arg("addr"), py::arg("nbytes"), py::arg("segment_bytes"),
      "The checksum kv_gather_blocks gives a block stored at addr (segment by segment).");
}

}  // namespace xllm
