// Linear layers over weights kept in GGUF-style quantization blocks, decoded
// exactly to fp32 on the fly.
//
// A weight W [N, K] (N output features, K input features, K a multiple of 32)
// is stored per row in blocks of 32 consecutive input features:
//
//   q4_1: w = d * q + m,  q in [0, 15]    qs uint8 [N, K / 2], d and m fp32 [N, K / 32]
//   q8_0: w = d * q,      q in [-128, 127] qs int8 [N, K],     d fp32 [N, K / 32]
//
//   bf16: w = the bf16 value widened (exact)          qs uint16 [N, K], no scales
//   f32:  w itself                                   qs float [N, K], no scales
//
// (bf16 and f32 are plain rows, handled by the same kernels so that any checkpoint can
// run on them: a bf16 checkpoint moves half the bytes of its fp32 copy.)
//
// In q4_1, byte j of a block's 16 bytes holds element j in its low nibble and
// element j + 16 in its high nibble (llama.cpp's order). d and m are the GGUF's
// fp16 scales widened to fp32, so d * q is exact in fp32 and the decoded weight
// is bit-identical to gguf.quants.dequantize (one rounding, in the add). All
// arithmetic is fp32: the blocks are a storage format, not a lower precision.
#pragma once

#include <cstdint>

#include "common/cpu_info.h"

namespace xllm::quant {

enum class Format : int { kQ4_1 = 0, kQ8_0 = 1, kBF16 = 2, kF32 = 3 };

constexpr int kBlock = 32;  // input features per block

struct BlockMatrix {
  Format format;
  const uint8_t* qs;     // [N, row bytes] (see qs_row_bytes)
  const float* scales;   // [N, K / 32] (q4_1, q8_0), nullptr otherwise
  const float* mins;     // [N, K / 32] (q4_1), nullptr otherwise
  int64_t rows, cols;    // N, K

  int64_t qs_row_bytes() const {
    switch (format) {
      case Format::kQ4_1: return cols / 2;
      case Format::kQ8_0: return cols;
      case Format::kBF16: return cols * 2;
      default: return cols * 4;
    }
  }
};

// The kernels of one ISA.
struct Kernels {
  // dst[0 : 32 (b1 - b0)] = blocks [b0, b1) of row n of w, decoded.
  void (*decode_row)(const BlockMatrix& w, int64_t n, int64_t b0, int64_t b1, float* dst);
  // out[r * ldo + j] = dot(x[r * ldx : +K], wt[j * K : +K]) (+ bias[j]) for r < mr, j < nt;
  // wt: nt decoded rows [nt, K], mr <= 3, nt <= 4.
  void (*tile)(const float* x, int64_t ldx, int mr, const float* wt, int nt, int64_t k,
               const float* bias, float* out, int64_t ldo);
  // The same for rows n0 .. n0 + nt of w, decoded in registers as it goes (no scratch):
  // the faster form when mr (<= 3) rows are all there is, as in a decode step.
  void (*direct)(const float* x, int64_t ldx, int mr, const BlockMatrix& w, int64_t n0, int nt,
                 const float* bias, float* out, int64_t ldo);
};

Kernels scalar_kernels();
#if defined(__x86_64__)
Kernels avx2_kernels();
Kernels avx512_kernels();
#endif

inline Kernels kernels_for(Isa isa) {
#if defined(__x86_64__)
  if (isa >= Isa::kAvx512) return avx512_kernels();
  if (isa >= Isa::kAvx2) return avx2_kernels();
#endif
  return scalar_kernels();
}

// out [M, N] (row stride ldo) = x [M, K] (row stride ldx) @ W^T (+ bias [N]).
void linear(const BlockMatrix& w, const float* x, int64_t ldx, int64_t m, const float* bias,
            float* out, int64_t ldo, Isa isa);
// linear()'s form for more than a decode step's rows, on any weight whose rows decode
// exactly to fp32: each thread decodes a tile of 4 rows at a time (decode(weight, n0, nt,
// b0, b1, dst): blocks [b0, b1) of rows n0 .. n0 + nt into dst [4, 32 (b1 - b0)]; all of K,
// or chunks of 1024 inputs when K > chunk_from_cols, block_linear.cpp) into scratch and
// multiplies every row of x against it. dense: fp32 rows [N, K] read in place instead
// (decode unused). A row of x gets the same bits whatever the other rows here (not the
// same as from linear()'s decode-step kernels, which sum in another order).
using DecodeTile = void (*)(const void* weight, int64_t n0, int nt, int64_t b0, int64_t b1,
                           float* dst);
void tiled_linear(const float* dense, DecodeTile decode, const void* weight, int64_t n,
                  int64_t k, const float* x, int64_t ldx, int64_t m, const float* bias,
                  float* out, int64_t ldo, Isa isa, int threads, int64_t chunk_from_cols);
// out [N, K] contiguous = W decoded.
void dequantize(const BlockMatrix& w, float* out, Isa isa);

}  // namespace xllm::quant
