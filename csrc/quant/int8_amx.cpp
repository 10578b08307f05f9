// The amx level's int8 linear from PackedAmxInt8::min_rows rows (int8_dot.h: PackedAmxInt8).
//
// x is quantized per row to 16 bits, x[r, k] ~ sx[r] * v with v = 256 hi + lo, hi a signed
// and lo an unsigned byte; the weight is its per-row int8 copy, w[n, k] ~ s[n] q. Per 64
// inputs, one TDPBSSD multiplies hi with q and one TDPBUSD lo with q, into two int32 tiles
// that hold exact sums over all of K (|sum| < 2^31 up to K = 66k inputs); after the last
// input the two are combined once, out = sx s (256 sum_hi + sum_lo). Nothing is scaled
// inside K, so the tile products run back to back; the cost is a second tile product per
// 64 inputs, which is cheaper than the per-block fp32 rescaling that an int8 x with a
// scale per 32 inputs needs (that kernel ran 1.3x slower on the demo's 64-row steps; the
// bf16 decode of the blocks that prompts took ran 1.2-2x slower).
//
// Blocking: 16 rows x 32 outputs a pass (tmm0/1: the hi sums of the two groups of 16
// outputs, tmm2/3: the lo sums, tmm4/5: x's hi and lo tiles, tmm6/7: the weight). A
// thread walks its pairs of groups for each band of rows whose x tiles fit in L2
// (amx_band_rows); within a band the pair's weight, streamed from memory in the band's first
// row block, stays in L1/L2 for the others, while the next pair's is asked for into L2 a
// few lines a step (L2Ask, bf16_gemm.h). A long K (over 4096 inputs: the 14336 of
// Llama-3-8B's down projection, where a band of whole rows was 32 rows and the weight
// streamed once per 32 rows) is summed in passes instead (int8_groups_amx_passes).
#include <immintrin.h>

#include <algorithm>
#include <limits>

#include "attention/vec.h"
#include "common/avx512.h"
#include "quant/bf16_gemm.h"
#include "quant/int8_dot.h"
#include "quant/scratch.h"

#if defined(__x86_64__)

namespace xllm::quant {
namespace {

constexpr int64_t kChunk = PackedAmxInt8::kChunk;  // inputs per tile product
constexpr int64_t kTile = 16 * kChunk;   // bytes of an x tile (16 rows x 64) or a W tile
constexpr int64_t kAhead = 2;            // chunks of W prefetched ahead in a streaming pass

// sums [2][16][32] int32: the hi then the lo sums of 16 rows x 16 NT outputs, over all chunks.
// a: the rows' x tiles (hi, lo per chunk); b0, b1: the two groups' W tiles. stream: ask for
// W kAhead chunks on (past the end, the next pair's first chunks). next (Next): the next
// pair's W and the next pass's x, asked for into L2 a few lines a step (bf16_gemm.h), in
// place of stream's requests (the W they would ask for was asked for during the last pair;
// asking both measured the same).
// init: sums of earlier chunks to go on from (the same layout), or null to start at zero.
template <int NT, bool Next>
XLLM_AMX void chunk_sums(const int8_t* a, int64_t chunks, const int8_t* b0, const int8_t* b1,
                         bool stream, AmxAsks& next, const int32_t* init, int32_t* sums) {
  constexpr int64_t kStride = 32 * sizeof(int32_t);
  if (init) {
    _tile_loadd(0, init, kStride);
    if (NT > 1) _tile_loadd(1, init + 16, kStride);
    _tile_loadd(2, init + 16 * 32, kStride);
    if (NT > 1) _tile_loadd(3, init + 16 * 32 + 16, kStride);
  } else {
    _tile_zero(0);
    if (NT > 1) _tile_zero(1);
    _tile_zero(2);
    if (NT > 1) _tile_zero(3);
  }
  for (int64_t c = 0; c < chunks; ++c) {
    if (Next) {
      next.step();
    } else if (stream) {
      const int64_t ahead = c + kAhead < chunks ? c + kAhead : c + kAhead + chunks;
      for (int l = 0; l < kTile / 64; ++l) {
        _mm_prefetch(reinterpret_cast<const char*>(b0 + ahead * kTile + l * 64), _MM_HINT_T0);
        if (NT > 1) {
          _mm_prefetch(reinterpret_cast<const char*>(b1 + ahead * kTile + l * 64), _MM_HINT_T0);
        }
      }
    }
    _tile_loadd(4, a + c * 2 * kTile, kChunk);
    _tile_loadd(5, a + c * 2 * kTile + kTile, kChunk);
    _tile_loadd(6, b0 + c * kTile, 64);
    if (NT > 1) _tile_loadd(7, b1 + c * kTile, 64);
    _tile_dpbssd(0, 4, 6);
    if (NT > 1) _tile_dpbssd(1, 4, 7);
    _tile_dpbusd(2, 5, 6);
    if (NT > 1) _tile_dpbusd(3, 5, 7);
  }
  _tile_stored(0, sums, kStride);
  if (NT > 1) _tile_stored(1, sums + 16, kStride);
  _tile_stored(2, sums + 16 * 32, kStride);
  if (NT > 1) _tile_stored(3, sums + 16 * 32 + 16, kStride);
}

// Group g's packed weight as bytes (AmxPairs::ask_after).
auto byte_groups(const PackedAmxInt8& w) {
  return [&w](int64_t g) { return reinterpret_cast<const char*>(w.group(g)); };
}

// 256 hi + lo, as fp32.
XLLM_AVX512 inline __m512 combine(const int32_t* hi, const int32_t* lo) {
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(hi)), _mm512_set1_ps(256.0f),
                         _mm512_cvtepi32_ps(_mm512_load_si512(lo)));
}

