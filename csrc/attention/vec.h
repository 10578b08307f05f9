// Per-ISA building blocks for the attention kernels: bf16 <-> fp32 conversion,
// 8-wide AVX2/FMA loads and stores, a vectorised exp and horizontal sums.
//
// The module is compiled for baseline x86-64. Every function that uses AVX2 or
// FMA intrinsics carries XLLM_AVX2 (a target attribute), and is only reached
// after active_isa() said the CPU has both; the scalar twins below are the
// fallback and the reference for what the vector code must compute.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include "common/avx512.h"
#define XLLM_HAVE_AVX2_KERNELS 1
#else
#define XLLM_HAVE_AVX2_KERNELS 0
#endif

#define XLLM_AVX2 __attribute__((target("avx2,fma")))

namespace xllm::attn {

// Raw bfloat16 bits: the upper half of an IEEE fp32.
using bf16_t = uint16_t;

// ---- scalar ---------------------------------------------------------------

inline float to_f32(float x) { return x; }

inline float to_f32(bf16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Round to nearest, ties to even, exactly like torch's Tensor.to(torch.bfloat16):
// adding 0x7FFF plus the lowest kept bit carries into the kept half exactly when
// the dropped half is above one half, or equal to it with an odd kept half. NaN
// becomes the canonical quiet NaN 0x7FC0 (the add could otherwise turn it into inf).
inline bf16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<bf16_t>(u >> 16);
}

// An int8 cache row ("q8"): head_size int8 values, then their fp32 scale (4 bytes, in
// the row itself so that a block stays one contiguous run of bytes for the pool, the
// tiers and transfers): value[d] = q[d] * scale.
using q8_t = int8_t;
constexpr int64_t kQ8ScaleBytes = 4;

inline float to_f32(q8_t q) { return static_cast<float>(q); }  // times the row's scale

// Elements of KT from one cache row to the next.
template <class KT>
constexpr int64_t row_stride(int64_t head_size) {
  return std::is_same_v<KT, q8_t> ? head_size + kQ8ScaleBytes : head_size;
}

// The scale of a cache row (1 for float and bf16 rows, whose values are themselves).
template <class KT>
inline float row_scale(const KT* row, int64_t head_size) {
  if constexpr (std::is_same_v<KT, q8_t>) {
    float s;
    std::memcpy(&s, row + head_size, sizeof s);
    return s;
  } else {
    return 1.0f;
  }
}

inline void from_f32(float x, float* dst) { *dst = x; }
inline void from_f32(float x, bf16_t* dst) { *dst = f32_to_bf16(x); }

#if XLLM_HAVE_AVX2_KERNELS
// Issues prefetches for a byte range a few cache lines per step, so a kernel's
// loop streams the next block in while it computes on the current one.
class Prefetcher {
 public:
  Prefetcher(const void* base, int64_t bytes, int64_t steps)
      : p_(static_cast<const char*>(base)), left_(base ? (bytes + 63) / 64 : 0),
        per_step_(steps > 0 ? (left_ + steps - 1) / steps : left_) {}
  void step() {
    for (int64_t i = 0; i < per_step_ && left_ > 0; ++i, --left_, p_ += 64) {
      _mm_prefetch(p_, _MM_HINT_T0);
    }
  }
  void flush() {
    for (; left_ > 0; --left_, p_ += 64) _mm_prefetch(p_, _MM_HINT_T0);
  }

 private:
  const char* p_;
  int64_t left_, per_step_;
};

// ---- AVX2 / FMA -----------------------------------------------------------

XLLM_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

// 8 bf16 -> 8 fp32: zero-extend to 32 bits and shift into the high half.
XLLM_AVX2 inline __m256 load8(const bf16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// 8 int8 -> 8 fp32 (a q8 row's values, before its scale).
XLLM_AVX2 inline __m256 load8(const q8_t* p) {
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

XLLM_AVX2 inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }

// Vector form of f32_to_bf16 (same rounding, same NaN).
XLLM_AVX2 inline void store8(bf16_t* p, __m256 v) {
  __m256i u = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  r = _mm256_srli_epi32(r, 16);
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  // packus works per 128-bit lane: [r0..r3 r0..r3 | r4..r7 r4..r7]; gather lanes 0 and 2.
  __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

XLLM_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

XLLM_AVX2 inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The horizontal sums of eight vectors as one vector [sum(a0), ..., sum(a7)]:
// a tree of hadds shares the work that eight separate hsums would repeat.
XLLM_AVX2 inline __m256 reduce8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5,
                                __m256 a6, __m256 a7) {
  __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  // s0123 = [lo0 lo1 lo2 lo3 | hi0 hi1 hi2 hi3] (lo/hi: the 128-bit halves' sums)
  __m256 lo = _mm256_permute2f128_ps(s0123, s4567, 0x20);
  __m256 hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
  return _mm256_add_ps(lo, hi);
}

// exp(x) for x <= ~88, Cephes' polynomial (about 2 ulp); x < -87 gives exactly 0
// (softmax weights that small vanish next to the row's maximum anyway), -inf included.
XLLM_AVX2 inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), lo);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // x - n*ln2 with ln2 split in two so the reduction stays exact.
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  e = _mm256_slli_epi32(e, 23);  // 2^n as a float's exponent field
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

// ---- AVX-512 (the avx512, avx512_bf16 and amx levels) -------------------------------------

// 16 values of an fp32 or bf16 row from element d, as fp32 (bf16 widened exactly).
XLLM_AVX512 inline __m512 load16(const void* row, bool bf16, int64_t d) {
  if (!bf16) return _mm512_loadu_ps(static_cast<const float*>(row) + d);
  const __m256i h =
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const bf16_t*>(row) + d));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// exp(x) for 16 lanes: exp8's polynomial, 2^n by scalef; x < -87 gives exactly 0.
XLLM_AVX512 inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f);
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), lo);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_scalef_ps(static_cast<__mmask16>(~underflow), y, n);
}

// silu(g) * u = g / (1 + exp(-g)) * u, 16 lanes: SiLU-and-mul's arithmetic, shared by the row
// op (rowops::silu_and_mul) and the GEMMs that fuse it into their store, so both give the
// same bits.
XLLM_AVX512 inline __m512 silu_mul16(__m512 g, __m512 u) {
  const __m512 e = exp16(_mm512_xor_ps(g, _mm512_set1_ps(-0.0f)));
  return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), u);
}
#endif  // XLLM_HAVE_AVX2_KERNELS

}  // namespace xllm::attn
