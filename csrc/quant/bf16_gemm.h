// Linear layers in bf16 arithmetic: bf16 weights, activations rounded to bf16 on the
// way in, every product of two bf16 values (exact in fp32) summed in fp32. This is
// what the matrix units compute (AMX TDPBF16PS, AVX512-BF16 VDPBF16PS); the avx2
// and scalar levels compute the same sums in fp32 FMAs, so every level agrees with
// the torch reference  (x.bfloat16().float() @ w.bfloat16().float().T)  up to the
// order of the fp32 additions.
//
// The weight W [N, K] (K a multiple of 32) is packed once, at load, in the layout
// both units read (VNNI pairs): for each group of 16 output features nb and each pair
// of input features p,
//
//   packed[nb][p][j][e] = W[16 nb + j][2 p + e]     (j < 16, e < 2; rows past N are 0)
//
// so one 64-byte line holds a k-pair for 16 outputs. 32 input features of a group
// (16 lines, 1 KiB) are an AMX B tile; a line is one VDPBF16PS operand.
#pragma once

#include <algorithm>
#include <cstdint>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <utility>

#include "common/cpu_info.h"
#include "quant/scratch.h"

namespace xllm::quant {

constexpr int kBf16Group = 16;  // output features per packed group (a tile's columns)
// Rows of x from which the AMX tiles beat VDPBF16PS. Both stream the same weight bytes,
// but from 3 rows VDPBF16PS falls behind memory while a tile (padding rows and all) keeps
// up: 30 layers of the demo's shapes and 16 of Llama-3.2-1B's, streamed, on the AMX Xeon
// (2 cores; bench.ops --only linear_rows): the tiles 1.09-1.13x at 3 rows, 1.23-1.30x at
// 4, 1.63-1.77x at 7; at 2 rows even.
constexpr int64_t kAmxMinRows = 3;

struct PackedBf16 {
  const uint16_t* data;  // [groups, K / 2, 16, 2] bf16 bits
  int64_t rows, cols;    // N, K

  int64_t groups() const { return (rows + kBf16Group - 1) / kBf16Group; }
  const uint16_t* group(int64_t g) const { return data + g * cols * kBf16Group; }
};

// A buffer of bf16 bits for a packed weight.
using Bf16Buffer = AlignedArray<uint16_t>;
Bf16Buffer alloc_packed_bf16(int64_t rows, int64_t cols);

// w [N, K] bf16 bits (row stride ldw) -> dst (alloc_packed_bf16(N, K)), packed as above.
void pack_bf16(const uint16_t* w, int64_t ldw, int64_t rows, int64_t cols, uint16_t* dst);
// dst [N, K] fp32 = the packed weight, unpacked (exact).
void unpack_bf16(const PackedBf16& w, float* dst);

// out [M, N] (row stride ldo) = bf16(x [M, K], row stride ldx) @ W^T (+ bias [N], fp32).
void bf16_linear(const PackedBf16& w, const float* x, int64_t ldx, int64_t m,
                 const float* bias, float* out, int64_t ldo, Isa isa);
// A gate|up weight W = [W_gate; W_up] ([2I, K]): out [M, I] = silu(x W_gate^T) * (x W_up^T),
// bit for bit the linear followed by rowops::silu_and_mul, without writing the [M, 2I]
// product: the AMX tiles pair each gate group with its up group and apply SiLU-and-mul as
// they store. Only where that form runs (AMX, from kAmxMinRows rows, I a multiple of 16);
// returns false, computing nothing, elsewhere.
bool bf16_linear_glu(const PackedBf16& w, const float* x, int64_t ldx, int64_t m, float* out,
                     int64_t ldo, Isa isa);

// The kernels of the bf16-capable levels. xb: x rounded to bf16, [m, K] contiguous (or
// in tiles, for AMX). Each computes output groups [g_begin, g_end) for rows [0, m) on the
// calling thread.
#if defined(__x86_64__)
// VDPBF16PS on zmm registers: any m; the form for few rows.
void bf16_groups_avx512(const PackedBf16& w, const uint16_t* xb, int64_t m, int64_t g_begin,
                        int64_t g_end, const float* bias, float* out, int64_t ldo);
// AMX tiles: xb as round_rows_bf16_tiles lays it out. The calling thread must have called
// amx_begin() (tile configuration) and calls amx_end() when done.
// glu > 0: W is a gate|up pair [2I, K] with glu = I / 16 groups of each; [g_begin, g_end)
// are gate groups, and out [m, I] gets silu(x W_gate^T) * (x W_up^T) for them (no bias).
void bf16_groups_amx(const PackedBf16& w, const uint16_t* xb, int64_t m, int64_t g_begin,
                     int64_t g_end, const float* bias, float* out, int64_t ldo,
                     int64_t glu = 0);
// Configures the calling thread's tiles, all eight 16 rows of 64 bytes (the bf16 and int8
// kernels and the AMX attention share this shape); amx_end() releases them.
void amx_begin();
void amx_end();
// Rows of x a band may hold so that its tiles (row_bytes a row) fit L2, a multiple of
// step and at least 32: the int8 tiles' one-pass form passes each band over a thread's
// weight groups (the bf16 tiles and the int8 passes take fixed 256-row bands of one pass's
// inputs instead).
inline int64_t amx_band_rows(int64_t row_bytes, int64_t step) {
  constexpr int64_t kBandBytes = int64_t{1} << 20;  // measured best on the AMX Xeon
  return std::max<int64_t>(32, kBandBytes / row_bytes / step * step);
}
// Both AMX GEMMs sum a long K in passes (bf16 over 768 inputs, int8 over 4096): rows go in
// bands of kAmxPassBandRows, whose x for one pass stays in L2 across the pairs of groups,
// and the sums of a band by up to kAmxPassPairs pairs wait in L2 between passes (measured
// best for both on the AMX Xeon: docs/ops.md).
constexpr int64_t kAmxPassBandRows = 256, kAmxPassPairs = 8;
// Pairs of groups a block of the passes takes: at most kAmxPassPairs, blocks of even sizes.
inline int64_t amx_pass_pairs(int64_t pairs) {
  const int64_t blocks = (pairs + kAmxPassPairs - 1) / kAmxPassPairs;
  return (pairs + blocks - 1) / blocks;
}
// Lines asked for into L2 a few at each K step of the AMX drivers' tile blocks, so that
// they come from memory while the tiles compute: the next pair's weight slices, and (bf16,
// several passes) the next pass's slice of x. Spread out: the same lines asked for all at
// once, at the start of a pair or of each row block, measured no faster than none (the
// requests crowd out the tiles' own loads); spread over the steps, the weight's 1.1-1.2x on
// Llama-3.2-1B's shapes at 64-1024 rows, streamed (docs/ops.md). With one row block (a
// decode step) each weight byte is used once, streamed by the hardware, and asking measured
// 0.9x: the drivers ask for the weight only from two row blocks on.
struct L2Ask {
  const char* base = nullptr;
  int64_t segs = 0, stride = 0;  // segments (each `lines` 64-byte lines), bytes apart
  int64_t lines = 0;             // 0: nothing to ask for
  int64_t seg = 0, line = 0;     // the next line to ask for (segments taken in turn)
  int64_t per_step = 0;

