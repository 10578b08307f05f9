// Element-wise layer ops of a decoder step, fused: residual add + RMSNorm,
// SiLU(gate) * up, and rotary embedding in place. In torch each is 4-8 small
// dispatches; at decode sizes ([1, 576]) those cost tens of microseconds per
// call, more than the arithmetic. fp32 only (the CPU compute dtype); rows are
// split across threads only when there are many (prefill).
//
// Roundings follow transformers' ops: RMSNorm computes x * (1 / sqrt(mean(x^2) +
// eps)) then * weight, rotary computes x1*cos - x2*sin and x2*cos + x1*sin with
// each product rounded (this file is compiled with -ffp-contract=off, so no FMA
// contraction), SiLU is g / (1 + exp(-g)). Only the order of the mean's sum and
// exp's last bit differ.
#include <omp.h>
#include <pybind11/pybind11.h>

#include <cmath>

#include "attention/vec.h"
#include "common/cpu_info.h"
#include "common/tensor.h"

namespace xllm {
namespace py = pybind11;

namespace {

constexpr int64_t kParallelRows = 32;  // fewer rows than this run on the calling thread

int threads_for_rows(int64_t rows) { return rows < kParallelRows ? 1 : omp_get_max_threads(); }

// ---- RMSNorm ----------------------------------------------------------------

void rms_row_scalar(const float* x, const float* w, float eps, int64_t h, float* out) {
  float ss = 0.0f;
  for (int64_t i = 0; i < h; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(h) + eps);
  for (int64_t i = 0; i < h; ++i) out[i] = (x[i] * inv) * w[i];
}

XLLM_AVX2 void rms_row_avx2(const float* x, const float* w, float eps, int64_t h, float* out) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= h; i += 16) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    acc0 = _mm256_add_ps(acc0, _mm256_mul_ps(a, a));
    acc1 = _mm256_add_ps(acc1, _mm256_mul_ps(b, b));
  }
  float ss = attn::hsum(_mm256_add_ps(acc0, acc1));
  for (; i < h; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(h) + eps);
  const __m256 vinv = _mm256_set1_ps(inv);
  i = 0;
  for (; i + 8 <= h; i += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), vinv);
    _mm256_storeu_ps(out + i, _mm256_mul_ps(v, _mm256_loadu_ps(w + i)));
  }
  for (; i < h; ++i) out[i] = (x[i] * inv) * w[i];
}

XLLM_AVX2 void add_avx2(float* r, const float* x, int64_t h) {
  int64_t i = 0;
  for (; i + 8 <= h; i += 8) {
    _mm256_storeu_ps(r + i, _mm256_add_ps(_mm256_loadu_ps(r + i), _mm256_loadu_ps(x + i)));
  }
  for (; i < h; ++i) r[i] += x[i];
}

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
  const bool avx2 = active_isa() == Isa::kAvx2;
  const float* xp = x.ptr<float>();
  const float* wp = w.ptr<float>();
  float* op = out.ptr<float>();
  const float e = static_cast<float>(eps);
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static) num_threads(threads_for_rows(rows))
  for (int64_t i = 0; i < rows; ++i) {
    const float* src = xp + i * x.stride[0];
    if (res) {
      float* r = res + i * res_stride;
      if (avx2) {
        add_avx2(r, src, h);
      } else {
        for (int64_t j = 0; j < h; ++j) r[j] += src[j];
      }
      src = r;
    }
    if (avx2) {
      rms_row_avx2(src, wp, e, h, op + i * out.stride[0]);
    } else {
      rms_row_scalar(src, wp, e, h, op + i * out.stride[0]);
    }
  }
}

// ---- SiLU(gate) * up ----------------------------------------------------------

XLLM_AVX2 void silu_mul_avx2(const float* g, const float* u, int64_t d, float* out) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 e = attn::exp8(_mm256_xor_ps(gv, sign));
    const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
  }
  for (; i < d; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

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
  const bool avx2 = active_isa() == Isa::kAvx2;
  const float* xp = x.ptr<float>();
  float* op = out.ptr<float>();
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static) num_threads(threads_for_rows(rows))
  for (int64_t i = 0; i < rows; ++i) {
    const float* g = xp + i * x.stride[0];
    float* o = op + i * out.stride[0];
    if (avx2) {
      silu_mul_avx2(g, g + d, d, o);
    } else {
      for (int64_t j = 0; j < d; ++j) o[j] = g[j] / (1.0f + std::exp(-g[j])) * g[d + j];
    }
  }
}

// ---- rotary embedding ---------------------------------------------------------

XLLM_AVX2 void rotate_avx2(float* x1, float* x2, const float* c, const float* s, int64_t half) {
  int64_t i = 0;
  for (; i + 8 <= half; i += 8) {
    const __m256 a = _mm256_loadu_ps(x1 + i), b = _mm256_loadu_ps(x2 + i);
    const __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
    _mm256_storeu_ps(x1 + i, _mm256_sub_ps(_mm256_mul_ps(a, cv), _mm256_mul_ps(b, sv)));
    _mm256_storeu_ps(x2 + i, _mm256_add_ps(_mm256_mul_ps(b, cv), _mm256_mul_ps(a, sv)));
  }
  for (; i < half; ++i) {
    const float a = x1[i], b = x2[i];
    x1[i] = a * c[i] - b * s[i];
    x2[i] = b * c[i] + a * s[i];
  }
}

// x [T, heads, head_dim] (rows strided, heads contiguous) rotated in place at positions.
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
  if (x.stride[2] != 1 || x.stride[1] != hd) {
    fail("argument 'x' must have contiguous heads (stride(1) == head_dim, stride(2) == 1)");
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
  const bool avx2 = active_isa() == Isa::kAvx2;
  float* xp = x.ptr<float>();
  const float* cp = cs.ptr<float>();
  const float* sp = sn.ptr<float>();
  py::gil_scoped_release release;
#pragma omp parallel for schedule(static) num_threads(threads_for_rows(rows))
  for (int64_t i = 0; i < rows; ++i) {
    const float* c = cp + pp[i] * half;
    const float* s = sp + pp[i] * half;
    for (int64_t h = 0; h < heads; ++h) {
      float* x1 = xp + i * x.stride[0] + h * hd;
      if (avx2) {
        rotate_avx2(x1, x1 + half, c, s, half);
      } else {
        for (int64_t j = 0; j < half; ++j) {
          const float a = x1[j], b = x1[half + j];
          x1[j] = a * c[j] - b * s[j];
          x1[half + j] = b * c[j] + a * s[j];
        }
      }
    }
  }
}

}  // namespace

void register_layer_ops(py::module_& m) {
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
