// Row-wise element-wise ops (see rowops.h). Compiled with -ffp-contract=off (see
// CMakeLists.txt): each product is rounded as torch rounds it, no FMA contraction.
#include "layers/rowops.h"

#include <omp.h>

#include <algorithm>
#include <cmath>

#include "attention/vec.h"

namespace xllm::rowops {
namespace {

constexpr int64_t kParallelRows = 32;  // fewer rows than this run on the calling thread

int threads_for_rows(int64_t rows) { return rows < kParallelRows ? 1 : omp_get_max_threads(); }

void rms_row_scalar(const float* x, const float* w, float eps, int64_t h, float* out) {
  float ss = 0.0f;
  for (int64_t i = 0; i < h; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(h) + eps);
  for (int64_t i = 0; i < h; ++i) out[i] = (x[i] * inv) * w[i];
}

XLLM_AVX2 void rms_row_avx2(const float* x, const float* w, float eps, int64_t h, float* out) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= h; i += 16) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    acc0 = _mm256_add_ps(acc0, _mm256_mul_ps(a, a));
    acc1 = _mm256_add_ps(acc1, _mm256_mul_ps(b, b));
  }
  float ss = attn::hsum(_mm256_add_ps(acc0, acc1));
  for (; i < h; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(h) + eps);
  const __m256 vinv = _mm256_set1_ps(inv);
  i = 0;
  for (; i + 8 <= h; i += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), vinv);
    _mm256_storeu_ps(out + i, _mm256_mul_ps(v, _mm256_loadu_ps(w + i)));
  }
  for (; i < h; ++i) out[i] = (x[i] * inv) * w[i];
}

XLLM_AVX2 void add_avx2(float* r, const float* x, int64_t h) {
  int64_t i = 0;
  for (; i + 8 <= h; i += 8) {
    _mm256_storeu_ps(r + i, _mm256_add_ps(_mm256_loadu_ps(r + i), _mm256_loadu_ps(x + i)));
  }
  for (; i < h; ++i) r[i] += x[i];
}

XLLM_AVX2 void silu_mul_avx2(const float* g, const float* u, int64_t d, float* out) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 e = attn::exp8(_mm256_xor_ps(gv, sign));
    const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
  }
  for (; i < d; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

XLLM_AVX2 void rotate_avx2(float* x1, float* x2, const float* c, const float* s, int64_t half) {
  int64_t i = 0;
  for (; i + 8 <= half; i += 8) {
    const __m256 a = _mm256_loadu_ps(x1 + i), b = _mm256_loadu_ps(x2 + i);
    const __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
    _mm256_storeu_ps(x1 + i, _mm256_sub_ps(_mm256_mul_ps(a, cv), _mm256_mul_ps(b, sv)));
    _mm256_storeu_ps(x2 + i, _mm256_add_ps(_mm256_mul_ps(b, cv), _mm256_mul_ps(a, sv)));
  }
  for (; i < half; ++i) {
    const float a = x1[i], b = x2[i];
    x1[i] = a * c[i] - b * s[i];
    x2[i] = b * c[i] + a * s[i];
  }
}

#if defined(__x86_64__)
// ---- AVX-512 (the avx512, avx512_bf16 and amx levels): the AVX2 forms 16 lanes wide. On
// the AMX Xeon (2 cores, 64 rows of the demo): SiLU-and-mul 1.43x the AVX2 form (the same
// bits), RMSNorm 1.2x, rotary 1.2x.

XLLM_AVX512 void rms_row_avx512(const float* x, const float* w, float eps, int64_t h,
                                float* out) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= h; i += 32) {
    const __m512 a = _mm512_loadu_ps(x + i), b = _mm512_loadu_ps(x + i + 16);
    acc0 = _mm512_add_ps(acc0, _mm512_mul_ps(a, a));
    acc1 = _mm512_add_ps(acc1, _mm512_mul_ps(b, b));
  }
  float ss = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  for (; i < h; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(h) + eps);
  const __m512 vinv = _mm512_set1_ps(inv);
  i = 0;
  for (; i + 16 <= h; i += 16) {
    const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + i), vinv);
    _mm512_storeu_ps(out + i, _mm512_mul_ps(v, _mm512_loadu_ps(w + i)));
  }
  for (; i < h; ++i) out[i] = (x[i] * inv) * w[i];
}

XLLM_AVX512 void add_avx512(float* r, const float* x, int64_t h) {
  int64_t i = 0;
  for (; i + 16 <= h; i += 16) {
    _mm512_storeu_ps(r + i, _mm512_add_ps(_mm512_loadu_ps(r + i), _mm512_loadu_ps(x + i)));
  }
  for (; i < h; ++i) r[i] += x[i];
}