  // segs segments of `bytes` each, `stride` bytes apart from `first`, over `steps` steps.
  void ask(const void* first, int64_t n_segs, int64_t seg_stride, int64_t bytes, int64_t steps) {
    base = static_cast<const char*>(first);
    segs = n_segs;
    stride = seg_stride;
    lines = bytes / 64;
    per_step = (segs * lines + steps - 1) / steps;
  }
  // A pair's two group slices (s1 null: one group).
  void ask_pair(const void* s0, const void* s1, int64_t bytes, int64_t steps) {
    ask(s0, s1 ? 2 : 1, s1 ? static_cast<const char*>(s1) - static_cast<const char*>(s0) : 0,
        bytes, steps);
  }
#if defined(__x86_64__)
  void step() {
    for (int64_t i = 0; i < per_step && line < lines; ++i) {
      _mm_prefetch(base + seg * stride + line * 64, _MM_HINT_T1);
      if (++seg == segs) seg = 0, ++line;
    }
  }
#endif
};
// The pairs of 16-output groups both AMX drivers multiply together (two weight tiles beside
// one x tile): neighbours g, g + 1 within [g_begin, g_end) (the last alone when the count
// is odd), or with glu > 0 (a gate|up weight, glu = I / 16) gate group g in [g_begin, g_end)
// with its up group g + glu. rows: the weight's output features.
struct AmxPairs {
  int64_t g_begin, g_end, glu, rows;

