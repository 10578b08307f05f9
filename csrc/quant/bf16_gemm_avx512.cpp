// bf16 linear kernels for the avx512_bf16 and amx levels (bf16_gemm.h has the layout).
//
// VDPBF16PS (few rows): a zmm of 16 fp32 accumulators per (row, output group); each
// step broadcasts one k-pair of a row of x and multiplies it into the packed line of
// the group, 32 products per instruction. MR rows x NT groups of accumulators share
// each weight line loaded, and NT groups give NT independent FMA chains per row.
//
// AMX (many rows): 2 x 2 tiles of 16 x 16 fp32 sums (32 rows x 32 outputs), fed per
// 32 input features by two 16-row tiles of x and two packed 1 KiB tiles of W; the
// weight tiles of a pair of groups stay in L1 while a band of row blocks of x passes,
// its tiles loaded with the no-reuse hint (TILELOADDT1) so that they do not push the
// weight out, and the next pair's weight is asked for into L2 meanwhile (L2Ask,
// bf16_gemm.h); long K is summed in passes (kAmxPassTiles below), each asking for the next
// pass's slice of x.
#include <immintrin.h>

#include <algorithm>

#include "attention/vec.h"
#include "common/avx512.h"
#include "quant/bf16_gemm.h"

#if defined(__x86_64__)

namespace xllm::quant {
namespace {

template <int MR, int NT>
XLLM_AVX512_BF16 void dot_block(const PackedBf16& w, const uint16_t* xb, int64_t g0,
                           const float* bias, float* out, int64_t ldo) {
  const int64_t kp = w.cols / 2;  // k-pairs
  const auto* x32 = reinterpret_cast<const int32_t*>(xb);
  const uint16_t* wg[NT];
  for (int j = 0; j < NT; ++j) wg[j] = w.group(g0 + j);
  __m512 acc[MR][NT];
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < NT; ++j) acc[r][j] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < kp; ++p) {
    __m512i wv[NT];
    for (int j = 0; j < NT; ++j) wv[j] = _mm512_load_si512(wg[j] + p * 32);
    for (int r = 0; r < MR; ++r) {
      const __m512i xv = _mm512_set1_epi32(x32[r * kp + p]);
      for (int j = 0; j < NT; ++j) {
        acc[r][j] = _mm512_dpbf16_ps(acc[r][j], (__m512bh)xv, (__m512bh)wv[j]);
      }
    }
  }
  for (int j = 0; j < NT; ++j) {
    const int64_t n0 = (g0 + j) * kBf16Group;
    const int cols = static_cast<int>(std::min<int64_t>(kBf16Group, w.rows - n0));
    for (int r = 0; r < MR; ++r) {
      store_lanes(out + r * ldo + n0, acc[r][j], bias ? bias + n0 : nullptr, cols);
    }
  }
}

// Groups [g, g + NT) for all m rows, MR rows a pass.
template <int NT>
XLLM_AVX512_BF16 void dot_groups(const PackedBf16& w, const uint16_t* xb, int64_t m, int64_t g,
                            const float* bias, float* out, int64_t ldo) {
  const int64_t k = w.cols;
  int64_t r = 0;
  for (; r + 4 <= m; r += 4) dot_block<4, NT>(w, xb + r * k, g, bias, out + r * ldo, ldo);
  switch (m - r) {
    case 3: dot_block<3, NT>(w, xb + r * k, g, bias, out + r * ldo, ldo); break;
    case 2: dot_block<2, NT>(w, xb + r * k, g, bias, out + r * ldo, ldo); break;
    case 1: dot_block<1, NT>(w, xb + r * k, g, bias, out + r * ldo, ldo); break;
    default: break;
  }
}

}  // namespace

XLLM_AVX512_BF16 void round_rows_bf16_avx512(const float* x, int64_t ldx, int64_t m, int64_t k,
                                        uint16_t* xb) {
  for (int64_t r = 0; r < m; ++r) {
    const float* src = x + r * ldx;
    uint16_t* dst = xb + r * k;
    for (int64_t i = 0; i < k; i += 32) {
      const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16),
                                             _mm512_loadu_ps(src + i));
      _mm512_storeu_si512(dst + i, (__m512i)v);
    }
  }
}

