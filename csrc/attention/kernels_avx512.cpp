// AVX-512 micro-kernels (see kernels.h) for head sizes that are a multiple of 32; the
// avx512, avx512_bf16 and amx levels run them (kernels_for), other head sizes keep the AVX2 ones.
//
// fp32 and bf16 rows. K and V rows are read 32 elements at a time as two fp32 vectors.
// From a bf16 cache those are the slice's even and odd elements: one shift and one mask
// widen them, where widening in order would take a shuffle per 16 elements (a port the
// FMAs share). The tile's query rows (prep) and its output rows (pv's order, post) are
// kept in that order for the whole tile, so sums are over the same pairs of elements,
// only in another order. An fp32 cache needs no reordering: its two vectors are the
// slice's halves. QK computes rows x 4 tokens of dot products per tile (a 16-lane
// accumulator each, reduced four at a time by unpacks and 128-bit lane shuffles); PV
// updates rows x 64 output columns per tile, per V row loaded.
//
// int8 ("q8") rows take VNNI integer dot products, as llama.cpp does for its Q8_0 cache:
// - QK: prep rounds each query row to int8 with one scale for the row (x / scale, to
//   nearest, |x| <= 127). A block's K rows are transposed 16 tokens at a time, so that
//   one vector holds one 4-byte group of the row for 16 tokens; one vpdpbusd per group
//   then adds 4 products for all 16 tokens, and a row's 16 scores come out in one vector
//   without horizontal sums. vpdpbusd multiplies unsigned by signed bytes: K is read as
//   k + 128 (a flip of the top bit) and 128 * sum(q) subtracted after.
// - PV: each row's weights times the V rows' scales are rounded to 16 bits with one
//   scale per row and 16 tokens (relative error <= 2^-16 of the largest), V is widened to
//   16 bits exactly, and vpdpwssd adds the products of two tokens at once. Two tokens'
//   rows interleaved by unpacks put acc's elements in an order of their own within each
//   32 (post restores it).
// The V rows and the cache's values are used exactly; the query's rounding is the error
// these kernels add (tests/test_attention.py models it).
#include <algorithm>
#include <cstring>
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

// Each 32 floats [a | b] of n (a multiple of 32) from src, as [a b][first] then [a b][second]
// (permutex2var: index i < 16 is a[i], else b[i - 16]) at dst, which may be src.
XLLM_AVX512 inline void permute_slices(const float* src, float* dst, int64_t n, __m512i first,
                                       __m512i second) {
  for (int64_t i = 0; i < n; i += 32) {
    const __m512 a = _mm512_loadu_ps(src + i), b = _mm512_loadu_ps(src + i + 16);
    _mm512_storeu_ps(dst + i, _mm512_permutex2var_ps(a, first, b));
    _mm512_storeu_ps(dst + i + 16, _mm512_permutex2var_ps(a, second, b));
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
    for (int t = 0; t < NT; ++t) load32(k + t * hs + d, ka[t], kb[t]);
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
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r) {
    const __m128 sums = reduce4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
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
    qk_tile<NR, 4>(q, ldq, k + t * hs, hs, s + t, lds);
  }
  const KT* kt = k + t * hs;
  switch (ntok - t) {
    case 1: qk_tile<NR, 1>(q, ldq, kt, hs, s + t, lds); break;
    case 2: qk_tile<NR, 2>(q, ldq, kt, hs, s + t, lds); break;
    case 3: qk_tile<NR, 3>(q, ldq, kt, hs, s + t, lds); break;
    default: break;
  }
}

constexpr int kMaxHead = 256;

template <class KT>
XLLM_AVX512 void qk(const float* q, int64_t ldq, int nrows, const KT* k, int ntok, int hs,
                    float* s, int64_t lds, const void* next, int64_t next_bytes) {
  Prefetcher pf(next, next_bytes, (ntok + 3) / 4);
  int r = 0;
  for (; r + 4 <= nrows; r += 4) qk_rows<4>(q + r * ldq, ldq, k, ntok, hs, s + r * lds, lds, pf);
  switch (nrows - r) {
    case 1: qk_rows<1>(q + r * ldq, ldq, k, ntok, hs, s + r * lds, lds, pf); break;
    case 2: qk_rows<2>(q + r * ldq, ldq, k, ntok, hs, s + r * lds, lds, pf); break;
    case 3: qk_rows<3>(q + r * ldq, ldq, k, ntok, hs, s + r * lds, lds, pf); break;
    default: break;
  }
  pf.flush();
}

