// int8 linear kernels for the avx512, avx512_bf16 and amx levels, on the packed form (int8_dot.h).
//
// Dot products: one zmm lane per output. Each step broadcasts 4 int8 inputs of a row of x
// to every lane and VPDPBUSD multiplies them with the 4 unsigned quants of each of 16
// outputs in a packed line, summing into int32 lanes; after a block's 8 quads one FMA
// scales the sums by d * dx and another adds c * sx. No horizontal sums: a zmm of sums is
// 16 outputs. Up to 4 rows of x share each weight line loaded; with fewer rows, 4 groups
// run side by side for independent chains.
//
// From PackedAmxInt8::min_rows rows the amx level runs the int8 tile form instead (int8_amx.cpp).
#include <immintrin.h>

#include <algorithm>
#include <limits>

#include "common/avx512.h"
#include "quant/int8_dot.h"

#if defined(__x86_64__)

namespace xllm::quant {
namespace {

// Rows [r0, r0 + MR) x output groups [g0, g0 + NG). X16: x in 16 bits (q.xlo): a block's
// sums over the high parts, times 255, then on over the low parts (int8_dot.h). (Both
// parts' products from each weight line loaded once, summed apart: 0.87-0.93x on the demo's
// batches and prompts, even on one row.)
template <int MR, int NG, bool X16>
XLLM_AVX512 void int8_block(const PackedInt8& w, const QuantizedRows& q, int64_t r0, int64_t g0,
                            const float* bias, float* out, int64_t ldo) {
  const int64_t k = w.cols, nb = w.blocks(), bytes = w.block_bytes();
  const int64_t group_stride = nb * bytes;
  const bool q4 = w.format == Format::kQ4_1;
  __m512 acc[MR][NG];
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < NG; ++j) acc[r][j] = _mm512_setzero_ps();
  }
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    __m512i isum[MR][NG];
    for (int r = 0; r < MR; ++r) {
      for (int j = 0; j < NG; ++j) isum[r][j] = _mm512_setzero_si512();
    }
    const uint8_t* blk = w.quads + (g0 * nb + b) * bytes;
    for (int pass = 0; pass < (X16 ? 2 : 1); ++pass) {
      if (pass == 1) {  // 255 times the high parts' sums
        for (int r = 0; r < MR; ++r) {
          for (int j = 0; j < NG; ++j) {
            isum[r][j] = _mm512_sub_epi32(_mm512_slli_epi32(isum[r][j], 8), isum[r][j]);
          }
        }
      }
      const int8_t* xs = pass == 0 ? q.xq : q.xlo;
      for (int v = 0; v < (q4 ? 4 : 8); ++v) {
        __m512i xa[MR], xb[MR];
        for (int r = 0; r < MR; ++r) {
          const int8_t* xr = xs + (r0 + r) * k + b * kBlock;
          xa[r] = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(xr + 4 * v));
          xb[r] = q4 ? _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(xr + 16 + 4 * v))
                     : xa[r];
        }
        for (int j = 0; j < NG; ++j) {
          const __m512i raw = _mm512_load_si512(blk + j * group_stride + v * 64);
          if (q4) {
            const __m512i lo = _mm512_and_si512(raw, low);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
            for (int r = 0; r < MR; ++r) {
              isum[r][j] = _mm512_dpbusd_epi32(isum[r][j], lo, xa[r]);
              isum[r][j] = _mm512_dpbusd_epi32(isum[r][j], hi, xb[r]);
            }
          } else {
            for (int r = 0; r < MR; ++r) {
              isum[r][j] = _mm512_dpbusd_epi32(isum[r][j], raw, xa[r]);
            }
          }
        }
      }
    }
    for (int j = 0; j < NG; ++j) {
      const __m512 d = _mm512_load_ps(w.d + ((g0 + j) * nb + b) * 16);
      const __m512 c = _mm512_load_ps(w.c + ((g0 + j) * nb + b) * 16);
      for (int r = 0; r < MR; ++r) {
        const int64_t at = (r0 + r) * nb + b;
        acc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[r][j]),
                                    _mm512_mul_ps(d, _mm512_set1_ps(q.dx[at])), acc[r][j]);
        acc[r][j] = _mm512_fmadd_ps(c, _mm512_set1_ps(q.sx[at]), acc[r][j]);
      }
    }
  }
  for (int j = 0; j < NG; ++j) {
    const int64_t n0 = (g0 + j) * 16;
    for (int r = 0; r < MR; ++r) {
      store_lanes(out + (r0 + r) * ldo + n0, acc[r][j], bias ? bias + n0 : nullptr, w.rows - n0);
    }
  }
}

