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

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace xllm::quant {

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
// An owned, 64-byte aligned array (AMX tile rows and zmm lines want the alignment).
template <class T>
using AlignedArray = std::unique_ptr<T[], AlignedFree>;

// Arrays of at least kHugePage bytes (packed weights) are aligned to it and advised onto
// transparent huge pages (MADV_HUGEPAGE; a hint, for kernels whose THP mode is "madvise"):
// a decode step streams every weight byte once, and with 4 KiB pages it took a TLB miss
// every 4 KiB, which in a VM costs a two-level page walk. Measured on the AMX Xeon (a KVM
// guest), 16 layers of Llama-3.2-1B's projections streamed: bf16 rows 1.01-1.05x at 1-64
// rows, the int8 tiles 1.1x at 16 rows, prompts 1.01x.
constexpr size_t kHugePage = size_t{2} << 20;

template <class T>
AlignedArray<T> aligned_array(size_t count) {
  // (The size is not rounded up to whole huge pages: the last part stays on small pages.)
  const size_t bytes = (count * sizeof(T) + 63) / 64 * 64;
  const size_t align = bytes >= kHugePage ? kHugePage : 64;
  void* p = std::aligned_alloc(align, bytes);
  if (!p) throw std::bad_alloc();
#if defined(__linux__)
  if (align == kHugePage) madvise(p, bytes, MADV_HUGEPAGE);  // (best effort: errors ignored)
#endif
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
