// The KV cache write: each new token's K and V rows (all KV heads) go to its
// slot, slot = block * block_size + offset, into [num_blocks, num_kv_heads,
// block_size, head_size] caches. Slot -1 is padding and is skipped. fp32 rows
// stored into a bf16 cache are rounded to nearest even (as torch's .to() does); into an
// int8 cache, quantized per row (quantize_row).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "attention/args.h"
#include "attention/ops.h"

namespace xllm::attn {
namespace {

// Below this many elements per call the OpenMP fork costs more than the copy.
constexpr int64_t kParallelElements = 1 << 16;

#if XLLM_HAVE_AVX2_KERNELS
XLLM_AVX2 void f32_to_bf16_avx2(const float* src, bf16_t* dst, int64_t n) {
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) store8(dst + d, _mm256_loadu_ps(src + d));
  for (; d < n; ++d) dst[d] = f32_to_bf16(src[d]);
}
#endif

// dst[:n] = src[:n], converting between float32 and bfloat16 as needed.
void copy_row(const void* src, bool src_bf16, void* dst, bool dst_bf16, int64_t n, Isa isa) {
  if (src_bf16 == dst_bf16) {
    std::memcpy(dst, src, static_cast<size_t>(n) * (src_bf16 ? 2 : 4));
  } else if (src_bf16) {
    const bf16_t* s = static_cast<const bf16_t*>(src);
    float* o = static_cast<float*>(dst);
    for (int64_t d = 0; d < n; ++d) o[d] = to_f32(s[d]);
  } else {
    const float* s = static_cast<const float*>(src);
    bf16_t* o = static_cast<bf16_t*>(dst);
#if XLLM_HAVE_AVX2_KERNELS
    if (isa >= Isa::kAvx2) {
      f32_to_bf16_avx2(s, o, n);
      return;
    }
#endif
    for (int64_t d = 0; d < n; ++d) o[d] = f32_to_bf16(s[d]);
  }
}

#if XLLM_HAVE_AVX2_KERNELS
// quantize_row for n a multiple of 16: the same division and rounding (the default
// MXCSR mode is nearest even), so the same bits.
XLLM_AVX512 void quantize_row_avx512(const void* src, bool src_bf16, q8_t* dst, int64_t n) {
  __m512 amax = _mm512_setzero_ps();
  for (int64_t d = 0; d < n; d += 16) {
    amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(src, src_bf16, d)));
  }
  const float scale = _mm512_reduce_max_ps(amax) / 127.0f;
  if (scale > 0) {
    const __m512 vs = _mm512_set1_ps(scale);
    for (int64_t d = 0; d < n; d += 16) {
      const __m512i q = _mm512_cvtps_epi32(_mm512_div_ps(load16(src, src_bf16, d), vs));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + d), _mm512_cvtsepi32_epi8(q));
    }
  } else {
    std::memset(dst, 0, static_cast<size_t>(n));
  }
  std::memcpy(dst + n, &scale, sizeof scale);
}
#endif

// A row into q8 form (vec.h): scale = max |x| / 127, q = x / scale rounded to nearest
// even, then the scale's 4 bytes. A row of zeros gets scale 0 and zeros.
void quantize_row(const void* src, bool src_bf16, q8_t* dst, int64_t n, Isa isa) {
#if XLLM_HAVE_AVX2_KERNELS
  if (isa >= Isa::kAvx512 && n % 16 == 0) {
    quantize_row_avx512(src, src_bf16, dst, n);
    return;
  }
#endif
  auto at = [&](int64_t d) {
    return src_bf16 ? to_f32(static_cast<const bf16_t*>(src)[d])
                    : static_cast<const float*>(src)[d];
  };
  float amax = 0;
  for (int64_t d = 0; d < n; ++d) amax = std::max(amax, std::fabs(at(d)));
  const float scale = amax / 127.0f;
  for (int64_t d = 0; d < n; ++d) {
    const float q = scale > 0 ? std::nearbyint(at(d) / scale) : 0.0f;
    dst[d] = static_cast<q8_t>(std::clamp(q, -127.0f, 127.0f));
  }
  std::memcpy(dst + n, &scale, sizeof scale);
}

