// Registers BlockWeight (a weight in quantization blocks, see block_linear.h)
// in xllm._C. The tensors are checked once, when the weight is built; a call
// then only reads its input and output, which keeps the per-call cost of a
// decode step's ~200 linears small.
#include <pybind11/pybind11.h>

#include "quant/block_weight.h"

namespace xllm {
namespace py = pybind11;

void register_quant(py::module_& m) {
  // Where the amx level switches the linears to its tiles (tests and docs read these).
  m.attr("AMX_MIN_ROWS") = quant::kAmxMinRows;
  m.attr("AMX_INT8_MIN_ROWS") = py::dict(py::arg("q8_0") = quant::kAmxInt8MinRows,
                                        py::arg("q4_1") = quant::kAmxInt8MinRowsQ4);
  // From these rows + 1 int16 at the avx2 level runs the exact fp32 tiles instead.
  m.attr("X16_AVX2_MAX_ROWS") = quant::kX16MaxRowsAvx2;
  py::class_<BlockWeight>(m, "BlockWeight",
                          "A weight [out_features, in_features] in GGUF-style blocks of 32 "
                          "(q4_1: w = d*q + m; q8_0: w = d*q) or plain bf16/f32 rows, decoded "
                          "exactly to fp32 on the fly; or bf16 rows computed in bf16 "
                          "arithmetic (bf16_gemm: x rounded to bf16, fp32 sums; AMX or "
                          "AVX512-BF16 where present). arithmetic 'int8' / 'int16': q4_1 or q8_0 "
                          "blocks times x quantized per block of 32 to 8 / 16 bits, integer "
                          "dot products. Layout: xllm/ops/blocks.py.")
      .def(py::init<const std::string&, py::object, py::object, py::object, py::object,
                    const std::string&>(),
           py::arg("format"), py::arg("qs"), py::arg("scales") = py::none(),
           py::arg("mins") = py::none(), py::arg("bias") = py::none(),
           py::arg("arithmetic") = "fp32")
      .def("linear", &BlockWeight::linear, py::arg("x"), py::arg("out"),
           "out [M, out_features] = x [M, in_features] @ W^T (+ bias), fp32.")
      .def("linear_silu_and_mul", &BlockWeight::linear_silu_and_mul, py::arg("x"),
           py::arg("out"),
           "out [M, out_features / 2] = silu(x @ W_gate^T) * (x @ W_up^T) for a gate|up "
           "weight (gate rows first), fp32: one fused pass where the format has it (bf16 "
           "rows or int8 on AMX tiles), else the linear and then silu_and_mul; the same bits "
           "either way.")
      .def("dequantize", &BlockWeight::dequantize, py::arg("out"),
           "out [out_features, in_features] = W as fp32 (bit-identical to gguf's dequantize).")
      .def_property_readonly("out_features", &BlockWeight::rows)
      .def_property_readonly("in_features", &BlockWeight::cols)
      .def_property_readonly("format", &BlockWeight::format)
      .def_property_readonly("arithmetic", &BlockWeight::arithmetic,
                             "'fp32' (exact decode), 'bf16' (bf16_gemm) or 'int8' (q4_1/q8_0 "
                             "with int8 activations, csrc/quant/int8_dot.h).")
      .def_property_readonly("nbytes", &BlockWeight::nbytes,
                             "Bytes of weight storage the kernels read.");
}

}  // namespace xllm
