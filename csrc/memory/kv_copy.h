// Copies of whole KV blocks between the paged KV cache and a tier's slots, each
// with a checksum of the block's bytes computed in the same pass.
//
// The KV cache is 2 * num_layers regions (one per layer's key and value
// tensor, xllm/ops/kv_cache.py); block b occupies `segment_bytes` bytes at
// region + b * segment_bytes in each. A tier slot holds one block as those
// segments back to back (region order), slot_bytes = regions * segment_bytes.
//
// The checksum is a Fletcher-style sum over 64-bit words in four lanes
// (running sums and sums of sums, mod 2^64) finished with xxHash64's
// avalanche: it reads at memory speed and catches flipped bits, zeroed or
// swapped words and torn writes. It guards against corruption, not against
// an adversary.
#pragma once

#include <cstddef>
#include <cstdint>

namespace xllm {

class BlockChecksum {
 public:
  void update(const uint8_t* data, size_t n);
  uint64_t digest() const;

 private:
  uint64_t a_[4] = {0, 0, 0, 0};
  uint64_t b_[4] = {0, 0, 0, 0};
  uint64_t bytes_ = 0;
};

uint64_t block_checksum(const uint8_t* data, size_t n);

// Block blocks[i] -> slot slots[i] of dst (slot s at dst + s * slot_bytes);
// writes each block's checksum to checksums[i].
void kv_gather_blocks(const uint8_t* const* regions, size_t num_regions, size_t segment_bytes,
                      const int64_t* blocks, size_t n, uint8_t* dst, size_t slot_bytes,
                      const int64_t* slots, uint64_t* checksums);

// Slot slots[i] of src -> block blocks[i], in order, checking each slot's bytes
// against checksums[i] as they are copied. Returns how many leading blocks
// arrived intact: at the first mismatch it stops (that block's bytes are then
// garbage and must be recomputed).
size_t kv_scatter_blocks(const uint8_t* src, size_t slot_bytes, const int64_t* slots,
                         const uint64_t* checksums, size_t n, uint8_t* const* regions,
                         size_t num_regions, size_t segment_bytes, const int64_t* blocks);

}  // namespace xllm
