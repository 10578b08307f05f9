// Prefill attention on AMX tiles (prefill.h).
//
// Two phases in one parallel region:
//
// 1. Pack every (sequence, KV head)'s context once into the layouts the tiles read, bf16
//    pairs along the reduction dimension: K as the B operand of S = Q K^T (pairs of head
//    dimensions x 16 keys), V as the B operand of O = P V (pairs of keys x 16 head
//    dimensions). Positions past the context are zeros (a masked weight times a NaN left
//    in a block's unused tail would otherwise poison the sum).
// 2. Tiles of 16 query rows (tokens x the KV head's query heads, token-major) each
//    compute their scores against every key up to their last token in 16 x 16 fp32
//    tiles, then a plain (not online) softmax per row in zmm registers, weights rounded to
//    bf16 once, then O = P V in up to 4 output tiles at a time. Materialising a tile's
//    scores (16 x context floats) instead of rescaling running sums keeps every product
//    in the tiles. Items go out largest first. With head sizes up to 64 an item is two
//    tiles (32 rows) whose products share each K and V tile loaded: a product otherwise
//    loads a 1 KB tile from L2 for its 8192 MACs (Llama-3.2-1B's shapes: 1.1x at 509-2048
//    tokens, 1.2-1.35x at 4000).
#include "attention/prefill.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "quant/bf16_gemm.h"

#if defined(__x86_64__)

namespace xllm::attn {
namespace {

constexpr int kRows = 16;                      // query rows per tile
// Query rows per work item: two tiles that share each K tile loaded (scores_pair) where
// their Q fits in four tiles (head size up to 64), else one.
template <int NQ>
constexpr int item_rows() { return NQ <= 2 ? 2 * kRows : kRows; }
constexpr int64_t kMaxPackBytes = int64_t{1} << 28;  // beyond this, the vector path

// Where each (sequence, head)'s packed K and V live: K at pack + offset, V after it.
struct Packs {
  std::vector<int64_t> offset;  // [num_seqs * nkv] in bf16 elements
  std::vector<int64_t> padded;  // [num_seqs] context length rounded up to 32
};

// K of keys [k0, k0 + 32) of one (sequence, head) into its packed layout
// [key group of 16][head-dim block of 32][pair p][key t][e], and V into
// [key block of 32][head-dim group of 16][key pair p][dim d][e].
// bf16(q[d] * scale) for a q8 row (hs a multiple of 32), rounded to nearest even.
XLLM_AMX void widen_q8(const q8_t* q, float scale, int hs, bf16_t* out) {
  const __m512 vs = _mm512_set1_ps(scale);
  for (int d = 0; d < hs; d += 32) {
    const __m512 lo = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
            reinterpret_cast<const __m128i*>(q + d)))), vs);
    const __m512 hi = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
            reinterpret_cast<const __m128i*>(q + d + 16)))), vs);
    _mm512_storeu_si512(out + d, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}

// A q8 cache's rows are widened to bf16 here (q times the row's scale, rounded once).
template <class KT>
void pack_block(const KvView<KT>& kv, const int32_t* table, int64_t head, int64_t len,
                int64_t k0, int hs, bf16_t* kp, bf16_t* vp) {
  const int nd32 = hs / 32, nd16 = hs / 16;
  bf16_t kw[256], vw[256];  // a q8 row in bf16 (hs <= 128 here)
  for (int t = 0; t < 32; ++t) {
    const int64_t key = k0 + t;
    const bf16_t* krow = nullptr;
    const bf16_t* vrow = nullptr;
    if (key < len) {
      const int32_t block = table[key / kv.block_size];
      const int64_t off = (key % kv.block_size) * row_stride<KT>(hs);
      if constexpr (std::is_same_v<KT, q8_t>) {
        const q8_t* kq = kv.k_rows(block, head) + off;
        const q8_t* vq = kv.v_rows(block, head) + off;
        widen_q8(kq, row_scale(kq, hs), hs, kw);
        widen_q8(vq, row_scale(vq, hs), hs, vw);
        krow = kw;
        vrow = vw;
      } else {
        krow = kv.k_rows(block, head) + off;
        vrow = kv.v_rows(block, head) + off;
      }
    }
    // K: group (k0 + t) / 16, key t % 16 in it.
    bf16_t* kg = kp + ((k0 + t) / 16) * nd32 * 512 + (t % 16) * 2;
    for (int d = 0; d < hs; d += 2) {
      bf16_t* dst = kg + (d / 32) * 512 + ((d % 32) / 2) * 32;
      dst[0] = krow ? krow[d] : 0;
      dst[1] = krow ? krow[d + 1] : 0;
    }
    // V: block k0 / 32, pair t / 2, element t % 2.
    bf16_t* vb = vp + (k0 / 32) * nd16 * 512 + (t / 2) * 32 + (t % 2);
    for (int d = 0; d < hs; ++d) vb[(d / 16) * 512 + (d % 16) * 2] = vrow ? vrow[d] : 0;
  }
}

