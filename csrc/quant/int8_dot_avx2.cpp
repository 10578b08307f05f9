// int8 linear kernel for the avx2 level, on the packed form (int8_dot.h).
//
// AVX2 has no VPDPBUSD: VPMADDUBSW multiplies unsigned by signed bytes and adds pairs into
// saturating int16, then VPMADDWD by ones adds pairs of those into int32 lanes, which is
// VPDPBUSD's sum of four. Pairs of Q4_1 quants (<= 15) times int8 never saturate. Q8_0's
// unsigned quants (q + 128, up to 255) could, so for Q8_0 the signed quant q is recovered
// (u ^ 0x80) and the sign moved onto x (|q| * sign(x, q), as llama.cpp does): then the sum is
// of q x, not u x, and the block's c * sx term (-128 d dx sum(xq)) is left out, which is the
// same number. A packed line's 16 outputs are two ymm halves.
//
// Q4_1's pairs are summed in int16 over a block before VPMADDWD widens them: a pair is at
// most 2 * 15 * 127 = 3810 and a block adds eight, at most 30480, so they never saturate.
// VPMADDWD then runs once a block instead of once a VPMADDUBSW (on Zen 1 both issue on one
// pipe). On the AMX Xeon forced to this level, 16 layers of Llama-3.2-1B's shapes on Q4_1:
// 1.07x at 16 rows, 1.1-1.2x at 64 and 509; the demo's 1.15x at 64 and 509 (/tmp script,
// builds in turns). Q8_0's pairs reach 2 * 128 * 127 = 32512, so each is widened at once.
#include <immintrin.h>

#include "quant/int8_dot.h"

#if defined(__x86_64__)
#define XLLM_AVX2 __attribute__((target("avx2,fma")))

namespace xllm::quant {
namespace {

// sum of four u8 x s8 products per int32 lane, added to acc.
XLLM_AVX2 inline __m256i dot4(__m256i acc, __m256i u, __m256i x) {
  const __m256i pairs = _mm256_maddubs_epi16(u, x);
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

XLLM_AVX2 inline void store8(float* out, __m256 acc, const float* bias, int64_t cols) {
  if (cols >= 8) {
    if (bias) acc = _mm256_add_ps(acc, _mm256_loadu_ps(bias));
    _mm256_storeu_ps(out, acc);
    return;
  }
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, acc);
  for (int64_t i = 0; i < cols; ++i) out[i] = bias ? tmp[i] + bias[i] : tmp[i];
}

// Rows [r0, r0 + MR) x the 16 outputs of group g.
template <int MR>
XLLM_AVX2 void int8_block(const PackedInt8& w, const QuantizedRows& q, int64_t r0, int64_t g,
                          const float* bias, float* out, int64_t ldo) {
  const int64_t k = w.cols, nb = w.blocks(), bytes = w.block_bytes();
  const bool q4 = w.format == Format::kQ4_1;
  __m256 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t b = 0; b < nb; ++b) {
    __m256i isum[MR][2];
    for (int r = 0; r < MR; ++r) isum[r][0] = isum[r][1] = _mm256_setzero_si256();
    const uint8_t* blk = w.quads + (g * nb + b) * bytes;
    for (int v = 0; v < (q4 ? 4 : 8); ++v) {
      __m256i xa[MR], xb[MR];
      for (int r = 0; r < MR; ++r) {
        const int8_t* xr = q.xq + (r0 + r) * k + b * kBlock;
        xa[r] = _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(xr + 4 * v));
        xb[r] = q4 ? _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(xr + 16 + 4 * v))
                   : xa[r];
      }
      for (int h = 0; h < 2; ++h) {
        const __m256i raw =
            _mm256_load_si256(reinterpret_cast<const __m256i*>(blk + v * 64 + h * 32));
        if (q4) {
          const __m256i lo = _mm256_and_si256(raw, low);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
          for (int r = 0; r < MR; ++r) {
            isum[r][h] = _mm256_add_epi16(isum[r][h],
                                          _mm256_add_epi16(_mm256_maddubs_epi16(lo, xa[r]),
                                                           _mm256_maddubs_epi16(hi, xb[r])));
          }
        } else {
          const __m256i sq = _mm256_xor_si256(raw, flip);  // the signed quant q
          const __m256i mag = _mm256_sign_epi8(sq, sq);     // |q| (<= 128 as unsigned)
          for (int r = 0; r < MR; ++r) {
            isum[r][h] = dot4(isum[r][h], mag, _mm256_sign_epi8(xa[r], sq));
          }
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 d = _mm256_load_ps(w.d + (g * nb + b) * 16 + 8 * h);
      const __m256 c = _mm256_load_ps(w.c + (g * nb + b) * 16 + 8 * h);
      for (int r = 0; r < MR; ++r) {
        const int64_t at = (r0 + r) * nb + b;
        const __m256i i32 =
            q4 ? _mm256_madd_epi16(isum[r][h], _mm256_set1_epi16(1)) : isum[r][h];
        acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32),
                                    _mm256_mul_ps(d, _mm256_set1_ps(q.dx[at])), acc[r][h]);
        if (q4) acc[r][h] = _mm256_fmadd_ps(c, _mm256_set1_ps(q.sx[at]), acc[r][h]);
      }
    }
  }
  const int64_t n0 = g * 16;
  for (int r = 0; r < MR; ++r) {
    for (int h = 0; h < 2; ++h) {
      const int64_t at = n0 + 8 * h;
      if (at < w.rows) {
        store8(out + (r0 + r) * ldo + at, acc[r][h], bias ? bias + at : nullptr, w.rows - at);
      }
    }
  }
}