// bf16 rows: the tile's query rows and its output rows in load32's order (see the top):
// a slice's even elements, then its odd ones, and back.
XLLM_AVX512 void prep_split(const float* q, int nrows, int hs, float* out) {
  permute_slices(q, out, static_cast<int64_t>(nrows) * hs,
                 _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
                 _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31));
}

XLLM_AVX512 void post_merge(float* acc, int nrows, int hs) {
  // Element j of the slice is a[j / 2] when j is even, else b[j / 2] (index 16 + j / 2).
  permute_slices(acc, acc, static_cast<int64_t>(nrows) * hs,
                 _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23),
                 _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31));
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
      const float* src = acc + r * hs + d0 + 32 * c;  // in load32's order (post)
      a[r][c][0] = _mm512_loadu_ps(src);
      a[r][c][1] = _mm512_loadu_ps(src + 16);
    }
  }
  const KT* vt = v + d0;
  for (int t = 0; t < ntok; ++t, vt += hs) {
    __m512 va[DC], vb[DC];
#pragma GCC unroll 2
    for (int c = 0; c < DC; ++c) load32(vt + 32 * c, va[c], vb[c]);
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      const __m512 w = _mm512_set1_ps(p[r * ldp + t]);
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
      _mm512_storeu_ps(dst, a[r][c][0]);
      _mm512_storeu_ps(dst + 16, a[r][c][1]);
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

// ---- int8 rows: VNNI (see the top) -----------------------------------------------

constexpr int64_t q8_row(int hs) { return hs + kQ8ScaleBytes; }

// A prepared query row (prep_q8), in the [hs] floats of room a row has: the int8 values,
// then the row's scale (float) and 128 * the values' sum (int32).
XLLM_AVX512 void prep_q8(const float* q, int nrows, int hs, float* out) {
  for (int r = 0; r < nrows; ++r) {
    const float* x = q + static_cast<int64_t>(r) * hs;
    auto* dst = reinterpret_cast<int8_t*>(out + static_cast<int64_t>(r) * hs);
    __m512 mx = _mm512_setzero_ps();
    for (int d = 0; d < hs; d += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(x + d)));
    const float amax = _mm512_reduce_max_ps(mx);
    const float scale = amax / 127.0f;
    const __m512 inv = _mm512_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
    __m512i sum = _mm512_setzero_si512();
    for (int d = 0; d < hs; d += 16) {
      const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + d), inv));
      sum = _mm512_add_epi32(sum, v);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + d), _mm512_cvtepi32_epi8(v));
    }
    const int32_t bias = 128 * _mm512_reduce_add_epi32(sum);
    std::memcpy(dst + hs, &scale, sizeof scale);
    std::memcpy(dst + hs + 4, &bias, sizeof bias);
  }
}

// Transposes 16 rows of 16 int32 (r is clobbered): out[j] lane t is element j of row t,
// for the first N elements.
template <int N>
XLLM_AVX512 inline void transpose16(__m512i r[16], __m512i* out) {
  __m512i t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // r[4i + k], 128-bit lane L: element 4L + k of rows 4i .. 4i + 3.
#pragma GCC unroll 4
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // Transpose the 4 x 4 grid of 128-bit lanes of r[k], r[4 + k], r[8 + k], r[12 + k].
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {
    t[k] = _mm512_shuffle_i32x4(r[k], r[4 + k], 0x88);       // L0, L2 of each
    t[4 + k] = _mm512_shuffle_i32x4(r[k], r[4 + k], 0xDD);   // L1, L3
    t[8 + k] = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0x88);
    t[12 + k] = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0xDD);
  }
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {
    out[k] = _mm512_shuffle_i32x4(t[k], t[8 + k], 0x88);
    out[4 + k] = _mm512_shuffle_i32x4(t[4 + k], t[12 + k], 0x88);
    if constexpr (N > 8) {
      out[8 + k] = _mm512_shuffle_i32x4(t[k], t[8 + k], 0xDD);
      out[12 + k] = _mm512_shuffle_i32x4(t[4 + k], t[12 + k], 0xDD);
    }
  }
}

// The scales of rows [0, n) of a q8 block (n <= 16), in lanes [0, n).
XLLM_AVX512 inline __m512 q8_scales(const q8_t* rows, int hs, __mmask16 live) {
  const __m512i at = _mm512_add_epi32(
      _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                         _mm512_set1_epi32(static_cast<int>(q8_row(hs)))),
      _mm512_set1_epi32(hs));
  return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, at, rows, 1);
}

