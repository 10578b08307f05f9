// Row-wise element-wise ops on fp32 buffers, shared by the Python-facing layer ops
// (layer_ops.cpp) and the native decoder stack (csrc/model). Pointers only, no
// Python: callers check arguments and may hold or release the GIL. Rows are split
// across OpenMP threads only when there are many (prefill). `isa` picks the path:
// AVX-512 (the avx512, avx512_bf16 and amx levels: RMSNorm, SiLU-and-mul, rotary; argmax stays on
// AVX2), AVX2, or scalar, the fallback and the reference.
#pragma once

#include <cstdint>

#include "common/cpu_info.h"

namespace xllm::rowops {

// out[r] = rmsnorm(x[r]) * w; with res (not null): res[r] += x[r] first and the norm
// is of res[r]. x [rows, h] row stride ldx; res row stride ldr; out row stride ldo.
// out may alias x when res is null (the norm of a row is taken before it is written).
void rms_norm(const float* x, int64_t ldx, float* res, int64_t ldr, const float* w, float eps,
              int64_t rows, int64_t h, float* out, int64_t ldo, Isa isa);

// out[r, :d] = silu(x[r, :d]) * x[r, d:2d].
void silu_and_mul(const float* x, int64_t ldx, int64_t rows, int64_t d, float* out,
                  int64_t ldo, Isa isa);

// Rotates x [rows, heads, hd] (head stride ldh, row stride ldx) in place, halves layout,
// with cos/sin rows [*, hd / 2] at pos[r] (already checked to be in range).
void rotary(float* x, int64_t ldx, int64_t rows, int64_t heads, int64_t hd, int64_t ldh,
            const int64_t* pos,
            const float* cos, const float* sin, Isa isa);

// out[r] = the index of the first maximum of x[r, :v] (x [rows, v], row stride ldx), as
// torch.argmax gives it: the first NaN if the row holds one, else the first of equal
// maxima. Greedy sampling's pick over the vocabulary.
void argmax_rows(const float* x, int64_t ldx, int64_t rows, int64_t v, int64_t* out, Isa isa);

// Structured outputs: for i < m, logits row rows[i] of x (row stride ldx, v columns) gets
// -inf wherever bit j % 32 of word j / 32 of bitmask row i (row stride ldb, in int32 words)
// is 0 (xgrammar's and llguidance's layout: bit set = token allowed).
void apply_token_bitmask(float* x, int64_t ldx, int64_t v, const int32_t* bitmask, int64_t ldb,
                         const int64_t* rows, int64_t m, Isa isa);

}  // namespace xllm::rowops