XLLM_AVX512_BF16 void round_rows_bf16_tiles(const float* x, int64_t ldx, int64_t m, int64_t k,
                                       uint16_t* xb, int64_t r_begin, int64_t r_end) {
  const int64_t kb_count = k / 32;
  for (int64_t r = r_begin; r < r_end; ++r) {
    const float* src = x + r * ldx;
    uint16_t* dst = xb + ((r / 16) * kb_count * 16 + r % 16) * 32;
    for (int64_t kb = 0; kb < kb_count; ++kb, dst += 16 * 32) {
      if (r >= m) {
        _mm512_storeu_si512(dst, _mm512_setzero_si512());
        continue;
      }
      const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + kb * 32 + 16),
                                             _mm512_loadu_ps(src + kb * 32));
      _mm512_storeu_si512(dst, (__m512i)v);
    }
  }
}

XLLM_AVX512_BF16 void bf16_groups_avx512(const PackedBf16& w, const uint16_t* xb, int64_t m,
                                    int64_t g_begin, int64_t g_end, const float* bias,
                                    float* out, int64_t ldo) {
  int64_t g = g_begin;
  // Four groups a pass when there are 4 rows to share each weight line; with fewer rows,
  // eight, so that each row still has 8 independent accumulator chains.
  if (m < 4) {
    for (; g + 8 <= g_end; g += 8) dot_groups<8>(w, xb, m, g, bias, out, ldo);
  }
  for (; g + 4 <= g_end; g += 4) dot_groups<4>(w, xb, m, g, bias, out, ldo);
  for (; g + 2 <= g_end; g += 2) dot_groups<2>(w, xb, m, g, bias, out, ldo);
  if (g < g_end) dot_groups<1>(w, xb, m, g, bias, out, ldo);
}

// ---- AMX ---------------------------------------------------------------------

