// Registers MoeExperts (csrc/moe/moe.h) in xllm._C.
#include "moe/moe.h"

namespace xllm {

void register_moe(py::module_& m) {
  py::class_<MoeExperts>(m, "MoeExperts",
                         "A mixture-of-experts MLP's experts (csrc/moe/moe.cpp): per expert e "
                         "gate_up[e] [2I, H] and down[e] [H, I] as BlockWeights (any format).")
      .def(py::init<const py::list&, const py::list&>(), py::arg("gate_up"), py::arg("down"))
      .def("forward", &MoeExperts::forward, py::arg("x"), py::arg("ids"), py::arg("weights"),
           py::arg("out"),
           "out [T, H] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) with expert e = "
           "down[e] @ (silu(gate) * up), [gate; up] = gate_up[e] @ x (fp32; ids int64 "
           "[T, k], weights fp32 [T, k]).")
      .def_property_readonly("num_experts", &MoeExperts::num_experts);
}

}  // namespace xllm