// Q8_0 at up to kHalvesMaxRows rows: rows [r0, r0 + MR) x the 8 outputs of half h of group
// g, so that 4 rows (not 2) share each weight line loaded and its |q| and sign taken; at
// more rows the weight's reuse is there anyway and x, read once a half, costs more. On the
// AMX Xeon forced to this level (16 layers of Llama-3.2-1B's shapes, the demo's 30 alike,
// builds in turns): 1.2-1.3x at 2-4 rows, 1.1-1.17x at 8, 1.05-1.14x at 16; even at 32-64
// and 0.95x at 509, so those keep the 2-row form.
constexpr int64_t kHalvesMaxRows = 16;

template <int MR>
XLLM_AVX2 void q8_half(const PackedInt8& w, const QuantizedRows& q, int64_t r0, int64_t g,
                       int h, const float* bias, float* out, int64_t ldo) {
  const int64_t k = w.cols, nb = w.blocks(), bytes = w.block_bytes();
  __m256 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const int8_t* x0 = q.xq + r0 * k;
  for (int64_t b = 0; b < nb; ++b) {
    __m256i isum[MR];
    for (int r = 0; r < MR; ++r) isum[r] = _mm256_setzero_si256();
    const uint8_t* blk = w.quads + (g * nb + b) * bytes + h * 32;
    const int8_t* xb = x0 + b * kBlock;
    for (int v = 0; v < 8; ++v) {
      const __m256i raw = _mm256_load_si256(reinterpret_cast<const __m256i*>(blk + v * 64));
      const __m256i sq = _mm256_xor_si256(raw, flip);  // the signed quant q
      const __m256i mag = _mm256_sign_epi8(sq, sq);     // |q| (<= 128 as unsigned)
      for (int r = 0; r < MR; ++r) {
        const __m256i xa =
            _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(xb + r * k + 4 * v));
        isum[r] = dot4(isum[r], mag, _mm256_sign_epi8(xa, sq));
      }
    }
    const __m256 d = _mm256_load_ps(w.d + (g * nb + b) * 16 + 8 * h);
    for (int r = 0; r < MR; ++r) {
      const __m256 scale = _mm256_mul_ps(d, _mm256_set1_ps(q.dx[(r0 + r) * nb + b]));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), scale, acc[r]);
    }
  }
  const int64_t at = g * 16 + 8 * h;
  if (at >= w.rows) return;
  for (int r = 0; r < MR; ++r) {
    store8(out + (r0 + r) * ldo + at, acc[r], bias ? bias + at : nullptr, w.rows - at);
  }
}

// Every row of q (at most kHalvesMaxRows) against group g of a Q8_0 weight, 4 rows a pass.
XLLM_AVX2 void q8_group_halves(const PackedInt8& w, const QuantizedRows& q, int64_t g,
                               const float* bias, float* out, int64_t ldo) {
  for (int h = 0; h < 2; ++h) {
    int64_t r = 0;
    for (; r + 4 <= q.m; r += 4) q8_half<4>(w, q, r, g, h, bias, out, ldo);
    switch (q.m - r) {
      case 3: q8_half<3>(w, q, r, g, h, bias, out, ldo); break;
      case 2: q8_half<2>(w, q, r, g, h, bias, out, ldo); break;
      case 1: q8_half<1>(w, q, r, g, h, bias, out, ldo); break;
      default: break;
    }
  }
}

}  // namespace

XLLM_AVX2 void int8_groups_avx2(const PackedInt8& w, const QuantizedRows& q, int64_t g_begin,
                                int64_t g_end, const float* bias, float* out, int64_t ldo) {
  if (w.format == Format::kQ8_0 && q.m > 1 && q.m <= kHalvesMaxRows) {
    for (int64_t g = g_begin; g < g_end; ++g) q8_group_halves(w, q, g, bias, out, ldo);
    return;
  }
  for (int64_t g = g_begin; g < g_end; ++g) {
    int64_t r = 0;
    for (; r + 2 <= q.m; r += 2) int8_block<2>(w, q, r, g, bias, out, ldo);
    if (r < q.m) int8_block<1>(w, q, r, g, bias, out, ldo);
  }
}

}  // namespace xllm::quant
#endif
