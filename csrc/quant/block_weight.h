// BlockWeight: a weight in quantization blocks (block_linear.h) held for Python,
// with its tensors checked once at construction. Bound in quant_bind.cpp; the
// native decoder stack (csrc/model) calls linear_raw() on it directly.
#pragma once

#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "common/tensor.h"
#include "layers/rowops.h"
#include "quant/bf16_gemm.h"
#include "quant/block_linear.h"
#include "quant/int8_dot.h"

namespace xllm {
namespace py = pybind11;

class BlockWeight {
 public:
  BlockWeight(const std::string& format, py::object qs, py::object scales, py::object mins,
              py::object bias, const std::string& arithmetic = "fp32")
      : qs_(std::move(qs)), scales_(std::move(scales)), mins_(std::move(mins)),
        bias_(std::move(bias)) {
    if (format == "q4_1") {
      m_.format = quant::Format::kQ4_1;
    } else if (format == "q8_0") {
      m_.format = quant::Format::kQ8_0;
    } else if (format == "bf16") {
      m_.format = quant::Format::kBF16;
    } else if (format == "f32") {
      m_.format = quant::Format::kF32;
    } else if (format == "bf16_gemm") {
      m_.format = quant::Format::kBF16;
      bf16_gemm_ = true;
    } else {
      fail("argument 'format' must be 'q4_1', 'q8_0', 'bf16', 'f32' or 'bf16_gemm', got '",
           format, "'");
    }
    format_ = format;
    const bool q4 = m_.format == quant::Format::kQ4_1;
    const bool blocked = q4 || m_.format == quant::Format::kQ8_0;
    if (arithmetic == "int8" || arithmetic == "int16") {
      if (!blocked) {
        fail("arithmetic '", arithmetic, "' needs format 'q4_1' or 'q8_0', got '", format, "'");
      }
      int8_ = true;
      x16_ = arithmetic == "int16";
    } else if (arithmetic != "fp32") {
      fail("argument 'arithmetic' must be 'fp32', 'int8' or 'int16', got '", arithmetic, "'");
    }
    const Tensor q = host_tensor(qs_, "qs");
    check_ndim(q, 2, "[out_features, row bytes / element]");
    check_contiguous(q);
    m_.qs = q.ptr<uint8_t>();
    m_.scales = nullptr;
    m_.mins = nullptr;
    if (!blocked) {
      check_dtype(q, m_.format == quant::Format::kBF16 ? DType::kBFloat16 : DType::kFloat32);
      if (!scales_.is_none() || !mins_.is_none()) {
        fail("arguments 'scales' and 'mins' must be None for format '", format, "'");
      }
      m_.rows = q.size(0);
      m_.cols = q.size(1);
      if (m_.cols % quant::kBlock) {
        fail("argument 'qs' has ", m_.cols, " in_features; the kernels need a multiple of ",
             quant::kBlock);
      }
    } else {
      if (scales_.is_none()) fail("argument 'scales' is required for format '", format, "'");
      const Tensor s = host_tensor(scales_, "scales");
      check_dtype(s, DType::kFloat32);
      check_ndim(s, 2, "[out_features, in_features / 32]");
      check_contiguous(s);
      m_.rows = s.size(0);
      m_.cols = s.size(1) * quant::kBlock;
      check_dtype(q, q4 ? DType::kUInt8 : DType::kInt8);
      check_dim(q, 0, m_.rows, "out_features (scales.shape[0])");
      check_dim(q, 1, q4 ? m_.cols / 2 : m_.cols, "in_features (32 * scales.shape[1])");
      m_.scales = s.ptr<float>();
      if (q4) {
        if (mins_.is_none()) fail("argument 'mins' is required for format 'q4_1'");
        const Tensor mn = host_tensor(mins_, "mins");
        check_dtype(mn, DType::kFloat32);
        check_ndim(mn, 2, "[out_features, in_features / 32]");
        check_contiguous(mn);
        check_dim(mn, 0, m_.rows, "out_features (scales.shape[0])");
        check_dim(mn, 1, s.size(1), "scales.shape[1]");
        m_.mins = mn.ptr<float>();
      } else if (!mins_.is_none()) {
        fail("argument 'mins' must be None for format 'q8_0' (it has no minimum)");
      }
    }
    if (int8_) {  // repacked once; the GGUF-order blocks are not needed after that
      {
        py::gil_scoped_release release;
        int8_w_ = quant::pack_int8(m_, int8_buffers_);
        // (int16 keeps the blocks' own weights: the tiles' per-row requantization is not)
        if (detected_isa() >= Isa::kAmx && !x16_) {
          amx_w_ = quant::pack_amx_int8(int8_w_, amx_buffers_);
        }
      }
      m_.qs = nullptr;
      m_.scales = m_.mins = nullptr;
      qs_ = scales_ = mins_ = py::none();
    }
    if (bf16_gemm_) {  // packed once; the rows are not needed after that
      packed_ = quant::alloc_packed_bf16(m_.rows, m_.cols);
      {
        py::gil_scoped_release release;
        quant::pack_bf16(reinterpret_cast<const uint16_t*>(m_.qs), m_.cols, m_.rows, m_.cols,
                         packed_.get());
      }
      m_.qs = nullptr;
      qs_ = py::none();
    }
    bias_ptr_ = nullptr;
    if (!bias_.is_none()) {
      const Tensor b = host_tensor(bias_, "bias");
      check_dtype(b, DType::kFloat32);
      check_ndim(b, 1, "[out_features]");
      check_contiguous(b);
      check_dim(b, 0, m_.rows, "out_features (scales.shape[0])");
      bias_ptr_ = b.ptr<float>();
    }
  }

