// AVX-512 micro-kernels (see kernels.h) for head sizes that are a multiple of 32; the
// avx512 and amx levels run them (kernels_for), other head sizes keep the AVX2 ones.
//
// K and V rows are read 32 elements at a time as two fp32 vectors. From a bf16 cache
// those are the slice's even and odd elements: one shift and one mask widen them, where
// widening in order would take a shuffle per 16 elements (a port the FMAs share). Query
// rows (QK) and output rows (PV) are put in the same order for the call (two permutes
// per 32 elements of a row, a few per block against the block's 16 tokens of FMAs),
// so sums are over the same pairs of elements, only in another order. An fp32 cache
// needs no reordering: its two vectors are the slice's halves.
//
// QK computes rows x 4 tokens of dot products per tile (a 16-lane accumulator each,
// reduced four at a time by unpacks and 128-bit lane shuffles); PV updates rows x 64
// output columns per tile, per V row loaded.
#include <algorithm>
#include <type_traits>

#include "attention/kernels.h"

#if XLLM_HAVE_AVX2_KERNELS
namespace xllm::attn {
namespace {

// 32 elements of a K or V row as two fp32 vectors (see the top of the file).
XLLM_AVX512 inline void load32(const float* p, __m512& a, __m512& b) {
  a = _mm512_loadu_ps(p);
  b = _mm512_loadu_ps(p + 16);
}

XLLM_AVX512 inline void load32(const bf16_t* p, __m512& a, __m512& b) {
  const __m512i x = _mm512_loadu_si512(p);
  a = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));  // the low halves: elements 0, 2, ..
  b = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// 32 int8 of a q8 row as two fp32 vectors in order (the row's scale applied later).
XLLM_AVX512 inline void load32(const q8_t* p, __m512& a, __m512& b) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(x)));
  b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(x, 1)));
}

// Whether load32 gives a slice's elements in order (else as even and odd halves).
template <class KT>
constexpr bool in_order = !std::is_same_v<KT, bf16_t>;

// 32 fp32 values [lo | hi] in load32's order for KT, and back.
template <class KT>
XLLM_AVX512 inline void split(__m512 lo, __m512 hi, __m512& a, __m512& b) {
  if constexpr (in_order<KT>) {
    a = lo;
    b = hi;
  } else {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                           28, 30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27,
                                          29, 31);
    a = _mm512_permutex2var_ps(lo, even, hi);
    b = _mm512_permutex2var_ps(lo, odd, hi);
  }
}

template <class KT>
XLLM_AVX512 inline void merge(__m512 a, __m512 b, __m512& lo, __m512& hi) {
  if constexpr (in_order<KT>) {
    lo = a;
    hi = b;
  } else {
    // Element j of the slice is a[j / 2] when j is even, else b[j / 2] (index 16 + j / 2).
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22,
                                            7, 23);
    const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14,
                                             30, 15, 31);
    lo = _mm512_permutex2var_ps(a, first, b);
    hi = _mm512_permutex2var_ps(a, second, b);
  }
}