// out rows [m0, m0 + rows), outputs [n0, n0 + cols) = sx s (256 hi + lo) (+ bias), from sums.
XLLM_AVX512 void store_sums(const PackedAmxInt8& w, const int32_t* sums, const float* sx,
                            int64_t m0, int64_t rows, int64_t n0, int cols, const float* bias,
                            float* out, int64_t ldo) {
  const __m512 s0 = _mm512_load_ps(w.s + n0);
  const __m512 s1 = cols > 16 ? _mm512_load_ps(w.s + n0 + 16) : s0;
  const float* bb = bias ? bias + n0 : nullptr;
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 xs = _mm512_set1_ps(sx[m0 + r]);
    float* o = out + (m0 + r) * ldo + n0;
    const int32_t* hi = sums + r * 32;
    const int32_t* lo = sums + 16 * 32 + r * 32;
    store_lanes(o, _mm512_mul_ps(_mm512_mul_ps(combine(hi, lo), xs), s0), bb, std::min(cols, 16));
    if (cols > 16) {
      store_lanes(o + 16, _mm512_mul_ps(_mm512_mul_ps(combine(hi + 16, lo + 16), xs), s1),
                  bb ? bb + 16 : nullptr, cols - 16);
    }
  }
}

// The gate|up form's store: out rows [m0, m0 + rows), outputs [n0, n0 + 16) =
// silu(gate) * up, the gate group's sums in columns 0-15 and its up group's (scales from
// output n_up) in 16-31, each value scaled as store_sums scales it.
XLLM_AVX512 void store_glu(const PackedAmxInt8& w, const int32_t* sums, const float* sx,
                           int64_t m0, int64_t rows, int64_t n0, int64_t n_up, float* out,
                           int64_t ldo) {
  const __m512 s0 = _mm512_load_ps(w.s + n0);
  const __m512 s1 = _mm512_load_ps(w.s + n_up);
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 xs = _mm512_set1_ps(sx[m0 + r]);
    const int32_t* hi = sums + r * 32;
    const int32_t* lo = sums + 16 * 32 + r * 32;
    const __m512 gate = _mm512_mul_ps(_mm512_mul_ps(combine(hi, lo), xs), s0);
    const __m512 up = _mm512_mul_ps(_mm512_mul_ps(combine(hi + 16, lo + 16), xs), s1);
    _mm512_storeu_ps(out + (m0 + r) * ldo + n0, attn::silu_mul16(gate, up));
  }
}

