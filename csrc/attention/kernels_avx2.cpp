// AVX2/FMA micro-kernels (see kernels.h). Register tiles are template
// parameters so the compiler keeps the accumulators in the 16 ymm registers:
// QK uses NR rows x NT tokens <= 8 dot products at once, reduced together by
// one hadd tree; PV updates NR rows x DC 8-wide column chunks of acc per V load.
#include <algorithm>
#include <cmath>
#include <limits>

#include "attention/kernels.h"

#if XLLM_HAVE_AVX2_KERNELS
namespace xllm::attn {
namespace {

// Issues prefetches for a byte range a few cache lines per step, so a kernel's
// loop streams the next block in while it computes on the current one.
class Prefetcher {
 public:
  Prefetcher(const void* base, int64_t bytes, int64_t steps)
      : p_(static_cast<const char*>(base)), left_(base ? (bytes + 63) / 64 : 0),
        per_step_(steps > 0 ? (left_ + steps - 1) / steps : left_) {}
  void step() {
    for (int64_t i = 0; i < per_step_ && left_ > 0; ++i, --left_, p_ += 64) {
      _mm_prefetch(p_, _MM_HINT_T0);
    }
  }
  void flush() {
    for (; left_ > 0; --left_, p_ += 64) _mm_prefetch(p_, _MM_HINT_T0);
  }

