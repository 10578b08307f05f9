// Drivers and the scalar kernels of the int8 linear (int8_dot.h).
#include "quant/int8_dot.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "quant/bf16_gemm.h"
#include "quant/scratch.h"

namespace xllm::quant {
namespace {

// c of block b of row n (int8_dot.h).
inline float block_offset(const BlockMatrix& w, int64_t n, int64_t b) {
  const int64_t nb = w.cols / kBlock;
  return w.format == Format::kQ4_1 ? w.mins[n * nb + b] : -128.0f * w.scales[n * nb + b];
}

// The quant of output j, element i (< 32) of block (g, b) in the packed form.
inline int packed_quant(const PackedInt8& w, int64_t g, int64_t b, int j, int i) {
  const uint8_t* blk = w.quads + (g * w.blocks() + b) * w.block_bytes();
  if (w.format == Format::kQ8_0) return blk[(i / 4) * 64 + j * 4 + i % 4];
  const uint8_t byte = blk[((i % 16) / 4) * 64 + j * 4 + i % 4];
  return i < 16 ? byte & 0x0F : byte >> 4;
}

}  // namespace

PackedInt8 pack_int8(const BlockMatrix& w, PackedInt8Buffers& buffers) {
  PackedInt8 p{w.format, nullptr, nullptr, nullptr, w.rows, w.cols};
  const int64_t groups = p.groups(), nb = p.blocks(), bytes = p.block_bytes();
  buffers.quads = aligned_array<uint8_t>(groups * nb * bytes);
  buffers.d = aligned_array<float>(groups * nb * 16);
  buffers.c = aligned_array<float>(groups * nb * 16);
  uint8_t* quads = buffers.quads.get();
  float* d = buffers.d.get();
  float* c = buffers.c.get();
  // Line v of a block holds 4 consecutive bytes of each output's block: q4_1's bytes as
  // the file has them (byte i: quant i low, quant 16 + i high, which is the packed form's
  // nibble order), q8_0's with q + 128 (flipping the sign bit).
  const int64_t row_bytes = w.qs_row_bytes(), src_block = bytes == 256 ? 16 : 32;
  const uint32_t flip = w.format == Format::kQ8_0 ? 0x80808080u : 0u;
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* blk = quads + (g * nb + b) * bytes;
      std::memset(blk, 0, static_cast<size_t>(bytes));
      for (int j = 0; j < 16; ++j) {
        const int64_t n = g * 16 + j;
        const bool real = n < w.rows;
        d[(g * nb + b) * 16 + j] = real ? w.scales[n * nb + b] : 0.0f;
        c[(g * nb + b) * 16 + j] = real ? block_offset(w, n, b) : 0.0f;
        if (!real) continue;
        const uint8_t* src = w.qs + n * row_bytes + b * src_block;
        for (int64_t v = 0; v < src_block / 4; ++v) {
          uint32_t four;
          std::memcpy(&four, src + 4 * v, 4);
          four ^= flip;
          std::memcpy(blk + v * 64 + j * 4, &four, 4);
        }
      }
    }
  }
  p.quads = quads;
  p.d = d;
  p.c = c;
  return p;
}

void unpack_int8(const PackedInt8& w, float* dst) {
  const int64_t nb = w.blocks();
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < w.rows; ++n) {
    const int64_t g = n / 16;
    const int j = static_cast<int>(n % 16);
    for (int64_t b = 0; b < nb; ++b) {
      const float d = w.d[(g * nb + b) * 16 + j], c = w.c[(g * nb + b) * 16 + j];
      for (int i = 0; i < kBlock; ++i) {
        dst[n * w.cols + b * kBlock + i] = d * static_cast<float>(packed_quant(w, g, b, j, i)) + c;
      }
    }
  }
}

PackedAmxInt8 pack_amx_int8(const PackedInt8& w, PackedAmxInt8Buffers& buffers) {
  PackedAmxInt8 p{nullptr, nullptr, w.rows, w.cols, amx_int8_min_rows(w.format)};
  const int64_t groups = p.groups();
  buffers.q = aligned_array<int8_t>(groups * p.group_bytes());
  buffers.s = aligned_array<float>(groups * 16);
#if defined(__x86_64__)
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < groups; ++g) {
    requantize_group_avx512(w, g, 2 * p.chunks(), buffers.q.get() + g * p.group_bytes(),
                            buffers.s.get() + g * 16);
  }