// S [16, 16 * ngroups] (row stride lds floats) = Q K^T over key groups [0, ngroups); Q is
// in tiles 4 .. 4 + NQ - 1.
template <int NQ>
XLLM_AMX void scores(const bf16_t* kp, int64_t ngroups, float* s, int64_t lds) {
  const int64_t stride = static_cast<int64_t>(lds) * sizeof(float);
  for (int64_t g = 0; g < ngroups; g += 2) {
    const bool two = g + 1 < ngroups;
    const bf16_t* k0 = kp + g * NQ * 512;
    const bf16_t* k1 = k0 + NQ * 512;
    _tile_zero(0);
    if (two) _tile_zero(1);
    _tile_loadd(2, k0, 64);
    _tile_dpbf16ps(0, 4, 2);
    if (two) { _tile_loadd(3, k1, 64); _tile_dpbf16ps(1, 4, 3); }
    if (NQ > 1) {
      _tile_loadd(2, k0 + 512, 64);
      _tile_dpbf16ps(0, 5, 2);
      if (two) { _tile_loadd(3, k1 + 512, 64); _tile_dpbf16ps(1, 5, 3); }
    }
    if (NQ > 2) {
      _tile_loadd(2, k0 + 1024, 64);
      _tile_dpbf16ps(0, 6, 2);
      if (two) { _tile_loadd(3, k1 + 1024, 64); _tile_dpbf16ps(1, 6, 3); }
    }
    if (NQ > 3) {
      _tile_loadd(2, k0 + 1536, 64);
      _tile_dpbf16ps(0, 7, 2);
      if (two) { _tile_loadd(3, k1 + 1536, 64); _tile_dpbf16ps(1, 7, 3); }
    }
    _tile_stored(0, s + g * 16, stride);
    if (two) _tile_stored(1, s + g * 16 + 16, stride);
  }
}

// Two 16-row query tiles against the same keys (NQ <= 2: the first tile's Q in tiles 4 ..
// 4 + NQ - 1, the second's in 4 + NQ ..): each K tile loaded feeds both, halving the K
// loads a product. S rows 0-15 are the first tile's, rows 16-31 the second's.
template <int NQ>
XLLM_AMX void scores_pair(const bf16_t* kp, int64_t ngroups, float* s, int64_t lds) {
  static_assert(NQ <= 2, "two query tiles need 2 NQ <= 4 tiles");
  const int64_t stride = static_cast<int64_t>(lds) * sizeof(float);
  float* s1 = s + 16 * lds;
  for (int64_t g = 0; g < ngroups; ++g) {
    const bf16_t* k0 = kp + g * NQ * 512;
    _tile_zero(0);
    _tile_zero(1);
    _tile_loadd(2, k0, 64);
    _tile_dpbf16ps(0, 4, 2);
    if constexpr (NQ == 1) {
      _tile_dpbf16ps(1, 5, 2);
    } else {
      _tile_dpbf16ps(1, 6, 2);
    }
    if (NQ > 1) {
      _tile_loadd(3, k0 + 512, 64);
      _tile_dpbf16ps(0, 5, 3);
      _tile_dpbf16ps(1, 7, 3);
    }
    _tile_stored(0, s + g * 16, stride);
    _tile_stored(1, s1 + g * 16, stride);
  }
}

