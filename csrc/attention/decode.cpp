// Paged attention for decode: one query token per sequence (its last token)
// against its whole paged context.
//
// Work items are (sequence, partition); a thread takes an item's KV heads one after
// the other (a block holds them side by side, so it streams the block's K, then V,
// contiguously: 1.1-1.3x on batches of 16-64 against spreading the heads over threads).
// A KV head's query heads (its GQA group) form one tile of rows, so each K/V row is read
// from memory once. When there are too few sequences to keep every thread busy, as with
// a batch of one and a long context, sequences are split into partitions of whole
// blocks (flash-decoding); each partition keeps its own max, sum and unnormalised
// output, and a second pass merges them. If that still leaves too few items, their KV
// heads are split into pieces. With a sliding window, a sequence's range starts at the
// block holding its window's first key; the blocks before it are never read.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "attention/args.h"
#include "attention/ops.h"

namespace xllm::attn {
namespace {

constexpr int kChunkTarget = 128;     // tokens scored per online-softmax step
constexpr int64_t kMinPartition = 128;  // never split a context finer than this

struct Item {
  int32_t seq, part;
};

template <class KT>
void run(const PagedCall& a, Isa isa) {  // a query row per sequence
  const Kernels<KT> kern = kernels_for<KT>(isa, a.cache.head_size);
  const SoftmaxFn softmax = softmax_for(isa);
  const KvView<KT> kv(a.cache);
  const int64_t nkv = a.cache.num_kv_heads, bs = a.cache.block_size;
  const int hs = static_cast<int>(a.cache.head_size);
  const int group = static_cast<int>(a.num_heads / nkv);
  // Partition length: whole blocks, long enough that merging costs little, and no
  // longer than an eighth of a thread's fair share of the work, so that dynamic
  // scheduling can balance it. Large batches of similar lengths are never split; a
  // batch of one, or one long sequence among short ones, is.
  // The first context token each sequence reads: the block holding its window's first key.
  auto start_of = [&](int64_t i) { return a.first_key(a.lens[i] - 1) / bs * bs; };
  int64_t total = 0;
  for (int64_t i = 0; i < a.num_seqs; ++i) total += a.lens[i] - (a.lens[i] ? start_of(i) : 0);
  const int threads = threads_for(2 * total * a.num_heads * hs);
  const int64_t want_items = 8 * static_cast<int64_t>(threads);
  int64_t part_len = std::max(kMinPartition, (total + want_items - 1) / want_items);
  if (threads == 1) part_len = std::max<int64_t>(total, 1);  // one thread: never split
  part_len = (part_len + bs - 1) / bs * bs;

  // Items, and where split sequences keep their partial results.
  std::vector<Item> items;
  std::vector<int64_t> partial_base(a.num_seqs, -1);
  int64_t num_partials = 0;
  for (int64_t i = 0; i < a.num_seqs; ++i) {
    const int64_t n = a.lens[i];
    if (n == 0) {
      std::fill(a.out + i * a.num_heads * hs, a.out + (i + 1) * a.num_heads * hs, 0.0f);
      continue;
    }
    const int64_t parts = (n - start_of(i) + part_len - 1) / part_len;
    if (parts > 1) {
      partial_base[i] = num_partials;
      num_partials += parts;
    }
    for (int64_t p = 0; p < parts; ++p) {
      items.push_back({static_cast<int32_t>(i), static_cast<int32_t>(p)});
    }
  }
  std::vector<int64_t> split_seqs;
  for (int64_t i = 0; i < a.num_seqs; ++i) {
    if (partial_base[i] >= 0) split_seqs.push_back(i);
  }

  const int chunk = chunk_tokens(bs, kChunkTarget);
  const size_t per_thread = TileState::floats(group, hs, chunk);
  // Partial results: acc [num_partials, nkv, group, hs], then m and l [.., nkv, group].
  const size_t partial_rows = static_cast<size_t>(num_partials) * nkv * group;
  float* scratch = caller_scratch(per_thread * threads + partial_rows * (hs + 2));
  float* part_acc = scratch + per_thread * threads;
  float* part_m = part_acc + partial_rows * hs;
  float* part_l = part_m + partial_rows;

  // Too few items to keep the threads busy (a short batch of one): split their KV heads
  // into pieces, down to one head a piece.
  const int64_t pieces = std::clamp<int64_t>(
      (want_items + static_cast<int64_t>(items.size()) - 1) /
          std::max<int64_t>(1, static_cast<int64_t>(items.size())), 1, nkv);
  const int64_t per_piece = (nkv + pieces - 1) / pieces;
  const int64_t num_items = static_cast<int64_t>(items.size()) * pieces;
  const int64_t out_s0 = a.num_heads * hs;
#pragma omp parallel num_threads(threads)
  {
    float* mine = scratch + per_thread * omp_get_thread_num();
    TileState st = TileState::carve(mine, group, hs, chunk);
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < num_items; ++w) {
      const Item it = items[w / pieces];
      const int64_t n = a.lens[it.seq];
      const int64_t k0 = start_of(it.seq) + it.part * part_len, k1 = std::min(n, k0 + part_len);
      const int lo = static_cast<int>(a.first_key(n - 1));
      const int64_t h0 = (w % pieces) * per_piece, h1 = std::min(nkv, h0 + per_piece);
      for (int64_t head = h0; head < h1; ++head) {
        for (int g = 0; g < group; ++g) {
          const int64_t qh = head * group + g;
          load_scaled(a.query, a.query_bf16, it.seq * a.q_stride0 + qh * hs, hs, a.scale,
                      st.q + g * hs);
          st.pos[g] = static_cast<int>(n - 1);
          st.lo[g] = lo;
        }
        st.reset(group, hs);
        attend_range(kern, softmax, kv, head, a.tables + it.seq * a.table_width, k0, k1, group,
                     st);
        if (partial_base[it.seq] < 0) {
          for (int g = 0; g < group; ++g) {
            float* o = a.out + it.seq * out_s0 + (head * group + g) * hs;
            const float inv = 1.0f / st.l[g];
            for (int d = 0; d < hs; ++d) o[d] = st.acc[g * hs + d] * inv;
          }
        } else {
          const int64_t row = ((partial_base[it.seq] + it.part) * nkv + head) * group;
          std::copy(st.acc, st.acc + static_cast<size_t>(group) * hs, part_acc + row * hs);
          std::copy(st.m, st.m + group, part_m + row);
          std::copy(st.l, st.l + group, part_l + row);
        }
      }
    }
    // Merge partitions: out = sum_p e^(m_p - M) acc_p / sum_p e^(m_p - M) l_p.
    const int64_t num_merges = static_cast<int64_t>(split_seqs.size()) * a.num_heads;
#pragma omp for schedule(static)
    for (int64_t w = 0; w < num_merges; ++w) {
      const int64_t i = split_seqs[w / a.num_heads], qh = w % a.num_heads;
      const int64_t head = qh / group, g = qh % group;
      const int64_t parts = (a.lens[i] - start_of(i) + part_len - 1) / part_len;
      auto row = [&](int64_t p) { return ((partial_base[i] + p) * nkv + head) * group + g; };
      float mx = -INFINITY;
      for (int64_t p = 0; p < parts; ++p) mx = std::max(mx, part_m[row(p)]);
      float* o = a.out + i * out_s0 + qh * hs;
      std::fill(o, o + hs, 0.0f);
      float denom = 0;
      for (int64_t p = 0; p < parts; ++p) {
        const float wgt = std::exp(part_m[row(p)] - mx);
        denom += wgt * part_l[row(p)];
        const float* src = part_acc + row(p) * hs;
        for (int d = 0; d < hs; ++d) o[d] += wgt * src[d];
      }
      const float inv = 1.0f / denom;
      for (int d = 0; d < hs; ++d) o[d] *= inv;
    }
  }
}

}  // namespace

