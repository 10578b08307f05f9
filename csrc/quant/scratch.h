// Per-thread scratch and thread counts shared by the reduced-precision linears
// (bf16_gemm.cpp, int8_dot.cpp).
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>

namespace xllm::quant {

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