 private:
  const char* p_;
  int64_t left_, per_step_;
};

// s[r * lds + t] for r < NR, t < NT; k: [NT, hs]; q: [NR, ldq]
template <int NR, int NT, class KT>
XLLM_AVX2 void qk_tile(const float* q, int64_t ldq, const KT* k, int hs, float* s, int64_t lds) {
  static_assert(NR * NT <= 8, "at most 8 accumulators are reduced at once");
  __m256 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
  for (int d = 0; d < hs; d += 8) {
    __m256 kv[NT];
    for (int t = 0; t < NT; ++t) kv[t] = load8(k + static_cast<int64_t>(t) * hs + d);
    for (int r = 0; r < NR; ++r) {
      __m256 qv = _mm256_loadu_ps(q + r * ldq + d);
      for (int t = 0; t < NT; ++t) acc[r * NT + t] = _mm256_fmadd_ps(qv, kv[t], acc[r * NT + t]);
    }
  }
  alignas(32) float sums[8];
  _mm256_store_ps(sums, reduce8(acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7]));
  for (int r = 0; r < NR; ++r) {
    for (int t = 0; t < NT; ++t) s[r * lds + t] = sums[r * NT + t];
  }
}

// Few rows share a K load with several tokens; many rows need one token each.
constexpr int qk_tokens(int rows) { return rows >= 5 ? 1 : (rows >= 3 ? 2 : 8 / rows); }
template <int NR>
constexpr int qk_tokens() {
  return qk_tokens(NR);
}
// Column chunks per PV tile: wider tiles for few rows keep ~8 FMA chains in flight.
constexpr int pv_chunks(int rows) { return rows <= 2 ? 4 : (rows <= 4 ? 2 : 1); }

template <int NR, class KT>
XLLM_AVX2 void qk_rows(const float* q, int64_t ldq, const KT* k, int ntok, int hs, float* s,
                       int64_t lds, Prefetcher& pf) {
  constexpr int NT = qk_tokens<NR>();
  int t = 0;
  for (; t + NT <= ntok; t += NT) {
    pf.step();
    qk_tile<NR, NT>(q, ldq, k + static_cast<int64_t>(t) * hs, hs, s + t, lds);
  }
  for (; t < ntok; ++t) {
    pf.step();
    qk_tile<NR, 1>(q, ldq, k + static_cast<int64_t>(t) * hs, hs, s + t, lds);
  }
}

template <class KT>
XLLM_AVX2 void qk(const float* q, int64_t ldq, int nrows, const KT* k, int ntok, int hs, float* s,
                  int64_t lds, const void* next, int64_t next_bytes) {
  // The first row group streams K from memory; prefetch the next block during it.
  const int nt = qk_tokens(std::min(nrows, 8));
  Prefetcher pf(next, next_bytes, ntok / nt + ntok % nt);
  int r = 0;
  for (; r + 8 <= nrows; r += 8) qk_rows<8>(q + r * ldq, ldq, k, ntok, hs, s + r * lds, lds, pf);
  const float* qr = q + r * ldq;
  float* sr = s + r * lds;
  switch (nrows - r) {
    case 1: qk_rows<1>(qr, ldq, k, ntok, hs, sr, lds, pf); break;
    case 2: qk_rows<2>(qr, ldq, k, ntok, hs, sr, lds, pf); break;
    case 3: qk_rows<3>(qr, ldq, k, ntok, hs, sr, lds, pf); break;
    case 4: qk_rows<4>(qr, ldq, k, ntok, hs, sr, lds, pf); break;
    case 5: qk_rows<5>(qr, ldq, k, ntok, hs, sr, lds, pf); break;
    case 6: qk_rows<6>(qr, ldq, k, ntok, hs, sr, lds, pf); break;
    case 7: qk_rows<7>(qr, ldq, k, ntok, hs, sr, lds, pf); break;
    default: break;
  }
  pf.flush();
}

// acc[r, d0 : d0 + 8*DC] += p[r, :ntok] @ v[:ntok, d0 : d0 + 8*DC] for r < NR
template <int NR, int DC, class KT>
XLLM_AVX2 void pv_tile(const float* p, int64_t ldp, const KT* v, int ntok, int hs, float* acc,
                       int d0) {
  // A flat array with fully unrolled constant loops, so GCC keeps it in registers
  // (a 2-D array here was kept in memory and stored back on every token).
  __m256 a[NR * DC];
#pragma GCC unroll 8
  for (int i = 0; i < NR * DC; ++i) a[i] = _mm256_loadu_ps(acc + (i / DC) * hs + d0 + 8 * (i % DC));
  const KT* vt = v + d0;
  for (int t = 0; t < ntok; ++t, vt += hs) {
    __m256 vv[DC];
#pragma GCC unroll 8
    for (int c = 0; c < DC; ++c) vv[c] = load8(vt + 8 * c);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const __m256 w = _mm256_broadcast_ss(p + r * ldp + t);
#pragma GCC unroll 8
      for (int c = 0; c < DC; ++c) a[r * DC + c] = _mm256_fmadd_ps(w, vv[c], a[r * DC + c]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < NR * DC; ++i) _mm256_storeu_ps(acc + (i / DC) * hs + d0 + 8 * (i % DC), a[i]);
}

template <int NR, class KT>
XLLM_AVX2 void pv_rows(const float* p, int64_t ldp, const KT* v, int ntok, int hs, float* acc,
                       Prefetcher& pf) {
  constexpr int DC = pv_chunks(NR);
  int d = 0;
  for (; d + 8 * DC <= hs; d += 8 * DC) {
    pf.step();
    pv_tile<NR, DC>(p, ldp, v, ntok, hs, acc, d);
  }
  for (; d < hs; d += 8) {
    pf.step();
    pv_tile<NR, 1>(p, ldp, v, ntok, hs, acc, d);
  }
}

template <class KT>
XLLM_AVX2 void pv(const float* p, int64_t ldp, int nrows, const KT* v, int ntok, int hs,
                  float* acc, const void* next, int64_t next_bytes) {
  const int dc = pv_chunks(std::min(nrows, 8));
  Prefetcher pf(next, next_bytes, hs / (8 * dc) + hs / 8 % dc);
  int r = 0;
  for (; r + 8 <= nrows; r += 8) pv_rows<8>(p + r * ldp, ldp, v, ntok, hs, acc + r * hs, pf);
  const float* pr = p + r * ldp;
  float* ar = acc + r * hs;
  switch (nrows - r) {
    case 1: pv_rows<1>(pr, ldp, v, ntok, hs, ar, pf); break;
    case 2: pv_rows<2>(pr, ldp, v, ntok, hs, ar, pf); break;
    case 3: pv_rows<3>(pr, ldp, v, ntok, hs, ar, pf); break;
    case 4: pv_rows<4>(pr, ldp, v, ntok, hs, ar, pf); break;
    case 5: pv_rows<5>(pr, ldp, v, ntok, hs, ar, pf); break;
    case 6: pv_rows<6>(pr, ldp, v, ntok, hs, ar, pf); break;
    case 7: pv_rows<7>(pr, ldp, v, ntok, hs, ar, pf); break;
    default: break;
  }
  pf.flush();
}

XLLM_AVX2 void softmax(float* s, int64_t lds, int nrows, int ncols, const int* valid, float* m,
                       float* l, float* acc, int hs) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int r = 0; r < nrows; ++r) {
    float* sr = s + r * lds;
    const int n = valid[r];
    if (n <= 0) {
      std::fill(sr, sr + ncols, 0.0f);
      continue;
    }
    int t = 0;
    __m256 vmax = _mm256_set1_ps(neg_inf);
    for (; t + 8 <= n; t += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(sr + t));
    float mx = hmax(vmax);
    for (; t < n; ++t) mx = std::max(mx, sr[t]);
    const float m_new = std::max(m[r], mx);
    const __m256 vm = _mm256_set1_ps(m_new);
    __m256 vsum = _mm256_setzero_ps();
    for (t = 0; t + 8 <= n; t += 8) {
      __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sr + t), vm));
      _mm256_storeu_ps(sr + t, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    if (t < n) {
      // The tail through the same vector exp, padded with -inf (weight 0).
      alignas(32) float tail[8];
      for (int i = 0; i < 8; ++i) tail[i] = t + i < n ? sr[t + i] : neg_inf;
      __m256 e = exp8(_mm256_sub_ps(_mm256_load_ps(tail), vm));
      _mm256_store_ps(tail, e);
      vsum = _mm256_add_ps(vsum, e);
      for (int i = 0; t + i < n; ++i) sr[t + i] = tail[i];
    }
    std::fill(sr + n, sr + ncols, 0.0f);
    const float sum = hsum(vsum);
    if (m_new > m[r]) {
      // exp(-inf) == 0: the first chunk of a row scales nothing away.
      const float alpha = std::exp(m[r] - m_new);
      l[r] *= alpha;
      const __m256 va = _mm256_set1_ps(alpha);
      float* ar = acc + static_cast<int64_t>(r) * hs;
      for (int d = 0; d < hs; d += 8) _mm256_storeu_ps(ar + d, _mm256_mul_ps(va, _mm256_loadu_ps(ar + d)));
      m[r] = m_new;
    }
    l[r] += sum;
  }
}

}  // namespace

template <class KT>
Kernels<KT> avx2_kernels() {
  return Kernels<KT>{&qk<KT>, &pv<KT>};
}
template Kernels<float> avx2_kernels<float>();
template Kernels<bf16_t> avx2_kernels<bf16_t>();

SoftmaxFn avx2_softmax() { return &softmax; }

}  // namespace xllm::attn
#endif  // XLLM_HAVE_AVX2_KERNELS
