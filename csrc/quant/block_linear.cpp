// Drivers of the block-weight linear: output features are split into tiles of
// four rows; each thread decodes a tile's rows into a small scratch buffer (L1
// sized: 4 x K floats) and multiplies every input row against them, so each
// weight byte is read from memory once per call whatever the batch size.
#include <omp.h>

#include <algorithm>
#include <memory>

#include "quant/block_linear.h"

namespace xllm::quant {
namespace {

constexpr int kTileRows = 4;  // output features per tile (the kernels' nt)
constexpr int kTileCols = 3;  // input rows per kernel call (the kernels' mr)

// A grow-only scratch buffer of the calling thread (each OpenMP worker has its own).
float* thread_scratch(size_t floats) {
  thread_local std::unique_ptr<float[]> buffer;
  thread_local size_t capacity = 0;
  if (floats > capacity) {
    capacity = std::max(floats, 2 * capacity);
    buffer.reset(new float[capacity]);
  }
  return buffer.get();
}

// Threads for a call: a small call (a few hundred KB of weights, a single row)
// stays on the calling thread, where waking a team would cost more than it saves.
int threads_for(const BlockMatrix& w, int64_t m) {
  const int64_t work = w.rows * w.cols * (m + 4);  // decoding costs about 4 MACs a weight
  return work < (int64_t{1} << 19) ? 1 : omp_get_max_threads();
}

// decode_row of a BlockMatrix, row by row, as tiled_linear's DecodeTile.
struct BlockRows {
  const BlockMatrix* w;
  void (*decode_row)(const BlockMatrix& w, int64_t n, int64_t b0, int64_t b1, float* dst);
};
void decode_block_rows(const void* rows, int64_t n0, int nt, int64_t b0, int64_t b1,
                       float* dst) {
  const auto* r = static_cast<const BlockRows*>(rows);
  for (int j = 0; j < nt; ++j) r->decode_row(*r->w, n0 + j, b0, b1, dst + j * (b1 - b0) * kBlock);
}

}  // namespace

// Rows of x per pass over the weight when x is larger than this: a prompt-sized x
// (hundreds of rows) streamed from L3 once per weight tile made large M slower than
// M = 256 (~23 against ~33 GFLOP/s a core for a layer at M = 1400); a block of rows
// stays in L2 while every tile of the thread's share passes over it. Each pass
// decodes the tiles again, about 5% of the multiply work at these block sizes.
constexpr int64_t kRowBlockBytes = 256 << 10;

// With more inputs than chunk_from_cols (kBlockChunkFromCols for the blocks), decoded
// weights are multiplied kChunkCols inputs at a time (each chunk's sums added to out), and
// the rows per pass are fitted to a chunk of x instead of whole rows: at K = 8192 a pass
// took 6 rows of x (256 KB), and the tiles were decoded again every 6 rows, about 40% of
// the work. At the avx2 level on the AMX Xeon (Q4_1,
// a session script alternating both forms in one process) at 16 / 64 / 256 rows: 2048 x 8192
// 1.23 / 1.56-1.60 / 1.82x, 4096 x 4096 1.13-1.16 / 1.23-1.27 / 1.28-1.29x, 4096 x 14336
// 1.50-1.80 / 1.93-2.26 / 2.01-2.51x; chunking K = 2048 too measured 0.83-1.05x, so it stays
// whole, as do fp32 rows (nothing to decode). Chunks of 512, 768 and 1536 were within 10%.
constexpr int64_t kChunkCols = 1024, kBlockChunkFromCols = 2048;

void linear(const BlockMatrix& w, const float* x, int64_t ldx, int64_t m, const float* bias,
            float* out, int64_t ldo, Isa isa) {
  if (m == 0 || w.rows == 0) return;
  const Kernels kern = kernels_for(isa);
  const int64_t k = w.cols;
  const int64_t tiles = (w.rows + kTileRows - 1) / kTileRows;
  const int threads = threads_for(w, m);
  if (m <= kTileCols) {
    // A decode step: decode in registers, no scratch round trip. Tiles in chunks of 1/32 of
    // the weight (two threads), handed out as threads come free, instead of a contiguous
    // half each: one stream of the demo at the avx2 level on the AMX Xeon 1.1-1.3x (builds
    // in turns, five rounds; the same bits), even at the avx512 level. Why is not clear: a
    // profile shows both threads equally busy either way. From 4 rows contiguous shares
    // stay (chunks measured 0.95-1.0x there), and the int8 kernels keep theirs (0.9x).
    const int64_t chunk = std::max<int64_t>(1, tiles / (16 * threads));
#pragma omp parallel for schedule(dynamic, chunk) num_threads(threads)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t n0 = t * kTileRows;
      const int nt = static_cast<int>(std::min<int64_t>(kTileRows, w.rows - n0));
      kern.direct(x, ldx, static_cast<int>(m), w, n0, nt, bias ? bias + n0 : nullptr, out + n0,
                  ldo);
    }
    return;
  }
  if (w.format == Format::kF32) {  // the rows are already what a tile reads
    return tiled_linear(reinterpret_cast<const float*>(w.qs), nullptr, nullptr, w.rows, k, x,
                        ldx, m, bias, out, ldo, isa, threads, k);
  }
  const BlockRows rows{&w, kern.decode_row};
  tiled_linear(nullptr, decode_block_rows, &rows, w.rows, k, x, ldx, m, bias, out, ldo, isa,
               threads, kBlockChunkFromCols);
}

