// Paged attention for prefill and extend: several new tokens per sequence,
// causal against a paged context that may already hold earlier tokens (chunked
// prefill, prefix-cache hits).
//
// Work items are (sequence, KV head, tile of query tokens). A tile's rows are
// its tokens times the KV head's query heads, token-major, so row positions
// never decrease and the causal mask is a prefix of each row; the tile walks
// the context up to its last token only (attend.h). Items are handed out
// largest first so the long tiles at the end of a prompt do not finish last.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "attention/args.h"
#include "attention/ops.h"
#include "attention/prefill.h"

namespace xllm::attn {
namespace {

constexpr int kTileRows = 32;    // query rows (tokens x group heads) per tile, about
constexpr int kChunkTarget = 64;  // key tokens per online-softmax step

template <class KT>
void run(const Prefill& a, Isa isa) {
  const Kernels<KT> kern = kernels_for<KT>(isa, a.cache.head_size);
  const SoftmaxFn softmax = softmax_for(isa);
  const KvView<KT> kv(a.cache);
  const int64_t nkv = a.cache.num_kv_heads;
  const int hs = static_cast<int>(a.cache.head_size);
  const int group = static_cast<int>(a.num_heads / nkv);
  const int tile_tokens = std::max(1, kTileRows / group);
  const int max_rows = tile_tokens * group;

  const std::vector<Item> items = query_tiles(a, tile_tokens);
  int64_t macs = 0;  // QK and PV over the keys each tile visits
  for (const Item& it : items) macs += 2 * it.cost * a.num_heads * hs;
  const int threads = threads_for(macs);

  const int chunk = chunk_tokens(a.cache.block_size, kChunkTarget);
  const size_t per_thread = TileState::floats(max_rows, hs, chunk);
  float* scratch = caller_scratch(per_thread * threads);
  const int64_t num_items = static_cast<int64_t>(items.size()) * nkv;
  const int64_t out_s0 = a.num_heads * hs;
#pragma omp parallel num_threads(threads)
  {
    float* mine = scratch + per_thread * omp_get_thread_num();
    TileState st = TileState::carve(mine, max_rows, hs, chunk);
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < num_items; ++w) {
      const Item it = items[w / nkv];
      const int64_t head = w % nkv;
      const int64_t q_len = a.starts[it.seq + 1] - a.starts[it.seq];
      const int64_t past = a.lens[it.seq] - q_len;
      const int64_t row0 = a.starts[it.seq] + it.first;  // first query row of the tile
      const int rows = it.ntok * group;
      for (int j = 0; j < it.ntok; ++j) {
        for (int g = 0; g < group; ++g) {
          const int r = j * group + g;
          load_scaled(a.query, a.query_bf16, (row0 + j) * a.q_stride0 + (head * group + g) * hs,
                      hs, a.scale, st.q + static_cast<int64_t>(r) * hs);
          st.pos[r] = static_cast<int>(past + it.first + j);
          st.lo[r] = static_cast<int>(a.first_key(past + it.first + j));
        }
      }
      st.reset(rows, hs);
      const int64_t keys = past + it.first + it.ntok;  // the tile's last token sees all before it
      // From the block holding the first row's first key (0 without a window).
      const int64_t k0 = st.lo[0] / a.cache.block_size * a.cache.block_size;
      attend_range(kern, softmax, kv, head, a.tables + it.seq * a.table_width, k0, keys, rows,
                   st);
      for (int j = 0; j < it.ntok; ++j) {
        for (int g = 0; g < group; ++g) {
          const int r = j * group + g;
          float* o = a.out + (row0 + j) * out_s0 + (head * group + g) * hs;
          const float* src = st.acc + static_cast<int64_t>(r) * hs;
          const float inv = 1.0f / st.l[r];
          for (int d = 0; d < hs; ++d) o[d] = src[d] * inv;
        }
      }
    }
  }
}

}  // namespace

