// Drivers of the bf16 linear (bf16_gemm.h): packing, the split of output groups over
// threads, and the avx2/scalar form, which widens the packed weight back to fp32 (exact)
// and runs the fp32 block kernels on x rounded to bf16: the same products, summed in
// another order.
#include "quant/bf16_gemm.h"

#include <omp.h>

#include <algorithm>

#include "attention/vec.h"
#include "quant/block_linear.h"
#include "quant/scratch.h"

namespace xllm::quant {
namespace {

float widen(uint16_t h) { return attn::to_f32(h); }

// Groups [g_begin, g_end) on a level without bf16 arithmetic (avx512, avx2, scalar): unpack
// a group to fp32 rows, then the fp32 tile kernels (<= 3 rows x <= 4 outputs a call) over x
// already rounded to bf16.
void groups_fp32(const PackedBf16& w, const float* xr, int64_t m, int64_t g_begin,
                 int64_t g_end, const float* bias, float* out, int64_t ldo, Isa isa) {
  const Kernels kern = kernels_for(isa);
  const int64_t k = w.cols;
  float* wt = static_cast<float*>(thread_scratch<1>(sizeof(float) * kBf16Group * k));
  for (int64_t g = g_begin; g < g_end; ++g) {
    const int64_t n0 = g * kBf16Group;
    const int nt = static_cast<int>(std::min<int64_t>(kBf16Group, w.rows - n0));
    const uint16_t* src = w.group(g);
    for (int64_t p = 0; p < k / 2; ++p) {
      for (int j = 0; j < nt; ++j) {
        wt[j * k + 2 * p] = widen(src[p * 32 + 2 * j]);
        wt[j * k + 2 * p + 1] = widen(src[p * 32 + 2 * j + 1]);
      }
    }
    for (int j0 = 0; j0 < nt; j0 += 4) {
      const int nj = std::min(4, nt - j0);
      for (int64_t r = 0; r < m; r += 3) {
        const int mr = static_cast<int>(std::min<int64_t>(3, m - r));
        kern.tile(xr + r * k, k, mr, wt + j0 * k, nj, k, bias ? bias + n0 + j0 : nullptr,
                  out + r * ldo + n0 + j0, ldo);
      }
    }
  }
}

}  // namespace

Bf16Buffer alloc_packed_bf16(int64_t rows, int64_t cols) {
  const int64_t groups = (rows + kBf16Group - 1) / kBf16Group;
  return aligned_array<uint16_t>(static_cast<size_t>(groups * kBf16Group * cols));
}

void pack_bf16(const uint16_t* w, int64_t ldw, int64_t rows, int64_t cols, uint16_t* dst) {
  const int64_t groups = (rows + kBf16Group - 1) / kBf16Group;
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < groups; ++g) {
    uint16_t* d = dst + g * cols * kBf16Group;
    for (int64_t p = 0; p < cols / 2; ++p) {
      for (int j = 0; j < kBf16Group; ++j) {
        const int64_t n = g * kBf16Group + j;
        d[p * 32 + 2 * j] = n < rows ? w[n * ldw + 2 * p] : 0;
        d[p * 32 + 2 * j + 1] = n < rows ? w[n * ldw + 2 * p + 1] : 0;
      }
    }
  }
}

void unpack_bf16(const PackedBf16& w, float* dst) {
  const int64_t k = w.cols;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < w.rows; ++n) {
    const uint16_t* src = w.group(n / kBf16Group) + 2 * (n % kBf16Group);
    for (int64_t p = 0; p < k / 2; ++p) {
      dst[n * k + 2 * p] = widen(src[p * 32]);
      dst[n * k + 2 * p + 1] = widen(src[p * 32 + 1]);
    }
  }
}

