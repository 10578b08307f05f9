// Argument checks shared by the attention ops and the KV cache write. Each one
// raises ValueError naming the argument; all run before any kernel writes.
#pragma once

#include <cstdint>

#include "attention/attend.h"
#include "common/tensor.h"

namespace xllm::attn {

// key_cache / value_cache: same shape [num_blocks, num_kv_heads, block_size,
// head_size], same dtype (float32 or bfloat16), contiguous; or int8 rows of head_size
// values and their fp32 scale ([.., head_size + 4], vec.h: q8_t).
PagedCache check_caches(const Tensor& key_cache, const Tensor& value_cache);

// A [rows, heads, head_size] float32/bfloat16 tensor whose last two dimensions are
// contiguous; dimension 0 may have any stride (a view of a fused QKV output).
void check_rows(const Tensor& t, int64_t rows, const char* rows_what, int64_t heads,
                const char* heads_what, int64_t head_size);

// The attention output: contiguous float32 of exactly `like`'s shape.
void check_out(const Tensor& out, const Tensor& like);

// Query heads must split evenly into KV groups, and the head size must suit the
// 8-wide kernels.
void check_heads(const Tensor& query, const PagedCache& cache);

// block_tables: int32 [num_seqs, max_blocks] contiguous; seq_lens: int32
// [num_seqs] contiguous. Checks every length against the table width and every
// block id a sequence uses (ceil(seq_len / block_size) of them) against num_blocks.
void check_context(const Tensor& block_tables, const Tensor& seq_lens, const PagedCache& cache);

void check_scale(double scale);

// A sliding window in tokens: >= 0 (0: none).
void check_window(int64_t window);

// The call's pointers and sizes from its checked tensors (num_seqs: seq_lens' length).
PagedCall paged_call(const Tensor& out, const Tensor& query, const PagedCache& cache,
                     const Tensor& block_tables, const Tensor& seq_lens, double scale);

}  // namespace xllm::attn
