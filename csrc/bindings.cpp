// The one place that names every part of xllm._C. Each csrc/ subdirectory
// defines a register_* function next to its code; this file only wires them.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace xllm {
void register_cpu_info(py::module_& m);
void register_attention(py::module_& m);
void register_block_pool(py::module_& m);
void register_queue(py::module_& m);
void register_vmm(py::module_& m);
void register_kv_copy(py::module_& m);
void register_shm_allreduce(py::module_& m);
void register_quant(py::module_& m);
void register_layer_ops(py::module_& m);
void register_decoder_stack(py::module_& m);
void register_moe(py::module_& m);
void register_moe_route(py::module_& m);
}  // namespace xllm

PYBIND11_MODULE(_C, m) {
  m.doc() = "xllm native core: paged attention, KV cache write, block pool, MPMC queue, "
            "VMM page pool, shared-memory allreduce, block-weight linears, fused layer ops and the native decoder stack.";
  xllm::register_cpu_info(m);
  xllm::register_attention(m);
  xllm::register_block_pool(m);
  xllm::register_queue(m);
  xllm::register_vmm(m);
  xllm::register_kv_copy(m);
  xllm::register_shm_allreduce(m);
  xllm::register_quant(m);
  xllm::register_layer_ops(m);
  xllm::register_decoder_stack(m);
  xllm::register_moe(m);
  xllm::register_moe_route(m);
}