// Long K (over kOnePassChunks) in passes of about kPassChunks (as the bf16 tiles do):
// within a pass a pair's weight (2 KiB a chunk) stays in L1 while a band of
// kAmxPassBandRows rows passes; the int32 sums of a band by up to kAmxPassPairs pairs
// (bf16_gemm.h) wait in this thread's scratch
// between passes (exact, combined after the last pass). Measured (docs/ops.md; the AMX
// Xeon, against one pass): Llama-3-8B's down projection (14336 inputs) 1.2-1.7x at 64-2048
// rows; 4096 inputs 0.9-1.1x and 1536 0.95-1.1x, so those keep one pass. Up to 16 rows (one
// row block: no weight tile is used twice) any K is one pass, since the passes would only add
// the sums' traffic: Llama-3-8B's down projection at 4-16 rows 1.2x (3.1-3.2 -> 2.55-2.65 ms
// a call, streamed; at 24-32 rows one pass was 0.8x).
constexpr int64_t kOnePassChunks = 64, kPassChunks = 8;

XLLM_AMX void int8_groups_amx_passes(const PackedAmxInt8& w, const int8_t* xq, const float* sx,
                                     int64_t m, int64_t g_begin, int64_t g_end,
                                     const float* bias, float* out, int64_t ldo, int64_t passes,
                                     int64_t glu) {
  const int64_t chunks = w.chunks();
  const int64_t band = std::min<int64_t>((m + 15) / 16 * 16, kAmxPassBandRows);
  const AmxPairs walk{g_begin, g_end, glu, w.rows};
  const int64_t pairs = walk.count();
  const int64_t nc = amx_pass_pairs(pairs);
  auto* slots = static_cast<int32_t*>(
      thread_scratch<2>(sizeof(int32_t) * 1024 * static_cast<size_t>(band / 16 * nc)));
  for (int64_t p_begin = 0; p_begin < pairs; p_begin += nc) {
    const int64_t p_end = std::min(pairs, p_begin + nc);
    for (int64_t m_begin = 0; m_begin < m; m_begin += band) {
      const int64_t m_end = std::min(m, m_begin + band);
      for (int64_t pass = 0; pass < passes; ++pass) {
        const int64_t c0 = chunks * pass / passes, nk = chunks * (pass + 1) / passes - c0;
        const bool first = pass == 0, last = pass == passes - 1;
        AmxAsks next;
        amx_ask_next_x(next.x, xq, m_begin, pass, passes, band, m, p_end == pairs, chunks,
                       2 * kTile, (p_end - p_begin) * ((m_end - m_begin + 15) / 16) * nk);
        for (int64_t p = p_begin; p < p_end; ++p) {
          const int64_t g = walk.first(p);
          const bool two = walk.two(p);
          const int8_t* b0 = w.group(g) + c0 * kTile;
          const int8_t* b1 = two ? w.group(walk.second(p)) + c0 * kTile : b0;
          const int64_t n0 = g * 16;
          const int cols = walk.cols(p);
          next.weight = L2Ask();
          if (m_end - m_begin > 16) {
            walk.ask_after(next.weight, p, pass, p_begin, p_end, passes, m_begin + band >= m,
                           chunks, kTile, (m_end - m_begin + 15) / 16 * nk, byte_groups(w));
          }
          for (int64_t m0 = m_begin; m0 < m_end; m0 += 16) {
            const int8_t* a = xq + (m0 / 16) * chunks * 2 * kTile + c0 * 2 * kTile;
            int32_t* slot = slots + 1024 * ((m0 - m_begin) / 16 * nc + (p - p_begin));
            const int32_t* init = first ? nullptr : slot;
            if (two && next.any()) chunk_sums<2, true>(a, nk, b0, b1, false, next, init, slot);
            else if (two) chunk_sums<2, false>(a, nk, b0, b1, false, next, init, slot);
            else chunk_sums<1, false>(a, nk, b0, b1, false, next, init, slot);
            if (last && glu) {
              store_glu(w, slot, sx, m0, std::min<int64_t>(16, m - m0), n0, walk.second(p) * 16,
                        out, ldo);
            } else if (last) {
              store_sums(w, slot, sx, m0, std::min<int64_t>(16, m - m0), n0, cols, bias, out,
                         ldo);
            }
          }
        }
      }
    }
  }
}

}  // namespace

