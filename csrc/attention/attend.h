// The flash-attention loop shared by decode and prefill: one tile of query rows
// (all of one KV head's group) walks a range of its sequence's paged context in
// chunks of whole blocks, computing scores, the online softmax and the weighted
// sum of V with the micro-kernels of kernels.h.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>

#include "attention/kernels.h"

namespace xllm::attn {

// One layer's paged cache (layout: xllm/ops/kv_cache.py), already checked.
struct PagedCache {
  const void* key;    // [num_blocks, num_kv_heads, block_size, row]
  const void* value;  // same shape and dtype as key
  bool bf16;          // storage dtype: bfloat16 rows
  bool q8;            // int8 rows with their scale (row = head_size + 4; vec.h: q8_t)
                      // (neither: float32 rows)
  int64_t num_blocks, num_kv_heads, block_size, head_size;
};

// What a decode or prefill call reads, its arguments already checked (args.h: paged_call).
// Query rows: one per sequence (decode) or per query token (prefill).
struct PagedCall {
  float* out;             // [rows, num_heads, hs] contiguous
  const void* query;      // [rows, num_heads, hs], row stride q_stride0
  bool query_bf16;
  int64_t q_stride0;
  PagedCache cache;
  const int32_t* tables;  // [num_seqs, table_width]
  int64_t table_width;
  const int32_t* lens;    // [num_seqs]
  int64_t num_seqs, num_heads;
  float scale;
  // Sliding window: a query at position p sees keys (p - window, p] (transformers'
  // kv_idx > q_idx - sliding_window); 0 = the whole causal context.
  int64_t window = 0;

  // The first key a query at position p sees.
  int64_t first_key(int64_t p) const {
    return window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
  }
};

template <class KT>
struct KvView {
  const KT* key;
  const KT* value;
  int64_t block_stride;  // num_kv_heads * block_size * row elements
  int64_t head_stride;   // block_size * row elements
  int block_size, head_size;

  explicit KvView(const PagedCache& c)
      : key(static_cast<const KT*>(c.key)), value(static_cast<const KT*>(c.value)),
        block_stride(c.num_kv_heads * c.block_size * row_stride<KT>(c.head_size)),
        head_stride(c.block_size * row_stride<KT>(c.head_size)),
        block_size(static_cast<int>(c.block_size)),
        head_size(static_cast<int>(c.head_size)) {}

  // [block_size, row] rows of KV head `head` in block `block`
  const KT* k_rows(int32_t block, int64_t head) const {
    return key + block * block_stride + head * head_stride;
  }
  const KT* v_rows(int32_t block, int64_t head) const {
    return value + block * block_stride + head * head_stride;
  }
};

// One tile's working state, carved from a thread's scratch.
struct TileState {
  float* q;    // [rows, hs] query rows times the softmax scale
  float* qp;   // [rows, hs] floats of room: q as the kernels' prep leaves it
  float* acc;  // [rows, hs] unnormalised output
  float* m;    // [rows] running max of scores
  float* l;    // [rows] running sum of exp(score - m)
  int* pos;    // [rows] last key position each row may see (causal), non-decreasing
  int* lo;     // [rows] first key position each row may see (sliding window; else 0),
               // non-decreasing
  int* valid;  // [rows] per chunk: how many of its columns the row sees
  float* s;    // [rows, chunk] scores, then weights
  int chunk;   // columns of s: the chunk length in tokens (a multiple of block_size)

