// Baseline (any CPU) micro-kernels: the fallback when AVX2/FMA is missing and
// the plain statement of what kernels_avx2.cpp computes. Rows still share each
// K/V row; the summation order differs from the vector code, so tests hold both
// paths to the torch reference rather than to each other. No software
// prefetch: this path is for correctness on old CPUs, not for speed.
#include <algorithm>
#include <cmath>
#include <limits>

#include "attention/kernels.h"

namespace xllm::attn {
namespace {

template <class KT>
void qk(const float* q, int64_t ldq, int nrows, const KT* k, int ntok, int hs, float* s,
        int64_t lds, const void* /*next*/, int64_t /*next_bytes*/) {
  for (int t = 0; t < ntok; ++t) {
    const KT* kt = k + t * row_stride<KT>(hs);
    const float scale = row_scale(kt, hs);
    for (int r = 0; r < nrows; ++r) {
      const float* qr = q + r * ldq;
      // Four partial sums break the add dependency chain.
      float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
      int d = 0;
      for (; d + 4 <= hs; d += 4) {
        a0 += qr[d] * to_f32(kt[d]);
        a1 += qr[d + 1] * to_f32(kt[d + 1]);
        a2 += qr[d + 2] * to_f32(kt[d + 2]);
        a3 += qr[d + 3] * to_f32(kt[d + 3]);
      }
      for (; d < hs; ++d) a0 += qr[d] * to_f32(kt[d]);
      s[r * lds + t] = ((a0 + a1) + (a2 + a3)) * scale;
    }
  }
}

template <class KT>
void pv(const float* p, int64_t ldp, int nrows, const KT* v, int ntok, int hs, float* acc,
        const void* /*next*/, int64_t /*next_bytes*/) {
  for (int t = 0; t < ntok; ++t) {
    const KT* vt = v + t * row_stride<KT>(hs);
    const float scale = row_scale(vt, hs);
    for (int r = 0; r < nrows; ++r) {
      const float w = p[r * ldp + t] * scale;
      float* ar = acc + static_cast<int64_t>(r) * hs;
      for (int d = 0; d < hs; ++d) ar[d] += w * to_f32(vt[d]);
    }
  }
}

void softmax(float* s, int64_t lds, int nrows, int ncols, const int* valid, float* m, float* l,
             float* acc, int hs) {
  for (int r = 0; r < nrows; ++r) {
    float* sr = s + r * lds;
    const int n = std::max(valid[r], 0);
    if (n > 0) {
      float mx = -std::numeric_limits<float>::infinity();
      for (int t = 0; t < n; ++t) mx = std::max(mx, sr[t]);
      const float m_new = std::max(m[r], mx);
      float sum = 0;
      for (int t = 0; t < n; ++t) {
        sr[t] = std::exp(sr[t] - m_new);
        sum += sr[t];
      }
      if (m_new > m[r]) {
        const float alpha = std::exp(m[r] - m_new);  // 0 for the first chunk (m = -inf)
        l[r] *= alpha;
        float* ar = acc + static_cast<int64_t>(r) * hs;
        for (int d = 0; d < hs; ++d) ar[d] *= alpha;
        m[r] = m_new;
      }
      l[r] += sum;
    }
    std::fill(sr + n, sr + ncols, 0.0f);
  }
}

}  // namespace

template <class KT>
Kernels<KT> scalar_kernels() {
  return Kernels<KT>{&qk<KT>, &pv<KT>};
}
template Kernels<float> scalar_kernels<float>();
template Kernels<bf16_t> scalar_kernels<bf16_t>();
template Kernels<q8_t> scalar_kernels<q8_t>();

SoftmaxFn scalar_softmax() { return &softmax; }

}  // namespace xllm::attn
