// Python bindings of the tensor-parallel groups: xllm._C.ShmAllReduce (one host, shared
// memory) and xllm._C.TcpCollective (ranks on several hosts), both xllm._C.Collective.
// Checks the tensor at the boundary, releases the GIL for every wait on peers
// (attaching, each call, close), and maps CommError kinds onto Python
// exceptions: ValueError, TimeoutError, RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>

#include "comm/shm_allreduce.h"
#include "comm/tcp_collective.h"
#include "common/tensor.h"

namespace xllm {
namespace {

using comm::CommError;
using comm::ErrorKind;
using comm::ShmAllReduce;

void translate_comm_error(std::exception_ptr p) {
  try {
    if (p) std::rethrow_exception(p);
  } catch (const CommError& e) {
    switch (e.kind()) {
      case ErrorKind::kInvalidArgument: py::set_error(PyExc_ValueError, e.what()); break;
      case ErrorKind::kTimeout: py::set_error(PyExc_TimeoutError, e.what()); break;
      default: py::set_error(PyExc_RuntimeError, e.what()); break;
    }
  }
}

// Runs Python signal handlers (only the main thread has any) while a rank
// waits, so Ctrl-C interrupts a long wait instead of sitting out the timeout.
void check_python_signals() {
  py::gil_scoped_acquire gil;
  if (PyErr_CheckSignals() != 0) throw py::error_already_set();
}

py::object allreduce(comm::Collective& self, py::handle tensor, bool bf16_sums) {
  Tensor t = host_tensor(tensor, "tensor");
  check_dtype(t, {DType::kFloat32, DType::kBFloat16});
  check_contiguous(t);
  comm::ElemType type =
      t.dtype == DType::kFloat32 ? comm::ElemType::kFloat32 : comm::ElemType::kBFloat16;
  if (bf16_sums && type == comm::ElemType::kFloat32) type = comm::ElemType::kFloat32Bf16Sums;
  {
    // The tensor stays alive: the caller's frame holds it for the whole call.
    py::gil_scoped_release release;
    self.allreduce(t.data, t.numel(), type);
  }
  return py::reinterpret_borrow<py::object>(tensor);
}

py::bytes broadcast(ShmAllReduce& self, py::object message, bool wait_forever) {
  std::string buf;
  if (self.rank() == 0) {
    if (message.is_none()) {
      throw py::value_error("rank 0 broadcasts: argument 'message' must be bytes, got None");
    }
    buf = py::cast<std::string>(py::bytes(message));
  } else if (!message.is_none()) {
    throw py::value_error("only rank 0 sends: pass message=None on rank " +
                          std::to_string(self.rank()));
  }
  {
    py::gil_scoped_release release;
    self.broadcast(buf, wait_forever);
  }
  return py::bytes(buf);
}

void gather(comm::Collective& self, py::handle src, py::handle dst, int64_t rows) {
  const Tensor s = host_tensor(src, "src");
  check_contiguous(s);
  const int64_t nbytes = s.numel() * dtype_size(s.dtype);
  if (rows < 1 || nbytes % rows != 0) {
    throw py::value_error("argument 'rows' must be >= 1 and divide src's " +
                          std::to_string(nbytes) + " bytes, got " + std::to_string(rows));
  }
  void* out = nullptr;
  if (self.rank() == 0) {
    if (dst.is_none()) throw py::value_error("rank 0 receives: argument 'dst' must be a tensor");
    const Tensor d = host_tensor(dst, "dst");
    check_contiguous(d);
    if (d.numel() * dtype_size(d.dtype) != nbytes * self.world_size()) {
      throw py::value_error("argument 'dst' must hold world_size x src's bytes (" +
                            std::to_string(nbytes * self.world_size()) + "), it holds " +
                            std::to_string(d.numel() * dtype_size(d.dtype)));
    }
    out = d.data;
  }
  py::gil_scoped_release release;
  self.gather(s.data, nbytes, out, rows);
}

}  // namespace

void register_shm_allreduce(py::module_& m) {
  py::register_exception_translator(&translate_comm_error);
  py::class_<comm::Collective>(m, "Collective",
                               "A tensor-parallel group's sums and gathers (ShmAllReduce, "
                               "TcpCollective); the native decoder stack sums through one.");
  py::class_<comm::TcpCollective, comm::Collective>(
      m, "TcpCollective",
      "Sums and gathers among ranks on several hosts over TCP connections the caller holds "
      "(rank 0: one per worker, in rank order; a worker: one to rank 0), a star through rank "
      "0. See xllm.ops.tcp_group.")
      .def(py::init<int, int, std::vector<int>, double>(), py::arg("rank"),
           py::arg("world_size"), py::arg("fds"), py::arg("timeout"))
      .def("allreduce", &allreduce, py::arg("tensor"), py::arg("bf16_sums") = false,
           "As ShmAllReduce.allreduce.")
      .def("gather", &gather, py::arg("src"), py::arg("dst"), py::arg("rows") = 1,
           "As ShmAllReduce.gather.")
      .def("close", [](comm::TcpCollective& self) {
             py::gil_scoped_release release;
             self.close();
           },
           "Stops using the connections (their owner closes them). Idempotent.")
      .def_property_readonly("rank", &comm::TcpCollective::rank)
      .def_property_readonly("world_size", &comm::TcpCollective::world_size)
      .def_property_readonly("timeout", &comm::TcpCollective::timeout)
      .def_property_readonly("wait_seconds", &comm::TcpCollective::wait_seconds,
                             "Seconds this rank waited for its peers' bytes, since it joined.")
      .def_property_readonly("closed", &comm::TcpCollective::closed);
  py::class_<ShmAllReduce, comm::Collective>(m, "ShmAllReduce",
                           "Sum-allreduce among world_size processes of this host through a "
                           "POSIX shared-memory segment named after `group`. Blocks until all "
                           "ranks have attached. See xllm.ops.allreduce.")
      .def(py::init([](const std::string& group, int rank, int world_size, double timeout,
                       int64_t buffer_bytes) {
             py::gil_scoped_release release;  // attaching waits for the other ranks
             return std::make_unique<ShmAllReduce>(group, rank, world_size, timeout,
                                                   buffer_bytes, &check_python_signals);
           }),
           py::arg("group"), py::arg("rank"), py::arg("world_size"),
           py::arg("timeout") = ShmAllReduce::kDefaultTimeoutSeconds,
           py::arg("buffer_bytes") = ShmAllReduce::kDefaultBufferBytes)
      .def("allreduce", &allreduce, py::arg("tensor"), py::arg("bf16_sums") = false,
           "Sums `tensor` (CPU, contiguous, float32 or bfloat16) over all ranks, in place; "
           "returns it. bf16_sums: a float32 tensor travels and is summed as bf16 (half the "
           "bytes), widened back after.")
      .def("broadcast", &broadcast, py::arg("message"), py::arg("wait_forever") = false,
           "Rank 0 sends `message` (bytes) to every rank; the others pass None and get it "
           "back. wait_forever: the first wait has no timeout, on any rank.")
      .def("gather", &gather, py::arg("src"), py::arg("dst"), py::arg("rows") = 1,
           "Rank 0's `dst` (world_size x src's bytes) gets every rank's contiguous `src`; "
           "the other ranks pass dst=None. src is `rows` rows; dst is laid out [rows]"
           "[world_size][row]: each row of every rank in rank order (rows=1: [world_size]"
           "[src]).")
      .def("close", [](ShmAllReduce& self) {
             py::gil_scoped_release release;  // waits for a call running in another thread
             self.close();
           },
           "Leaves the group; peers waiting for this rank fail at once. Idempotent.")
      .def_property_readonly("group", &ShmAllReduce::group)
      .def_property_readonly("rank", &ShmAllReduce::rank)
      .def_property_readonly("world_size", &ShmAllReduce::world_size)
      .def_property_readonly("timeout", &ShmAllReduce::timeout)
      .def_property_readonly("buffer_bytes", &ShmAllReduce::buffer_bytes)
      .def_property("busy_wait", &ShmAllReduce::busy_wait, &ShmAllReduce::set_busy_wait,
                    "Seconds a waiting rank keeps its CPU (spin, then yield) before it sleeps.")
      .def_property_readonly("wait_seconds", &ShmAllReduce::wait_seconds,
                             "Seconds this rank waited at barriers for peers not yet arrived "
                             "(their work's skew and wake-ups), since it joined.")
      .def_property_readonly("segment_name", &ShmAllReduce::segment_name)
      .def_property_readonly("closed", &ShmAllReduce::closed)
      .def_static("segment_name_for", &ShmAllReduce::segment_name_for, py::arg("group"),
                  "The /dev/shm name a group uses: '/xllm_ar_<group>'; ValueError if the "
                  "group name is invalid.");
}

}  // namespace xllm