#endif
  p.q = buffers.q.get();
  p.s = buffers.s.get();
  return p;
}

void quantize_rows(const float* x, int64_t ldx, int64_t m, int64_t k, int8_t* xq, float* dx,
                   float* sx, Isa isa, int8_t* xlo) {
#if defined(__x86_64__)
  if (isa >= Isa::kAvx512) return quantize_rows_avx512(x, ldx, m, k, xq, dx, sx, xlo);
  if (isa >= Isa::kAvx2) return quantize_rows_avx2(x, ldx, m, k, xq, dx, sx, xlo);
#endif
  const int64_t nb = k / kBlock;
  const float top = x_top(xlo != nullptr);
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* src = x + r * ldx + b * kBlock;
      float amax = 0.0f;
      bool finite = true;
      for (int i = 0; i < kBlock; ++i) {
        amax = std::max(amax, std::fabs(src[i]));
        finite &= std::isfinite(src[i]);
      }
      if (!finite) {  // NaN scales: the row's outputs are NaN, as in fp32 (quantize_block)
        std::fill(xq + r * k + b * kBlock, xq + r * k + (b + 1) * kBlock, int8_t{0});
        if (xlo) std::fill(xlo + r * k + b * kBlock, xlo + r * k + (b + 1) * kBlock, int8_t{0});
        dx[r * nb + b] = sx[r * nb + b] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      const float d = amax / top;
      const float id = d > 0.0f ? 1.0f / d : 0.0f;
      int sum = 0;
      for (int i = 0; i < kBlock; ++i) {
        const int q = static_cast<int>(std::nearbyint(src[i] * id));  // round half to even
        sum += q;
        if (!xlo) {
          xq[r * k + b * kBlock + i] = static_cast<int8_t>(q);
          continue;
        }
        // q / 255 is never within 0.002 of a half: the rounding is the same in any order.
        const int hi = static_cast<int>(std::nearbyint(static_cast<float>(q) * (1.0f / 255)));
        xq[r * k + b * kBlock + i] = static_cast<int8_t>(hi);
        xlo[r * k + b * kBlock + i] = static_cast<int8_t>(q - 255 * hi);
      }
      dx[r * nb + b] = d;
      sx[r * nb + b] = d * static_cast<float>(sum);
    }
  }
}

void int8_groups_scalar(const PackedInt8& w, const QuantizedRows& q, int64_t g_begin,
                        int64_t g_end, const float* bias, float* out, int64_t ldo) {
  const int64_t nb = w.blocks();
  for (int64_t g = g_begin; g < g_end; ++g) {
    for (int j = 0; j < 16 && g * 16 + j < w.rows; ++j) {
      const int64_t n = g * 16 + j;
      for (int64_t r = 0; r < q.m; ++r) {
        float sum = 0.0f;
        for (int64_t b = 0; b < nb; ++b) {
          int dot = 0, lo = 0;
          for (int i = 0; i < kBlock; ++i) {
            const int u = packed_quant(w, g, b, j, i);
            dot += u * q.xq[r * q.cols + b * kBlock + i];
            if (q.xlo) lo += u * q.xlo[r * q.cols + b * kBlock + i];
          }
          if (q.xlo) dot = 255 * dot + lo;
          sum += w.d[(g * nb + b) * 16 + j] * q.dx[r * nb + b] * static_cast<float>(dot) +
                 w.c[(g * nb + b) * 16 + j] * q.sx[r * nb + b];
        }
        out[r * ldo + n] = bias ? sum + bias[n] : sum;
      }
    }
  }
}

