// Linears on GGUF blocks with int8 activations (what llama.cpp does): each 32-element
// block of a row of x is quantized to int8 with its own scale, and every block product is
// an integer dot product of the weight's quants with x's, scaled once per block:
//
//   x[r, 32b + i] ~ dx[r, b] * xq[r, 32b + i],   xq in [-127, 127], dx = max|x block| / 127
//   W[n, 32b + i] = d[n, b] * u[n, 32b + i] + c[n, b],   u in [0, 255] unsigned
//   out[r, n] = sum over b of  d[n, b] dx[r, b] * (sum_i u xq)  +  c[n, b] * dx[r, b] * (sum_i xq)
//
// Q4_1 is already of that form (u = the 4-bit quant, c = its min); Q8_0 (w = d q, q signed)
// becomes u = q + 128, c = -128 d. The integer sums are exact, so every ISA level computes
// the same block sums from the same quantized x; only the order of the fp32 additions
// differs. VNNI (VPDPBUSD: unsigned x signed bytes, four products per lane) does the
// integer part on the avx512 and avx512_bf16 levels, and on the amx level for fewer than
// kAmxInt8MinRows rows; from there the amx level runs AMX-INT8 tiles on a requantized copy
// of the weight (PackedAmxInt8, below).
#pragma once

#include <cstdint>

#include "common/cpu_info.h"
#include "quant/block_linear.h"
#include "quant/scratch.h"

namespace xllm::quant {

// A q4_1 or q8_0 weight repacked at load for the integer kernels: per group of 16 outputs
// g and block b, the unsigned quants as VPDPBUSD operands (one 64-byte line holds 4
// consecutive inputs for each of the 16 outputs, one int32 lane per output), and the
// block's scales for the 16 outputs side by side:
//
//   q8_0: quads[g][b][v][j][t] = u[16 g + j][32 b + 4 v + t]           v < 8   (512 B)
//   q4_1: quads[g][b][v][j][t] = u[.. 4 v + t] | u[.. 16 + 4 v + t] << 4  v < 4   (256 B)
//   d[g][b][j], c[g][b][j]     (fp32; zeros for rows past N)
struct PackedInt8 {
  Format format;               // kQ4_1 or kQ8_0
  const uint8_t* quads;
  const float* d;
  const float* c;
  int64_t rows, cols;

  int64_t groups() const { return (rows + 15) / 16; }
  int64_t blocks() const { return cols / kBlock; }
  int64_t block_bytes() const { return format == Format::kQ4_1 ? 256 : 512; }
};

struct PackedInt8Buffers {
  AlignedArray<uint8_t> quads;
  AlignedArray<float> d, c;
};

// Repacks w (q4_1 or q8_0) into buffers (allocated here) and returns the view.
PackedInt8 pack_int8(const BlockMatrix& w, PackedInt8Buffers& buffers);
// dst [N, K] fp32 = the weight decoded from the packed form (exact).
void unpack_int8(const PackedInt8& w, float* dst);

// The amx level's form from min_rows rows of x: the weight requantized once, at load, to
// one scale per output row, w[n, k] ~ s[n] q[n, k] (q = round(w / s), s = max |w row| / 127,
// signed), packed as AMX-INT8 B tiles: per group of 16 outputs g and block of 32 inputs b,
// 512 B (the blocks padded with zeros to an even count, so two make one 1 KB tile of 64
// inputs):
//
//   q_tiles[g][b][v][j][t] = q[16 g + j][32 b + 4 v + t]     (v < 8; zeros past N)
//
// x is quantized per row to 16 bits and split into a signed high and an unsigned low byte
// (int8_amx.cpp), so the tile sums are exact over all of K and scaled once:
// out[r, n] = s[n] sx[r] (256 (hi . q) + (lo . q)).
// Why these granularities (perplexity of a fixed text on the demo, against fp32): the weight
// per row adds 0.1-0.2% to the Q4_1 blocks' own error; x as int8 per row was +4-7%, per 64
// inputs +0.7-1.1%, per 32 +0.3% (but every block then needs its own fp32 rescaling of the
// tile sums: 1.3x slower at 64 rows); x in 16 bits per row keeps 15 bits of the row's
// largest value, finer than int8 per block unless a row's largest value is 256x its
// block's. Per-block weight scales would need the per-block rescaling too.
struct PackedAmxInt8 {
  const int8_t* q;
  const float* s;  // [groups * 16]
  int64_t rows, cols;
  int64_t min_rows;  // rows of x from which the tiles run: amx_int8_min_rows(source format)