XLLM_AVX512 void silu_mul_avx512(const float* g, const float* u, int64_t d, float* out) {
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    _mm512_storeu_ps(out + i, attn::silu_mul16(_mm512_loadu_ps(g + i), _mm512_loadu_ps(u + i)));
  }
  if (i < d) silu_mul_avx2(g + i, u + i, d - i, out + i);
}

XLLM_AVX512 void rotate_avx512(float* x1, float* x2, const float* c, const float* s,
                               int64_t half) {
  int64_t i = 0;
  for (; i + 16 <= half; i += 16) {
    const __m512 a = _mm512_loadu_ps(x1 + i), b = _mm512_loadu_ps(x2 + i);
    const __m512 cv = _mm512_loadu_ps(c + i), sv = _mm512_loadu_ps(s + i);
    _mm512_storeu_ps(x1 + i, _mm512_sub_ps(_mm512_mul_ps(a, cv), _mm512_mul_ps(b, sv)));
    _mm512_storeu_ps(x2 + i, _mm512_add_ps(_mm512_mul_ps(b, cv), _mm512_mul_ps(a, sv)));
  }
  if (i < half) rotate_avx2(x1 + i, x2 + i, c + i, s + i, half - i);
}
#endif

// The first index of the row's maximum, or its first NaN (torch.argmax's rule).
int64_t argmax_row_scalar(const float* x, int64_t v) {
  int64_t best = 0;
  for (int64_t i = 0; i < v; ++i) {
    if (std::isnan(x[i])) return i;
    if (x[i] > x[best]) best = i;
  }
  return best;
}

// The same: a vector pass for the maximum and whether a NaN occurs (then the scalar form),
// then a scan for the first element equal to the maximum.
XLLM_AVX2 int64_t argmax_row_avx2(const float* x, int64_t v) {
  __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
  __m256 nan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= v; i += 32) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    const __m256 c = _mm256_loadu_ps(x + i + 16), d = _mm256_loadu_ps(x + i + 24);
    m0 = _mm256_max_ps(m0, a);
    m1 = _mm256_max_ps(m1, b);
    m2 = _mm256_max_ps(m2, c);
    m3 = _mm256_max_ps(m3, d);
    nan = _mm256_or_ps(nan, _mm256_or_ps(_mm256_cmp_ps(a, b, _CMP_UNORD_Q),
                                         _mm256_cmp_ps(c, d, _CMP_UNORD_Q)));
  }
  float mx = attn::hmax(_mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
  bool any_nan = _mm256_movemask_ps(nan) != 0;
  for (int64_t j = i; j < v; ++j) {
    any_nan |= std::isnan(x[j]);
    mx = std::max(mx, x[j]);
  }
  if (any_nan) return argmax_row_scalar(x, v);
  const __m256 target = _mm256_set1_ps(mx);
  for (i = 0; i + 8 <= v; i += 8) {
    const int hits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), target, _CMP_EQ_OQ));
    if (hits) return i + __builtin_ctz(static_cast<unsigned>(hits));
  }
  for (; i < v; ++i) {
    if (x[i] == mx) return i;
  }
  return 0;  // an empty row, or all -inf: index 0, as torch gives
}

}  // namespace

void argmax_rows(const float* x, int64_t ldx, int64_t rows, int64_t v, int64_t* out, Isa isa) {
  const bool avx2 = isa >= Isa::kAvx2;
  // Threads only for several rows of a large vocabulary (a batch's logits).
  const int threads = rows * v >= (int64_t{1} << 18) ? omp_get_max_threads() : 1;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < rows; ++r) {
    out[r] = avx2 ? argmax_row_avx2(x + r * ldx, v) : argmax_row_scalar(x + r * ldx, v);
  }
}

void rms_norm(const float* x, int64_t ldx, float* res, int64_t ldr, const float* w, float eps,
              int64_t rows, int64_t h, float* out, int64_t ldo, Isa isa) {
#pragma omp parallel for schedule(static) num_threads(threads_for_rows(rows))
  for (int64_t i = 0; i < rows; ++i) {
    const float* src = x + i * ldx;
    if (res) {
      float* r = res + i * ldr;
#if defined(__x86_64__)
      if (isa >= Isa::kAvx512) add_avx512(r, src, h);
      else
#endif
      if (isa >= Isa::kAvx2) add_avx2(r, src, h);
      else for (int64_t j = 0; j < h; ++j) r[j] += src[j];
      src = r;
    }
#if defined(__x86_64__)
    if (isa >= Isa::kAvx512) rms_row_avx512(src, w, eps, h, out + i * ldo);
    else
#endif
    if (isa >= Isa::kAvx2) rms_row_avx2(src, w, eps, h, out + i * ldo);
    else rms_row_scalar(src, w, eps, h, out + i * ldo);
  }
}