namespace {

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tmm0-3: sums (16 x 16 fp32); tmm4-5: x (16 rows x 32 bf16); tmm6-7: W (16 pairs x 16 x 2).
// a: x in tiles (round_rows_bf16_tiles), the first of MT 16-row blocks at its first K tile;
// nk K tiles of 32 inputs. The sums start from src (row stride ld_src floats) or from zero
// when src is null, and end in dst (row stride ld_dst). Next: next.step() once a K tile.
template <int MT, int NT, bool Next>
XLLM_AMX void amx_block(const uint16_t* a, int64_t k, int64_t nk, const uint16_t* b0,
                        const uint16_t* b1, const float* src, int64_t ld_src, float* dst,
                        int64_t ld_dst, AmxAsks& next) {
  if (src) {
    const int64_t stride = ld_src * static_cast<int64_t>(sizeof(float));
    _tile_loadd(0, src, stride);
    if (NT > 1) _tile_loadd(1, src + 16, stride);
    if (MT > 1) _tile_loadd(2, src + 16 * ld_src, stride);
    if (MT > 1 && NT > 1) _tile_loadd(3, src + 16 * ld_src + 16, stride);
  } else {
    _tile_zero(0);
    if (NT > 1) _tile_zero(1);
    if (MT > 1) _tile_zero(2);
    if (MT > 1 && NT > 1) _tile_zero(3);
  }
  // Tiles are not renamed (a load into a tile waits for the products that read it), so
  // the next K tile's x and W are loaded as soon as their tile's last product has issued
  // (measured no different from loading all four first, on the AMX Xeon).
  _tile_stream_loadd(4, a, 64);
  _tile_loadd(6, b0, 64);
  if (NT > 1) _tile_loadd(7, b1, 64);
  if (MT > 1) _tile_stream_loadd(5, a + 16 * k, 64);
  for (int64_t kb = 0; kb < nk; ++kb) {
    const bool more = kb + 1 < nk;
    _tile_dpbf16ps(0, 4, 6);
    if (Next) next.step();
    if (NT > 1) _tile_dpbf16ps(1, 4, 7);
    if (more) _tile_stream_loadd(4, a + (kb + 1) * 512, 64);
    if (MT > 1) _tile_dpbf16ps(2, 5, 6);
    if (more) _tile_loadd(6, b0 + (kb + 1) * 512, 64);
    if (MT > 1 && NT > 1) _tile_dpbf16ps(3, 5, 7);
    if (more && MT > 1) _tile_stream_loadd(5, a + 16 * k + (kb + 1) * 512, 64);
    if (more && NT > 1) _tile_loadd(7, b1 + (kb + 1) * 512, 64);
  }
  const int64_t stride = ld_dst * static_cast<int64_t>(sizeof(float));
  _tile_stored(0, dst, stride);
  if (NT > 1) _tile_stored(1, dst + 16, stride);
  if (MT > 1) _tile_stored(2, dst + 16 * ld_dst, stride);
  if (MT > 1 && NT > 1) _tile_stored(3, dst + 16 * ld_dst + 16, stride);
}

// The AMX driver's blocking (measured on the AMX Xeon, L1 48 KiB and L2 2 MiB a core, with
// the demo's and Llama-3-8B's shapes at 64-2048 rows: docs/ops.md, bf16 linears):
// K of up to kAmxOnePass tiles of 32 inputs is summed in one pass (the demo's 576 inputs:
// a pair of groups' weight, 36 KiB, stays near L1, and no sums are stored between
// passes); longer K in passes of about kAmxPassTiles (32 KiB of a pair's weight, held in L1
// while x's tiles stream past it, loaded with the no-reuse hint). Rows go in bands of
// kAmxPassBandRows (bf16_gemm.h) in one pass too; with several passes the sums of up to
// kAmxPassPairs pairs of groups by a band (256 KiB) wait in L2 between passes. Up to 32 rows
// (one row block, so no weight tile is used twice) K is summed in one pass whatever its
// length: passes would only add the sums' stores and loads (Llama-3.2-1B's projections at
// 16-32 rows 1.03-1.07x). Up to kAmxFewRows rows (a batch's decode step: each weight byte
// used by 2-4 row blocks, the step bound by the weight's stream) the passes are of up to
// kAmxFewRowsPassTiles (2048 inputs: one pass for K to 2048): fewer, longer runs of each
// pair's weight to fetch, and fewer sums stored. Llama-3.2-1B's projections streamed, 2
// threads: 64 rows 1.1-1.2x (qkv, o, gate|up; the down projection's 8192 inputs in 4
// passes 1.0-1.1x), 96 rows 1.1-1.2x, 128 rows 1.1x; at 192 rows even and at 256 0.8x.
constexpr int64_t kAmxOnePass = 24, kAmxPassTiles = 16;
constexpr int64_t kAmxFewRows = 128, kAmxFewRowsPassTiles = 64;

}  // namespace

XLLM_AMX void amx_begin() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = 16;
  }
  // ldtilecfg reads all 64 bytes; the intrinsic tells the compiler of only 8.
  __asm__ volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

XLLM_AMX void amx_end() { _tile_release(); }