template <int NG, bool X16>
XLLM_AVX512 void int8_rows(const PackedInt8& w, const QuantizedRows& q, int64_t g0,
                           const float* bias, float* out, int64_t ldo) {
  int64_t r = 0;
  for (; r + 4 <= q.m; r += 4) int8_block<4, NG, X16>(w, q, r, g0, bias, out, ldo);
  switch (q.m - r) {
    case 3: int8_block<3, NG, X16>(w, q, r, g0, bias, out, ldo); break;
    case 2: int8_block<2, NG, X16>(w, q, r, g0, bias, out, ldo); break;
    case 1: int8_block<1, NG, X16>(w, q, r, g0, bias, out, ldo); break;
    default: break;
  }
}

template <bool X16>
XLLM_AVX512 void int8_groups(const PackedInt8& w, const QuantizedRows& q, int64_t g_begin,
                             int64_t g_end, const float* bias, float* out, int64_t ldo) {
  int64_t g = g_begin;
  // Four groups a pass for fewer than 4 rows, so that each row has 4 independent sums.
  if (q.m < 4) {
    for (; g + 4 <= g_end; g += 4) int8_rows<4, X16>(w, q, g, bias, out, ldo);
  }
  for (; g + 2 <= g_end; g += 2) int8_rows<2, X16>(w, q, g, bias, out, ldo);
  if (g < g_end) int8_rows<1, X16>(w, q, g, bias, out, ldo);
}

// One 32-element block of x: dst = round(src / d), d = max|src| / 127; returns d and
// stores d * sum(dst) in *sum_d. With lo: v = round(src / d), d = max|src| / kX16Max, split
// into dst = round(v / 255) and lo = v - 255 dst (int8_dot.h), *sum_d = d * sum(v).
XLLM_AVX512 float quantize_block(const float* src, int8_t* dst, float* sum_d, int8_t* lo) {
  const __m512 v0 = _mm512_loadu_ps(src), v1 = _mm512_loadu_ps(src + 16);
  if (_mm512_fpclass_ps_mask(v0, kNonFinite) | _mm512_fpclass_ps_mask(v1, kNonFinite)) {
    // A NaN or infinity: the block's scale is NaN, so every output of the row is NaN (as
    // in fp32), and the quants are zeros rather than what converting NaN would give.
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_setzero_si256());
    if (lo) _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo), _mm256_setzero_si256());
    *sum_d = std::numeric_limits<float>::quiet_NaN();
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
  const float d = amax / x_top(lo != nullptr);
  const __m512 id = _mm512_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
  // cvtps rounds half to even under the default MXCSR, as nearbyint does.
  const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id));
  const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
  if (lo) {
    const __m512 inv = _mm512_set1_ps(1.0f / 255);
    const __m512i h0 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_cvtepi32_ps(q0), inv));
    const __m512i h1 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_cvtepi32_ps(q1), inv));
    const __m512i k255 = _mm512_set1_epi32(255);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtsepi32_epi8(h0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm512_cvtsepi32_epi8(h1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(lo),
                     _mm512_cvtsepi32_epi8(_mm512_sub_epi32(q0, _mm512_mullo_epi32(h0, k255))));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + 16),
                     _mm512_cvtsepi32_epi8(_mm512_sub_epi32(q1, _mm512_mullo_epi32(h1, k255))));
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtsepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm512_cvtsepi32_epi8(q1));
  }
  *sum_d = d * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
  return d;
}

}  // namespace