  int64_t groups() const { return (rows + 15) / 16; }
  int64_t blocks() const { return cols / kBlock; }
  int64_t chunks() const { return (blocks() + 1) / 2; }  // 1 KB tiles of 64 inputs a group
  int64_t group_bytes() const { return chunks() * 16 * kChunk; }
  const int8_t* group(int64_t g) const { return q + g * group_bytes(); }
  static constexpr int64_t kChunk = 2 * kBlock;
};

struct PackedAmxInt8Buffers {
  AlignedArray<int8_t> q;
  AlignedArray<float> s;
};

// Requantizes the packed weight w into buffers (allocated here) and returns the view. AMX
// CPUs only (the requantization runs on AVX-512).
PackedAmxInt8 pack_amx_int8(const PackedInt8& w, PackedAmxInt8Buffers& buffers);

// x quantized per 32-element block: xq [m, K] int8, dx [m, K / 32], sx [m, K / 32] = dx * sum(xq).
//
// With xlo (arithmetic 'int16'), x is in 16 bits per block: v = round(x / dx) with
// dx = max |x block| / kX16Max, split v = 255 xq + xlo (xq = round(v / 255), both bytes in
// [-127, 127], so that AVX2's sign trick and VPDPBUSD take either as they take int8 x), and
// sx = dx * sum(v). A block's integer sum is 255 (u . xq) + (u . xlo), exact in int32
// (|.| <= 32 * 255 * 32385 < 2^31): the kernels run their int8 pass twice. 15 bits of the
// block's largest value: the products are within ~3e-5 of the exact blocks' (the weights
// are not requantized), against ~8e-3 for int8 x.
struct QuantizedRows {
  const int8_t* xq;
  const float* dx;
  const float* sx;
  int64_t m, cols;
  const int8_t* xlo = nullptr;  // 16-bit x: the low parts (null: int8 x)
};
constexpr int kX16Max = 127 * 255;  // 32385
// At the avx2 level (no VNNI: VPMADDUBSW and VPMADDWD, twice) the 16-bit form beats the
// exact fp32 kernels on the blocks by far for few rows of x, and falls behind from about a
// dozen. From kX16MaxRowsAvx2 + 1 rows int16 runs the exact fp32 tiles instead, on the
// packed weight decoded to fp32 (tiled_linear): the blocks' own decoded weights and fp32
// sums, bit for bit up to kPackedChunkFromCols inputs (above, K goes in chunks sooner than
// for the blocks: the same sums in another order).
// On the AMX Xeon forced to that level, int16's two passes / those fp32 tiles against the
// exact blocks (Q4_1), rows 9 / 16 / 64 / 256:
//   K = 576 (3072 x 576):     0.95 / 1.04 / 0.84 / 0.87   0.94 / 0.99 / 0.98 / 1.01
//   K = 8192 (2048 x 8192):   1.78 / 1.55 / 1.04 / 0.88   1.69 / 1.48 / 1.23 / 1.11
//   K = 14336 (4096 x 14336): 1.84 / 1.43 / 1.10 / 1.04   1.72 / 1.36 / 1.22 / 1.22
// (at K > 2048 the tiles take K in chunks, block_linear.cpp, which the packed decode reads
// better than the blocks' rows) and a decode step's projections over the demo's 30 layers
// (Llama-3.2-1B's 16): 1.71x (2.9x) at 1 row, 1.45x (1.6x) at 4, 1.04x (1.19x) at 8. The
// other levels run int16's two passes at every row count (VNNI: one instruction each).
constexpr int64_t kX16MaxRowsAvx2 = 8;
// K above which those tiles decode the packed weight in chunks: from 1024 inputs, not the
// blocks' 2048 (Llama-3.2-1B's 16 layers from 9 rows, against the blocks: 1.06-1.14x whole
// at 2048 inputs, 1.22-1.27x in chunks; the demo's 1536 inputs 0.96-1.01x either way).
constexpr int64_t kPackedChunkFromCols = 1024;
inline bool x16_runs_fp32_tiles(Isa isa, int64_t m) {
  return isa == Isa::kAvx2 && m > kX16MaxRowsAvx2;
}
// The largest quant of a block of x: dx = max |x block| / x_top(x16) (every level).
constexpr float x_top(bool x16) { return x16 ? static_cast<float>(kX16Max) : 127.0f; }

// Quantizes x [m, K] (row stride ldx) into xq/dx/sx (the same bits on every level); with
// xlo non-null, in 16 bits (xq the high parts, xlo the low).
void quantize_rows(const float* x, int64_t ldx, int64_t m, int64_t k, int8_t* xq, float* dx,
                   float* sx, Isa isa, int8_t* xlo = nullptr);

// out [m, N] (row stride ldo) = x @ W^T (+ bias), int8 arithmetic (x16: x in 16 bits, as
// QuantizedRows says). On the amx level from amx->min_rows rows: amx (the int8 tile form;
// null where not packed).
void int8_linear(const PackedInt8& w, const PackedAmxInt8* amx, const float* x, int64_t ldx,
                 int64_t m, const float* bias, float* out, int64_t ldo, Isa isa,
                 bool x16 = false);
// A gate|up weight [2I, K] (gate rows first): out [m, I] = silu(gate) * up, bit for bit
// int8_linear then rowops::silu_and_mul, with SiLU-and-mul applied as the AMX tiles store
// (each gate group paired with its up group; no [m, 2I] product written). Only where that
// form runs (the tile form packed, the amx level, from amx->min_rows rows, I a multiple
// of 16); returns false, computing nothing, elsewhere.
bool int8_linear_glu(const PackedAmxInt8* amx, const float* x, int64_t ldx, int64_t m,
                     float* out, int64_t ldo, Isa isa);
// Rows of x from which the tiles beat VNNI on the blocks; few rows are bound by the weight
// bytes each form reads. Measured on the demo's and Llama-3.2-1B's shapes (30 and 16 layers
// streamed, 2 cores of a Xeon with AMX): q8_0 blocks are as many bytes as the tiles, and
// from 3 rows VNNI falls behind (the tiles 1.10x at 3 rows, 1.18-1.37x at 4, 1.44-1.72x at
// 7: bench.ops --only linear_rows); q4_1 blocks are 5 bits a weight against the tiles' 8,
// and VNNI on them keeps up to 6 rows (there the tiles 0.97-1.0x) and falls behind from 7
// (1.02-1.06x at 7, 1.06-1.08x at 8).
constexpr int64_t kAmxInt8MinRows = 3, kAmxInt8MinRowsQ4 = 7;
inline int64_t amx_int8_min_rows(Format f) {
  return f == Format::kQ8_0 ? kAmxInt8MinRows : kAmxInt8MinRowsQ4;
}

// Kernels: output groups [g_begin, g_end) for every row of q.
void int8_groups_scalar(const PackedInt8& w, const QuantizedRows& q, int64_t g_begin,
                        int64_t g_end, const float* bias, float* out, int64_t ldo);
#if defined(__x86_64__)
void int8_groups_avx2(const PackedInt8& w, const QuantizedRows& q, int64_t g_begin,
                      int64_t g_end, const float* bias, float* out, int64_t ldo);
void int8_groups_avx512(const PackedInt8& w, const QuantizedRows& q, int64_t g_begin,
                        int64_t g_end, const float* bias, float* out, int64_t ldo);
void quantize_rows_avx512(const float* x, int64_t ldx, int64_t m, int64_t k, int8_t* xq,
                          float* dx, float* sx, int8_t* xlo);
void quantize_rows_avx2(const float* x, int64_t ldx, int64_t m, int64_t k, int8_t* xq,
                        float* dx, float* sx, int8_t* xlo);
// Blocks [b0, b1) of rows n0 .. n0 + 4 of a PackedInt8 (weight; n0 a multiple of 4)
// decoded exactly to fp32, dst [4, 32 (b1 - b0)]: the bits the avx2 level's decode_row
// gives for the blocks it was packed from (tiled_linear's DecodeTile; rows past N, the
// group's padding, decode to zeros).
void decode_packed_tile_avx2(const void* weight, int64_t n0, int nt, int64_t b0, int64_t b1,
                             float* dst);
// Group g of pack_amx_int8: its 16 rows' scales into s[0..16) and their int8 tiles into
// dst, `blocks` 512 B tiles (zeros past the weight's last block and for rows past N).
void requantize_group_avx512(const PackedInt8& w, int64_t g, int64_t blocks, int8_t* dst,
                             float* s);
// x [m, K] quantized per row to 16 bits, v = round(x / sx), sx = max |x row| / 32767, as AMX
// A tiles of its high (signed) and low (unsigned) bytes, v = 256 hi + lo:
// xq [m / 16 (rounded up)][chunks][hi, lo][16 rows][64], zeros past K; sx [m rounded up to
// 16]. Rows [r_begin, r_end) of that, rows past m zeros (sx 0).
void quantize_rows_amx(const float* x, int64_t ldx, int64_t m, int64_t k, int8_t* xq,
                       float* sx, int64_t r_begin, int64_t r_end);
// Output groups [g_begin, g_end) for rows [0, m) of x in tiles; the calling thread has
// configured its tiles with amx_begin() (bf16_gemm.h).
// glu > 0: the gate|up form (glu = I / 16): [g_begin, g_end) are gate groups, each paired
// with group g + glu, and out [m, I] gets silu(gate) * up for them (no bias).
void int8_groups_amx(const PackedAmxInt8& w, const int8_t* xq, const float* sx, int64_t m,
                     int64_t g_begin, int64_t g_end, const float* bias, float* out,
                     int64_t ldo, int64_t glu = 0);
#endif

}  // namespace xllm::quant
