// AVX2/FMA micro-kernels (see kernels.h). Register tiles are template
// parameters so the compiler keeps the accumulators in the 16 ymm registers:
// QK computes NR rows x NT tokens dot products at once (reduced together by a
// hadd tree), PV updates NR rows x DC 8-wide column chunks of acc per V load.
#include <algorithm>
#include <cmath>
#include <limits>

#include "attention/kernels.h"

#if XLLM_HAVE_AVX2_KERNELS
namespace xllm::attn {
namespace {

// Keeps a value in a register: GCC otherwise folds the same load into every FMA
// that uses it (a memory operand per FMA), and loads, not FMAs, become the limit
// (one 256-bit load per cycle on Zen 1).
#define XLLM_IN_REGISTER(v) __asm__("" : "+x"(v))

// Register tiles hold at most 12 accumulators: with the 3-4 operands they share
// that fills the 16 ymm registers, and loads per FMA drop to about 0.6.
constexpr int kMaxAcc = 12;

// Rows per QK tile for a group of `rows` rows, and tokens per tile for NR rows.
constexpr int qk_tokens(int rows) { return rows >= 4 ? 3 : (rows == 3 ? 4 : (rows == 2 ? 6 : 8)); }

// s[r * lds + t] = dot(q[r], k[t]) for r < NR, t < NT; k: [NT, hs]; q: [NR, ldq]
template <int NR, int NT, class KT>
XLLM_AVX2 void qk_tile(const float* q, int64_t ldq, const KT* k, int hs, float* s, int64_t lds) {
  static_assert(NR * NT <= kMaxAcc, "too many accumulators for 16 ymm registers");
  // Padded to 12: the unused ones stay constant zeros and feed the reduction.
  __m256 acc[kMaxAcc];
#pragma GCC unroll 12
  for (int i = 0; i < kMaxAcc; ++i) acc[i] = _mm256_setzero_ps();
  // Hold the shorter side's operands in registers and stream the other side's:
  // 12 accumulators + min(NR, NT) + 1 operands fit the 16 ymm registers.
  for (int d = 0; d < hs; d += 8) {
    if constexpr (NT <= NR) {
      __m256 kv[NT];
#pragma GCC unroll 12
      for (int t = 0; t < NT; ++t) {
        kv[t] = load8(k + t * row_stride<KT>(hs) + d);
        XLLM_IN_REGISTER(kv[t]);
      }
#pragma GCC unroll 12
      for (int r = 0; r < NR; ++r) {
        __m256 qv = _mm256_loadu_ps(q + r * ldq + d);
        XLLM_IN_REGISTER(qv);
#pragma GCC unroll 12
        for (int t = 0; t < NT; ++t) acc[r * NT + t] = _mm256_fmadd_ps(qv, kv[t], acc[r * NT + t]);
      }
    } else {
      __m256 qv[NR];
#pragma GCC unroll 12
      for (int r = 0; r < NR; ++r) {
        qv[r] = _mm256_loadu_ps(q + r * ldq + d);
        XLLM_IN_REGISTER(qv[r]);
      }
#pragma GCC unroll 12
      for (int t = 0; t < NT; ++t) {
        __m256 kv = load8(k + t * row_stride<KT>(hs) + d);
        XLLM_IN_REGISTER(kv);
#pragma GCC unroll 12
        for (int r = 0; r < NR; ++r) acc[r * NT + t] = _mm256_fmadd_ps(qv[r], kv, acc[r * NT + t]);
      }
    }
  }
  // Horizontal sums, eight at a time through one hadd tree.
  alignas(32) float sums[16];
  _mm256_store_ps(sums, reduce8(acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7]));
  if (NR * NT > 8) {
    const __m256 z = _mm256_setzero_ps();
    _mm256_store_ps(sums + 8, reduce8(acc[8], acc[9], acc[10], acc[11], z, z, z, z));
  }
  float scale[NT];  // q8 rows: the sums are of the unscaled values
#pragma GCC unroll 12
  for (int t = 0; t < NT; ++t) scale[t] = row_scale(k + t * row_stride<KT>(hs), hs);
#pragma GCC unroll 12
  for (int r = 0; r < NR; ++r) {
#pragma GCC unroll 12
    for (int t = 0; t < NT; ++t) s[r * lds + t] = sums[r * NT + t] * scale[t];
  }
}

template <int NR, class KT>
XLLM_AVX2 void qk_rows(const float* q, int64_t ldq, const KT* k, int ntok, int hs, float* s,
                       int64_t lds, Prefetcher& pf) {
  constexpr int NT = qk_tokens(NR);
  int t = 0;
  for (; t + NT <= ntok; t += NT) {
    pf.step();
    qk_tile<NR, NT>(q, ldq, k + t * row_stride<KT>(hs), hs, s + t, lds);
  }
  for (; t < ntok; ++t) {
    pf.step();
    qk_tile<NR, 1>(q, ldq, k + t * row_stride<KT>(hs), hs, s + t, lds);
  }
}

template <class KT>
XLLM_AVX2 void qk(const float* q, int64_t ldq, int nrows, const KT* k, int ntok, int hs, float* s,
                  int64_t lds, const void* next, int64_t next_bytes) {
  // Rows go in groups of 4, the last group 1-3 rows. The first group streams K in
  // from memory (later ones hit L1), so it spreads the next block's prefetches.
  const int first = std::min(nrows, 4);
  const int nt = qk_tokens(first);
  Prefetcher pf(next, next_bytes, ntok / nt + ntok % nt);
  int r = 0;
  for (; r + 4 <= nrows; r += 4) qk_rows<4>(q + r * ldq, ldq, k, ntok, hs, s + r * lds, lds, pf);
  const float* qr = q + r * ldq;
  float* sr = s + r * lds;
  switch (nrows - r) {
    case 1: qk_rows<1>(qr, ldq, k, ntok, hs, sr, lds, pf); break;
    case 2: qk_rows<2>(qr, ldq, k, ntok, hs, sr, lds, pf); break;
    case 3: qk_rows<3>(qr, ldq, k, ntok, hs, sr, lds, pf); break;
    default: break;
  }
  pf.flush();
}

// Column chunks (8 floats each) per PV tile for NR rows.
constexpr int pv_chunks(int rows) { return rows >= 4 ? 3 : (rows == 3 ? 4 : (rows == 2 ? 6 : 8)); }

// acc[r, d0 : d0 + 8*DC] += p[r, :ntok] @ v[:ntok, d0 : d0 + 8*DC] for r < NR
template <int NR, int DC, class KT>
XLLM_AVX2 void pv_tile(const float* p, int64_t ldp, const KT* v, int ntok, int hs, float* acc,
                       int d0) {
  static_assert(NR * DC <= kMaxAcc, "too many accumulators for 16 ymm registers");
  __m256 a[NR * DC];
#pragma GCC unroll 12
  for (int i = 0; i < NR * DC; ++i) a[i] = _mm256_loadu_ps(acc + (i / DC) * hs + d0 + 8 * (i % DC));
  const KT* vt = v + d0;
  // As in qk_tile: hold min(NR, DC) operands, stream the others.
  for (int t = 0; t < ntok; ++t, vt += row_stride<KT>(hs)) {
    const float scale = row_scale(vt - d0, hs);  // 1 but for q8 rows
    if constexpr (DC <= NR) {
      __m256 vv[DC];
#pragma GCC unroll 12
      for (int c = 0; c < DC; ++c) {
        vv[c] = load8(vt + 8 * c);
        XLLM_IN_REGISTER(vv[c]);
      }
#pragma GCC unroll 12
      for (int r = 0; r < NR; ++r) {
        const __m256 w = _mm256_set1_ps(p[r * ldp + t] * scale);
#pragma GCC unroll 12
        for (int c = 0; c < DC; ++c) a[r * DC + c] = _mm256_fmadd_ps(w, vv[c], a[r * DC + c]);
      }
    } else {
      __m256 w[NR];
#pragma GCC unroll 12
      for (int r = 0; r < NR; ++r) w[r] = _mm256_set1_ps(p[r * ldp + t] * scale);
#pragma GCC unroll 12
      for (int c = 0; c < DC; ++c) {
        __m256 vv = load8(vt + 8 * c);
        XLLM_IN_REGISTER(vv);
#pragma GCC unroll 12
        for (int r = 0; r < NR; ++r) a[r * DC + c] = _mm256_fmadd_ps(w[r], vv, a[r * DC + c]);
      }
    }
  }
#pragma GCC unroll 12
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
  // The 1..DC-1 chunks left over, in one narrower tile.
  switch ((hs - d) / 8) {
    case 1: pv_tile<NR, 1>(p, ldp, v, ntok, hs, acc, d); break;
    case 2: if constexpr (DC > 2) pv_tile<NR, 2>(p, ldp, v, ntok, hs, acc, d); break;
    case 3: if constexpr (DC > 3) pv_tile<NR, 3>(p, ldp, v, ntok, hs, acc, d); break;
    case 4: if constexpr (DC > 4) pv_tile<NR, 4>(p, ldp, v, ntok, hs, acc, d); break;
    case 5: if constexpr (DC > 5) pv_tile<NR, 5>(p, ldp, v, ntok, hs, acc, d); break;
    case 6: if constexpr (DC > 6) pv_tile<NR, 6>(p, ldp, v, ntok, hs, acc, d); break;
    case 7: if constexpr (DC > 7) pv_tile<NR, 7>(p, ldp, v, ntok, hs, acc, d); break;
    default: break;
  }
}

template <class KT>
XLLM_AVX2 void pv(const float* p, int64_t ldp, int nrows, const KT* v, int ntok, int hs,
                  float* acc, const void* next, int64_t next_bytes) {
  // Rows go in groups of 3 (4 x 8-wide columns each); a remainder of one row joins
  // the first group (4 rows x 3 columns), a remainder of two forms its own group.
  const int lead = nrows % 3 == 1 && nrows >= 4 ? 4 : std::min(nrows, 3);
  const int dc = pv_chunks(lead);
  Prefetcher pf(next, next_bytes, hs / (8 * dc) + 1);
  int r = 0;
  if (lead == 4) {
    pv_rows<4>(p, ldp, v, ntok, hs, acc, pf);
    r = 4;
  }
  for (; r + 3 <= nrows; r += 3) pv_rows<3>(p + r * ldp, ldp, v, ntok, hs, acc + r * hs, pf);
  const float* pr = p + r * ldp;
  float* ar = acc + r * hs;
  switch (nrows - r) {
    case 1: pv_rows<1>(pr, ldp, v, ntok, hs, ar, pf); break;
    case 2: pv_rows<2>(pr, ldp, v, ntok, hs, ar, pf); break;
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
      for (int d = 0; d < hs; d += 8) {
        _mm256_storeu_ps(ar + d, _mm256_mul_ps(va, _mm256_loadu_ps(ar + d)));
      }
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
template Kernels<q8_t> avx2_kernels<q8_t>();

SoftmaxFn avx2_softmax() { return &softmax; }

}  // namespace xllm::attn
#endif  // XLLM_HAVE_AVX2_KERNELS