XLLM_AMX void bf16_groups_amx(const PackedBf16& w, const uint16_t* xb, int64_t m,
                              int64_t g_begin, int64_t g_end, const float* bias, float* out,
                              int64_t ldo, int64_t glu) {
  const int64_t k = w.cols, kt = k / 32;
  const bool one_pass = kt <= kAmxOnePass || m <= 32;  // (32 rows: one 2 x 2 block's)
  const int64_t pass_tiles = m <= kAmxFewRows ? kAmxFewRowsPassTiles : kAmxPassTiles;
  const int64_t passes = one_pass ? 1 : (kt + pass_tiles - 1) / pass_tiles;
  const int64_t band = std::min<int64_t>((m + 31) / 32 * 32, kAmxPassBandRows);
  const AmxPairs walk{g_begin, g_end, glu, w.rows};
  const int64_t pairs = walk.count();
  const int64_t nc = passes == 1 ? pairs : amx_pass_pairs(pairs);  // (one pass: no sums kept)
  // Sums of the current (band x nc pairs) block, 32 x 32 fp32 per (row block, pair).
  float* sums = passes > 1 ? static_cast<float*>(thread_scratch<1>(
                                 sizeof(float) * 1024 * static_cast<size_t>(band / 32 * nc)))
                           : nullptr;
  alignas(64) float c[32 * 32];
  for (int64_t p_begin = 0; p_begin < pairs; p_begin += nc) {
    const int64_t p_end = std::min(pairs, p_begin + nc);
    for (int64_t m_begin = 0; m_begin < m; m_begin += band) {
      const int64_t m_end = std::min(m, m_begin + band);
      for (int64_t pass = 0; pass < passes; ++pass) {
        const int64_t kb0 = kt * pass / passes, nk = kt * (pass + 1) / passes - kb0;
        const bool first = pass == 0, last = pass == passes - 1;
        // With passes, the slice of x the next pass reads (the next band's, or the next
        // block of pairs' first, after the last pass), asked for over this pass.
        AmxAsks next;
        if (passes > 1) {
          amx_ask_next_x(next.x, xb, m_begin, pass, passes, band, m, p_end == pairs, kt, 1024,
                         (p_end - p_begin) * ((m_end - m_begin + 31) / 32) * nk);
        }
        for (int64_t p = p_begin; p < p_end; ++p) {
          const int64_t g = walk.first(p);
          const bool two = walk.two(p);
          const uint16_t* b0 = w.group(g) + kb0 * 512;
          const uint16_t* b1 = two ? w.group(walk.second(p)) + kb0 * 512 : b0;
          // The weight slice that comes next, asked for over this pair's row blocks.
          next.weight = L2Ask();
          if (m_end - m_begin > 32) {
            walk.ask_after(next.weight, p, pass, p_begin, p_end, passes, m_begin + band >= m, kt,
                           1024, (m_end - m_begin + 31) / 32 * nk, [&](int64_t gi) {
                             return reinterpret_cast<const char*>(w.group(gi));
                           });
          }
          const int64_t n0 = g * kBf16Group;
          const int cols = walk.cols(p);
          for (int64_t m0 = m_begin; m0 < m_end; m0 += 32) {
            const int64_t rows = std::min<int64_t>(32, m - m0);
            float* acc = sums ? sums + 1024 * ((m0 - m_begin) / 32 * nc + (p - p_begin)) : c;
            const float* src = first ? nullptr : acc;
            const bool direct = last && rows == 32 && cols == 32 && !bias && !glu;
            float* dst = direct ? out + m0 * ldo + n0 : (last ? c : acc);
            const int64_t ld_dst = direct ? ldo : 32;
            const uint16_t* a = xb + m0 * k + kb0 * 512;
            const bool tall = rows > 16;
            // (Only the full 2 x 2 block asks: the others are a band's or a share's edge.)
            if (tall && two && next.any()) {
              amx_block<2, 2, true>(a, k, nk, b0, b1, src, 32, dst, ld_dst, next);
            } else if (tall && two) {
              amx_block<2, 2, false>(a, k, nk, b0, b1, src, 32, dst, ld_dst, next);
            } else if (tall) {
              amx_block<2, 1, false>(a, k, nk, b0, b1, src, 32, dst, ld_dst, next);
            } else if (two) {
              amx_block<1, 2, false>(a, k, nk, b0, b1, src, 32, dst, ld_dst, next);
            } else {
              amx_block<1, 1, false>(a, k, nk, b0, b1, src, 32, dst, ld_dst, next);
            }
            if (!last || direct) continue;
            if (glu) {
              for (int64_t r = 0; r < rows; ++r) {
                _mm512_storeu_ps(out + (m0 + r) * ldo + n0,
                                 attn::silu_mul16(_mm512_load_ps(c + r * 32),
                                                  _mm512_load_ps(c + r * 32 + 16)));
              }
              continue;
            }
            const float* bb = bias ? bias + n0 : nullptr;
            for (int64_t r = 0; r < rows; ++r) {
              float* o = out + (m0 + r) * ldo + n0;
              store_lanes(o, _mm512_load_ps(c + r * 32), bb, std::min(cols, 16));
              if (cols > 16) {
                store_lanes(o + 16, _mm512_load_ps(c + r * 32 + 16), bb ? bb + 16 : nullptr,
                            cols - 16);
              }
            }
          }
        }
      }
    }
  }
}

}  // namespace xllm::quant
#endif