// s[r * lds + t] for NR prepared rows and the 16 tokens of kt (transposed, + 128).
template <int NR>
XLLM_AVX512 void qk_q8_rows(const float* q, int64_t ldq, const __m512i* kt, int hs, __m512 sk,
                            __mmask16 live, float* s, int64_t lds) {
  __m512i acc[NR][2];
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
  const int words = hs / 4;  // even: hs is a multiple of 32
  for (int j = 0; j < words; j += 2) {
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      const auto* row = reinterpret_cast<const int32_t*>(q + r * ldq);
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], kt[j], _mm512_set1_epi32(row[j]));
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], kt[j + 1], _mm512_set1_epi32(row[j + 1]));
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r) {
    const auto* row = reinterpret_cast<const int8_t*>(q + r * ldq);
    float scale;
    int32_t bias;
    std::memcpy(&scale, row + hs, sizeof scale);
    std::memcpy(&bias, row + hs + 4, sizeof bias);
    const __m512i dot =
        _mm512_sub_epi32(_mm512_add_epi32(acc[r][0], acc[r][1]), _mm512_set1_epi32(bias));
    _mm512_mask_storeu_ps(s + r * lds, live,
                          _mm512_mul_ps(_mm512_cvtepi32_ps(dot),
                                        _mm512_mul_ps(sk, _mm512_set1_ps(scale))));
  }
}

XLLM_AVX512 void qk_q8(const float* q, int64_t ldq, int nrows, const q8_t* k, int ntok, int hs,
                       float* s, int64_t lds, const void* next, int64_t next_bytes) {
  Prefetcher pf(next, next_bytes, (ntok + 15) / 16);
  const int64_t row = q8_row(hs);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  alignas(64) __m512i kt[kMaxHead / 4];  // kt[j] lane t: bytes 4j .. 4j + 3 of token t, + 128
  for (int t0 = 0; t0 < ntok; t0 += 16) {
    const int nt = std::min(16, ntok - t0);
    const q8_t* kb = k + t0 * row;
    for (int j = 0; j < hs / 4; j += 16) {  // 64 bytes of the 16 rows at a time
      const __mmask64 bytes = hs - 4 * j >= 64 ? ~__mmask64{0} : __mmask64{0xFFFFFFFF};
      __m512i r[16];
#pragma GCC unroll 16
      for (int t = 0; t < 16; ++t) {
        r[t] = t < nt ? _mm512_xor_si512(_mm512_maskz_loadu_epi8(bytes, kb + t * row + 4 * j), flip)
                      : _mm512_setzero_si512();
      }
      if (hs - 4 * j >= 64) transpose16<16>(r, kt + j);
      else transpose16<8>(r, kt + j);
    }
    pf.step();
    const __mmask16 live = first_lanes(nt);
    const __m512 sk = q8_scales(kb, hs, live);
    float* st = s + t0;
    int r = 0;
    for (; r + 4 <= nrows; r += 4) qk_q8_rows<4>(q + r * ldq, ldq, kt, hs, sk, live, st + r * lds, lds);
    switch (nrows - r) {
      case 1: qk_q8_rows<1>(q + r * ldq, ldq, kt, hs, sk, live, st + r * lds, lds); break;
      case 2: qk_q8_rows<2>(q + r * ldq, ldq, kt, hs, sk, live, st + r * lds, lds); break;
      case 3: qk_q8_rows<3>(q + r * ldq, ldq, kt, hs, sk, live, st + r * lds, lds); break;
      default: break;
    }
  }
  pf.flush();
}

// acc (in pv_q8's order) += NR rows' weights (16 bits, pairs of tokens in each int32 of w,
// times wscale[r]) times the nt (<= 16) V rows from v, over 64 output columns from d0.
template <int NR, int DC>
XLLM_AVX512 void pv_q8_tile(const int32_t* w, const float* wscale, const q8_t* v, int nt, int hs,
                            float* acc, int d0) {
  __m512i a[NR][DC][2];
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r) {
#pragma GCC unroll 2
    for (int c = 0; c < DC; ++c) a[r][c][0] = a[r][c][1] = _mm512_setzero_si512();
  }
  const int64_t row = q8_row(hs);
  for (int t = 0; t < nt; t += 2) {
    __m512i lo[DC], hi[DC];
#pragma GCC unroll 2
    for (int c = 0; c < DC; ++c) {
      const q8_t* src = v + t * row + d0 + 32 * c;
      const __m512i x =
          _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
      const __m512i y = t + 1 < nt ? _mm512_cvtepi8_epi16(_mm256_loadu_si256(
                                         reinterpret_cast<const __m256i*>(src + row)))
                                   : _mm512_setzero_si512();
      lo[c] = _mm512_unpacklo_epi16(x, y);
      hi[c] = _mm512_unpackhi_epi16(x, y);
    }
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      const __m512i wt = _mm512_set1_epi32(w[r * 8 + t / 2]);
#pragma GCC unroll 2
      for (int c = 0; c < DC; ++c) {
        a[r][c][0] = _mm512_dpwssd_epi32(a[r][c][0], lo[c], wt);
        a[r][c][1] = _mm512_dpwssd_epi32(a[r][c][1], hi[c], wt);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r) {
    const __m512 ws = _mm512_set1_ps(wscale[r]);
#pragma GCC unroll 2
    for (int c = 0; c < DC; ++c) {
      float* dst = acc + r * hs + d0 + 32 * c;
      _mm512_storeu_ps(dst, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[r][c][0]), ws,
                                            _mm512_loadu_ps(dst)));
      _mm512_storeu_ps(dst + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[r][c][1]), ws,
                                                 _mm512_loadu_ps(dst + 16)));
    }
  }
}