// The sums of four vectors' lanes, [sum(v0), sum(v1), sum(v2), sum(v3)].
XLLM_AVX512 inline __m128 reduce4(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
  // Per 128-bit lane: [v0 (0+2), v1 (0+2), v0 (1+3), v1 (1+3)], the same for v2, v3.
  const __m512 x01 = _mm512_add_ps(_mm512_unpacklo_ps(v0, v1), _mm512_unpackhi_ps(v0, v1));
  const __m512 x23 = _mm512_add_ps(_mm512_unpacklo_ps(v2, v3), _mm512_unpackhi_ps(v2, v3));
  // Per 128-bit lane: that lane's sums of v0, v1, v2, v3.
  const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(x01), _mm512_castps_pd(x23));
  const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(x01), _mm512_castps_pd(x23));
  __m512 y = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  // Add the four lanes.
  y = _mm512_add_ps(y, _mm512_shuffle_f32x4(y, y, _MM_SHUFFLE(1, 0, 3, 2)));
  y = _mm512_add_ps(y, _mm512_shuffle_f32x4(y, y, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm512_castps512_ps128(y);
}

// s[r * lds + t] = dot(q[r], k[t]) for r < NR, t < NT; q: NR rows of hs in load32's order
// (ldq apart), k: [NT, hs].
template <int NR, int NT, class KT>
XLLM_AVX512 void qk_tile(const float* q, int64_t ldq, const KT* k, int hs, float* s, int64_t lds) {
  static_assert(NR <= 4 && NT <= 4, "16 accumulators, 8 K and 2 query vectors: 26 registers");
  __m512 acc[NR][4];
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r) {
#pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) acc[r][t] = _mm512_setzero_ps();
  }
  for (int d = 0; d < hs; d += 32) {
    __m512 ka[NT], kb[NT];
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) load32(k + t * row_stride<KT>(hs) + d, ka[t], kb[t]);
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      const __m512 qa = _mm512_loadu_ps(q + r * ldq + d);
      const __m512 qb = _mm512_loadu_ps(q + r * ldq + d + 16);
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) {
        acc[r][t] = _mm512_fmadd_ps(qa, ka[t], acc[r][t]);
        acc[r][t] = _mm512_fmadd_ps(qb, kb[t], acc[r][t]);
      }
    }
  }
  __m128 scales = _mm_setzero_ps();  // q8 rows: the sums are of the unscaled values
  if constexpr (std::is_same_v<KT, q8_t>) {
    alignas(16) float sc[4] = {0, 0, 0, 0};
    for (int t = 0; t < NT; ++t) sc[t] = row_scale(k + t * row_stride<KT>(hs), hs);
    scales = _mm_load_ps(sc);
  }
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r) {
    __m128 sums = reduce4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
    if constexpr (std::is_same_v<KT, q8_t>) sums = _mm_mul_ps(sums, scales);
    if constexpr (NT == 4) {
      _mm_storeu_ps(s + r * lds, sums);
    } else {
      _mm_mask_storeu_ps(s + r * lds, static_cast<__mmask8>((1u << NT) - 1), sums);
    }
  }
}

template <int NR, class KT>
XLLM_AVX512 void qk_rows(const float* q, int64_t ldq, const KT* k, int ntok, int hs, float* s,
                         int64_t lds, Prefetcher& pf) {
  int t = 0;
  for (; t + 4 <= ntok; t += 4) {
    pf.step();
    qk_tile<NR, 4>(q, ldq, k + t * row_stride<KT>(hs), hs, s + t, lds);
  }
  const KT* kt = k + t * row_stride<KT>(hs);
  switch (ntok - t) {
    case 1: qk_tile<NR, 1>(q, ldq, kt, hs, s + t, lds); break;
    case 2: qk_tile<NR, 2>(q, ldq, kt, hs, s + t, lds); break;
    case 3: qk_tile<NR, 3>(q, ldq, kt, hs, s + t, lds); break;
    default: break;
  }
}

// The most query rows a call reorders at once (scratch on the stack: 8 KB at hs 256).
constexpr int kRowsPerPass = 8;
constexpr int kMaxHead = 256;

template <class KT>
XLLM_AVX512 void qk(const float* q, int64_t ldq, int nrows, const KT* k, int ntok, int hs,
                    float* s, int64_t lds, const void* next, int64_t next_bytes) {
  Prefetcher pf(next, next_bytes, (ntok + 3) / 4);
  alignas(64) float reordered[in_order<KT> ? 1 : kRowsPerPass * kMaxHead];
  for (int r0 = 0; r0 < nrows; r0 += kRowsPerPass) {
    const int rows = std::min(kRowsPerPass, nrows - r0);
    const float* qr = q + r0 * ldq;
    int64_t ld = ldq;
    if constexpr (!in_order<KT>) {
      for (int r = 0; r < rows; ++r) {
        for (int d = 0; d < hs; d += 32) {
          __m512 a, b;
          split<KT>(_mm512_loadu_ps(qr + r * ldq + d), _mm512_loadu_ps(qr + r * ldq + d + 16), a,
                    b);
          _mm512_store_ps(reordered + r * hs + d, a);
          _mm512_store_ps(reordered + r * hs + d + 16, b);
        }
      }
      qr = reordered;
      ld = hs;
    }
    float* sr = s + r0 * lds;
    int r = 0;
    for (; r + 4 <= rows; r += 4) qk_rows<4>(qr + r * ld, ld, k, ntok, hs, sr + r * lds, lds, pf);
    switch (rows - r) {
      case 1: qk_rows<1>(qr + r * ld, ld, k, ntok, hs, sr + r * lds, lds, pf); break;
      case 2: qk_rows<2>(qr + r * ld, ld, k, ntok, hs, sr + r * lds, lds, pf); break;
      case 3: qk_rows<3>(qr + r * ld, ld, k, ntok, hs, sr + r * lds, lds, pf); break;
      default: break;
    }
  }
  pf.flush();
}

