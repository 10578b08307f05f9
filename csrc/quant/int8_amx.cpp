// The amx level's int8 linear for many rows (int8_dot.h: PackedAmxInt8): AMX-INT8 tiles
// (TDPBSSD, signed x signed bytes, int32 sums), 2 x 2 tiles of 16 x 16 sums (32 rows x
// 32 outputs) per 32-input block, fed by two 16-row tiles of x and two 512 B tiles of the
// weight. x has a scale per row and block, so after each block the int32 tiles are stored
// and added into fp32 sums as  acc += float(sum) * dx[row, block]; the weight's scale per
// output multiplies the total once, at the end. That scaling per block is the kernel's cost: without it the tiles
// run ~1.6x faster. The weight streams from memory and is prefetched kAhead blocks on.
#include <immintrin.h>

#include <algorithm>

#include "common/avx512.h"
#include "quant/int8_dot.h"

#if defined(__x86_64__)

namespace xllm::quant {
namespace {

constexpr int64_t kTile = 16 * kBlock;  // bytes of an x or W tile

// tmm0-3: int32 sums; tmm4-5: x (16 rows x 32 bytes); tmm6-7: W (8 quads x 16 outputs x 4).
// a: the first 16-row block of x's tiles (quantize_rows_amx), MT of them; dx: their rows'
// block scales; acc [32][32].
template <int MT, int NT>
XLLM_AMX void block_sums(const int8_t* a, const float* dx, int64_t blocks, const int8_t* b0,
                         const int8_t* b1, float* acc) {
  alignas(64) int32_t sums[2][32 * 32];
  for (int r = 0; r < 16 * MT; ++r) {
    _mm512_store_ps(acc + r * 32, _mm512_setzero_ps());
    if (NT > 1) _mm512_store_ps(acc + r * 32 + 16, _mm512_setzero_ps());
  }
  constexpr int64_t kStride = 32 * sizeof(int32_t), kAhead = 4;
  for (int64_t c = 0; c < blocks; ++c) {
    int32_t* s = sums[c & 1];  // alternate, so the next block's stores need not wait on reads
    // The weight streams from memory: ask for the tiles kAhead blocks on, past the last
    // block those of the next pair of groups (a prefetch past the array is harmless).
    const int64_t ahead = c + kAhead < blocks ? c + kAhead : c + kAhead + blocks;
    for (int l = 0; l < kTile / 64; ++l) {
      _mm_prefetch(reinterpret_cast<const char*>(b0 + ahead * kTile + l * 64), _MM_HINT_T0);
      if (NT > 1) {
        _mm_prefetch(reinterpret_cast<const char*>(b1 + ahead * kTile + l * 64), _MM_HINT_T0);
      }
    }
    _tile_zero(0);
    if (NT > 1) _tile_zero(1);
    if (MT > 1) _tile_zero(2);
    if (MT > 1 && NT > 1) _tile_zero(3);
    _tile_loadd(4, a + c * kTile, kBlock);
    if (MT > 1) _tile_loadd(5, a + (blocks + c) * kTile, kBlock);
    _tile_loadd(6, b0 + c * kTile, 64);
    if (NT > 1) _tile_loadd(7, b1 + c * kTile, 64);
    _tile_dpbssd(0, 4, 6);
    if (NT > 1) _tile_dpbssd(1, 4, 7);
    if (MT > 1) _tile_dpbssd(2, 5, 6);
    if (MT > 1 && NT > 1) _tile_dpbssd(3, 5, 7);
    _tile_stored(0, s, kStride);
    if (NT > 1) _tile_stored(1, s + 16, kStride);
    if (MT > 1) _tile_stored(2, s + 16 * 32, kStride);
    if (MT > 1 && NT > 1) _tile_stored(3, s + 16 * 32 + 16, kStride);
    for (int r = 0; r < 16 * MT; ++r) {
      const __m512 xs = _mm512_set1_ps(dx[r * blocks + c]);
      float* row = acc + r * 32;
      _mm512_store_ps(row, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(s + r * 32)), xs,
                                           _mm512_load_ps(row)));
      if (NT > 1) {
        _mm512_store_ps(row + 16,
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(s + r * 32 + 16)),
                                        xs, _mm512_load_ps(row + 16)));
      }
    }
  }
}

}  // namespace

XLLM_AMX void int8_groups_amx(const PackedAmxInt8& w, const int8_t* xq, const float* dx,
                              int64_t m, int64_t g_begin, int64_t g_end, const float* bias,
                              float* out, int64_t ldo) {
  const int64_t blocks = w.blocks();
  alignas(64) float acc[32 * 32];
  for (int64_t g = g_begin; g < g_end; g += 2) {
    const bool two = g + 1 < g_end;
    const int8_t* b0 = w.group(g);
    const int8_t* b1 = two ? w.group(g + 1) : b0;
    const int64_t n0 = g * 16;
    const int cols = static_cast<int>(std::min<int64_t>(two ? 32 : 16, w.rows - n0));
    const __m512 s0 = _mm512_load_ps(w.s + n0);
    const __m512 s1 = two ? _mm512_load_ps(w.s + n0 + 16) : s0;
    for (int64_t m0 = 0; m0 < m; m0 += 32) {
      const bool tall = m0 + 16 < m;
      const int8_t* a = xq + m0 * blocks * kBlock;
      const float* d = dx + m0 * blocks;
      if (tall && two) block_sums<2, 2>(a, d, blocks, b0, b1, acc);
      else if (tall) block_sums<2, 1>(a, d, blocks, b0, b1, acc);
      else if (two) block_sums<1, 2>(a, d, blocks, b0, b1, acc);
      else block_sums<1, 1>(a, d, blocks, b0, b1, acc);
      const int64_t rows = std::min<int64_t>(32, m - m0);
      const float* bb = bias ? bias + n0 : nullptr;
      for (int64_t r = 0; r < rows; ++r) {
        float* o = out + (m0 + r) * ldo + n0;
        store_lanes(o, _mm512_mul_ps(_mm512_load_ps(acc + r * 32), s0), bb, std::min(cols, 16));
        if (cols > 16) {
          store_lanes(o + 16, _mm512_mul_ps(_mm512_load_ps(acc + r * 32 + 16), s1),
                      bb ? bb + 16 : nullptr, cols - 16);
        }
      }
    }
  }
}

}  // namespace xllm::quant
#endif