  // out [M, N] = x [M, K] @ W^T (+ bias); rows of x and out may be strided.
  void linear(py::handle x_obj, py::handle out_obj) const {
    const Tensor x = host_tensor(x_obj, "x");
    const Tensor out = host_tensor(out_obj, "out");
    check_x_out(x, out, m_.rows, "out_features");
    const Isa isa = active_isa();
    py::gil_scoped_release release;
    linear_raw(x.ptr<float>(), x.stride[0], x.size(0), out.ptr<float>(), out.stride[0], isa);
  }

  // out [N, K] contiguous fp32 = the decoded weight (bias not applied).
  void dequantize(py::handle out_obj) const {
    const Tensor out = host_tensor(out_obj, "out");
    check_dtype(out, DType::kFloat32);
    check_ndim(out, 2, "[out_features, in_features]");
    check_contiguous(out);
    check_dim(out, 0, m_.rows, "out_features of the weight");
    check_dim(out, 1, m_.cols, "in_features of the weight");
    const Isa isa = active_isa();
    py::gil_scoped_release release;
    if (bf16_gemm_) return quant::unpack_bf16(packed(), out.ptr<float>());
    if (int8_) return quant::unpack_int8(int8_w_, out.ptr<float>());
    quant::dequantize(m_, out.ptr<float>(), isa);
  }

  // out [m, N] (row stride ldo) = x [m, K] (row stride ldx) @ W^T (+ bias); no checks, no
  // GIL needed: for native callers that sized the buffers from rows() and cols().
  void linear_raw(const float* x, int64_t ldx, int64_t m, float* out, int64_t ldo,
                  Isa isa) const {
    if (bf16_gemm_) return quant::bf16_linear(packed(), x, ldx, m, bias_ptr_, out, ldo, isa);
    if (int8_) {
      return quant::int8_linear(int8_w_, amx_w_.q ? &amx_w_ : nullptr, x, ldx, m, bias_ptr_, out,
                                ldo, isa, x16_);
    }
    quant::linear(m_, x, ldx, m, bias_ptr_, out, ldo, isa);
  }

  // A gate|up weight ([2I, K], gate rows first): out [m, I] (row stride ldo) =
  // silu(x W_gate^T) * (x W_up^T) in one pass, bit for bit linear_raw then
  // rowops::silu_and_mul, where this format has the fused form for these rows (bf16_gemm
  // or int8 on the AMX tiles, no bias); returns false, computing nothing, elsewhere.
  bool linear_glu_raw(const float* x, int64_t ldx, int64_t m, float* out, int64_t ldo,
                      Isa isa) const {
    if (bias_ptr_ || m == 0) return false;
    if (bf16_gemm_) return quant::bf16_linear_glu(packed(), x, ldx, m, out, ldo, isa);
    if (int8_) {
      return quant::int8_linear_glu(amx_w_.q ? &amx_w_ : nullptr, x, ldx, m, out, ldo, isa);
    }
    return false;
  }