  int64_t count() const { return glu ? g_end - g_begin : (g_end - g_begin + 1) / 2; }
  int64_t first(int64_t p) const { return g_begin + (glu ? p : 2 * p); }
  bool two(int64_t p) const { return glu || first(p) + 1 < g_end; }
  int64_t second(int64_t p) const { return first(p) + (glu ? glu : 1); }
  // The (pair, pass) after pair p of pass `pass` in the drivers' loop nest (blocks of pairs
  // [p_begin, p_end), then bands of rows, then passes, then pairs): the next pair, else the
  // block's first in the next pass, else in the next band (the same pass 0), else after the
  // last band the next block's first pair (count() when there is none).
  std::pair<int64_t, int64_t> after(int64_t p, int64_t pass, int64_t p_begin, int64_t p_end,
                                    int64_t passes, bool last_band) const {
    if (p + 1 < p_end) return {p + 1, pass};
    if (pass + 1 < passes) return {p_begin, pass + 1};
    return {last_band ? p_end : p_begin, 0};
  }
  // Has `ask` ask for the weight slice that comes after pair p of pass `pass` (after()), over
  // `steps` steps: that pass's share of each of its groups' `units` units of `unit_bytes`
  // (group(g): the first byte of group g's packed weight). Past the last pair, nothing.
  template <class Group>
  void ask_after(L2Ask& ask, int64_t p, int64_t pass, int64_t p_begin, int64_t p_end,
                 int64_t passes, bool last_band, int64_t units, int64_t unit_bytes,
                 int64_t steps, Group group) const {
    const auto [np, npass] = after(p, pass, p_begin, p_end, passes, last_band);
    if (np >= count()) return;
    const int64_t u0 = units * npass / passes, nu = units * (npass + 1) / passes - u0;
    ask.ask_pair(group(first(np)) + u0 * unit_bytes,
                 two(np) ? group(second(np)) + u0 * unit_bytes : nullptr, nu * unit_bytes, steps);
  }
  // Outputs of pair p that land in out: its first group's onwards (glu: one group's worth).
  int cols(int64_t p) const {
    if (glu) return 16;
    return static_cast<int>(std::min<int64_t>(two(p) ? 32 : 16, rows - 16 * first(p)));
  }
};
// What the AMX drivers' tile blocks ask for as they go: the next pair's weight (over a pair's
// row blocks) and, with passes, the next pass's slice of x (over a pass).
struct AmxAsks {
  L2Ask weight, x;
  bool any() const { return weight.lines || x.lines; }
#if defined(__x86_64__)
  void step() {
    weight.step();
    x.step();
  }
#endif
};
// With passes: the (first row, pass) of the band whose slice of x comes after pass `pass` of
// the band at m_begin: the next pass, else the next band's first, else (last_block: none,
// m) the first band's for the next block of pairs.
inline std::pair<int64_t, int64_t> amx_next_x(int64_t m_begin, int64_t pass, int64_t passes,
                                              int64_t band, int64_t m, bool last_block) {
  if (pass + 1 < passes) return {m_begin, pass + 1};
  if (m_begin + band < m) return {m_begin + band, 0};
  return {last_block ? m : 0, 0};
}
// Has `ask` ask for the slice of x that comes after pass `pass` of the band at m_begin
// (amx_next_x), over `steps` steps: that pass's share of the `units` units of `unit_bytes`
// in each 16-row block of the band's rows (x: the tiles at `base`, [16-row block][units]).
// After the last, nothing.
inline void amx_ask_next_x(L2Ask& ask, const void* base, int64_t m_begin, int64_t pass,
                           int64_t passes, int64_t band, int64_t m, bool last_block,
                           int64_t units, int64_t unit_bytes, int64_t steps) {
  const auto [nb, npass] = amx_next_x(m_begin, pass, passes, band, m, last_block);
  if (nb >= m) return;
  const int64_t u0 = units * npass / passes, nu = units * (npass + 1) / passes - u0;
  ask.ask(static_cast<const char*>(base) + (nb / 16 * units + u0) * unit_bytes,
          (std::min(m, nb + band) - nb + 15) / 16, units * unit_bytes, nu * unit_bytes, steps);
}
// Thread me of nth's groups when the output groups are split: whole pairs, as even as can
// be; with glu, gate groups (each brings its up group). Returns [begin, end); nth = 1 gives
// all of them.
inline std::pair<int64_t, int64_t> amx_group_share(int64_t groups, int64_t glu, int nth,
                                                  int me) {
  const int64_t g_all = glu ? glu : groups, per = glu ? 1 : 2;
  const int64_t units = (g_all + per - 1) / per;
  return {std::min(g_all, per * (units * me / nth)),
          std::min(g_all, per * (units * (me + 1) / nth))};
}
// Prompt-sized x is split between threads by rows, from kAmxSplitRows rows a thread: each
// thread prepares its own rows of x (no barrier) and passes them over the whole weight,
// with half the x in each L2. Fewer rows split the output groups, so that each weight byte
// is read once (a decode step is bound by those bytes). Measured on the AMX Xeon
// (docs/ops.md): at 509 rows of the demo's shapes 1.1-1.25x splitting the groups, for the
// bf16 and the int8 tiles; at 128 rows a thread, mixed. While all rows fit one band
// (kAmxPassBandRows) the groups stay split: each thread then reads its weight once for all
// rows, where split rows read the whole weight on both (256 rows of Llama-3.2-1B's bf16
// projections 1.13x, the demo's 1.02-1.11x; from 320 rows two bands make it 0.9x).
constexpr int64_t kAmxSplitRows = 128;
inline bool amx_split_rows(int64_t m, int threads) {
  return m >= kAmxSplitRows * threads && m > kAmxPassBandRows;
}
// The first row of thread t's share when split by rows: whole 32-row blocks (AMX tiles).
inline int64_t amx_row_share(int64_t m, int threads, int t) {
  return (m + 31) / 32 * t / threads * 32;
}
// x [m, K] fp32 (row stride ldx) -> xb [m, K] bf16 bits, round to nearest even.
void round_rows_bf16_avx512(const float* x, int64_t ldx, int64_t m, int64_t k, uint16_t* xb);
// The same into AMX A tiles: [m / 16 (rounded up)][k / 32][16 rows][32], each 1 KiB tile
// contiguous (streamed, not strided); rows [r_begin, r_end) of that, rows past m zeros.
void round_rows_bf16_tiles(const float* x, int64_t ldx, int64_t m, int64_t k, uint16_t* xb,
                           int64_t r_begin, int64_t r_end);
#endif

}  // namespace xllm::quant