int64_t slot_at(const Tensor& slots, int64_t t) {
  return slots.dtype == DType::kInt64 ? slots.ptr<int64_t>()[t] : slots.ptr<int32_t>()[t];
}

}  // namespace

void write_kv_cache(py::handle key_obj, py::handle value_obj, py::handle key_cache_obj,
                    py::handle value_cache_obj, py::handle slot_mapping_obj) {
  const Tensor key = host_tensor(key_obj, "key");
  const Tensor value = host_tensor(value_obj, "value");
  const Tensor key_cache = host_tensor(key_cache_obj, "key_cache");
  const Tensor value_cache = host_tensor(value_cache_obj, "value_cache");
  const Tensor slots = host_tensor(slot_mapping_obj, "slot_mapping");
  py::gil_scoped_release release;
  write_kv_cache(key, value, key_cache, value_cache, slots);
}

void write_kv_cache(const Tensor& key, const Tensor& value, const Tensor& key_cache,
                    const Tensor& value_cache, const Tensor& slots) {

  const PagedCache cache = check_caches(key_cache, value_cache);
  check_rows(key, -1, "", cache.num_kv_heads, "the caches' num_kv_heads", cache.head_size);
  check_rows(value, key.size(0), "key's num_tokens", cache.num_kv_heads,
             "the caches' num_kv_heads", cache.head_size);
  if (value.dtype != key.dtype) {
    fail("argument 'value' must have key's dtype ", dtype_name(key.dtype), ", got ",
         dtype_name(value.dtype));
  }
  check_ndim(slots, 1, "[num_tokens]");
  check_dtype(slots, {DType::kInt64, DType::kInt32});
  check_contiguous(slots);
  const int64_t num_tokens = key.size(0);
  check_dim(slots, 0, num_tokens, "key's num_tokens");
  const int64_t num_slots = cache.num_blocks * cache.block_size;
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t s = slot_at(slots, t);
    if (s < -1 || s >= num_slots) {
      fail("argument 'slot_mapping' has slot_mapping[", t, "] = ", s, " outside [0, ", num_slots,
           ") (num_blocks x block_size of the caches); use -1 for padding");
    }
  }
  if (num_tokens == 0) return;

  const bool src_bf16 = key.dtype == DType::kBFloat16, dst_bf16 = cache.bf16;
  const int64_t nkv = cache.num_kv_heads, bs = cache.block_size, hs = cache.head_size;
  const int64_t src_elt = src_bf16 ? 2 : 4;
  // Bytes of a cache row.
  const int64_t dst_row = cache.q8 ? hs + kQ8ScaleBytes : hs * (dst_bf16 ? 2 : 4);
  const char* key_src = static_cast<const char*>(key.data);
  const char* value_src = static_cast<const char*>(value.data);
  char* key_dst = static_cast<char*>(key_cache.data);
  char* value_dst = static_cast<char*>(value_cache.data);
  const int64_t k_s0 = key.stride[0], v_s0 = value.stride[0];
  const Isa isa = active_isa();
  const bool parallel = num_tokens * nkv * hs >= kParallelElements && omp_get_max_threads() > 1;

  // Two tokens with the same slot race (last writer wins, as with torch indexing);
  // an engine never assigns one slot twice in a step.
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t s = slot_at(slots, t);
    if (s < 0) continue;
    const int64_t block = s / bs, offset = s % bs;
    for (int64_t h = 0; h < nkv; ++h) {
      const int64_t dst = ((block * nkv + h) * bs + offset) * dst_row;
      const int64_t row_k = (t * k_s0 + h * hs) * src_elt, row_v = (t * v_s0 + h * hs) * src_elt;
      if (cache.q8) {
        quantize_row(key_src + row_k, src_bf16, reinterpret_cast<q8_t*>(key_dst + dst), hs, isa);
        quantize_row(value_src + row_v, src_bf16, reinterpret_cast<q8_t*>(value_dst + dst), hs,
                     isa);
      } else {
        copy_row(key_src + row_k, src_bf16, key_dst + dst, dst_bf16, hs, isa);
        copy_row(value_src + row_v, src_bf16, value_dst + dst, dst_bf16, hs, isa);
      }
    }
  }
}

}  // namespace xllm::attn