  // out [M, N / 2] = silu(x W_gate^T) * (x W_up^T) for a gate|up weight (N = 2I, gate rows
  // first): fused where linear_glu_raw runs, else the linear and then silu_and_mul.
  void linear_silu_and_mul(py::handle x_obj, py::handle out_obj) const {
    const Tensor x = host_tensor(x_obj, "x");
    const Tensor out = host_tensor(out_obj, "out");
    if (m_.rows % 2) fail("a gate|up weight has an even number of out_features, got ", m_.rows);
    check_x_out(x, out, m_.rows / 2, "out_features / 2");
    const Isa isa = active_isa();
    const int64_t m = x.size(0), half = m_.rows / 2;
    py::gil_scoped_release release;
    if (linear_glu_raw(x.ptr<float>(), x.stride[0], m, out.ptr<float>(), out.stride[0], isa)) {
      return;
    }
    std::vector<float> gu(static_cast<size_t>(m * 2 * half));
    linear_raw(x.ptr<float>(), x.stride[0], m, gu.data(), 2 * half, isa);
    rowops::silu_and_mul(gu.data(), 2 * half, m, half, out.ptr<float>(), out.stride[0], isa);
  }

  // Bytes of weight storage the kernels read (the packed copy for bf16_gemm).
  int64_t nbytes() const {
    if (bf16_gemm_) return packed().groups() * quant::kBf16Group * m_.cols * 2;
    if (int8_) {
      const int64_t amx = amx_w_.q ? amx_w_.groups() * (amx_w_.group_bytes() + 16 * 4) : 0;
      return int8_w_.groups() * int8_w_.blocks() * (int8_w_.block_bytes() + 2 * 16 * 4) + amx;
    }
    const int64_t scales = m_.scales ? m_.rows * (m_.cols / quant::kBlock) * 4 : 0;
    return m_.rows * m_.qs_row_bytes() + scales * (m_.mins ? 2 : 1);
  }

  int64_t rows() const { return m_.rows; }
  std::string arithmetic() const {
    return x16_ ? "int16" : int8_ ? "int8" : bf16_gemm_ ? "bf16" : "fp32";
  }
  int64_t cols() const { return m_.cols; }
  const std::string& format() const { return format_; }

 private:
  py::object qs_, scales_, mins_, bias_;  // keep the tensors alive
  quant::BlockMatrix m_{};
  const float* bias_ptr_ = nullptr;
  std::string format_;
  bool bf16_gemm_ = false;  // bf16 arithmetic on packed_ (quant/bf16_gemm.h)
  bool int8_ = false;       // int8 activations on int8_w_ (quant/int8_dot.h)
  bool x16_ = false;        // ... in 16 bits (arithmetic 'int16'; int8_ set too)
  quant::PackedInt8Buffers int8_buffers_;
  quant::PackedInt8 int8_w_{};
  quant::PackedAmxInt8Buffers amx_buffers_;
  quant::PackedAmxInt8 amx_w_{};  // int8 on a CPU with AMX: the tile form too (else q null)
  quant::Bf16Buffer packed_;

  quant::PackedBf16 packed() const { return {packed_.get(), m_.rows, m_.cols}; }

  // x [M, in_features] and out [M, cols] fp32 with contiguous rows; `what` names cols.
  void check_x_out(const Tensor& x, const Tensor& out, int64_t cols, const std::string& what)
      const {
    check_dtype(x, DType::kFloat32);
    check_dtype(out, DType::kFloat32);
    check_ndim(x, 2, "[num_tokens, in_features]");
    check_ndim(out, 2, ("[num_tokens, " + what + "]").c_str());
    check_dim(x, 1, m_.cols, "in_features of the weight");
    check_dim(out, 0, x.size(0), "x.shape[0]");
    check_dim(out, 1, cols, what + " of the weight");
    if (x.stride[1] != 1 || out.stride[1] != 1) {
      fail("arguments 'x' and 'out' must have contiguous rows (stride(1) == 1)");
    }
  }
};


}  // namespace xllm
