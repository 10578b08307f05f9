// Memory and thread counts shared by the reduced-precision linears (bf16_gemm, int8_dot):
// 64-byte aligned arrays for packed weights, per-thread scratch, threads per call.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>

namespace xllm::quant {

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
// An owned, 64-byte aligned array (AMX tile rows and zmm lines want the alignment).
template <class T>
using AlignedArray = std::unique_ptr<T[], AlignedFree>;

template <class T>
AlignedArray<T> aligned_array(size_t count) {
  void* p = std::aligned_alloc(64, (count * sizeof(T) + 63) / 64 * 64);
  if (!p) throw std::bad_alloc();
  return AlignedArray<T>(static_cast<T*>(p));
}

// A grow-only, 64-byte aligned scratch buffer of the calling thread; `Slot` tells apart the
// buffers one thread needs at once (AMX tile rows and zmm loads want the alignment).
template <int Slot>
void* thread_scratch(size_t bytes) {
  struct Buffer {
    void* p = nullptr;
    size_t capacity = 0;
    ~Buffer() { std::free(p); }
  };
  thread_local Buffer buffer;
  if (bytes > buffer.capacity) {
    std::free(buffer.p);
    buffer.capacity = (std::max(bytes, 2 * buffer.capacity) + 63) / 64 * 64;
    buffer.p = std::aligned_alloc(64, buffer.capacity);
    if (!buffer.p) throw std::bad_alloc();
  }
  return buffer.p;
}

// Threads for a linear of a [rows, cols] weight over m rows of x: small ones stay on the
// calling thread, where waking a team would cost more than it saves.
inline int linear_threads(int64_t rows, int64_t cols, int64_t m) {
  const int64_t work = rows * cols * std::min<int64_t>(m, 16);
  return work < (int64_t{1} << 18) ? 1 : omp_get_max_threads();
}

}  // namespace xllm::quant