// acc[r, d0 : d0 + 32 * DC] += p[r, :ntok] @ v[:ntok, d0 : d0 + 32 * DC] for r < NR
template <int NR, int DC, class KT>
XLLM_AVX512 void pv_tile(const float* p, int64_t ldp, const KT* v, int ntok, int hs, float* acc,
                         int d0) {
  static_assert(NR <= 4 && DC <= 2, "16 accumulators, 4 V vectors and a weight: 21 registers");
  __m512 a[NR][DC][2];
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r) {
#pragma GCC unroll 2
    for (int c = 0; c < DC; ++c) {
      const float* src = acc + r * hs + d0 + 32 * c;
      split<KT>(_mm512_loadu_ps(src), _mm512_loadu_ps(src + 16), a[r][c][0], a[r][c][1]);
    }
  }
  const KT* vt = v + d0;
  for (int t = 0; t < ntok; ++t, vt += row_stride<KT>(hs)) {
    const float scale = row_scale(vt - d0, hs);  // 1 but for q8 rows
    __m512 va[DC], vb[DC];
#pragma GCC unroll 2
    for (int c = 0; c < DC; ++c) load32(vt + 32 * c, va[c], vb[c]);
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      const __m512 w = _mm512_set1_ps(p[r * ldp + t] * scale);
#pragma GCC unroll 2
      for (int c = 0; c < DC; ++c) {
        a[r][c][0] = _mm512_fmadd_ps(w, va[c], a[r][c][0]);
        a[r][c][1] = _mm512_fmadd_ps(w, vb[c], a[r][c][1]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r) {
#pragma GCC unroll 2
    for (int c = 0; c < DC; ++c) {
      float* dst = acc + r * hs + d0 + 32 * c;
      __m512 lo, hi;
      merge<KT>(a[r][c][0], a[r][c][1], lo, hi);
      _mm512_storeu_ps(dst, lo);
      _mm512_storeu_ps(dst + 16, hi);
    }
  }
}

template <int NR, class KT>
XLLM_AVX512 void pv_rows(const float* p, int64_t ldp, const KT* v, int ntok, int hs, float* acc,
                         Prefetcher& pf) {
  int d = 0;
  for (; d + 64 <= hs; d += 64) {
    pf.step();
    pv_tile<NR, 2>(p, ldp, v, ntok, hs, acc, d);
  }
  if (d < hs) pv_tile<NR, 1>(p, ldp, v, ntok, hs, acc, d);  // hs is a multiple of 32
}

template <class KT>
XLLM_AVX512 void pv(const float* p, int64_t ldp, int nrows, const KT* v, int ntok, int hs,
                    float* acc, const void* next, int64_t next_bytes) {
  Prefetcher pf(next, next_bytes, (hs + 63) / 64);
  int r = 0;
  for (; r + 4 <= nrows; r += 4) pv_rows<4>(p + r * ldp, ldp, v, ntok, hs, acc + r * hs, pf);
  const float* pr = p + r * ldp;
  float* ar = acc + r * hs;
  switch (nrows - r) {
    case 1: pv_rows<1>(pr, ldp, v, ntok, hs, ar, pf); break;
    case 2: pv_rows<2>(pr, ldp, v, ntok, hs, ar, pf); break;
    case 3: pv_rows<3>(pr, ldp, v, ntok, hs, ar, pf); break;
    default: break;
  }
  pf.flush();
}

}  // namespace

bool avx512_kernels_fit(int64_t head_size) {
  return head_size % 32 == 0 && head_size <= kMaxHead;
}

template <class KT>
Kernels<KT> avx512_kernels() {
  return Kernels<KT>{&qk<KT>, &pv<KT>};
}
template Kernels<float> avx512_kernels<float>();
template Kernels<bf16_t> avx512_kernels<bf16_t>();
template Kernels<q8_t> avx512_kernels<q8_t>();

}  // namespace xllm::attn
#endif  // XLLM_HAVE_AVX2_KERNELS
