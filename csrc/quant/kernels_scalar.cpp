// Scalar kernels: the fallback on CPUs without AVX2/FMA and the reference the
// vector kernels must agree with (decoding bit for bit, dot products to fp32
// rounding).
#include <cstring>

#include "quant/block_linear.h"

namespace xllm::quant {
namespace {

float bf16_value(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

void decode_row(const BlockMatrix& w, int64_t n, int64_t b0, int64_t b1, float* dst) {
  const int64_t nb = w.cols / kBlock;
  if (w.format == Format::kF32) {
    std::memcpy(dst, reinterpret_cast<const float*>(w.qs + n * w.qs_row_bytes()) + b0 * kBlock,
                static_cast<size_t>((b1 - b0) * kBlock) * sizeof(float));
    return;
  }
  if (w.format == Format::kBF16) {
    const uint16_t* src =
        reinterpret_cast<const uint16_t*>(w.qs + n * w.qs_row_bytes()) + b0 * kBlock;
    for (int64_t i = 0; i < (b1 - b0) * kBlock; ++i) dst[i] = bf16_value(src[i]);
    return;
  }
  const float* d = w.scales + n * nb;
  if (w.format == Format::kQ4_1) {
    const uint8_t* qs = w.qs + n * w.qs_row_bytes() + b0 * (kBlock / 2);
    const float* m = w.mins + n * nb;
    for (int64_t b = b0; b < b1; ++b, qs += kBlock / 2, dst += kBlock) {
      for (int j = 0; j < kBlock / 2; ++j) {
        dst[j] = d[b] * static_cast<float>(qs[j] & 0x0F) + m[b];
        dst[j + kBlock / 2] = d[b] * static_cast<float>(qs[j] >> 4) + m[b];
      }
    }
  } else {
    const int8_t* q = reinterpret_cast<const int8_t*>(w.qs + n * w.qs_row_bytes()) + b0 * kBlock;
    for (int64_t b = b0; b < b1; ++b, q += kBlock, dst += kBlock) {
      for (int j = 0; j < kBlock; ++j) dst[j] = static_cast<float>(q[j]) * d[b];
    }
  }
}

void tile(const float* x, int64_t ldx, int mr, const float* wt, int nt, int64_t k,
          const float* bias, float* out, int64_t ldo) {
  for (int r = 0; r < mr; ++r) {
    for (int j = 0; j < nt; ++j) {
      const float* a = x + r * ldx;
      const float* b = wt + j * k;
      float sum = 0.0f;
      for (int64_t i = 0; i < k; ++i) sum += a[i] * b[i];
      out[r * ldo + j] = bias ? sum + bias[j] : sum;
    }
  }
}

// Decodes one block at a time into a 32-float buffer and accumulates every row.
void direct(const float* x, int64_t ldx, int mr, const BlockMatrix& w, int64_t n0, int nt,
            const float* bias, float* out, int64_t ldo) {
  const int64_t nb = w.cols / kBlock;
  for (int j = 0; j < nt; ++j) {
    const int64_t n = n0 + j;
    const float* d = w.scales ? w.scales + n * nb : nullptr;
    const uint8_t* qs = w.qs + n * w.qs_row_bytes();
    float sum[3] = {0.0f, 0.0f, 0.0f};
    float blk[kBlock];
    for (int64_t b = 0; b < nb; ++b) {
      if (w.format == Format::kF32) {
        std::memcpy(blk, qs + b * kBlock * 4, sizeof blk);
      } else if (w.format == Format::kBF16) {
        const uint16_t* q = reinterpret_cast<const uint16_t*>(qs) + b * kBlock;
        for (int i = 0; i < kBlock; ++i) blk[i] = bf16_value(q[i]);
      } else if (w.format == Format::kQ4_1) {
        const float mn = w.mins[n * nb + b];
        const uint8_t* q = qs + b * (kBlock / 2);
        for (int i = 0; i < kBlock / 2; ++i) {
          blk[i] = d[b] * static_cast<float>(q[i] & 0x0F) + mn;
          blk[i + kBlock / 2] = d[b] * static_cast<float>(q[i] >> 4) + mn;
        }
      } else {
        const int8_t* q = reinterpret_cast<const int8_t*>(qs) + b * kBlock;
        for (int i = 0; i < kBlock; ++i) blk[i] = static_cast<float>(q[i]) * d[b];
      }
      for (int r = 0; r < mr; ++r) {
        const float* xb = x + r * ldx + b * kBlock;
        for (int i = 0; i < kBlock; ++i) sum[r] += xb[i] * blk[i];
      }
    }
    for (int r = 0; r < mr; ++r) out[r * ldo + j] = bias ? sum[r] + bias[j] : sum[r];
  }
}

}  // namespace

Kernels scalar_kernels() { return {decode_row, tile, direct}; }

}  // namespace xllm::quant
