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

// segment_bytes: one size for every region, or one per region (tensor-parallel parts whose
// shares of the heads differ).
std::vector<size_t> segments_of(const py::object& segment_bytes, size_t num_regions) {
  if (py::isinstance<py::int_>(segment_bytes)) {
    const auto one = segment_bytes.cast<int64_t>();
    if (one <= 0) fail("segment_bytes must be positive, got ", one);
    return std::vector<size_t>(num_regions, static_cast<size_t>(one));
  }
  const auto each = segment_bytes.cast<std::vector<int64_t>>();
  if (each.size() != num_regions) {
    fail("segment_bytes has ", each.size(), " sizes for ", num_regions, " regions");
  }
  std::vector<size_t> out(each.size());
  for (size_t r = 0; r < each.size(); ++r) {
    if (each[r] <= 0) fail("segment_bytes[", r, "] must be positive, got ", each[r]);
    out[r] = static_cast<size_t>(each[r]);
  }
  return out;
}

size_t sum_of(const std::vector<size_t>& segments) {
  size_t total = 0;
  for (size_t v : segments) total += v;
  return total;
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
      [](const std::vector<uintptr_t>& regions, const py::object& segment_bytes,
         const std::vector<int64_t>& blocks, uintptr_t dst, size_t slot_bytes,
         const std::vector<int64_t>& slots) {
        const auto segs = segments_of(segment_bytes, regions.size());
        check_lengths(blocks.size(), slots.size());
        if (slot_bytes < sum_of(segs)) fail("slot_bytes is smaller than a block");
        const auto ptrs = as_pointers<const uint8_t>(regions);
        std::vector<uint64_t> sums(blocks.size());
        {
          py::gil_scoped_release release;
          kv_gather_blocks(ptrs.data(), ptrs.size(), segs.data(), blocks.data(), blocks.size(),
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
         const py::object& segment_bytes, const std::vector<int64_t>& blocks) {
        const auto segs = segments_of(segment_bytes, regions.size());
        check_lengths(blocks.size(), slots.size());
        check_lengths(blocks.size(), checksums.size());
        if (slot_bytes < sum_of(segs)) fail("slot_bytes is smaller than a block");
        const auto ptrs = as_pointers<uint8_t>(regions);
        py::gil_scoped_release release;
        return kv_scatter_blocks(reinterpret_cast<const uint8_t*>(src), slot_bytes, slots.data(),
                                 checksums.data(), slots.size(), ptrs.data(), ptrs.size(),
                                 segs.data(), blocks.data());
      },
      py::arg("src"), py::arg("slot_bytes"), py::arg("slots"), py::arg("checksums"),
      py::arg("regions"), py::arg("segment_bytes"), py::arg("blocks"),
      "Copies tier slots into KV blocks, checking each; returns how many leading blocks are "
      "intact.");
  m.def(
      "kv_disk_read",
      [](int fd, const std::vector<int64_t>& offsets, const std::vector<uint64_t>& checksums,
         const std::vector<uintptr_t>& regions, const py::object& segment_bytes,
         const std::vector<int64_t>& blocks) {
        const auto segs = segments_of(segment_bytes, regions.size());
        check_lengths(blocks.size(), offsets.size());
        check_lengths(blocks.size(), checksums.size());
        const auto ptrs = as_pointers<uint8_t>(regions);
        DiskIoResult r;
        {
          py::gil_scoped_release release;
          r = kv_disk_read(fd, offsets.data(), checksums.data(), blocks.size(), ptrs.data(),
                           ptrs.size(), segs.data(), blocks.data());
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
         const py::object& segment_bytes, const std::vector<int64_t>& blocks) {
        const auto segs = segments_of(segment_bytes, regions.size());
        check_lengths(blocks.size(), offsets.size());
        const auto ptrs = as_pointers<const uint8_t>(regions);
        std::vector<uint64_t> sums(blocks.size());
        DiskIoResult r;
        {
          py::gil_scoped_release release;
          r = kv_disk_write(fd, offsets.data(), blocks.size(), ptrs.data(), ptrs.size(),
                            segs.data(), blocks.data(), sums.data());
        }
        sums.resize(r.done);
        return py::make_tuple(sums, r.error);
      },
      py::arg("fd"), py::arg("offsets"), py::arg("regions"), py::arg("segment_bytes"),
      py::arg("blocks"),
      "Writes KV blocks to a file; returns (checksums of the blocks written, error) as "
      "kv_disk_read.");
  m.def(
      "kv_copy_blocks",
      [](const std::vector<uintptr_t>& src_regions, const std::vector<int64_t>& src_blocks,
         const std::vector<uintptr_t>& dst_regions, const std::vector<int64_t>& dst_blocks,
         const py::object& segment_bytes) {
        const auto segs = segments_of(segment_bytes, src_regions.size());
        check_lengths(src_blocks.size(), dst_blocks.size());
        if (src_regions.size() != dst_regions.size()) fail("src and dst region counts differ");
        const auto src = as_pointers<const uint8_t>(src_regions);
        const auto dst = as_pointers<uint8_t>(dst_regions);
        std::vector<uint64_t> sums(src_blocks.size());
        {
          py::gil_scoped_release release;
          kv_copy_blocks(src.data(), src_blocks.data(), dst.data(), dst_blocks.data(),
                         src_blocks.size(), src.size(), segs.data(), sums.data());
        }
        return sums;
      },
      py::arg("src_regions"), py::arg("src_blocks"), py::arg("dst_regions"),
      py::arg("dst_blocks"), py::arg("segment_bytes"),
      "Copies KV blocks between two caches; returns each block's checksum.");
  m.def(
      "kv_blocks_checksums",
      [](const std::vector<uintptr_t>& regions, const py::object& segment_bytes,
         const std::vector<int64_t>& blocks) {
        const auto segs = segments_of(segment_bytes, regions.size());
        const auto ptrs = as_pointers<const uint8_t>(regions);
        std::vector<uint64_t> sums(blocks.size());
        {
          py::gil_scoped_release release;
          kv_blocks_checksums(ptrs.data(), ptrs.size(), segs.data(), blocks.data(),
                              blocks.size(), sums.data());
        }
        return sums;
      },
      py::arg("regions"), py::arg("segment_bytes"), py::arg("blocks"),
      "Each KV block's checksum, in place.");
  m.def(
      "kv_gather_bytes",
      [](const std::vector<uintptr_t>& regions, const py::object& segment_bytes,
         const std::vector<int64_t>& blocks) {
        const auto segs = segments_of(segment_bytes, regions.size());
        const auto ptrs = as_pointers<const uint8_t>(regions);
        const size_t slot = sum_of(segs);
        // A new bytes object, filled before anyone sees it (no zeroing, no second copy).
        PyObject* raw = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(
                                                               slot * blocks.size()));
        if (raw == nullptr) throw py::error_already_set();
        py::bytes out = py::reinterpret_steal<py::bytes>(raw);
        auto* dst = reinterpret_cast<uint8_t*>(PyBytes_AS_STRING(raw));
        std::vector<int64_t> slots(blocks.size());
        for (size_t i = 0; i < slots.size(); ++i) slots[i] = static_cast<int64_t>(i);
        std::vector<uint64_t> sums(blocks.size());
        {
          py::gil_scoped_release release;
          kv_gather_blocks(ptrs.data(), ptrs.size(), segs.data(), blocks.data(), blocks.size(),
                           dst, slot, slots.data(), sums.data());
        }
        return py::make_tuple(out, sums);
      },
      py::arg("regions"), py::arg("segment_bytes"), py::arg("blocks"),
      "KV blocks gathered back to back into a new bytes object, and their checksums.");
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
