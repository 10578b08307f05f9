// AVX2/FMA kernels. Decoding widens a block's 32 quants to fp32 with
// cvtepu8/cvtepi8 + cvtepi32_ps and applies the scale (and min) with one FMA:
// d * q is exact in fp32, so the FMA rounds exactly where the reference's add
// does. The tile keeps a 3 x 4 register tile of accumulators (12 ymm) plus the
// three x operands and one weight operand: 16 registers, 7 loads per 12 FMAs.
#include <immintrin.h>

#include "quant/block_linear.h"

#if defined(__x86_64__)
#define XLLM_AVX2 __attribute__((target("avx2,fma")))

namespace xllm::quant {
namespace {

// 8 bf16 values widened to fp32 (a shift of the bits: exact).
XLLM_AVX2 inline __m256 widen_bf16(const uint8_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

XLLM_AVX2 void decode_row(const BlockMatrix& w, int64_t n, int64_t b0, int64_t b1,
                          float* dst) {
  const int64_t nb = w.cols / kBlock, count = (b1 - b0) * kBlock;
  const uint8_t* qs = w.qs + n * w.qs_row_bytes();
  if (w.format == Format::kF32) {
    const float* src = reinterpret_cast<const float*>(qs) + b0 * kBlock;
    for (int64_t i = 0; i < count; i += 8) _mm256_storeu_ps(dst + i, _mm256_loadu_ps(src + i));
    return;
  }
  if (w.format == Format::kBF16) {
    const uint8_t* src = qs + 2 * b0 * kBlock;
    for (int64_t i = 0; i < count; i += 8) _mm256_storeu_ps(dst + i, widen_bf16(src + 2 * i));
    return;
  }
  const float* d = w.scales + n * nb;
  if (w.format == Format::kQ4_1) {
    const float* m = w.mins + n * nb;
    const __m128i low = _mm_set1_epi8(0x0F);
    qs += b0 * (kBlock / 2);
    for (int64_t b = b0; b < b1; ++b, qs += kBlock / 2, dst += kBlock) {
      const __m256 scale = _mm256_set1_ps(d[b]);
      const __m256 min = _mm256_set1_ps(m[b]);
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
      const __m128i lo = _mm_and_si128(bytes, low);                     // elements 0..15
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);  // elements 16..31
      const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
      for (int p = 0; p < 4; ++p) {
        const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[p]));
        _mm256_storeu_ps(dst + 8 * p, _mm256_fmadd_ps(q, scale, min));
      }
    }
  } else {
    qs += b0 * kBlock;
    for (int64_t b = b0; b < b1; ++b, qs += kBlock, dst += kBlock) {
      const __m256 scale = _mm256_set1_ps(d[b]);
      for (int p = 0; p < 4; ++p) {
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8 * p));
        const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
        _mm256_storeu_ps(dst + 8 * p, _mm256_mul_ps(q, scale));
      }
    }
  }
}

// Sums each of a[0..3] across its 8 lanes: {sum a0, sum a1, sum a2, sum a3}.
XLLM_AVX2 inline __m128 reduce4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// Keeps a value in a register: GCC otherwise folds the same load into every FMA
// that uses it, and loads become the limit.
#define XLLM_IN_REGISTER(v) __asm__("" : "+x"(v))

template <int MR>
XLLM_AVX2 void tile_full(const float* x, int64_t ldx, const float* wt, int64_t k,
                         const float* bias, float* out, int64_t ldo) {
  __m256 acc[MR][4];
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_ps();
  }
  for (int64_t i = 0; i < k; i += 8) {
    __m256 xv[MR];
    for (int r = 0; r < MR; ++r) {
      xv[r] = _mm256_loadu_ps(x + r * ldx + i);
      XLLM_IN_REGISTER(xv[r]);
    }
    for (int j = 0; j < 4; ++j) {
      const __m256 wv = _mm256_loadu_ps(wt + j * k + i);
      for (int r = 0; r < MR; ++r) acc[r][j] = _mm256_fmadd_ps(xv[r], wv, acc[r][j]);
    }
  }
  const __m128 b = bias ? _mm_loadu_ps(bias) : _mm_setzero_ps();
  for (int r = 0; r < MR; ++r) {
    _mm_storeu_ps(out + r * ldo,
                  _mm_add_ps(reduce4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]), b));
  }
}

