// The attention micro-kernels of one ISA, as a table of function pointers.
//
// A driver (attend.h) walks a sequence's paged context chunk by chunk and calls
// these on one KV block at a time. "Rows" are query rows already multiplied by
// the softmax scale: the query heads of one KV group (decode), or several query
// tokens times those heads (prefill), so each K/V row is loaded once for all of
// them. KT is the cache's storage type (float, bf16_t or q8_t). Float and bf16
// rows are widened to fp32 in registers and every sum is fp32; the AVX-512 kernels
// on q8 rows take integer dot products instead (kernels_avx512.cpp).
#pragma once

#include <cstdint>

#include "attention/vec.h"
#include "common/cpu_info.h"

namespace xllm::attn {

template <class KT>
struct Kernels {
  // s[r * lds + t] = dot(q[r * ldq : +hs], k[t * hs : +hs])
  // q: [nrows, ldq] fp32 (or as prep left them); k: [ntok, hs] one block's rows of one
  // KV head; s: [nrows, lds]
  // next: the bytes [next, next + next_bytes) that the driver reads after this call
  // (the next block); the kernel spreads prefetches for them over its work so that
  // memory streams while it computes. nullptr: nothing to prefetch.
  void (*qk)(const float* q, int64_t ldq, int nrows, const KT* k, int ntok, int hs, float* s,
             int64_t lds, const void* next, int64_t next_bytes);

  // acc[r * hs + d] += sum over t of p[r * ldp + t] * v[t * hs + d]
  // p: [nrows, ldp] softmax weights; v: [ntok, hs]; acc: [nrows, hs]; next: as for qk
  void (*pv)(const float* p, int64_t ldp, int nrows, const KT* v, int ntok, int hs, float* acc,
             const void* next, int64_t next_bytes);

  // Optional (nullptr: qk reads the rows as they are). Rewrites a tile's query rows
  // [nrows, hs] into the form qk reads, once per tile rather than once per block:
  // out has room for [nrows, hs] floats, and qk is then called on its rows (ldq = hs).
  void (*prep)(const float* q, int nrows, int hs, float* out);

  // Optional (nullptr: pv keeps acc in order). pv may keep acc's rows in an order of
  // its own across calls (the online softmax only scales whole rows, in place); post
  // puts the [nrows, hs] rows back in order once the tile is done.
  void (*post)(float* acc, int nrows, int hs);
};

// The online-softmax step for one chunk of key columns (flash-attention style).
// s: [nrows, lds] scores of ncols columns; row r sees only its first valid[r]
// columns (causal mask: a prefix). Turns s into weights exp(s - m_new) (zeros
// past valid[r]), and updates the running max m[r], the running sum l[r] and
// rescales acc[r, :hs] by exp(m_old - m_new) when the max grew.
using SoftmaxFn = void (*)(float* s, int64_t lds, int nrows, int ncols, const int* valid,
                           float* m, float* l, float* acc, int hs);

template <class KT>
Kernels<KT> scalar_kernels();
SoftmaxFn scalar_softmax();

#if XLLM_HAVE_AVX2_KERNELS
template <class KT>
Kernels<KT> avx2_kernels();
SoftmaxFn avx2_softmax();
// kernels_avx512.cpp: head sizes that are a multiple of 32, up to 256.
bool avx512_kernels_fit(int64_t head_size);
template <class KT>
Kernels<KT> avx512_kernels();
#endif

// The kernels for the ISA active now (see common/cpu_info.h) and a head size, chosen
// per call.
template <class KT>
Kernels<KT> kernels_for(Isa isa, int64_t head_size) {
#if XLLM_HAVE_AVX2_KERNELS
  if (isa >= Isa::kAvx512 && avx512_kernels_fit(head_size)) return avx512_kernels<KT>();
  if (isa >= Isa::kAvx2) return avx2_kernels<KT>();
#endif
  return scalar_kernels<KT>();
}

inline SoftmaxFn softmax_for(Isa isa) {
#if XLLM_HAVE_AVX2_KERNELS
  if (isa >= Isa::kAvx2) return avx2_softmax();
#endif
  return scalar_softmax();
}

}  // namespace xllm::attn