template <int NR>
XLLM_AVX512 void pv_q8_rows(const float* p, int64_t ldp, const q8_t* v, int nt, __mmask16 live,
                            __m512 sv, int hs, float* acc) {
  // Each row's weights times the rows' scales, rounded to 16 bits against the largest.
  alignas(64) int32_t w[NR * 8];
  float wscale[NR];
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r) {
    const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(live, p + r * ldp), sv);
    const float top = _mm512_reduce_max_ps(x);  // weights are >= 0
    wscale[r] = top / 32767.0f;
    const __m512 inv = _mm512_set1_ps(top > 0 ? 32767.0f / top : 0.0f);
    _mm256_store_si256(reinterpret_cast<__m256i*>(w + r * 8),
                       _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(x, inv))));
  }
  int d = 0;
  for (; d + 64 <= hs; d += 64) pv_q8_tile<NR, 2>(w, wscale, v, nt, hs, acc, d);
  if (d < hs) pv_q8_tile<NR, 1>(w, wscale, v, nt, hs, acc, d);
}

XLLM_AVX512 void pv_q8(const float* p, int64_t ldp, int nrows, const q8_t* v, int ntok, int hs,
                       float* acc, const void* next, int64_t next_bytes) {
  Prefetcher pf(next, next_bytes, (ntok + 15) / 16);
  const int64_t row = q8_row(hs);
  for (int t0 = 0; t0 < ntok; t0 += 16) {
    pf.step();
    const int nt = std::min(16, ntok - t0);
    const __mmask16 live = first_lanes(nt);
    const q8_t* vb = v + t0 * row;
    const __m512 sv = q8_scales(vb, hs, live);
    const float* pt = p + t0;
    int r = 0;
    for (; r + 4 <= nrows; r += 4) pv_q8_rows<4>(pt + r * ldp, ldp, vb, nt, live, sv, hs, acc + r * hs);
    switch (nrows - r) {
      case 1: pv_q8_rows<1>(pt + r * ldp, ldp, vb, nt, live, sv, hs, acc + r * hs); break;
      case 2: pv_q8_rows<2>(pt + r * ldp, ldp, vb, nt, live, sv, hs, acc + r * hs); break;
      case 3: pv_q8_rows<3>(pt + r * ldp, ldp, vb, nt, live, sv, hs, acc + r * hs); break;
      default: break;
    }
  }
  pf.flush();
}

// pv_q8's order within each 32 elements: unpacks of two tokens' rows give, per 128-bit
// lane L, elements 8L .. 8L + 3 in the first vector and 8L + 4 .. 8L + 7 in the second.
XLLM_AVX512 void post_q8(float* acc, int nrows, int hs) {
  permute_slices(acc, acc, static_cast<int64_t>(nrows) * hs,
                 _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23),
                 _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31));
}

}  // namespace

bool avx512_kernels_fit(int64_t head_size) {
  return head_size % 32 == 0 && head_size <= kMaxHead;
}

template <class KT>
Kernels<KT> avx512_kernels() {
  if constexpr (std::is_same_v<KT, q8_t>) {
    return Kernels<KT>{&qk_q8, &pv_q8, &prep_q8, &post_q8};
  } else if constexpr (std::is_same_v<KT, bf16_t>) {
    return Kernels<KT>{&qk<KT>, &pv<KT>, &prep_split, &post_merge};
  } else {
    return Kernels<KT>{&qk<KT>, &pv<KT>, nullptr, nullptr};
  }
}
template Kernels<float> avx512_kernels<float>();
template Kernels<bf16_t> avx512_kernels<bf16_t>();
template Kernels<q8_t> avx512_kernels<q8_t>();

}  // namespace xllm::attn
#endif  // XLLM_HAVE_AVX2_KERNELS