template <int NQ>
XLLM_AMX void load_query(const bf16_t* qb, int hs) {
  const int64_t stride = static_cast<int64_t>(hs) * sizeof(bf16_t);
  _tile_loadd(4, qb, stride);
  if (NQ > 1) _tile_loadd(5, qb + 32, stride);
  if (NQ > 2) _tile_loadd(6, qb + 64, stride);
  if (NQ > 3) _tile_loadd(7, qb + 96, stride);
}

// Query rows 16-31 (the second tile of scores_pair) into tiles 4 + NQ ...
template <int NQ>
XLLM_AMX void load_query_second(const bf16_t* qb, int hs) {
  const int64_t stride = static_cast<int64_t>(hs) * sizeof(bf16_t);
  const bf16_t* q1 = qb + 16 * hs;
  if constexpr (NQ == 1) {
    _tile_loadd(5, q1, stride);
  } else {
    _tile_loadd(6, q1, stride);
    _tile_loadd(7, q1 + 32, stride);
  }
}

// O [16, 16 * NC] (row stride ldo floats) = P [16, 32 * nblocks] (row stride ldp) V for
// head-dim groups [c0, c0 + NC) of the packed V.
template <int NC>
XLLM_AMX void weighted_sum(const bf16_t* p, int64_t ldp, const bf16_t* vp, int64_t nblocks,
                           int nd16, int c0, float* o, int64_t ldo) {
  _tile_zero(0);
  if (NC > 1) _tile_zero(1);
  if (NC > 2) _tile_zero(2);
  if (NC > 3) _tile_zero(3);
  const int64_t pstride = ldp * static_cast<int64_t>(sizeof(bf16_t));
  for (int64_t b = 0; b < nblocks; ++b) {
    _tile_loadd(4, p + b * 32, pstride);
    const bf16_t* v = vp + (b * nd16 + c0) * 512;
    _tile_loadd(5, v, 64);
    _tile_dpbf16ps(0, 4, 5);
    if (NC > 1) { _tile_loadd(6, v + 512, 64); _tile_dpbf16ps(1, 4, 6); }
    if (NC > 2) { _tile_loadd(7, v + 1024, 64); _tile_dpbf16ps(2, 4, 7); }
    if (NC > 3) { _tile_loadd(5, v + 1536, 64); _tile_dpbf16ps(3, 4, 5); }
  }
  const int64_t ostride = ldo * static_cast<int64_t>(sizeof(float));
  _tile_stored(0, o + c0 * 16, ostride);
  if (NC > 1) _tile_stored(1, o + c0 * 16 + 16, ostride);
  if (NC > 2) _tile_stored(2, o + c0 * 16 + 32, ostride);
  if (NC > 3) _tile_stored(3, o + c0 * 16 + 48, ostride);
}