#if defined(__x86_64__)
namespace {

// The avx512_bf16 and amx levels: x rounded to bf16 (in tiles for AMX), then the kernels, on
// `threads` threads. glu > 0: the gate|up form of bf16_linear_glu (AMX only).
void bf16_linear_avx512(const PackedBf16& w, const float* x, int64_t ldx, int64_t m,
                        const float* bias, float* out, int64_t ldo, bool amx, int64_t glu,
                        int threads) {
  const int64_t k = w.cols, groups = w.groups();
  // AMX reads whole 16-row tiles of x: the padding rows are zeros (their outputs are
  // computed and dropped).
  const int64_t m_pad = amx ? (m + 15) / 16 * 16 : m;
  auto* xb = static_cast<uint16_t*>(thread_scratch<0>(sizeof(uint16_t) * m_pad * k));
#pragma omp parallel num_threads(threads)
  {
    const int nth = omp_get_num_threads(), me = omp_get_thread_num();
    if (amx && amx_split_rows(m, nth)) {
      const int64_t r0 = amx_row_share(m, nth, me), r1 = amx_row_share(m, nth, me + 1);
      const int64_t rows = std::min(m, r1) - r0;  // (r1 may pass m: the padding rows)
      round_rows_bf16_tiles(x, ldx, m, k, xb, r0, std::min(m_pad, r1));
      if (rows > 0) {
        amx_begin();
        const auto [g_begin, g_end] = amx_group_share(groups, glu, 1, 0);
        bf16_groups_amx(w, xb + r0 * k, rows, g_begin, g_end, bias, out + r0 * ldo, ldo, glu);
        amx_end();
      }
    } else {
      // Each thread rounds a share of x (a prompt's x was ~5% of the call on one thread).
      if (amx) {
        round_rows_bf16_tiles(x, ldx, m, k, xb, m_pad / 16 * me / nth * 16,
                              m_pad / 16 * (me + 1) / nth * 16);
      } else {
        const int64_t r0 = m * me / nth, r1 = m * (me + 1) / nth;
        round_rows_bf16_avx512(x + r0 * ldx, ldx, r1 - r0, k, xb + r0 * k);
      }
#pragma omp barrier
      // Shares in whole pairs: the AMX kernel computes two groups at a time.
      const auto [g_begin, g_end] = amx_group_share(groups, glu, nth, me);
      if (g_begin < g_end) {
        if (amx) {
          amx_begin();
          bf16_groups_amx(w, xb, m, g_begin, g_end, bias, out, ldo, glu);
          amx_end();
        } else {
          bf16_groups_avx512(w, xb, m, g_begin, g_end, bias, out, ldo);
        }
      }
    }
  }
}

}  // namespace
#endif

bool bf16_linear_glu(const PackedBf16& w, const float* x, int64_t ldx, int64_t m, float* out,
                     int64_t ldo, Isa isa) {
#if defined(__x86_64__)
  if (isa >= Isa::kAmx && m >= kAmxMinRows && w.rows % (2 * kBf16Group) == 0) {
    bf16_linear_avx512(w, x, ldx, m, nullptr, out, ldo, true, w.rows / 2 / kBf16Group,
                       linear_threads(w.rows, w.cols, m));
    return true;
  }
#endif
  (void)w, (void)x, (void)ldx, (void)m, (void)out, (void)ldo, (void)isa;
  return false;
}

void bf16_linear(const PackedBf16& w, const float* x, int64_t ldx, int64_t m,
                 const float* bias, float* out, int64_t ldo, Isa isa) {
  if (m == 0 || w.rows == 0) return;
  const int64_t k = w.cols, groups = w.groups();
  const int threads = linear_threads(w.rows, w.cols, m);
#if defined(__x86_64__)
  if (isa >= Isa::kAvx512Bf16) {
    return bf16_linear_avx512(w, x, ldx, m, bias, out, ldo, isa >= Isa::kAmx && m >= kAmxMinRows,
                              0, threads);
  }
#endif
  // avx2 / scalar: x rounded to bf16 and widened back (exact), then fp32 kernels.
  auto* xr = static_cast<float*>(thread_scratch<0>(sizeof(float) * m * k));
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t i = 0; i < k; ++i) xr[r * k + i] = widen(attn::f32_to_bf16(x[r * ldx + i]));
  }
#pragma omp parallel num_threads(threads)
  {
    const int nth = omp_get_num_threads(), me = omp_get_thread_num();
    groups_fp32(w, xr, m, groups * me / nth, groups * (me + 1) / nth, bias, out, ldo, isa);
  }
}

}  // namespace xllm::quant