XLLM_AVX512 void quantize_rows_avx512(const float* x, int64_t ldx, int64_t m, int64_t k,
                                      int8_t* xq, float* dx, float* sx, int8_t* xlo) {
  const int64_t nb = k / kBlock;
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t at = r * k + b * kBlock;
      dx[r * nb + b] = quantize_block(x + r * ldx + b * kBlock, xq + at, &sx[r * nb + b],
                                      xlo ? xlo + at : nullptr);
    }
  }
}

XLLM_AVX512 void int8_groups_avx512(const PackedInt8& w, const QuantizedRows& q,
                                    int64_t g_begin, int64_t g_end, const float* bias,
                                    float* out, int64_t ldo) {
  if (q.xlo) return int8_groups<true>(w, q, g_begin, g_end, bias, out, ldo);
  int8_groups<false>(w, q, g_begin, g_end, bias, out, ldo);
}

XLLM_AVX512 void requantize_group_avx512(const PackedInt8& w, int64_t g, int64_t blocks,
                                         int8_t* dst, float* s) {
  // A packed line holds 4 consecutive inputs t of each of the 16 outputs (one dword an
  // output); lane j of the t-th vector below is output j's input 4 v + t of the line.
  const int64_t nb = w.blocks(), bytes = w.block_bytes();
  const bool q4 = w.format == Format::kQ4_1;
  const int lines = q4 ? 4 : 8;
  auto values = [&](int64_t b, int v, int shift, __m512 out[4]) XLLM_AVX512 {
    const __m512i line = _mm512_load_si512(w.quads + (g * nb + b) * bytes + v * 64);
    const __m512 d = _mm512_load_ps(w.d + (g * nb + b) * 16);
    const __m512 c = _mm512_load_ps(w.c + (g * nb + b) * 16);
    const __m512i mask = _mm512_set1_epi32(q4 ? 0x0F : 0xFF);
    for (int t = 0; t < 4; ++t) {
      const __m512i u = _mm512_and_si512(_mm512_srli_epi32(line, shift + 8 * t), mask);
      // d u + c as the blocks' decode rounds it: a product, then a sum (no FMA).
      out[t] = _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(u)), c);
    }
  };
  __m512 amax = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    for (int v = 0; v < lines; ++v) {
      for (int half = 0; half < (q4 ? 2 : 1); ++half) {
        __m512 x[4];
        values(b, v, 4 * half, x);
        for (int t = 0; t < 4; ++t) amax = _mm512_max_ps(amax, _mm512_abs_ps(x[t]));
      }
    }
  }
  const __m512 scale = _mm512_div_ps(amax, _mm512_set1_ps(127.0f));
  const __mmask16 live = _mm512_cmp_ps_mask(scale, _mm512_setzero_ps(), _CMP_GT_OQ);
  const __m512 inv = _mm512_maskz_div_ps(live, _mm512_set1_ps(1.0f), scale);
  _mm512_store_ps(s, scale);
  for (int64_t b = 0; b < blocks; ++b) {
    int8_t* tile = dst + b * 16 * kBlock;  // [8 lines][16 outputs][4]
    if (b >= nb) {
      std::fill(tile, tile + 16 * kBlock, int8_t{0});
      continue;
    }
    for (int v = 0; v < lines; ++v) {
      for (int half = 0; half < (q4 ? 2 : 1); ++half) {
        __m512 x[4];
        values(b, v, 4 * half, x);
        __m512i packed = _mm512_setzero_si512();
        for (int t = 0; t < 4; ++t) {
          // round half to even (the default mode), as nearbyint; |x * inv| <= 127.
          const __m512i qt = _mm512_cvtps_epi32(_mm512_mul_ps(x[t], inv));
          packed = _mm512_or_si512(packed, _mm512_slli_epi32(
              _mm512_and_si512(qt, _mm512_set1_epi32(0xFF)), 8 * t));
        }
        // q4_1's high nibbles are inputs 16 + 4 v + t: tile line v + 4.
        _mm512_store_si512(tile + (v + 4 * half) * 64, packed);
      }
    }
  }
}

}  // namespace xllm::quant
#endif