// weighted_sum for two 16-row tiles of P (rows 0-15 and 16-31 of p, o) and head-dim groups
// [c0, c0 + 2): each V tile loaded feeds both (sums in tiles 0-1 and 2-3, P in 4-5).
XLLM_AMX void weighted_sum_pair(const bf16_t* p, int64_t ldp, const bf16_t* vp, int64_t nblocks,
                                int nd16, int c0, float* o, int64_t ldo) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const int64_t pstride = ldp * static_cast<int64_t>(sizeof(bf16_t));
  const bf16_t* p1 = p + 16 * ldp;
  for (int64_t b = 0; b < nblocks; ++b) {
    const bf16_t* v = vp + (b * nd16 + c0) * 512;
    _tile_loadd(4, p + b * 32, pstride);
    _tile_loadd(6, v, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(5, p1 + b * 32, pstride);
    _tile_dpbf16ps(2, 5, 6);
    _tile_loadd(7, v + 512, 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(3, 5, 7);
  }
  const int64_t ostride = ldo * static_cast<int64_t>(sizeof(float));
  float* o1 = o + 16 * ldo;
  _tile_stored(0, o + c0 * 16, ostride);
  _tile_stored(1, o + c0 * 16 + 16, ostride);
  _tile_stored(2, o1 + c0 * 16, ostride);
  _tile_stored(3, o1 + c0 * 16 + 16, ostride);
}

// exp(x) for x <= 0, to 4e-6 relative: the weights are rounded to bf16 (2^-9) next, so
// exp16's fp32 accuracy (and its range checks: x here is a score less the row's largest)
// buys nothing. 2^(x log2 e) = 2^n 2^f, f in [-0.5, 0.5], 2^f by a degree-4 polynomial
// (a Chebyshev fit). 10 instructions against exp16's 15: the softmax, not the tiles, was
// the largest part of a long prompt's attention (42% at 4000 tokens, perf).
XLLM_AMX inline __m512 exp_nonpositive(__m512 x) {
  // (max(lo, x), not max(x, lo): a NaN x stays NaN.) Below -87, 2^-126: 0 once in bf16 sums.
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(_mm512_set1_ps(-87.0f), x),
                                 _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 y = _mm512_fmadd_ps(_mm512_set1_ps(9.676037356e-3f), f, _mm512_set1_ps(5.592203513e-2f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.402210683e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.931210160e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.000000119f));
  return _mm512_scalef_ps(y, n);
}

// Row r of s (fp32 scores, valid columns [0, valid)) -> p (bf16 weights exp(s - max), zeros
// in [valid, width)); returns the sum of the weights as rounded.
XLLM_AMX float softmax_row(const float* s, int64_t valid, int64_t width, bf16_t* p) {
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 16 <= valid; i += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + i));
  if (i < valid) {
    const __mmask16 m = first_lanes(valid - i);
    vmax = _mm512_mask_max_ps(vmax, m, vmax, _mm512_maskz_loadu_ps(m, s + i));
  }
  const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
  __m512 sum = _mm512_setzero_ps();
  const __m512i high = _mm512_set1_epi32(-65536);
  for (i = 0; i < width; i += 32) {
    __m512 e[2];
    if (i + 32 <= valid) {
      e[0] = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + i), mx));
      e[1] = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + i + 16), mx));
    } else {
      for (int h = 0; h < 2; ++h) {
        const int64_t at = i + 16 * h;
        const __mmask16 m = first_lanes(valid - at);
        e[h] = _mm512_maskz_mov_ps(
            m, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + at), mx)));
      }
    }
    const __m512bh b = _mm512_cvtne2ps_pbh(e[1], e[0]);
    _mm512_storeu_si512(p + i, (__m512i)b);
    // The sum of what the products will use: the weights rounded to bf16, widened back.
    const __m512i bits = (__m512i)b;
    const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
    const __m512 hi = _mm512_castsi512_ps(_mm512_and_si512(bits, high));
    sum = _mm512_add_ps(sum, _mm512_add_ps(lo, hi));
  }
  return _mm512_reduce_add_ps(sum);
}