XLLM_AMX void int8_groups_amx(const PackedAmxInt8& w, const int8_t* xq, const float* sx,
                              int64_t m, int64_t g_begin, int64_t g_end, const float* bias,
                              float* out, int64_t ldo, int64_t glu) {
  const int64_t chunks = w.chunks();
  if (chunks > kOnePassChunks && m > 16) {
    return int8_groups_amx_passes(w, xq, sx, m, g_begin, g_end, bias, out, ldo,
                                  (chunks + kPassChunks - 1) / kPassChunks, glu);
  }
  const int64_t band = amx_band_rows(2 * chunks * kChunk, 16);
  const AmxPairs walk{g_begin, g_end, glu, w.rows};
  const int64_t pairs = walk.count();
  alignas(64) int32_t sums[2 * 16 * 32];
  for (int64_t m_begin = 0; m_begin < m; m_begin += band) {
    const int64_t m_end = std::min(m, m_begin + band);
    for (int64_t p = 0; p < pairs; ++p) {
      const int64_t g = walk.first(p);
      const bool two = walk.two(p);
      const int8_t* b0 = w.group(g);
      const int8_t* b1 = two ? w.group(walk.second(p)) : b0;
      const int64_t n0 = g * 16;
      const int cols = walk.cols(p);
      AmxAsks next;
      if (m_end - m_begin > 16) {
        walk.ask_after(next.weight, p, 0, 0, pairs, 1, m_begin + band >= m, chunks, kTile,
                       (m_end - m_begin + 15) / 16 * chunks, byte_groups(w));
      }
      for (int64_t m0 = m_begin; m0 < m_end; m0 += 16) {
        const int8_t* a = xq + (m0 / 16) * chunks * 2 * kTile;
        const bool stream = m0 == m_begin;
        if (two && next.any()) chunk_sums<2, true>(a, chunks, b0, b1, stream, next, nullptr, sums);
        else if (two) chunk_sums<2, false>(a, chunks, b0, b1, stream, next, nullptr, sums);
        else chunk_sums<1, false>(a, chunks, b0, b1, stream, next, nullptr, sums);
        if (glu) {
          store_glu(w, sums, sx, m0, std::min<int64_t>(16, m - m0), n0, walk.second(p) * 16, out,
                    ldo);
        } else {
          store_sums(w, sums, sx, m0, std::min<int64_t>(16, m - m0), n0, cols, bias, out, ldo);
        }
      }
    }
  }
}

XLLM_AVX512 void quantize_rows_amx(const float* x, int64_t ldx, int64_t m, int64_t k,
                                   int8_t* xq, float* sx, int64_t r_begin, int64_t r_end) {
  const int64_t chunks = (k / kBlock + 1) / 2;
  const __m512 sign = _mm512_set1_ps(-0.0f);
  for (int64_t r = r_begin; r < r_end; ++r) {
    int8_t* tiles = xq + (r / 16) * chunks * 2 * kTile + (r % 16) * kChunk;  // row r % 16
    const float* src = x + r * ldx;
    float amax = 0.0f;
    bool finite = true;
    if (r < m) {
      __m512 vmax = _mm512_setzero_ps();
      __mmask16 bad = 0;
      for (int64_t i = 0; i < k; i += 16) {
        const __m512 v = _mm512_loadu_ps(src + i);
        vmax = _mm512_max_ps(vmax, _mm512_andnot_ps(sign, v));
        bad |= _mm512_fpclass_ps_mask(v, kNonFinite);
      }
      amax = _mm512_reduce_max_ps(vmax);
      finite = bad == 0;
    }
    // A NaN or infinity in the row: a NaN scale and zero quants, so the row's outputs are
    // NaN, as in fp32 (the quants of converting NaN would be arbitrary).
    sx[r] = finite ? amax / 32767.0f : std::numeric_limits<float>::quiet_NaN();
    const __m512 inv = _mm512_set1_ps(finite && amax > 0.0f ? 32767.0f / amax : 0.0f);
    for (int64_t c = 0; c < chunks; ++c) {
      int8_t* hi = tiles + c * 2 * kTile;
      int8_t* lo = hi + kTile;
      for (int64_t j = 0; j < kChunk; j += 16) {
        const int64_t i = c * kChunk + j;
        // v = round(x * inv), half to even (the default rounding mode), |v| <= 32767.
        __m512i v = _mm512_setzero_si512();
        if (finite && r < m && i < k) {
          v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(src + i), inv));
        }
        _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + j),
                         _mm512_cvtepi32_epi8(_mm512_srai_epi32(v, 8)));  // v >> 8, signed
        _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + j),
                         _mm512_cvtepi32_epi8(v));  // v & 255: the low byte, unsigned
      }
    }
  }
}

}  // namespace xllm::quant
#endif