void paged_attention_decode(py::handle out_obj, py::handle query_obj, py::handle key_cache_obj,
                            py::handle value_cache_obj, py::handle block_tables_obj,
                            py::handle seq_lens_obj, double scale, int64_t window) {
  const Tensor out = host_tensor(out_obj, "out");
  const Tensor query = host_tensor(query_obj, "query");
  const Tensor key_cache = host_tensor(key_cache_obj, "key_cache");
  const Tensor value_cache = host_tensor(value_cache_obj, "value_cache");
  const Tensor block_tables = host_tensor(block_tables_obj, "block_tables");
  const Tensor seq_lens = host_tensor(seq_lens_obj, "seq_lens");
  py::gil_scoped_release release;
  paged_attention_decode(out, query, key_cache, value_cache, block_tables, seq_lens, scale,
                         window);
}

void paged_attention_decode(const Tensor& out, const Tensor& query, const Tensor& key_cache,
                            const Tensor& value_cache, const Tensor& block_tables,
                            const Tensor& seq_lens, double scale, int64_t window) {

  const PagedCache cache = check_caches(key_cache, value_cache);
  check_rows(query, -1, "", -1, "", cache.head_size);
  check_heads(query, cache);
  check_out(out, query);
  check_context(block_tables, seq_lens, cache);
  check_dim(query, 0, seq_lens.size(0), "seq_lens' num_seqs");
  check_scale(scale);

  check_window(window);
  PagedCall a = paged_call(out, query, cache, block_tables, seq_lens, scale);
  a.window = window;
  if (a.num_seqs == 0) return;

  const Isa isa = active_isa();
  if (cache.bf16) run<bf16_t>(a, isa);
  else if (cache.q8) run<q8_t>(a, isa);
  else run<float>(a, isa);
}

}  // namespace xllm::attn