// Any mr <= 3, nt <= 4 (the edges of the output): one dot product at a time.
XLLM_AVX2 void tile_edge(const float* x, int64_t ldx, int mr, const float* wt, int nt,
                         int64_t k, const float* bias, float* out, int64_t ldo) {
  for (int r = 0; r < mr; ++r) {
    for (int j = 0; j < nt; ++j) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t i = 0; i < k; i += 8) {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * ldx + i), _mm256_loadu_ps(wt + j * k + i),
                              acc);
      }
      const __m128 s = reduce4(acc, _mm256_setzero_ps(), _mm256_setzero_ps(),
                               _mm256_setzero_ps());
      const float sum = _mm_cvtss_f32(s);
      out[r * ldo + j] = bias ? sum + bias[j] : sum;
    }
  }
}

XLLM_AVX2 void tile(const float* x, int64_t ldx, int mr, const float* wt, int nt, int64_t k,
                    const float* bias, float* out, int64_t ldo) {
  if (nt == 4) {
    if (mr == 3) return tile_full<3>(x, ldx, wt, k, bias, out, ldo);
    if (mr == 2) return tile_full<2>(x, ldx, wt, k, bias, out, ldo);
    if (mr == 1) return tile_full<1>(x, ldx, wt, k, bias, out, ldo);
  }
  tile_edge(x, ldx, mr, wt, nt, k, bias, out, ldo);
}

// Decodes block b of row n into 4 vectors of 8 weights each.
XLLM_AVX2 inline void decode_block(const BlockMatrix& w, int64_t n, int64_t nb, int64_t b,
                                   __m256 out[4]) {
  const uint8_t* qs = w.qs + n * w.qs_row_bytes();
  if (w.format == Format::kF32) {
    const float* src = reinterpret_cast<const float*>(qs) + b * kBlock;
    for (int p = 0; p < 4; ++p) out[p] = _mm256_loadu_ps(src + 8 * p);
    return;
  }
  if (w.format == Format::kBF16) {
    for (int p = 0; p < 4; ++p) out[p] = widen_bf16(qs + 2 * (b * kBlock + 8 * p));
    return;
  }
  const __m256 scale = _mm256_set1_ps(w.scales[n * nb + b]);
  if (w.format == Format::kQ4_1) {
    const __m256 min = _mm256_set1_ps(w.mins[n * nb + b]);
    const __m128i low = _mm_set1_epi8(0x0F);
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + b * 16));
    const __m128i lo = _mm_and_si128(bytes, low);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int p = 0; p < 4; ++p) {
      out[p] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[p])), scale, min);
    }
  } else {
    for (int p = 0; p < 4; ++p) {
      const __m128i bytes =
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + b * kBlock + 8 * p));
      out[p] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), scale);
    }
  }
}

// One accumulator per (input row, 8-lane part of a block): 4 independent FMA chains
// per row, so FMA latency does not serialise a block's four products.
template <int MR>
XLLM_AVX2 void direct_rows(const float* x, int64_t ldx, const BlockMatrix& w, int64_t n0,
                           int nt, const float* bias, float* out, int64_t ldo) {
  const int64_t nb = w.cols / kBlock;
  for (int j = 0; j < nt; ++j) {
    const int64_t n = n0 + j;
    __m256 acc[MR][4];
    for (int r = 0; r < MR; ++r) {
      for (int p = 0; p < 4; ++p) acc[r][p] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < nb; ++b) {
      __m256 wv[4];
      decode_block(w, n, nb, b, wv);
      for (int r = 0; r < MR; ++r) {
        const float* xb = x + r * ldx + b * kBlock;
        for (int p = 0; p < 4; ++p) {
          acc[r][p] = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 8 * p), wv[p], acc[r][p]);
        }
      }
    }
    for (int r = 0; r < MR; ++r) {
      const __m256 s = _mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]),
                                     _mm256_add_ps(acc[r][2], acc[r][3]));
      const float sum = _mm_cvtss_f32(reduce4(s, s, s, s));
      out[r * ldo + j] = bias ? sum + bias[j] : sum;
    }
  }
}

XLLM_AVX2 void direct(const float* x, int64_t ldx, int mr, const BlockMatrix& w, int64_t n0,
                      int nt, const float* bias, float* out, int64_t ldo) {
  if (mr == 1) return direct_rows<1>(x, ldx, w, n0, nt, bias, out, ldo);
  if (mr == 2) return direct_rows<2>(x, ldx, w, n0, nt, bias, out, ldo);
  direct_rows<3>(x, ldx, w, n0, nt, bias, out, ldo);
}

}  // namespace

Kernels avx2_kernels() { return {decode_row, tile, direct}; }

}  // namespace xllm::quant
#endif
