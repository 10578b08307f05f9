// Prefill attention on AMX tiles, for a bf16 KV cache (the bf16 compute mode's cache).
#pragma once

#include <cstdint>

#include "attention/attend.h"

namespace xllm::attn {

// One prefill call's arguments, already checked (prefill.cpp).
struct Prefill {
  float* out;              // [num_tokens, num_heads, hs] contiguous
  const void* query;       // [num_tokens, num_heads, hs], row stride q_stride0
  bool query_bf16;
  int64_t q_stride0;
  PagedCache cache;
  const int32_t* tables;   // [num_seqs, table_width]
  int64_t table_width;
  const int32_t* lens;     // [num_seqs]
  const int32_t* starts;   // [num_seqs + 1] query_start_loc
  int64_t num_seqs, num_heads;
  float scale;
};

// Runs the call on the matrix units: scores and weighted sums as bf16 products with fp32
// sums (the query times the scale and the softmax weights are rounded to bf16; the max,
// exp and sums are fp32). Needs a CPU at the amx level and a bf16 cache; returns false,
// having done nothing, where the shapes do not suit it (head_size not a multiple of 32 or
// above 128, more than 16 query heads per KV head, or too large a context to pack).
bool prefill_amx(const Prefill& a);

}  // namespace xllm::attn
