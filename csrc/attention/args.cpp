#include "attention/args.h"

#include <cmath>

namespace xllm::attn {

PagedCache check_caches(const Tensor& key_cache, const Tensor& value_cache) {
  const char* layout =
      "[num_blocks, num_kv_heads, block_size, head_size] (int8: head_size + 4, the row's scale)";
  for (const Tensor* t : {&key_cache, &value_cache}) {
    check_ndim(*t, 4, layout);
    check_dtype(*t, {DType::kFloat32, DType::kBFloat16, DType::kInt8});
    check_contiguous(*t);
  }
  if (value_cache.dtype != key_cache.dtype) {
    fail("argument 'value_cache' must have key_cache's dtype ", dtype_name(key_cache.dtype),
         ", got ", dtype_name(value_cache.dtype));
  }
  for (int d = 0; d < 4; ++d) check_dim(value_cache, d, key_cache.size(d), "key_cache's");
  if (key_cache.size(1) < 1 || key_cache.size(2) < 1 || key_cache.size(3) < 1) {
    fail("argument 'key_cache' must have num_kv_heads, block_size and head_size >= 1, got shape ",
         key_cache.shape_str());
  }
  PagedCache c;
  c.key = key_cache.data;
  c.value = value_cache.data;
  c.bf16 = key_cache.dtype == DType::kBFloat16;
  c.q8 = key_cache.dtype == DType::kInt8;
  c.num_blocks = key_cache.size(0);
  c.num_kv_heads = key_cache.size(1);
  c.block_size = key_cache.size(2);
  c.head_size = key_cache.size(3) - (c.q8 ? kQ8ScaleBytes : 0);
  if (c.head_size < 1) {
    fail("argument 'key_cache' is int8 with rows of ", key_cache.size(3),
         " bytes; an int8 row holds head_size values and a 4-byte scale");
  }
  return c;
}

void check_rows(const Tensor& t, int64_t rows, const char* rows_what, int64_t heads,
                const char* heads_what, int64_t head_size) {
  check_ndim(t, 3, "[num_tokens, num_heads, head_size]");
  check_dtype(t, {DType::kFloat32, DType::kBFloat16});
  if (rows >= 0) check_dim(t, 0, rows, rows_what);
  if (heads >= 0) check_dim(t, 1, heads, heads_what);
  check_dim(t, 2, head_size, "the caches' head_size");
  const bool inner_ok = (t.size(2) <= 1 || t.stride[2] == 1) &&
                        (t.size(1) <= 1 || t.stride[1] == t.size(2));
  if (!inner_ok || t.stride[0] < 0) {
    fail("argument '", t.name, "' must have contiguous last two dimensions (strides (*, ",
         t.size(2), ", 1)); got strides (", t.stride[0], ", ", t.stride[1], ", ", t.stride[2],
         "); call .contiguous() first");
  }
}

void check_out(const Tensor& out, const Tensor& like) {
  check_ndim(out, 3, "[num_tokens, num_heads, head_size]");
  check_dtype(out, DType::kFloat32);
  for (int d = 0; d < 3; ++d) check_dim(out, d, like.size(d), like.name + "'s size");
  check_contiguous(out);
}

void check_heads(const Tensor& query, const PagedCache& cache) {
  if (query.size(1) < 1 || query.size(1) % cache.num_kv_heads != 0) {
    fail("argument 'query' has ", query.size(1), " heads, not a multiple of the caches' ",
         cache.num_kv_heads, " KV heads (GQA needs num_heads % num_kv_heads == 0)");
  }
  if (cache.head_size % 8 != 0) {
    fail("argument 'key_cache' has head_size ", cache.head_size,
         "; the CPU attention kernels need a multiple of 8");
  }
}

void check_context(const Tensor& block_tables, const Tensor& seq_lens, const PagedCache& cache) {
  check_ndim(block_tables, 2, "[num_seqs, max_blocks_per_seq]");
  check_dtype(block_tables, DType::kInt32);
  check_contiguous(block_tables);
  check_ndim(seq_lens, 1, "[num_seqs]");
  check_dtype(seq_lens, DType::kInt32);
  check_contiguous(seq_lens);
  const int64_t num_seqs = seq_lens.size(0);
  check_dim(block_tables, 0, num_seqs, "seq_lens' num_seqs");
  const int64_t width = block_tables.size(1);
  const int64_t capacity = width * cache.block_size;
  const int32_t* lens = seq_lens.ptr<int32_t>();
  const int32_t* table = block_tables.ptr<int32_t>();
  for (int64_t i = 0; i < num_seqs; ++i) {
    const int64_t n = lens[i];
    if (n < 0 || n > capacity) {
      fail("argument 'seq_lens' has seq_lens[", i, "] = ", n, " outside [0, ", capacity,
           "] (max_blocks_per_seq ", width, " x block_size ", cache.block_size, ")");
    }
    const int64_t used = (n + cache.block_size - 1) / cache.block_size;
    for (int64_t j = 0; j < used; ++j) {
      const int64_t b = table[i * width + j];
      if (b < 0 || b >= cache.num_blocks) {
        fail("argument 'block_tables' has block_tables[", i, ", ", j, "] = ", b, " outside [0, ",
             cache.num_blocks, ") (num_blocks of the caches), used by a sequence of ", n,
             " tokens");
      }
    }
  }
}

void check_scale(double scale) {
  if (!std::isfinite(scale)) fail("argument 'scale' must be finite, got ", scale);
}

void check_window(int64_t window) {
  if (window < 0) fail("argument 'window' must be >= 0 (0: no sliding window), got ", window);
}

PagedCall paged_call(const Tensor& out, const Tensor& query, const PagedCache& cache,
                     const Tensor& block_tables, const Tensor& seq_lens, double scale) {
  PagedCall a;
  a.out = out.ptr<float>();
  a.query = query.data;
  a.query_bf16 = query.dtype == DType::kBFloat16;
  a.q_stride0 = query.stride[0];
  a.cache = cache;
  a.tables = block_tables.ptr<int32_t>();
  a.table_width = block_tables.size(1);
  a.lens = seq_lens.ptr<int32_t>();
  a.num_seqs = seq_lens.size(0);
  a.num_heads = query.size(1);
  a.scale = static_cast<float>(scale);
  return a;
}

}  // namespace xllm::attn