void tiled_linear(const float* dense, DecodeTile decode, const void* weight, int64_t n,
                  int64_t k, const float* x, int64_t ldx, int64_t m, const float* bias,
                  float* out, int64_t ldo, Isa isa, int threads, int64_t chunk_from_cols) {
  if (m == 0 || n == 0) return;
  const Kernels kern = kernels_for(isa);
  const int64_t tiles = (n + kTileRows - 1) / kTileRows;
  // Inputs per pass over a tile: all of K, or (decoded weights, K large) chunks.
  const int64_t kc = dense || k <= chunk_from_cols ? k : kChunkCols;
  // Rows per pass: a multiple of kTileCols, so blocking changes no row's grouping.
  const int64_t fit = kRowBlockBytes / (kc * static_cast<int64_t>(sizeof(float)));
  const int64_t row_block = std::max<int64_t>(kTileCols, fit / kTileCols * kTileCols);
#pragma omp parallel num_threads(threads)
  {
    // This thread's tiles: a contiguous share, as schedule(static) would give it.
    const int nth = omp_get_num_threads(), me = omp_get_thread_num();
    const int64_t t_begin = tiles * me / nth, t_end = tiles * (me + 1) / nth;
    float* scratch = dense ? nullptr : thread_scratch(static_cast<size_t>(kTileRows * kc));
    float part[kTileCols * kTileRows];  // a chunk's sums after the first, added to out
    for (int64_t r_begin = 0; r_begin < m; r_begin += row_block) {
      const int64_t r_end = std::min(m, r_begin + row_block);
      for (int64_t k0 = 0; k0 < k; k0 += kc) {
        const int64_t len = std::min(kc, k - k0);
        for (int64_t t = t_begin; t < t_end; ++t) {
          const int64_t n0 = t * kTileRows;
          const int nt = static_cast<int>(std::min<int64_t>(kTileRows, n - n0));
          const float* wt = dense ? dense + n0 * k : scratch;
          if (!dense) decode(weight, n0, nt, k0 / kBlock, (k0 + len) / kBlock, scratch);
          for (int64_t r = r_begin; r < r_end;) {
            // Groups of 3 rows; a final 4 goes as 2 + 2, since a 1-row pass reloads every
            // weight for a quarter of the work of a 3-row one.
            const int64_t left = r_end - r;
            const int mr = left == 4 ? 2 : static_cast<int>(std::min<int64_t>(kTileCols, left));
            float* o = out + r * ldo + n0;
            if (k0 == 0) {
              kern.tile(x + r * ldx, ldx, mr, wt, nt, len, bias ? bias + n0 : nullptr, o, ldo);
            } else {
              kern.tile(x + r * ldx + k0, ldx, mr, wt, nt, len, nullptr, part, kTileRows);
              for (int i = 0; i < mr; ++i) {
                for (int j = 0; j < nt; ++j) o[i * ldo + j] += part[i * kTileRows + j];
              }
            }
            r += mr;
          }
        }
      }
    }
  }
}

void dequantize(const BlockMatrix& w, float* out, Isa isa) {
  const Kernels kern = kernels_for(isa);
#pragma omp parallel for schedule(static) num_threads(threads_for(w, 0))
  for (int64_t n = 0; n < w.rows; ++n) kern.decode_row(w, n, 0, w.cols / kBlock, out + n * w.cols);
}

}  // namespace xllm::quant