// x [hs] (fp32 or bf16) times scale -> dst [hs] bf16.
XLLM_AMX void scaled_bf16(const void* src, bool bf16, int hs, float scale, bf16_t* dst) {
  const __m512 sc = _mm512_set1_ps(scale);
  for (int d = 0; d < hs; d += 32) {
    const __m512 lo = _mm512_mul_ps(load16(src, bf16, d), sc);
    const __m512 hi = _mm512_mul_ps(load16(src, bf16, d + 16), sc);
    _mm512_storeu_si512(dst + d, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}

template <int NQ, class KT>
XLLM_AMX void run(const Prefill& a, const Packs& packs, bf16_t* pack,
                  const std::vector<Item>& items, int64_t max_padded, float* scratch,
                  size_t per_thread, int threads) {
  const KvView<KT> kv(a.cache);
  const int64_t nkv = a.cache.num_kv_heads;
  const int hs = static_cast<int>(a.cache.head_size);
  const int nd16 = hs / 16;
  const int group = static_cast<int>(a.num_heads / nkv);
  const int64_t num_items = static_cast<int64_t>(items.size()) * nkv;
  const int64_t out_s0 = a.num_heads * hs;
  const int64_t qsize = a.query_bf16 ? 2 : 4;
#pragma omp parallel num_threads(threads)
  {
    // Phase 1: pack 32 keys of one (sequence, head) per unit.
#pragma omp for schedule(static)
    for (int64_t sh = 0; sh < a.num_seqs * nkv; ++sh) {
      const int64_t seq = sh / nkv, head = sh % nkv;
      bf16_t* kp = pack + packs.offset[sh];
      bf16_t* vp = kp + packs.padded[seq] * hs;
      for (int64_t k0 = 0; k0 < packs.padded[seq]; k0 += 32) {
        pack_block(kv, a.tables + seq * a.table_width, head, a.lens[seq], k0, hs, kp, vp);
      }
    }
    // Phase 2: the query tiles, two at a time (item_rows<NQ>() rows) where they fit.
    constexpr int kItem = item_rows<NQ>();
    float* mine = scratch + per_thread * omp_get_thread_num();
    float* s = mine;                                   // [kItem, max_padded] scores
    float* o = s + kItem * max_padded;                 // [kItem, hs] weighted sums
    auto* p = reinterpret_cast<bf16_t*>(o + kItem * hs);  // [kItem, max_padded] weights
    bf16_t* qb = p + kItem * max_padded;               // [kItem, hs] query rows
    float* l = reinterpret_cast<float*>(qb + kItem * hs);  // [kItem]
    quant::amx_begin();
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < num_items; ++w) {
      const Item it = items[w / nkv];
      const int64_t head = w % nkv;
      const int64_t q_len = a.starts[it.seq + 1] - a.starts[it.seq];
      const int64_t past = a.lens[it.seq] - q_len;
      const int64_t row0 = a.starts[it.seq] + it.first;
      const int rows = it.ntok * group;
      const int used = rows > kRows ? 2 * kRows : kRows;  // rows in the tiles: one or two
      for (int r = 0; r < used; ++r) {
        if (r < rows) {
          const int64_t at = (row0 + r / group) * a.q_stride0 + (head * group + r % group) * hs;
          scaled_bf16(static_cast<const char*>(a.query) + at * qsize, a.query_bf16, hs,
                      a.scale, qb + r * hs);
        } else {
          std::fill(qb + r * hs, qb + (r + 1) * hs, bf16_t{0});
        }
      }
      const int64_t keys = past + it.first + it.ntok;  // what the item's last row sees
      const int64_t width = (keys + 31) / 32 * 32;
      const bf16_t* kp = pack + packs.offset[it.seq * nkv + head];
      const bf16_t* vp = kp + packs.padded[it.seq] * hs;
      load_query<NQ>(qb, hs);
      bool paired = false;  // (rows past 16: only where an item holds two tiles)
      if constexpr (kItem > kRows) {
        paired = used > kRows;
        if (paired) {
          load_query_second<NQ>(qb, hs);
          scores_pair<NQ>(kp, width / 16, s, max_padded);
        }
      }
      if (!paired) scores<NQ>(kp, width / 16, s, max_padded);
      for (int r = 0; r < used; ++r) {
        if (r < rows) {
          const int64_t valid = past + it.first + r / group + 1;
          l[r] = softmax_row(s + r * max_padded, valid, width, p + r * max_padded);
        } else {
          std::fill(p + r * max_padded, p + r * max_padded + width, bf16_t{0});
        }
      }
      if (paired) {  // both tiles from each V tile loaded (nd16 is 2 or 4 here)
        for (int c0 = 0; c0 < nd16; c0 += 2) {
          weighted_sum_pair(p, max_padded, vp, width / 32, nd16, c0, o, hs);
        }
      } else {
        for (int c0 = 0; c0 < nd16; c0 += 4) {
          switch (std::min(4, nd16 - c0)) {
            case 4: weighted_sum<4>(p, max_padded, vp, width / 32, nd16, c0, o, hs); break;
            case 3: weighted_sum<3>(p, max_padded, vp, width / 32, nd16, c0, o, hs); break;
            case 2: weighted_sum<2>(p, max_padded, vp, width / 32, nd16, c0, o, hs); break;
            default: weighted_sum<1>(p, max_padded, vp, width / 32, nd16, c0, o, hs); break;
          }
        }
      }
      for (int r = 0; r < rows; ++r) {
        float* dst = a.out + (row0 + r / group) * out_s0 + (head * group + r % group) * hs;
        const __m512 inv = _mm512_set1_ps(1.0f / l[r]);
        for (int d = 0; d < hs; d += 16) {
          _mm512_storeu_ps(dst + d, _mm512_mul_ps(_mm512_loadu_ps(o + r * hs + d), inv));
        }
      }
    }
    quant::amx_end();
  }
}

template <class KT>
void dispatch(const Prefill& a, const Packs& packs, bf16_t* pack, const std::vector<Item>& items,
              int64_t max_padded, float* scratch, size_t per_thread, int threads) {
  switch (a.cache.head_size / 32) {
    case 1: run<1, KT>(a, packs, pack, items, max_padded, scratch, per_thread, threads); break;
    case 2: run<2, KT>(a, packs, pack, items, max_padded, scratch, per_thread, threads); break;
    case 3: run<3, KT>(a, packs, pack, items, max_padded, scratch, per_thread, threads); break;
    default: run<4, KT>(a, packs, pack, items, max_padded, scratch, per_thread, threads); break;
  }
}

}  // namespace