  // Floats of scratch that a tile of `rows` rows needs (rounded to 64-byte lines).
  static size_t floats(int rows, int hs, int chunk) {
    auto line = [](size_t n) { return (n + 15) / 16 * 16; };
    return 3 * line(static_cast<size_t>(rows) * hs) + 5 * line(rows) +
           line(static_cast<size_t>(rows) * chunk);
  }
  static TileState carve(float* base, int rows, int hs, int chunk) {
    auto line = [](size_t n) { return (n + 15) / 16 * 16; };
    TileState st;
    st.q = base;
    st.qp = st.q + line(static_cast<size_t>(rows) * hs);
    st.acc = st.qp + line(static_cast<size_t>(rows) * hs);
    st.m = st.acc + line(static_cast<size_t>(rows) * hs);
    st.l = st.m + line(rows);
    st.pos = reinterpret_cast<int*>(st.l + line(rows));
    st.lo = reinterpret_cast<int*>(st.l + 2 * line(rows));
    st.valid = reinterpret_cast<int*>(st.l + 3 * line(rows));
    st.s = st.l + 4 * line(rows);
    st.chunk = chunk;
    return st;
  }
  void reset(int rows, int hs) {
    std::fill(acc, acc + static_cast<size_t>(rows) * hs, 0.0f);
    std::fill(m, m + rows, -std::numeric_limits<float>::infinity());
    std::fill(l, l + rows, 0.0f);
  }
};

// Chunk length: whole blocks, about `target` tokens (at least one block).
inline int chunk_tokens(int64_t block_size, int target) {
  return static_cast<int>(block_size * std::max<int64_t>(1, target / block_size));
}

// Attends the tile's rows to context tokens [k0, k1) of one sequence for KV head
// `head`. k0 is a multiple of block_size; tokens past a row's pos or before its lo are
// masked, and nothing at or past k1 is read (a block's unused tail may hold anything).
// Chunks wholly before every row's lo should not be passed (k0 past them): their blocks
// may have been freed.
// block_table: [>= ceil(k1 / block_size)] ids already checked to be in range.
// qrows: the tile's query rows as qk reads them (st.q, or st.qp after the kernels' prep).
template <class KT>
void attend_chunks(const Kernels<KT>& kern, SoftmaxFn softmax, const KvView<KT>& kv,
                   int64_t head, const int32_t* block_table, int64_t k0, int64_t k1, int rows,
                   const float* qrows, TileState& st) {
  const int hs = kv.head_size, bs = kv.block_size, chunk = st.chunk;
  int r0 = 0;  // rows before r0 see none of the current chunk (pos is non-decreasing)
  int r1 = 0;  // nor do rows from r1 on (their window starts after it; lo non-decreasing)
  for (int64_t c0 = k0; c0 < k1; c0 += chunk) {
    while (r0 < rows && st.pos[r0] < c0) ++r0;
    if (r0 == rows) return;
    const int ncols = static_cast<int>(std::min<int64_t>(chunk, k1 - c0));
    while (r1 < rows && st.lo[r1] < c0 + ncols) ++r1;
    if (r1 <= r0) continue;
    const int n = r1 - r0;
    float* s = st.s + static_cast<int64_t>(r0) * chunk;
    const float* q = qrows + static_cast<int64_t>(r0) * hs;
    float* acc = st.acc + static_cast<int64_t>(r0) * hs;
    // Calls run K(0..), then V(0..) of this chunk; each prefetches what the next
    // call reads, the last V prefetches the next chunk's first K block.
    const int64_t row_bytes = row_stride<KT>(hs) * static_cast<int64_t>(sizeof(KT));
    auto rows_at = [&](int b) { return static_cast<int64_t>(std::min(bs, ncols - b)); };
    for (int b = 0; b < ncols; b += bs) {
      const int32_t block = block_table[(c0 + b) / bs];
      const bool last = b + bs >= ncols;
      const KT* next = last ? kv.v_rows(block_table[c0 / bs], head)
                            : kv.k_rows(block_table[(c0 + b + bs) / bs], head);
      kern.qk(q, hs, n, kv.k_rows(block, head), static_cast<int>(rows_at(b)), hs, s + b, chunk,
              next, (last ? rows_at(0) : rows_at(b + bs)) * row_bytes);
    }
    for (int r = r0; r < r1; ++r) {
      st.valid[r] = static_cast<int>(std::min<int64_t>(st.pos[r] - c0 + 1, ncols));
      // Columns before the window: weight exactly 0 (the kernels' exp of -inf).
      if (st.lo[r] > c0) {
        std::fill(s + static_cast<int64_t>(r - r0) * chunk,
                  s + static_cast<int64_t>(r - r0) * chunk + (st.lo[r] - c0),
                  -std::numeric_limits<float>::infinity());
      }
    }
    softmax(s, chunk, n, ncols, st.valid + r0, st.m + r0, st.l + r0, acc, hs);
    for (int b = 0; b < ncols; b += bs) {
      const int32_t block = block_table[(c0 + b) / bs];
      const KT* next = nullptr;
      int64_t next_rows = 0;
      if (b + bs < ncols) {
        next = kv.v_rows(block_table[(c0 + b + bs) / bs], head);
        next_rows = rows_at(b + bs);
      } else if (c0 + chunk < k1) {
        next = kv.k_rows(block_table[(c0 + chunk) / bs], head);
        next_rows = std::min<int64_t>(bs, k1 - c0 - chunk);
      }
      kern.pv(s + b, chunk, n, kv.v_rows(block, head), static_cast<int>(rows_at(b)), hs, acc, next,
              next_rows * row_bytes);
    }
  }
}

// attend_chunks for a whole tile: the kernels' prep of its query rows first, and acc's
// rows back in order at the end.
template <class KT>
void attend_range(const Kernels<KT>& kern, SoftmaxFn softmax, const KvView<KT>& kv, int64_t head,
                  const int32_t* block_table, int64_t k0, int64_t k1, int rows, TileState& st) {
  const float* qrows = st.q;
  if (kern.prep != nullptr) {
    kern.prep(st.q, rows, kv.head_size, st.qp);
    qrows = st.qp;
  }
  attend_chunks(kern, softmax, kv, head, block_table, k0, k1, rows, qrows, st);
  if (kern.post != nullptr) kern.post(st.acc, rows, kv.head_size);
}

// Threads for a call doing about `macs` multiply-adds. Tiny calls (a decode step
// of one short sequence) run on the calling thread alone: they finish in a few
// microseconds, and a team would make them wait for a worker to be scheduled,
// which on a busy machine can take a scheduler tick (milliseconds).
inline int threads_for(int64_t macs) {
  constexpr int64_t kSerialMacs = int64_t{1} << 18;  // ~15 us of FMA work on one core
  return macs < kSerialMacs ? 1 : omp_get_max_threads();
}

// A grow-only scratch buffer owned by the calling thread (the one that entered
// the op), 64-byte aligned, reused across calls so steady-state decode steps
// allocate nothing; OpenMP workers use disjoint slices of it.
inline float* caller_scratch(size_t floats) {
  thread_local std::unique_ptr<float[]> buffer;
  thread_local size_t capacity = 0;
  if (floats + 16 > capacity) {
    capacity = std::max(floats + 16, capacity * 2);
    buffer.reset(new float[capacity]);
  }
  auto addr = reinterpret_cast<uintptr_t>(buffer.get());
  return buffer.get() + ((64 - addr % 64) % 64) / sizeof(float);
}

// Reads the query row at element `offset` ([hs] elements, fp32 or bf16) into dst,
// times scale.
inline void load_scaled(const void* query, bool bf16, int64_t offset, int hs, float scale,
                        float* dst) {
  if (bf16) {
    const bf16_t* src = static_cast<const bf16_t*>(query) + offset;
    for (int d = 0; d < hs; ++d) dst[d] = to_f32(src[d]) * scale;
  } else {
    const float* src = static_cast<const float*>(query) + offset;
    for (int d = 0; d < hs; ++d) dst[d] = src[d] * scale;
  }
}

}  // namespace xllm::attn
