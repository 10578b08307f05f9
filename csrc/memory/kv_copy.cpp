#include "memory/kv_copy.h"

#include <cstring>

#include "memory/block_pool.h"

namespace xllm {

void BlockChecksum::update(const uint8_t* data, size_t n) {
  // Lanes are assigned by word position in the whole stream, so the digest
  // does not depend on how the bytes are split across update() calls as long
  // as every piece but the last is a multiple of 32 bytes (segments are).
  size_t i = 0;
  uint64_t w[4];
  for (; i + 32 <= n; i += 32) {
    std::memcpy(w, data + i, 32);
    for (int j = 0; j < 4; ++j) {
      a_[j] += w[j];
      b_[j] += a_[j];
    }
  }
  if (i < n) {  // a tail: zero-padded to 32 bytes
    uint8_t tail[32] = {};
    std::memcpy(tail, data + i, n - i);
    std::memcpy(w, tail, 32);
    for (int j = 0; j < 4; ++j) {
      a_[j] += w[j];
      b_[j] += a_[j];
    }
  }
  bytes_ += n;
}

uint64_t BlockChecksum::digest() const {
  uint64_t h = hash_avalanche(bytes_ + kHashPrime5);
  for (int j = 0; j < 4; ++j) {
    h = hash_avalanche(h ^ (a_[j] * kHashPrime1));
    h = hash_avalanche(h ^ (b_[j] * kHashPrime2));
  }
  return h;
}

uint64_t block_checksum(const uint8_t* data, size_t n) {
  BlockChecksum c;
  c.update(data, n);
  return c.digest();
}

void kv_gather_blocks(const uint8_t* const* regions, size_t num_regions, size_t segment_bytes,
                      const int64_t* blocks, size_t n, uint8_t* dst, size_t slot_bytes,
                      const int64_t* slots, uint64_t* checksums) {
  for (size_t i = 0; i < n; ++i) {
    const size_t off = static_cast<size_t>(blocks[i]) * segment_bytes;
    uint8_t* out = dst + static_cast<size_t>(slots[i]) * slot_bytes;
    BlockChecksum c;
    for (size_t r = 0; r < num_regions; ++r) {
      // Copied, then summed while the segment is still in L1.
      std::memcpy(out, regions[r] + off, segment_bytes);
      c.update(out, segment_bytes);
      out += segment_bytes;
    }
    checksums[i] = c.digest();
  }
}

size_t kv_scatter_blocks(const uint8_t* src, size_t slot_bytes, const int64_t* slots,
                         const uint64_t* checksums, size_t n, uint8_t* const* regions,
                         size_t num_regions, size_t segment_bytes, const int64_t* blocks) {
  for (size_t i = 0; i < n; ++i) {
    const size_t off = static_cast<size_t>(blocks[i]) * segment_bytes;
    const uint8_t* in = src + static_cast<size_t>(slots[i]) * slot_bytes;
    BlockChecksum c;
    for (size_t r = 0; r < num_regions; ++r) {
      uint8_t* out = regions[r] + off;
      std::memcpy(out, in, segment_bytes);
      c.update(out, segment_bytes);  // the bytes as they landed
      in += segment_bytes;
    }
    if (c.digest() != checksums[i]) return i;
  }
  return n;
}

}  // namespace xllm