bool prefill_amx(const Prefill& a) {
  const int64_t nkv = a.cache.num_kv_heads;
  const int hs = static_cast<int>(a.cache.head_size);
  const int group = static_cast<int>(a.num_heads / nkv);
  if (!(a.cache.bf16 || a.cache.q8) || hs % 32 || hs > 128 || group > kRows) return false;
  Packs packs;
  packs.offset.resize(a.num_seqs * nkv);
  packs.padded.resize(a.num_seqs);
  int64_t total = 0, max_padded = 32;
  for (int64_t i = 0; i < a.num_seqs; ++i) {
    packs.padded[i] = (int64_t{a.lens[i]} + 31) / 32 * 32;
    max_padded = std::max(max_padded, packs.padded[i]);
    for (int64_t h = 0; h < nkv; ++h) {
      packs.offset[i * nkv + h] = total;
      total += 2 * packs.padded[i] * hs;  // K, then V
    }
  }
  if (total * static_cast<int64_t>(sizeof(bf16_t)) > kMaxPackBytes) return false;

  const int64_t rows = hs <= 64 ? item_rows<2>() : item_rows<4>();  // (run's kItem)
  const std::vector<Item> items = query_tiles(a, std::max<int>(1, rows / group));
  if (items.empty()) return true;
  int64_t macs = 0;  // QK and PV of each item's (padded) rows over the keys it sees
  for (const Item& it : items) macs += 2 * rows * (it.cost / it.ntok) * hs * nkv;
  const int threads = threads_for(macs);
  // Per thread: scores and weights [rows, max_padded], sums [rows, hs], query [rows, hs],
  // rows norms; in floats, rounded to 64-byte lines.
  const size_t per_thread =
      (rows * max_padded + rows * hs + rows * max_padded / 2 + rows * hs / 2 + rows + 15) / 16 *
      16;
  float* scratch = caller_scratch(per_thread * threads + (total + 1) / 2 + 16);
  auto* pack = reinterpret_cast<bf16_t*>(scratch + per_thread * threads);
  if (a.cache.q8) {
    dispatch<q8_t>(a, packs, pack, items, max_padded, scratch, per_thread, threads);
  } else {
    dispatch<bf16_t>(a, packs, pack, items, max_padded, scratch, per_thread, threads);
  }
  return true;
}

}  // namespace xllm::attn
#else
namespace xllm::attn {
bool prefill_amx(const Prefill&) { return false; }
}  // namespace xllm::attn
#endif