std::vector<Item> query_tiles(const Prefill& a, int tile_tokens) {
  std::vector<Item> items;
  for (int64_t i = 0; i < a.num_seqs; ++i) {
    const int32_t q_len = a.starts[i + 1] - a.starts[i];
    const int32_t past = a.lens[i] - q_len;  // tokens before the first query token
    for (int32_t j = 0; j < q_len; j += tile_tokens) {
      const int32_t n = std::min(tile_tokens, q_len - j);
      items.push_back({static_cast<int32_t>(i), j, n, int64_t{n} * (past + j + n)});
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& x, const Item& y) { return x.cost > y.cost; });
  return items;
}

namespace {

void check_query_starts(const Tensor& starts, const Tensor& seq_lens, int64_t num_tokens) {
  check_ndim(starts, 1, "[num_seqs + 1]");
  check_dtype(starts, DType::kInt32);
  check_contiguous(starts);
  const int64_t num_seqs = seq_lens.size(0);
  check_dim(starts, 0, num_seqs + 1, "num_seqs + 1 (from seq_lens)");
  const int32_t* s = starts.ptr<int32_t>();
  const int32_t* lens = seq_lens.ptr<int32_t>();
  if (s[0] != 0) fail("argument 'query_start_loc' must start at 0, got ", s[0]);
  for (int64_t i = 0; i < num_seqs; ++i) {
    if (s[i + 1] < s[i]) {
      fail("argument 'query_start_loc' must be non-decreasing, got query_start_loc[", i, "] = ",
           s[i], " > query_start_loc[", i + 1, "] = ", s[i + 1]);
    }
    if (s[i + 1] - s[i] > lens[i]) {
      fail("argument 'query_start_loc' gives sequence ", i, " ", s[i + 1] - s[i],
           " query tokens, more than its seq_lens[", i, "] = ", lens[i],
           " (the query tokens are the context's last ones)");
    }
  }
  if (s[num_seqs] != num_tokens) {
    fail("argument 'query_start_loc' ends at ", s[num_seqs], " but query has ", num_tokens,
         " tokens (dimension 0)");
  }
}

}  // namespace

void paged_attention_prefill(py::handle out_obj, py::handle query_obj, py::handle key_cache_obj,
                             py::handle value_cache_obj, py::handle block_tables_obj,
                             py::handle query_start_loc_obj, py::handle seq_lens_obj,
                             double scale, int64_t window) {
  const Tensor out = host_tensor(out_obj, "out");
  const Tensor query = host_tensor(query_obj, "query");
  const Tensor key_cache = host_tensor(key_cache_obj, "key_cache");
  const Tensor value_cache = host_tensor(value_cache_obj, "value_cache");
  const Tensor block_tables = host_tensor(block_tables_obj, "block_tables");
  const Tensor starts = host_tensor(query_start_loc_obj, "query_start_loc");
  const Tensor seq_lens = host_tensor(seq_lens_obj, "seq_lens");
  py::gil_scoped_release release;
  paged_attention_prefill(out, query, key_cache, value_cache, block_tables, starts, seq_lens,
                          scale, window);
}

void paged_attention_prefill(const Tensor& out, const Tensor& query, const Tensor& key_cache,
                             const Tensor& value_cache, const Tensor& block_tables,
                             const Tensor& starts, const Tensor& seq_lens, double scale,
                             int64_t window) {

  const PagedCache cache = check_caches(key_cache, value_cache);
  check_rows(query, -1, "", -1, "", cache.head_size);
  check_heads(query, cache);
  check_out(out, query);
  check_context(block_tables, seq_lens, cache);
  check_query_starts(starts, seq_lens, query.size(0));
  check_scale(scale);
  check_window(window);

  Prefill a{paged_call(out, query, cache, block_tables, seq_lens, scale), starts.ptr<int32_t>()};
  a.window = window;
  if (query.size(0) == 0) return;

  const Isa isa = active_isa();
  // The tile path has no window mask: windowed layers take the vector kernels.
  if ((cache.bf16 || cache.q8) && isa >= Isa::kAmx && window == 0 && prefill_amx(a)) return;
  if (cache.bf16) run<bf16_t>(a, isa);
  else if (cache.q8) run<q8_t>(a, isa);
  else run<float>(a, isa);
}

}  // namespace xllm::attn
