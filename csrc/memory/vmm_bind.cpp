// Python binding of the VMM page pool (csrc/memory/vmm.h): xllm._C.VmmPool.
//
// The pool exports its whole reserved range through the buffer protocol, one
// writable byte per element, so memoryview(pool) and torch.frombuffer(pool)
// alias it without a copy and hold a reference that keeps the pool (and its
// address range) alive. map/unmap drop the GIL around their syscalls.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <exception>
#include <system_error>

#include "memory/vmm.h"

namespace xllm {
namespace py = pybind11;

namespace {

// std::system_error from the pool becomes OSError(errno, message), which
// Python narrows to the matching subclass (e.g. PermissionError).
void translate_system_error(std::exception_ptr p) {
  try {
    if (p) std::rethrow_exception(p);
  } catch (const std::system_error& e) {
    PyObject* args = Py_BuildValue("(is)", e.code().value(), e.what());
    if (args != nullptr) {
      PyErr_SetObject(PyExc_OSError, args);
      Py_DECREF(args);
    }
  }
}

constexpr const char* kClassDoc = R"doc(A reserved virtual range with fixed-size pages mapped in on demand.

VmmPool(reserve_bytes, page_bytes=2 MiB) reserves reserve_bytes of address space
(no memory). map_page(offset) backs one page with memory that reads as zeros;
unmap_page(offset) returns it to the kernel and leaves the range reserved. The
pool supports the buffer protocol over its whole range (memoryview(pool),
torch.frombuffer(pool)); such views keep the pool alive.

Touching an unmapped page, or any page after release(), raises SIGSEGV: only
touch mapped pages. Methods are thread-safe (one internal mutex).
Errors: ValueError for bad arguments (named), OSError when a syscall fails.)doc";

}  // namespace

void register_vmm(py::module_& m) {
  py::register_local_exception_translator(translate_system_error);
  using Release = py::call_guard<py::gil_scoped_release>;

  py::class_<VmmPool>(m, "VmmPool", py::buffer_protocol(), kClassDoc)
      .def(py::init<int64_t, int64_t>(), py::arg("reserve_bytes"),
           py::arg("page_bytes") = VmmPool::kDefaultPageBytes)
      .def("map_page", &VmmPool::map_page, py::arg("offset"), Release(),
           "Back the page at byte `offset` with zeroed memory; it must be unmapped.")
      .def("unmap_page", &VmmPool::unmap_page, py::arg("offset"), Release(),
           "Unmap the page at byte `offset` and return its memory; it must be mapped.")
      .def("map_pages", &VmmPool::map_pages, py::arg("offsets"), Release(),
           "map_page for many offsets in one call: all checked first, all or nothing.")
      .def("unmap_pages", &VmmPool::unmap_pages, py::arg("offsets"), Release(),
           "unmap_page for many offsets in one call: all checked first, all or nothing.")
      .def("is_mapped", &VmmPool::is_mapped, py::arg("offset"))
      .def("mapped_offsets", &VmmPool::mapped_offsets, "Offsets of the mapped pages, ascending.")
      .def("resident_bytes", &VmmPool::resident_bytes, Release(),
           "Bytes of memory the kernel holds for the pages (memfd st_blocks * 512); "
           "only pages written (or read) since they were mapped count.")
      .def("release", &VmmPool::release, Release(),
           "Unmap every page and free its memory; the range stays reserved (PROT_NONE) "
           "until the pool is destroyed. Idempotent.")
      .def("close", &VmmPool::release, Release(), "Same as release().")
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](VmmPool& pool, py::args) { pool.release(); })
      .def_property_readonly("physical_bytes", &VmmPool::physical_bytes,
                             "Bytes of mapped pages (mapped pages * page_bytes).")
      .def_property_readonly("reserved_bytes", &VmmPool::reserved_bytes)
      .def_property_readonly("page_bytes", &VmmPool::page_bytes)
      .def_property_readonly("num_pages", &VmmPool::num_pages)
      .def_property_readonly(
          "address", [](const VmmPool& pool) { return reinterpret_cast<uintptr_t>(pool.address()); },
          "Base address of the reserved range.")
      .def_property_readonly("released", &VmmPool::released)
      .def_property_readonly("fd", &VmmPool::fd)
      .def("__repr__",
           [](const VmmPool& pool) {
             return "VmmPool(reserved_bytes=" + std::to_string(pool.reserved_bytes()) +
                    ", page_bytes=" + std::to_string(pool.page_bytes()) +
                    ", physical_bytes=" + std::to_string(pool.physical_bytes()) +
                    (pool.released() ? ", released" : "") + ")";
           })
      .def_buffer([](VmmPool& pool) {
        if (pool.released()) {
          throw py::buffer_error("this VmmPool was released; its range can no longer be viewed");
        }
        // [reserved_bytes] uint8, writable.
        return py::buffer_info(pool.address(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {pool.reserved_bytes()}, {int64_t{1}}, false);
      });
}

}  // namespace xllm
