// What the kernels of the avx512, avx512_bf16 and amx levels share (common/cpu_info.h says
// when they run): their target attributes, lane masks and the masked row store. The module
// is compiled for baseline x86-64; only functions carrying these attributes use AVX-512 or
// AMX.
#pragma once

#if defined(__x86_64__)
#include <immintrin.h>

#include <cstdint>

// XLLM_AVX512 leaves out AVX512-BF16, so that the compiler refuses a bf16 instruction in a
// kernel the avx512 level runs; only XLLM_AVX512_BF16 and XLLM_AMX functions may use one.
#define XLLM_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")))
#define XLLM_AVX512_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,fma")))
#define XLLM_AMX                                                                        \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,fma," \
                        "amx-tile,amx-bf16,amx-int8")))

namespace xllm {

// _mm512_fpclass_ps_mask's categories for a NaN (quiet or signalling) or an infinity.
constexpr int kNonFinite = 0x01 | 0x08 | 0x10 | 0x80;

// 16 lanes whose first n are set (n clamped to [0, 16]).
inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF)
                 : n <= 0 ? __mmask16(0) : static_cast<__mmask16>((1u << n) - 1);
}

// out[0:cols] = acc (+ bias[0:cols]) for the first min(cols, 16) lanes.
XLLM_AVX512 inline void store_lanes(float* out, __m512 acc, const float* bias, int64_t cols) {
  const __mmask16 mask = first_lanes(cols);
  if (bias) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(mask, bias));
  _mm512_mask_storeu_ps(out, mask, acc);
}

}  // namespace xllm
#endif
