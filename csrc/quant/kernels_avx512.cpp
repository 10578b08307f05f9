// The AVX-512 form of the fp32 block kernels' direct form (block_linear.h: a decode step's
// few rows), for the avx512, avx512_bf16 and amx levels: the AVX2 kernel's arithmetic 16
// lanes wide. Decoding widens a block's 32 quants to fp32 (two zmm) and applies the scale
// (and min) with one FMA: d * q is exact in fp32, so the FMA rounds where the reference's
// add does and the decoded weight is the same bits. The sums differ from the AVX2 level's only in
// the order of their fp32 additions. Measured on the demo's shapes (2 cores of a Xeon with
// AMX): 1.2x the AVX2 kernel at 1 row, 1.4x at 3.
#include <immintrin.h>

#include "common/avx512.h"
#include "quant/block_linear.h"

#if defined(__x86_64__)

namespace xllm::quant {
namespace {

// 16 bf16 values widened to fp32 (a shift of the bits: exact).
XLLM_AVX512 inline __m512 widen_bf16(const uint8_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Block b of row n as two vectors of 16 weights.
XLLM_AVX512 inline void decode_block(const BlockMatrix& w, int64_t n, int64_t nb, int64_t b,
                                     __m512 out[2]) {
  const uint8_t* qs = w.qs + n * w.qs_row_bytes();
  if (w.format == Format::kF32) {
    const float* src = reinterpret_cast<const float*>(qs) + b * kBlock;
    out[0] = _mm512_loadu_ps(src);
    out[1] = _mm512_loadu_ps(src + 16);
    return;
  }
  if (w.format == Format::kBF16) {
    out[0] = widen_bf16(qs + 2 * b * kBlock);
    out[1] = widen_bf16(qs + 2 * b * kBlock + 32);
    return;
  }
  const __m512 scale = _mm512_set1_ps(w.scales[n * nb + b]);
  if (w.format == Format::kQ4_1) {
    const __m512 min = _mm512_set1_ps(w.mins[n * nb + b]);
    const __m128i low = _mm_set1_epi8(0x0F);
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + b * 16));
    const __m128i lo = _mm_and_si128(bytes, low);                     // elements 0..15
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);  // elements 16..31
    out[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), scale, min);
    out[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), scale, min);
  } else {
    for (int p = 0; p < 2; ++p) {
      const __m128i bytes =
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + b * kBlock + 16 * p));
      out[p] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)), scale);
    }
  }
}

// One accumulator per (input row, 16-lane half of a block): 2 independent FMA chains per
// row, and 2 output rows at a time for 4 chains.
template <int MR>
XLLM_AVX512 void direct_rows(const float* x, int64_t ldx, const BlockMatrix& w, int64_t n0,
                             int nt, const float* bias, float* out, int64_t ldo) {
  const int64_t nb = w.cols / kBlock;
  int j = 0;
  for (; j + 2 <= nt; j += 2) {
    __m512 acc[MR][4];
    for (int r = 0; r < MR; ++r) {
      for (int p = 0; p < 4; ++p) acc[r][p] = _mm512_setzero_ps();
    }
    for (int64_t b = 0; b < nb; ++b) {
      __m512 wv[4];
      decode_block(w, n0 + j, nb, b, wv);
      decode_block(w, n0 + j + 1, nb, b, wv + 2);
      for (int r = 0; r < MR; ++r) {
        const float* xb = x + r * ldx + b * kBlock;
        const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
        acc[r][0] = _mm512_fmadd_ps(x0, wv[0], acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(x1, wv[1], acc[r][1]);
        acc[r][2] = _mm512_fmadd_ps(x0, wv[2], acc[r][2]);
        acc[r][3] = _mm512_fmadd_ps(x1, wv[3], acc[r][3]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      for (int h = 0; h < 2; ++h) {
        const float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][2 * h], acc[r][2 * h + 1]));
        out[r * ldo + j + h] = bias ? sum + bias[j + h] : sum;
      }
    }
  }
  for (; j < nt; ++j) {
    __m512 acc[MR][2];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      __m512 wv[2];
      decode_block(w, n0 + j, nb, b, wv);
      for (int r = 0; r < MR; ++r) {
        const float* xb = x + r * ldx + b * kBlock;
        acc[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xb), wv[0], acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(_mm512_loadu_ps(xb + 16), wv[1], acc[r][1]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      const float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
      out[r * ldo + j] = bias ? sum + bias[j] : sum;
    }
  }
}

XLLM_AVX512 void direct(const float* x, int64_t ldx, int mr, const BlockMatrix& w, int64_t n0,
                        int nt, const float* bias, float* out, int64_t ldo) {
  if (mr == 1) return direct_rows<1>(x, ldx, w, n0, nt, bias, out, ldo);
  if (mr == 2) return direct_rows<2>(x, ldx, w, n0, nt, bias, out, ldo);
  direct_rows<3>(x, ldx, w, n0, nt, bias, out, ldo);
}

}  // namespace

// Decoding to rows and the tile stay the AVX2 ones: at 16 lanes the tile measured 0.7x
// (zmm FMAs bought no throughput over two ymm ports on this Xeon, and the 16-lane sums cost
// more to reduce) and decode_row 0.95x; the direct form gains from the wider widening.
Kernels avx512_kernels() {
  const Kernels avx2 = avx2_kernels();
  return {avx2.decode_row, avx2.tile, direct};
}

}  // namespace xllm::quant
#endif
