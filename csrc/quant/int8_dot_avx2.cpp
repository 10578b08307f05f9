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

#include <cmath>

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

// 255 a, in int32 lanes: 16-bit x's high parts' weight (int8_dot.h).
XLLM_AVX2 inline __m256i times255(__m256i a) {
  return _mm256_sub_epi32(_mm256_slli_epi32(a, 8), a);
}

// Rows [r0, r0 + MR) x the 16 outputs of group g. X16: x in 16 bits (q.xlo), the block's
// sums over the high parts times 255 plus those over the low parts.
template <int MR, bool X16>
XLLM_AVX2 void int8_block(const PackedInt8& w, const QuantizedRows& q, int64_t r0, int64_t g,
                          const float* bias, float* out, int64_t ldo) {
  const int64_t k = w.cols, nb = w.blocks(), bytes = w.block_bytes();
  const bool q4 = w.format == Format::kQ4_1;
  __m256 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t b = 0; b < nb; ++b) {
    __m256i isum[MR][2], carry[MR][2];  // carry: Q4_1's high-part sums, widened, times 255
    for (int r = 0; r < MR; ++r) isum[r][0] = isum[r][1] = _mm256_setzero_si256();
    const uint8_t* blk = w.quads + (g * nb + b) * bytes;
    for (int pass = 0; pass < (X16 ? 2 : 1); ++pass) {
      for (int r = 0; r < MR && pass == 1; ++r) {
        for (int h = 0; h < 2; ++h) {
          if (q4) {
            carry[r][h] = _mm256_madd_epi16(isum[r][h], _mm256_set1_epi16(255));
            isum[r][h] = _mm256_setzero_si256();
          } else {
            isum[r][h] = times255(isum[r][h]);
          }
        }
      }
      const int8_t* xs = pass == 0 ? q.xq : q.xlo;
      for (int v = 0; v < (q4 ? 4 : 8); ++v) {
        __m256i xa[MR], xb[MR];
        for (int r = 0; r < MR; ++r) {
          const int8_t* xr = xs + (r0 + r) * k + b * kBlock;
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
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 d = _mm256_load_ps(w.d + (g * nb + b) * 16 + 8 * h);
      const __m256 c = _mm256_load_ps(w.c + (g * nb + b) * 16 + 8 * h);
      for (int r = 0; r < MR; ++r) {
        const int64_t at = (r0 + r) * nb + b;
        __m256i i32 = q4 ? _mm256_madd_epi16(isum[r][h], _mm256_set1_epi16(1)) : isum[r][h];
        if (X16 && q4) i32 = _mm256_add_epi32(i32, carry[r][h]);
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

template <int MR, bool X16>
XLLM_AVX2 void q8_half(const PackedInt8& w, const QuantizedRows& q, int64_t r0, int64_t g,
                       int h, const float* bias, float* out, int64_t ldo) {
  const int64_t k = w.cols, nb = w.blocks(), bytes = w.block_bytes();
  __m256 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t b = 0; b < nb; ++b) {
    __m256i isum[MR];
    for (int r = 0; r < MR; ++r) isum[r] = _mm256_setzero_si256();
    const uint8_t* blk = w.quads + (g * nb + b) * bytes + h * 32;
    for (int pass = 0; pass < (X16 ? 2 : 1); ++pass) {
      if (pass == 1) {
        for (int r = 0; r < MR; ++r) isum[r] = times255(isum[r]);
      }
      const int8_t* xb = (pass == 0 ? q.xq : q.xlo) + r0 * k + b * kBlock;
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
template <bool X16>
XLLM_AVX2 void q8_group_halves(const PackedInt8& w, const QuantizedRows& q, int64_t g,
                               const float* bias, float* out, int64_t ldo) {
  for (int h = 0; h < 2; ++h) {
    int64_t r = 0;
    for (; r + 4 <= q.m; r += 4) q8_half<4, X16>(w, q, r, g, h, bias, out, ldo);
    switch (q.m - r) {
      case 3: q8_half<3, X16>(w, q, r, g, h, bias, out, ldo); break;
      case 2: q8_half<2, X16>(w, q, r, g, h, bias, out, ldo); break;
      case 1: q8_half<1, X16>(w, q, r, g, h, bias, out, ldo); break;
      default: break;
    }
  }
}

template <bool X16>
XLLM_AVX2 void int8_groups(const PackedInt8& w, const QuantizedRows& q, int64_t g_begin,
                           int64_t g_end, const float* bias, float* out, int64_t ldo) {
  if (w.format == Format::kQ8_0 && q.m > 1 && q.m <= kHalvesMaxRows) {
    for (int64_t g = g_begin; g < g_end; ++g) q8_group_halves<X16>(w, q, g, bias, out, ldo);
    return;
  }
  for (int64_t g = g_begin; g < g_end; ++g) {
    int64_t r = 0;
    for (; r + 2 <= q.m; r += 2) int8_block<2, X16>(w, q, r, g, bias, out, ldo);
    if (r < q.m) int8_block<1, X16>(w, q, r, g, bias, out, ldo);
  }
}

// 8 lanes of x times id rounded (half to even) to int32, and (lo) split as int8_dot.h says.
XLLM_AVX2 inline __m256i round8(__m256 v, __m256 id) {
  return _mm256_cvtps_epi32(_mm256_mul_ps(v, id));
}

XLLM_AVX2 inline void store32(int8_t* dst, __m256i v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), v);
}

// 32 int32 values (each within int8) packed to bytes in order.
XLLM_AVX2 inline __m256i pack32(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i ab = _mm256_packs_epi32(a, b), cd = _mm256_packs_epi32(c, d);
  const __m256i bytes = _mm256_packs_epi16(ab, cd);  // lanes interleaved by 128-bit half
  return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// A row's 4-byte words w[v] of a packed block (line v, the row's lane) into 8 int32 lanes
// in k order with no shuffle: words a and b broadcast (loads), blended as {a x4, b x4}, and
// each lane's byte (sh: its shift) taken by a variable shift and a mask.
XLLM_AVX2 inline __m256i words2(const uint8_t* a, const uint8_t* b) {
  return _mm256_blend_epi32(_mm256_set1_epi32(*reinterpret_cast<const int32_t*>(a)),
                            _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(b)), 0xF0);
}

// Blocks ahead that decode_packed_tile asks for: the first tile of a group is the one that
// reads its lines from memory (on the demo's shapes 0.93-0.97x the blocks' own decode at
// 9-16 rows without, 0.97-1.0x with).
constexpr int64_t kPrefetchBlocks = 4;

// Blocks [b0, b1) of rows n0 .. n0 + 4 of the packed weight (n0 a multiple of 4) into
// dst [4, 32 (b1 - b0)].
template <bool Q4>
XLLM_AVX2 void decode_packed_tile(const PackedInt8& w, int64_t n0, int64_t b0, int64_t b1,
                                  float* dst) {
  const int64_t k = (b1 - b0) * kBlock, nb = w.blocks(), bytes = w.block_bytes(), g = n0 / 16;
  const uint8_t* quads = w.quads + g * nb * bytes + 4 * (n0 % 16);  // lane n0 % 16 of line 0
  const float* ds = w.d + g * nb * 16 + n0 % 16;
  const float* cs = w.c + g * nb * 16 + n0 % 16;
  const __m256i sh_lo = _mm256_setr_epi32(0, 8, 16, 24, 0, 8, 16, 24);
  const __m256i sh_hi = _mm256_setr_epi32(4, 12, 20, 28, 4, 12, 20, 28);
  const __m256i mask = _mm256_set1_epi32(Q4 ? 0x0F : 0xFF);
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* blk = quads + b * bytes;
    for (int64_t v = 0; v < bytes; v += 128) {
      _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchBlocks * bytes + v),
                   _MM_HINT_T0);
    }
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      const uint8_t* row = blk + 4 * r;
      float* out = dst + r * k + (b - b0) * kBlock;
      // w = d u + c: Q4_1's d q + m; Q8_0's d (u - 128) = d q, exact (the products and sums
      // of a fp16 d and 8-bit u are), so one rounding as in the blocks' decode_row
      const __m256 scale = _mm256_broadcast_ss(ds + b * 16 + r);
      const __m256 offset = _mm256_broadcast_ss(cs + b * 16 + r);
      __m256i q[4];
      if constexpr (Q4) {  // byte t of word v: quant 4 v + t low, 16 + 4 v + t high
        const __m256i w01 = words2(row, row + 64), w23 = words2(row + 128, row + 192);
        q[0] = _mm256_srlv_epi32(w01, sh_lo);
        q[1] = _mm256_srlv_epi32(w23, sh_lo);
        q[2] = _mm256_srlv_epi32(w01, sh_hi);
        q[3] = _mm256_srlv_epi32(w23, sh_hi);
      } else {  // byte t of word v: u of quant 4 v + t
#pragma GCC unroll 4
        for (int p = 0; p < 4; ++p) {
          q[p] = _mm256_srlv_epi32(words2(row + 128 * p, row + 128 * p + 64), sh_lo);
        }
      }
#pragma GCC unroll 4
      for (int p = 0; p < 4; ++p) {
        const __m256 u = _mm256_cvtepi32_ps(_mm256_and_si256(q[p], mask));
        _mm256_storeu_ps(out + 8 * p, _mm256_fmadd_ps(u, scale, offset));
      }
    }
  }
}

}  // namespace