void silu_and_mul(const float* x, int64_t ldx, int64_t rows, int64_t d, float* out,
                  int64_t ldo, Isa isa) {
#pragma omp parallel for schedule(static) num_threads(threads_for_rows(rows))
  for (int64_t i = 0; i < rows; ++i) {
    const float* g = x + i * ldx;
    float* o = out + i * ldo;
#if defined(__x86_64__)
    if (isa >= Isa::kAvx512) silu_mul_avx512(g, g + d, d, o);
    else
#endif
    if (isa >= Isa::kAvx2) silu_mul_avx2(g, g + d, d, o);
    else for (int64_t j = 0; j < d; ++j) o[j] = g[j] / (1.0f + std::exp(-g[j])) * g[d + j];
  }
}

void rotary(float* x, int64_t ldx, int64_t rows, int64_t heads, int64_t hd, int64_t ldh,
            const int64_t* pos,
            const float* cos, const float* sin, Isa isa) {
  const int64_t half = hd / 2;
#pragma omp parallel for schedule(static) num_threads(threads_for_rows(rows))
  for (int64_t i = 0; i < rows; ++i) {
    const float* c = cos + pos[i] * half;
    const float* s = sin + pos[i] * half;
    for (int64_t h = 0; h < heads; ++h) {
      float* x1 = x + i * ldx + h * ldh;
#if defined(__x86_64__)
      if (isa >= Isa::kAvx512) {
        rotate_avx512(x1, x1 + half, c, s, half);
      } else
#endif
      if (isa >= Isa::kAvx2) {
        rotate_avx2(x1, x1 + half, c, s, half);
      } else {
        for (int64_t j = 0; j < half; ++j) {
          const float a = x1[j], b = x1[half + j];
          x1[j] = a * c[j] - b * s[j];
          x1[half + j] = b * c[j] + a * s[j];
        }
      }
    }
  }
}

namespace {

// One row: logits[j] = -inf where bit j of the mask words is 0, for j < v.
void mask_row_scalar(float* x, const int32_t* words, int64_t v) {
  for (int64_t w = 0; w * 32 < v; ++w) {
    uint32_t off = ~static_cast<uint32_t>(words[w]);
    if (w * 32 + 32 > v) off &= (1u << (v - w * 32)) - 1u;
    while (off) {
      x[w * 32 + __builtin_ctz(off)] = -INFINITY;
      off &= off - 1;
    }
  }
}

// 8 lanes at a time: lane k is masked where bit k of the byte is 0 (a masked store).
XLLM_AVX2 void mask_row_avx2(float* x, const int32_t* words, int64_t v) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256 ninf = _mm256_set1_ps(-INFINITY);
  const int64_t full = v / 32;
  for (int64_t w = 0; w < full; ++w) {
    const uint32_t bits = static_cast<uint32_t>(words[w]);
    if (bits == 0xFFFFFFFFu) continue;
    for (int b = 0; b < 4; ++b) {
      const __m256i byte = _mm256_set1_epi32(static_cast<int>((bits >> (8 * b)) & 0xFF));
      const __m256i off = _mm256_cmpeq_epi32(_mm256_and_si256(byte, bit), _mm256_setzero_si256());
      _mm256_maskstore_ps(x + w * 32 + 8 * b, off, ninf);
    }
  }
  if (full * 32 < v) mask_row_scalar(x + full * 32, words + full, v - full * 32);
}

#if defined(__x86_64__)
XLLM_AVX512 void mask_row_avx512(float* x, const int32_t* words, int64_t v) {
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  for (int64_t w = 0; w * 32 < v; ++w) {
    const uint32_t off = ~static_cast<uint32_t>(words[w]);
    if (!off) continue;
    const int64_t at = w * 32;
    _mm512_mask_storeu_ps(x + at, static_cast<__mmask16>(off & first_lanes(v - at)), ninf);
    _mm512_mask_storeu_ps(x + at + 16, static_cast<__mmask16>((off >> 16) & first_lanes(v - at - 16)),
                          ninf);
  }
}
#endif

}  // namespace

void apply_token_bitmask(float* x, int64_t ldx, int64_t v, const int32_t* bitmask, int64_t ldb,
                         const int64_t* rows, int64_t m, Isa isa) {
  for (int64_t i = 0; i < m; ++i) {
    float* row = x + rows[i] * ldx;
    const int32_t* words = bitmask + i * ldb;
#if defined(__x86_64__)
    if (isa >= Isa::kAvx512) mask_row_avx512(row, words, v);
    else
#endif
    if (isa >= Isa::kAvx2) mask_row_avx2(row, words, v);
    else mask_row_scalar(row, words, v);
  }
}

}  // namespace xllm::rowops
