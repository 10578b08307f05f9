// What one core's AMX bf16 tiles can do, apart from any driver: the ceiling the bf16 GEMM
// (csrc/quant/bf16_gemm_avx512.cpp) is measured against in docs/benchmarks.md. Random
// bf16 data (zeros run faster), one thread; run one copy per core to see both.
//
//   g++ -O2 -mamx-tile -mamx-bf16 -mavx512bf16 bench/amx_tiles.cpp -o /tmp/amx_tiles &&
//     /tmp/amx_tiles [WEIGHT_MIB]
//
// Lines printed:
//   vdpbf16ps    the avx512 level's instruction alone (12 independent chains of zmm
//                products): the ceiling of the VDPBF16PS kernels, in the same units;
//   products     tile products alone (no loads): the units' own rate;
//   2x2 A/B KiB  the 2 x 2 block of the GEMM (2 x tiles, 2 weight tiles, 4 sums), x read
//                round-robin from A KiB (streamed, the no-reuse hint) and the weight from
//                B KiB: sizes under L1, L2 and beyond show where each operand can live;
//   blocks       the GEMM's pass structure: blocks of 16 K tiles (one pair's 32 KiB of
//                weight held while 8 row blocks of x pass), the 4 sums zeroed, stored, or
//                loaded and stored around each block;
//   driver       the driver's loop nest for a prompt thread's share (256 rows, K = 2048 in
//                4 passes, blocks of 8 pairs), the weight cycling through WEIGHT_MIB MiB
//                (default 64; as in a model larger than the caches, but a VM may report
//                an L3 that holds 64 MiB: 1024 puts it past any L3): asking for nothing,
//                for the next pair's weight, and for that and the next pass's x (L2Ask in
//                csrc/quant/bf16_gemm.h), a few lines at each K step.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

constexpr double kFlopsPerProduct = 16.0 * 16 * 32 * 2;
volatile float sink;

std::vector<uint16_t> random_bf16(size_t count, uint16_t base) {
  std::vector<uint16_t> v(count + 32);
  for (auto& e : v) e = static_cast<uint16_t>(base + (rand() & 0xff) - ((rand() & 1) << 15));
  return v;
}

const uint16_t* aligned(const std::vector<uint16_t>& v) {
  return reinterpret_cast<const uint16_t*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~63);
}

template <class F>
void report(const char* what, F&& body) {
  long products = 0;
  const auto t0 = std::chrono::steady_clock::now();
  double s = 0;
  do {
    products += body();
    s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  } while (s < 0.5);
  std::printf("%-28s %6.2f ns a product  %5.2f TFLOP/s\n", what, s / products * 1e9,
              products * kFlopsPerProduct / s / 1e12);
}

// VDPBF16PS: 12 chains of 2000 products each, 32 bf16 pairs a product; counted in tile
// products' worth of flops (a tile product is 256 times one VDPBF16PS) by report().
__attribute__((target("avx512f,avx512bf16"))) long vdpbf16ps_only() {
  __m512 acc[12];
  for (auto& a : acc) a = _mm512_setzero_ps();
  __m512bh x = (__m512bh)_mm512_set1_epi16(0x3f80), w = (__m512bh)_mm512_set1_epi16(0x3f00);
  for (int i = 0; i < 2000; ++i) {
#pragma GCC unroll 12
    for (auto& a : acc) a = _mm512_dpbf16_ps(a, x, w);
    __asm__ volatile("" : "+v"(x));  // (not hoisted)
  }
  float sum = 0;
  for (auto& a : acc) sum += _mm512_reduce_add_ps(a);
  sink = sum;
  return 12 * 2000 / 256;
}

long products_only() {
  for (int i = 0; i < 100000; ++i) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  return 400000;
}

// x tiles from a (a_tiles of 1 KiB), weight tiles from b (b_tiles), as the GEMM orders them.
long block_2x2(const uint16_t* a, size_t a_tiles, const uint16_t* b, size_t b_tiles) {
  size_t ia = 0, ib = 0;
  for (int i = 0; i < 100000; ++i) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_stream_loadd(4, a + ia * 512, 64);
    _tile_dpbf16ps(2, 5, 6);
    _tile_loadd(6, b + ib * 512, 64);
    _tile_dpbf16ps(3, 5, 7);
    _tile_stream_loadd(5, a + (ia + 1) * 512, 64);
    _tile_loadd(7, b + (ib + 1) * 512, 64);
    ia = ia + 4 > a_tiles ? 0 : ia + 2;
    ib = ib + 4 > b_tiles ? 0 : ib + 2;
  }
  return 400000;
}

