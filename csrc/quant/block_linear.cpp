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

}  // namespace

void linear(const BlockMatrix& w, const float* x, int64_t ldx, int64_t m, const float* bias,
            float* out, int64_t ldo, Isa isa) {
  if (m == 0 || w.rows == 0) return;
  const Kernels kern = kernels_for(isa);
  const int64_t k = w.cols;
  const int64_t tiles = (w.rows + kTileRows - 1) / kTileRows;
#pragma omp parallel for schedule(static) num_threads(threads_for(w, m))
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t n0 = t * kTileRows;
    const int nt = static_cast<int>(std::min<int64_t>(kTileRows, w.rows - n0));
    const float* b = bias ? bias + n0 : nullptr;
    if (m <= kTileCols) {  // a decode step: decode in registers, no scratch round trip
      kern.direct(x, ldx, static_cast<int>(m), w, n0, nt, b, out + n0, ldo);
      continue;
    }
    const float* wt;
    if (w.format == Format::kF32) {  // the rows are already what a tile reads
      wt = reinterpret_cast<const float*>(w.qs) + n0 * k;
    } else {
      float* scratch = thread_scratch(static_cast<size_t>(kTileRows * k));
      for (int j = 0; j < nt; ++j) kern.decode_row(w, n0 + j, scratch + j * k);
      wt = scratch;
    }
    for (int64_t r = 0; r < m;) {
      // Groups of 3 rows; a final 4 goes as 2 + 2, since a 1-row pass reloads every
      // weight for a quarter of the work of a 3-row one.
      const int64_t left = m - r;
      const int mr = left == 4 ? 2 : static_cast<int>(std::min<int64_t>(kTileCols, left));
      kern.tile(x + r * ldx, ldx, mr, wt, nt, k, b, out + r * ldo + n0, ldo);
      r += mr;
    }
  }
}

void dequantize(const BlockMatrix& w, float* out, Isa isa) {
  const Kernels kern = kernels_for(isa);
#pragma omp parallel for schedule(static) num_threads(threads_for(w, 0))
  for (int64_t n = 0; n < w.rows; ++n) kern.decode_row(w, n, out + n * w.cols);
}

}  // namespace xllm::quant