#if defined(__x86_64__)
namespace {

// The amx level's tiles from min_rows rows on `threads` threads (glu > 0: the gate|up
// form of int8_linear_glu).
void int8_linear_amx(const PackedAmxInt8& amx, const float* x, int64_t ldx, int64_t m,
                     const float* bias, float* out, int64_t ldo, int64_t glu, int threads) {
  const int64_t k = amx.cols, groups = amx.groups();
  const int64_t m_pad = (m + 15) / 16 * 16;
  const size_t x_bytes = static_cast<size_t>(m_pad * amx.chunks() * 2 * PackedAmxInt8::kChunk);
  auto* xq = static_cast<int8_t*>(thread_scratch<0>(x_bytes));
  auto* sx = static_cast<float*>(thread_scratch<1>(sizeof(float) * m_pad));
#pragma omp parallel num_threads(threads)
  {
    const int nth = omp_get_num_threads(), me = omp_get_thread_num();
    if (amx_split_rows(m, nth)) {  // bf16_gemm.h
      const int64_t r0 = amx_row_share(m, nth, me), r1 = amx_row_share(m, nth, me + 1);
      const int64_t rows = std::min(m, r1) - r0;  // (r1 may pass m: the padding rows)
      quantize_rows_amx(x, ldx, m, k, xq, sx, r0, std::min(m_pad, r1));
      if (rows > 0) {
        amx_begin();
        const auto [g_begin, g_end] = amx_group_share(groups, glu, 1, 0);
        int8_groups_amx(amx, xq + r0 * amx.chunks() * 2 * PackedAmxInt8::kChunk, sx + r0, rows,
                        g_begin, g_end, bias, out + r0 * ldo, ldo, glu);
        amx_end();
      }
    } else {
      quantize_rows_amx(x, ldx, m, k, xq, sx, m_pad / 16 * me / nth * 16,
                        m_pad / 16 * (me + 1) / nth * 16);
#pragma omp barrier
      const auto [g_begin, g_end] = amx_group_share(groups, glu, nth, me);  // whole pairs
      if (g_begin < g_end) {
        amx_begin();
        int8_groups_amx(amx, xq, sx, m, g_begin, g_end, bias, out, ldo, glu);
        amx_end();
      }
    }
  }
}

}  // namespace
#endif

bool int8_linear_glu(const PackedAmxInt8* amx, const float* x, int64_t ldx, int64_t m,
                     float* out, int64_t ldo, Isa isa) {
#if defined(__x86_64__)
  if (amx && isa >= Isa::kAmx && m >= amx->min_rows && amx->rows % 32 == 0) {
    int8_linear_amx(*amx, x, ldx, m, nullptr, out, ldo, amx->rows / 32,
                    linear_threads(amx->rows, amx->cols, m));
    return true;
  }
#endif
  (void)amx, (void)x, (void)ldx, (void)m, (void)out, (void)ldo, (void)isa;
  return false;
}

void int8_linear(const PackedInt8& w, const PackedAmxInt8* amx, const float* x, int64_t ldx,
                 int64_t m, const float* bias, float* out, int64_t ldo, Isa isa, bool x16) {
  if (m == 0 || w.rows == 0) return;
  const int64_t k = w.cols, nb = w.blocks(), groups = w.groups();
  const int threads = linear_threads(w.rows, w.cols, m);
#if defined(__x86_64__)
  if (amx && !x16 && isa >= Isa::kAmx && m >= amx->min_rows) {
    return int8_linear_amx(*amx, x, ldx, m, bias, out, ldo, 0, threads);
  }
  if (x16 && x16_runs_fp32_tiles(isa, m)) {  // exact fp32 (int8_dot.h)
    return tiled_linear(nullptr, decode_packed_tile_avx2, &w, w.rows, k, x, ldx, m, bias, out,
                        ldo, isa, threads, kPackedChunkFromCols);
  }
#endif
  auto* xq = static_cast<int8_t*>(
      thread_scratch<0>(static_cast<size_t>((x16 ? 2 : 1) * m * k) + 64));
  int8_t* xlo = x16 ? xq + m * k : nullptr;
  auto* dx = static_cast<float*>(thread_scratch<1>(sizeof(float) * 2 * m * nb + 64));
  float* sx = dx + m * nb;
  quantize_rows(x, ldx, m, k, xq, dx, sx, isa, xlo);
  const QuantizedRows q{xq, dx, sx, m, k, xlo};
#pragma omp parallel num_threads(threads)
  {
    const int nth = omp_get_num_threads(), me = omp_get_thread_num();
    const int64_t g_begin = groups * me / nth, g_end = groups * (me + 1) / nth;
    if (g_begin < g_end) {
#if defined(__x86_64__)
      if (isa >= Isa::kAvx512) int8_groups_avx512(w, q, g_begin, g_end, bias, out, ldo);
      else if (isa >= Isa::kAvx2) int8_groups_avx2(w, q, g_begin, g_end, bias, out, ldo);
      else int8_groups_scalar(w, q, g_begin, g_end, bias, out, ldo);
#else
      int8_groups_scalar(w, q, g_begin, g_end, bias, out, ldo);
#endif
    }
  }
}

}  // namespace xllm::quant