// mode 0: sums zeroed and dropped; 1: zeroed and stored; 2: loaded and stored.
template <int Mode>
void pass_block(const uint16_t* a, int64_t row_block, int nk, const uint16_t* b0,
                const uint16_t* b1, float* c) {
  if (Mode == 2) {
    _tile_loadd(0, c, 128);
    _tile_loadd(1, c + 16, 128);
    _tile_loadd(2, c + 512, 128);
    _tile_loadd(3, c + 528, 128);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  _tile_stream_loadd(4, a, 64);
  _tile_loadd(6, b0, 64);
  _tile_loadd(7, b1, 64);
  _tile_stream_loadd(5, a + row_block, 64);
  for (int kb = 0; kb < nk; ++kb) {
    const bool more = kb + 1 < nk;
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (more) _tile_stream_loadd(4, a + (kb + 1) * 512, 64);
    _tile_dpbf16ps(2, 5, 6);
    if (more) _tile_loadd(6, b0 + (kb + 1) * 512, 64);
    _tile_dpbf16ps(3, 5, 7);
    if (more) _tile_stream_loadd(5, a + row_block + (kb + 1) * 512, 64);
    if (more) _tile_loadd(7, b1 + (kb + 1) * 512, 64);
  }
  if (Mode > 0) {
    _tile_stored(0, c, 128);
    _tile_stored(1, c + 16, 128);
    _tile_stored(2, c + 512, 128);
    _tile_stored(3, c + 528, 128);
  }
}

template <int Mode>
long blocks(const uint16_t* x, const uint16_t* w, float* sums) {
  constexpr int kNk = 16, kRowBlocks = 8, kPairs = 8;
  constexpr int64_t k = kNk * 32, row_block = 16 * k;
  for (int p = 0; p < kPairs; ++p) {
    const uint16_t* b0 = w + static_cast<int64_t>(p) * 2 * 16 * k;
    for (int r = 0; r < kRowBlocks; ++r) {
      pass_block<Mode>(x + static_cast<int64_t>(r) * 32 * k, row_block, kNk, b0, b0 + 16 * k,
                       sums + (r * kPairs + p) * 1024);
    }
  }
  return 4L * kNk * kRowBlocks * kPairs;
}

// The driver's loop nest (bf16_groups_amx with passes) on one block of 8 pairs: x in the
// driver's tiles ([16-row block][64 K tiles][16 x 32]), the pairs' weight taken in turn
// from w (w_tiles tiles of 1 KiB, cycling). Asks: 0 none, 1 the next pair's weight, 2 that
// and the next pass's x, spread over the steps as the driver spreads them.
long driver(const uint16_t* x, const uint16_t* w, size_t w_tiles, float* sums, int asks) {
  constexpr int kt = 64, nk = 16, passes = 4, kPairs = 8, kRowBlocks = 8;
  constexpr int64_t k = kt * 32;
  static size_t offset = 0;
  if (offset + (kPairs + 1) * 2 * kt > w_tiles) offset = 0;
  const uint16_t* wb = w + offset * 512;  // pair p: groups 2p and 2p + 1, kt tiles each
  offset += kPairs * 2 * kt;
  auto ask = [](const char* at, int64_t i) { _mm_prefetch(at + i * 64, _MM_HINT_T1); };
  for (int pass = 0; pass < passes; ++pass) {
    const auto* next_x = reinterpret_cast<const char*>(x + ((pass + 1) % passes) * nk * 512);
    for (int p = 0; p < kPairs; ++p) {
      const uint16_t* b0 = wb + (2 * p * kt + pass * nk) * 512;
      const uint16_t* b1 = b0 + kt * 512;
      // The next pair's slices (past the last pair: the next pass's first, or beyond).
      const int np = p + 1 < kPairs ? p + 1 : 0, npass = p + 1 < kPairs ? pass : pass + 1;
      const auto* nw = reinterpret_cast<const char*>(wb + (2 * np * kt + npass * nk) * 512);
      for (int r = 0; r < kRowBlocks; ++r) {
        const uint16_t* a = x + static_cast<int64_t>(r) * 32 * k + pass * nk * 512;
        float* c = sums + (r * kPairs + p) * 1024;
        if (pass == 0) {
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
        } else {
          _tile_loadd(0, c, 128);
          _tile_loadd(1, c + 16, 128);
          _tile_loadd(2, c + 512, 128);
          _tile_loadd(3, c + 528, 128);
        }
        _tile_stream_loadd(4, a, 64);
        _tile_loadd(6, b0, 64);
        _tile_loadd(7, b1, 64);
        _tile_stream_loadd(5, a + 16 * k, 64);
        for (int kb = 0; kb < nk; ++kb) {
          const bool more = kb + 1 < nk;
          _tile_dpbf16ps(0, 4, 6);
          if (asks > 0) {  // 256 lines of each group's slice over 8 x 16 steps: 2 a step
            const int64_t i = (r * nk + kb) * 2;
            ask(nw, i), ask(nw, i + 1), ask(nw + kt * 1024, i), ask(nw + kt * 1024, i + 1);
          }
          if (asks > 1) {  // the next pass's x: 16 row blocks x 256 lines over 1024 steps
            const int64_t i = ((p * kRowBlocks + r) * nk + kb) * 4;
            for (int64_t j = i; j < i + 4; ++j) ask(next_x + (j / 256) * kt * 1024, j % 256);
          }
          _tile_dpbf16ps(1, 4, 7);
          if (more) _tile_stream_loadd(4, a + (kb + 1) * 512, 64);
          _tile_dpbf16ps(2, 5, 6);
          if (more) _tile_loadd(6, b0 + (kb + 1) * 512, 64);
          _tile_dpbf16ps(3, 5, 7);
          if (more) _tile_stream_loadd(5, a + 16 * k + (kb + 1) * 512, 64);
          if (more) _tile_loadd(7, b1 + (kb + 1) * 512, 64);
        }
        _tile_stored(0, c, 128);
        _tile_stored(1, c + 16, 128);
        _tile_stored(2, c + 512, 128);
        _tile_stored(3, c + 528, 128);
      }
    }
  }
  return 4L * nk * kRowBlocks * kPairs * passes;
}

}  // namespace

