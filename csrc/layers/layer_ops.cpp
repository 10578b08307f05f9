// Python bindings of the element-wise layer ops (the loops live in rowops.cpp),
// fused: residual add + RMSNorm,
// SiLU(gate) * up, and rotary embedding in place. In torch each is 4-8 small
// dispatches; at decode sizes ([1, 576]) those cost tens of microseconds per
// call, more than the arithmetic. fp32 only (the CPU compute dtype); rows are
// split across threads only when there are many (prefill).
//
// Roundings follow transformers' ops: RMSNorm computes x * (1 / sqrt(mean(x^2) +
// eps)) then * weight, rotary computes x1*cos - x2*sin and x2*cos + x1*sin with
// each product rounded (rowops.cpp is compiled with -ffp-contract=off, so no FMA
// contraction), SiLU is g / (1 + exp(-g)). Only the order of the mean's sum and
// exp's last bit differ.
#include <pybind11/pybind11.h>

#include "common/cpu_info.h"
#include "common/tensor.h"
#include "layers/rowops.h"

namespace xllm {
namespace py = pybind11;

namespace {

// out = rmsnorm(x) * weight; with residual: residual += x, then out = rmsnorm(residual).
void rms_norm(py::handle out_obj, py::handle x_obj, py::handle weight_obj, double eps,
              py::handle residual_obj) {
  const Tensor out = host_tensor(out_obj, "out");
  const Tensor x = host_tensor(x_obj, "x");
  const Tensor w = host_tensor(weight_obj, "weight");
  for (const Tensor* t : {&out, &x, &w}) check_dtype(*t, DType::kFloat32);
  check_ndim(x, 2, "[num_tokens, hidden_size]");
  check_ndim(out, 2, "[num_tokens, hidden_size]");
  check_ndim(w, 1, "[hidden_size]");
  check_contiguous(w);
  const int64_t rows = x.size(0), h = x.size(1);
  check_dim(w, 0, h, "x.shape[1]");
  check_dim(out, 0, rows, "x.shape[0]");
  check_dim(out, 1, h, "x.shape[1]");
  if (x.stride[1] != 1 || out.stride[1] != 1) {
    fail("arguments 'x' and 'out' must have contiguous rows (stride(1) == 1)");
  }
  float* res = nullptr;
  int64_t res_stride = 0;
  if (!residual_obj.is_none()) {
    const Tensor r = host_tensor(residual_obj, "residual");
    check_dtype(r, DType::kFloat32);
    check_ndim(r, 2, "[num_tokens, hidden_size]");
    check_dim(r, 0, rows, "x.shape[0]");
    check_dim(r, 1, h, "x.shape[1]");
    if (r.stride[1] != 1) fail("argument 'residual' must have contiguous rows");
    res = r.ptr<float>();
    res_stride = r.stride[0];
  }
  const Isa isa = active_isa();
  py::gil_scoped_release release;
  rowops::rms_norm(x.ptr<float>(), x.stride[0], res, res_stride, w.ptr<float>(),
                 static_cast<float>(eps), rows, h, out.ptr<float>(), out.stride[0], isa);
}

// ---- SiLU(gate) * up ----------------------------------------------------------

void silu_and_mul(py::handle out_obj, py::handle x_obj) {
  const Tensor out = host_tensor(out_obj, "out");
  const Tensor x = host_tensor(x_obj, "x");
  check_dtype(out, DType::kFloat32);
  check_dtype(x, DType::kFloat32);
  check_ndim(x, 2, "[num_tokens, 2 * d] (gate | up)");
  check_ndim(out, 2, "[num_tokens, d]");
  const int64_t rows = x.size(0), d = x.size(1) / 2;
  if (x.size(1) % 2) fail("argument 'x' must have an even last dimension (gate | up), got ",
                          x.shape_str());
  check_dim(out, 0, rows, "x.shape[0]");
  check_dim(out, 1, d, "x.shape[1] / 2");
  if (x.stride[1] != 1 || out.stride[1] != 1) {
    fail("arguments 'x' and 'out' must have contiguous rows (stride(1) == 1)");
  }
  const Isa isa = active_isa();
  py::gil_scoped_release release;
  rowops::silu_and_mul(x.ptr<float>(), x.stride[0], rows, d, out.ptr<float>(), out.stride[0],
                     isa);
}

// ---- rotary embedding ---------------------------------------------------------

// x [T, heads, head_dim] (rows and heads strided, each head contiguous) rotated in place at
// positions. Strided heads: MLA rotates the rope tail of each head's row.
void rotary(py::handle x_obj, py::handle positions_obj, py::handle cos_obj, py::handle sin_obj) {
  const Tensor x = host_tensor(x_obj, "x");
  const Tensor pos = host_tensor(positions_obj, "positions");
  const Tensor cs = host_tensor(cos_obj, "cos_cache");
  const Tensor sn = host_tensor(sin_obj, "sin_cache");
  check_dtype(x, DType::kFloat32);
  check_dtype(cs, DType::kFloat32);
  check_dtype(sn, DType::kFloat32);
  check_dtype(pos, DType::kInt64);
  check_ndim(x, 3, "[num_tokens, num_heads, head_dim]");
  check_ndim(pos, 1, "[num_tokens]");
  check_ndim(cs, 2, "[max_position, head_dim / 2]");
  check_ndim(sn, 2, "[max_position, head_dim / 2]");
  check_contiguous(cs);
  check_contiguous(sn);
  check_contiguous(pos);
  const int64_t rows = x.size(0), heads = x.size(1), hd = x.size(2), half = hd / 2;
  if (hd % 2) fail("argument 'x' must have an even head_dim, got ", x.shape_str());
  if (x.stride[2] != 1 || (heads > 1 && x.stride[1] < hd)) {
    fail("argument 'x' must have contiguous heads that do not overlap (stride(2) == 1, "
         "stride(1) >= head_dim)");
  }
  check_dim(pos, 0, rows, "x.shape[0]");
  check_dim(cs, 1, half, "head_dim / 2");
  check_dim(sn, 0, cs.size(0), "cos_cache.shape[0]");
  check_dim(sn, 1, half, "head_dim / 2");
  const int64_t* pp = pos.ptr<int64_t>();
  const int64_t max_pos = cs.size(0);
  for (int64_t i = 0; i < rows; ++i) {
    if (pp[i] < 0 || pp[i] >= max_pos) {
      fail("argument 'positions' holds ", pp[i], " at row ", i, "; positions must be in [0, ",
           max_pos, ") (the model's max_position_embeddings)");
    }
  }
  const Isa isa = active_isa();
  py::gil_scoped_release release;
  rowops::rotary(x.ptr<float>(), x.stride[0], rows, heads, hd, x.stride[1], pp, cs.ptr<float>(),
                 sn.ptr<float>(), isa);
}

// ---- argmax over rows ---------------------------------------------------------

void argmax_rows(py::handle out_obj, py::handle x_obj) {
  const Tensor out = host_tensor(out_obj, "out");
  const Tensor x = host_tensor(x_obj, "x");
  check_dtype(x, DType::kFloat32);
  check_dtype(out, DType::kInt64);
  check_ndim(x, 2, "[num_rows, vocab_size]");
  check_ndim(out, 1, "[num_rows]");
  check_contiguous(out);
  check_dim(out, 0, x.size(0), "x.shape[0]");
  if (x.size(1) == 0) fail("argument 'x' has no columns: an argmax needs at least one");
  if (x.stride[1] != 1) fail("argument 'x' must have contiguous rows (stride(1) == 1)");
  const Isa isa = active_isa();
  py::gil_scoped_release release;
  rowops::argmax_rows(x.ptr<float>(), x.stride[0], x.size(0), x.size(1), out.ptr<int64_t>(),
                      isa);
}

// ---- token bitmask (structured outputs) -----------------------------------------

void apply_token_bitmask(py::handle logits_obj, py::handle bitmask_obj, py::handle rows_obj) {
  const Tensor x = host_tensor(logits_obj, "logits");
  const Tensor b = host_tensor(bitmask_obj, "bitmask");
  const Tensor r = host_tensor(rows_obj, "rows");
  check_dtype(x, DType::kFloat32);
  check_dtype(b, DType::kInt32);
  check_dtype(r, DType::kInt64);
  check_ndim(x, 2, "[num_rows, vocab_size]");
  check_ndim(b, 2, "[num_masked_rows, words]");
  check_ndim(r, 1, "[num_masked_rows]");
  check_contiguous(r);
  check_dim(r, 0, b.size(0), "bitmask.shape[0]");
  if (x.stride[1] != 1 || b.stride[1] != 1) {
    fail("arguments 'logits' and 'bitmask' must have contiguous rows (stride(1) == 1)");
  }
  const int64_t v = x.size(1);
  if (b.size(1) * 32 < v) {
    fail("argument 'bitmask' has ", b.size(1), " words per row; ", (v + 31) / 32,
         " are needed for ", v, " logits");
  }
  const int64_t* rows = r.ptr<int64_t>();
  for (int64_t i = 0; i < r.size(0); ++i) {
    if (rows[i] < 0 || rows[i] >= x.size(0)) {
      fail("argument 'rows' holds ", rows[i], " at ", i, "; rows must be in [0, ", x.size(0), ")");
    }
  }
  const Isa isa = active_isa();
  py::gil_scoped_release release;
  rowops::apply_token_bitmask(x.ptr<float>(), x.stride[0], v, b.ptr<int32_t>(), b.stride[0], rows,
                              r.size(0), isa);
}

}  // namespace

void register_layer_ops(py::module_& m) {
  m.def("apply_token_bitmask", &apply_token_bitmask, py::arg("logits"), py::arg("bitmask"),
        py::arg("rows"),
        "In place: logits[rows[i], j] = -inf where bit j % 32 of bitmask[i, j // 32] is 0 "
        "(logits [N, V] fp32, bitmask [M, >= ceil(V / 32)] int32, rows [M] int64): the "
        "structured-output mask of xgrammar's layout.");
  m.def("argmax_rows", &argmax_rows, py::arg("out"), py::arg("x"),
        "out [T] (int64) = the index of each row's first maximum of x [T, V] (fp32, rows may "
        "be strided), as torch.argmax: the first NaN if a row holds one.");
  m.def("rms_norm", &rms_norm, py::arg("out"), py::arg("x"), py::arg("weight"), py::arg("eps"),
        py::arg("residual") = py::none(),
        "out = x / sqrt(mean(x^2) + eps) * weight over rows of x [T, H] (fp32). With "
        "residual [T, H]: residual += x first (in place) and the norm is of the sum.");
  m.def("silu_and_mul", &silu_and_mul, py::arg("out"), py::arg("x"),
        "out [T, d] = silu(x[:, :d]) * x[:, d:] for x [T, 2d] (fp32).");
  m.def("rotary", &rotary, py::arg("x"), py::arg("positions"), py::arg("cos_cache"),
        py::arg("sin_cache"),
        "Rotates x [T, heads, head_dim] (fp32, rows may be strided) in place, halves layout: "
        "x1' = x1*cos - x2*sin, x2' = x2*cos + x1*sin with cos/sin = cache[positions[t]] "
        "([max_position, head_dim / 2] fp32).");
}

}  // namespace xllm