XLLM_AVX2 void int8_groups_avx2(const PackedInt8& w, const QuantizedRows& q, int64_t g_begin,
                                int64_t g_end, const float* bias, float* out, int64_t ldo) {
  if (q.xlo) return int8_groups<true>(w, q, g_begin, g_end, bias, out, ldo);
  int8_groups<false>(w, q, g_begin, g_end, bias, out, ldo);
}

XLLM_AVX2 void decode_packed_tile_avx2(const void* weight, int64_t n0, int nt, int64_t b0,
                                       int64_t b1, float* dst) {
  const PackedInt8& w = *static_cast<const PackedInt8*>(weight);
  (void)nt;  // the group's padding rows decode to zeros: all 4 rows are written
  if (w.format == Format::kQ4_1) return decode_packed_tile<true>(w, n0, b0, b1, dst);
  decode_packed_tile<false>(w, n0, b0, b1, dst);
}

// quantize_rows at the avx2 level (the same bits as the scalar form).
XLLM_AVX2 void quantize_rows_avx2(const float* x, int64_t ldx, int64_t m, int64_t k,
                                  int8_t* xq, float* dx, float* sx, int8_t* xlo) {
  const int64_t nb = k / kBlock;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* src = x + r * ldx + b * kBlock;
      const int64_t at = r * k + b * kBlock;
      __m256 v[4], amax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
      for (int p = 0; p < 4; ++p) {
        v[p] = _mm256_loadu_ps(src + 8 * p);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[p]));
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(v[p], v[p], _CMP_UNORD_Q));  // NaN
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_andnot_ps(sign, v[p]),
                                              _mm256_set1_ps(INFINITY), _CMP_EQ_OQ));
      }
      if (!_mm256_testz_ps(bad, bad)) {  // NaN scales: the row's outputs NaN, as in fp32
        store32(xq + at, _mm256_setzero_si256());
        if (xlo) store32(xlo + at, _mm256_setzero_si256());
        dx[r * nb + b] = sx[r * nb + b] = NAN;
        continue;
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
      const float d = _mm_cvtss_f32(m4) / x_top(xlo != nullptr);
      const __m256 id = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
      __m256i qv[4], sum = _mm256_setzero_si256();
      for (int p = 0; p < 4; ++p) {
        qv[p] = round8(v[p], id);
        sum = _mm256_add_epi32(sum, qv[p]);
      }
      if (xlo) {
        const __m256 inv = _mm256_set1_ps(1.0f / 255);
        __m256i hi[4], lo[4];
        for (int p = 0; p < 4; ++p) {
          hi[p] = round8(_mm256_cvtepi32_ps(qv[p]), inv);
          lo[p] = _mm256_sub_epi32(qv[p], _mm256_mullo_epi32(hi[p], _mm256_set1_epi32(255)));
        }
        store32(xq + at, pack32(hi[0], hi[1], hi[2], hi[3]));
        store32(xlo + at, pack32(lo[0], lo[1], lo[2], lo[3]));
      } else {
        store32(xq + at, pack32(qv[0], qv[1], qv[2], qv[3]));
      }
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
      dx[r * nb + b] = d;
      sx[r * nb + b] = d * static_cast<float>(_mm_cvtsi128_si32(s4));
    }
  }
}

}  // namespace xllm::quant
#endif