int main(int argc, char** argv) {
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0) {
    std::fprintf(stderr, "the OS did not grant the AMX tile state\n");
    return 1;
  }
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = 16;
  }
  _tile_loadconfig(&cfg);
  const auto xs = random_bf16(4096 * 512, 0x3f80), ws = random_bf16(1024 * 512, 0x3c00);
  const uint16_t* x = aligned(xs);
  const uint16_t* w = aligned(ws);
  _tile_loadd(4, x, 64);
  _tile_loadd(5, x + 512, 64);
  _tile_loadd(6, w, 64);
  _tile_loadd(7, w + 512, 64);
  report("vdpbf16ps", vdpbf16ps_only);
  report("products", products_only);
  const int sizes[][2] = {{16, 16}, {512, 32}, {1024, 128}, {512, 512}, {4096, 32}};
  for (const auto& ab : sizes) {
    char what[64];
    std::snprintf(what, sizeof what, "2x2 A %d KiB B %d KiB", ab[0], ab[1]);
    report(what, [&] { return block_2x2(x, ab[0], w, ab[1]); });
  }
  std::vector<float> sums(8 * 8 * 1024 + 16);
  float* c = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(sums.data()) + 63) & ~63);
  report("blocks, sums dropped", [&] { return blocks<0>(x, w, c); });
  report("blocks, sums stored", [&] { return blocks<1>(x, w, c); });
  report("blocks, sums loaded + stored", [&] { return blocks<2>(x, w, c); });
  const size_t weight_tiles = size_t{1024} * (argc > 1 ? std::strtoul(argv[1], nullptr, 10) : 64);
  if (weight_tiles < 1024) {
    std::fprintf(stderr, "WEIGHT_MIB must be at least 1\n");
    return 2;
  }
  const auto big = random_bf16(weight_tiles * 512, 0x3c00);  // 1 KiB tiles
  const char* what[] = {"driver, nothing asked", "driver, weight asked",
                        "driver, weight and x asked"};
  for (int asks = 0; asks < 3; ++asks) {
    report(what[asks], [&] { return driver(x, aligned(big), weight_tiles, c, asks); });
  }
  _tile_release();
  return 0;
}
