#include "comm/shm_reduce.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define XLLM_HAVE_X86 1
#endif

#include "common/cpu_info.h"

namespace xllm::comm {
namespace {

// ---- scalar: the reference path, always compiled and tested ----

void reduce_f32_scalar(const float* const* srcs, int n_src, float* dst, int64_t begin, int64_t n) {
  for (int64_t i = begin; i < n; ++i) {
    float acc = srcs[0][i];
    for (int r = 1; r < n_src; ++r) acc += srcs[r][i];
    dst[i] = acc;
  }
}

void reduce_bf16_scalar(const uint16_t* const* srcs, int n_src, uint16_t* dst, int64_t begin,
                        int64_t n) {
  for (int64_t i = begin; i < n; ++i) {
    float acc = bf16_to_f32(srcs[0][i]);
    for (int r = 1; r < n_src; ++r) acc += bf16_to_f32(srcs[r][i]);
    dst[i] = f32_to_bf16_rne(acc);
  }
}

#ifdef XLLM_HAVE_X86

// 32 floats per step: four independent accumulators keep the adder busy while
// the loads stream in; the sum per element is still srcs[0] + srcs[1] + ...
__attribute__((target("avx2"))) int64_t reduce_f32_avx2(const float* const* srcs, int n_src,
                                                        float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256 a0 = _mm256_loadu_ps(srcs[0] + i);
    __m256 a1 = _mm256_loadu_ps(srcs[0] + i + 8);
    __m256 a2 = _mm256_loadu_ps(srcs[0] + i + 16);
    __m256 a3 = _mm256_loadu_ps(srcs[0] + i + 24);
    for (int r = 1; r < n_src; ++r) {
      const float* s = srcs[r] + i;
      a0 = _mm256_add_ps(a0, _mm256_loadu_ps(s));
      a1 = _mm256_add_ps(a1, _mm256_loadu_ps(s + 8));
      a2 = _mm256_add_ps(a2, _mm256_loadu_ps(s + 16));
      a3 = _mm256_add_ps(a3, _mm256_loadu_ps(s + 24));
    }
    _mm256_storeu_ps(dst + i, a0);
    _mm256_storeu_ps(dst + i + 8, a1);
    _mm256_storeu_ps(dst + i + 16, a2);
    _mm256_storeu_ps(dst + i + 24, a3);
  }
  return i;  // the caller finishes the tail with the scalar loop
}

// bf16 is the top half of an fp32: interleaving zeros below each bf16 widens it
// exactly. unpacklo/hi work within 128-bit lanes, so `lo` holds elements 0-3 and
// 8-11 and `hi` holds 4-7 and 12-15; packus (also per lane) restores the order.
__attribute__((target("avx2"))) inline void load_bf16x16(const uint16_t* p, __m256* lo,
                                                         __m256* hi) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i zero = _mm256_setzero_si256();
  *lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw));
  *hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw));
}

// Eight fp32 -> eight bf16 bit patterns in the low halves of 32-bit lanes,
// rounded exactly like f32_to_bf16_rne.
__attribute__((target("avx2"))) inline __m256i round_to_bf16x8(__m256 value) {
  const __m256i bits = _mm256_castps_si256(value);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(
      _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(value, value, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), is_nan);
}

__attribute__((target("avx2"))) int64_t reduce_bf16_avx2(const uint16_t* const* srcs, int n_src,
                                                         uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256 lo, hi;
    load_bf16x16(srcs[0] + i, &lo, &hi);
    for (int r = 1; r < n_src; ++r) {
      __m256 lo_r, hi_r;
      load_bf16x16(srcs[r] + i, &lo_r, &hi_r);
      lo = _mm256_add_ps(lo, lo_r);
      hi = _mm256_add_ps(hi, hi_r);
    }
    const __m256i packed = _mm256_packus_epi32(round_to_bf16x8(lo), round_to_bf16x8(hi));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), packed);
  }
  return i;
}

// 16 floats -> 16 bf16: packus works per 128-bit lane, so the 64-bit quarters come out
// as 0-3, 8-11, 4-7, 12-15 and one permute puts them in order.
__attribute__((target("avx2"))) int64_t f32_to_bf16_avx2(const float* src, uint16_t* dst,
                                                         int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i packed = _mm256_packus_epi32(round_to_bf16x8(_mm256_loadu_ps(src + i)),
                                               round_to_bf16x8(_mm256_loadu_ps(src + i + 8)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm256_permute4x64_epi64(packed, 0xD8));
  }
  return i;
}

__attribute__((target("avx2"))) int64_t bf16_to_f32_avx2(const uint16_t* src, float* dst,
                                                         int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i wide = _mm256_cvtepu16_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
  }
  return i;
}

#endif  // XLLM_HAVE_X86

}  // namespace

void convert_f32_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
#ifdef XLLM_HAVE_X86
  if (active_isa() >= Isa::kAvx2) i = f32_to_bf16_avx2(src, dst, n);
#endif
  for (; i < n; ++i) dst[i] = f32_to_bf16_rne(src[i]);
}

void convert_bf16_to_f32(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
#ifdef XLLM_HAVE_X86
  if (active_isa() >= Isa::kAvx2) i = bf16_to_f32_avx2(src, dst, n);
#endif
  for (; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}

void reduce_sum_f32(const float* const* srcs, int n_src, float* dst, int64_t n) {
  int64_t done = 0;
#ifdef XLLM_HAVE_X86
  if (active_isa() >= Isa::kAvx2) done = reduce_f32_avx2(srcs, n_src, dst, n);
#endif
  reduce_f32_scalar(srcs, n_src, dst, done, n);
}

void reduce_sum_bf16(const uint16_t* const* srcs, int n_src, uint16_t* dst, int64_t n) {
  int64_t done = 0;
#ifdef XLLM_HAVE_X86
  if (active_isa() >= Isa::kAvx2) done = reduce_bf16_avx2(srcs, n_src, dst, n);
#endif
  reduce_bf16_scalar(srcs, n_src, dst, done, n);
}

}  // namespace xllm::comm
