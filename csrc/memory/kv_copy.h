// Copies of whole KV blocks between the paged KV cache and a tier's slots, each
// with a checksum of the block's bytes computed in the same pass.
//
// The KV cache is 2 * num_layers regions (one per layer's key and value
// tensor, xllm/ops/kv_cache.py; under tensor parallelism every rank's, whose
// segments differ when its share of the heads does); block b occupies
// `segments[r]` bytes at region r + b * segments[r]. A tier slot holds one block
// as those segments back to back (region order), slot_bytes = their sum.
//
// The checksum is a Fletcher-style sum over 64-bit words in eight lanes
// (word i of each 64-byte chunk goes to lane i; running sums and sums of
// sums, mod 2^64; a tail is zero-padded to 64 bytes) finished with xxHash64's
// avalanche. It catches flipped bits, zeroed or swapped words and torn
// writes; it guards against corruption, not against an adversary. The value
// is the same at every ISA level (blocks may rest on disk and be read by a
// process on another CPU); the AVX2 version sums from L1 several times faster
// than a copy from memory runs.
#pragma once

#include <cstddef>
#include <cstdint>

namespace xllm {

class BlockChecksum {
 public:
  // Every piece but the last must be a multiple of 64 bytes for the value to
  // equal one update() over the whole stream (a block's segments are summed
  // one by one, so callers keep to the same split).
  void update(const uint8_t* data, size_t n);
  // Copies src[0, n) to dst and sums the bytes in the same pass (stream: store
  // past the cache where dst allows). Same value as memcpy, then update(dst).
  void copy_update(uint8_t* dst, const uint8_t* src, size_t n, bool stream);
  uint64_t digest() const;

 private:
  uint64_t a_[8] = {};
  uint64_t b_[8] = {};
  uint64_t bytes_ = 0;
};

uint64_t block_checksum(const uint8_t* data, size_t n);

// Block blocks[i] -> slot slots[i] of dst (slot s at dst + s * slot_bytes);
// writes each block's checksum to checksums[i].
void kv_gather_blocks(const uint8_t* const* regions, size_t num_regions, const size_t* segments,
                      const int64_t* blocks, size_t n, uint8_t* dst, size_t slot_bytes,
                      const int64_t* slots, uint64_t* checksums);

// Slot slots[i] of src -> block blocks[i], in order, checking each slot's bytes
// against checksums[i] as they are copied. Returns how many leading blocks
// arrived intact: at the first mismatch it stops (that block's bytes are then
// garbage and must be recomputed).
size_t kv_scatter_blocks(const uint8_t* src, size_t slot_bytes, const int64_t* slots,
                         const uint64_t* checksums, size_t n, uint8_t* const* regions,
                         size_t num_regions, const size_t* segments, const int64_t* blocks);

// Block src_blocks[i] of the src regions -> block dst_blocks[i] of the dst
// regions (another KV cache: a peer's, mapped from its memfd), checksums of
// each block's bytes to checksums[i], one pass, streaming stores.
void kv_copy_blocks(const uint8_t* const* src_regions, const int64_t* src_blocks,
                    uint8_t* const* dst_regions, const int64_t* dst_blocks, size_t n,
                    size_t num_regions, const size_t* segments, uint64_t* checksums);

// The checksum of each block in place (what kv_gather_blocks would return).
void kv_blocks_checksums(const uint8_t* const* regions, size_t num_regions,
                         const size_t* segments, const int64_t* blocks, size_t n,
                         uint64_t* checksums);

// ---- the disk tier: blocks straight between the KV cache and a file ---------
// Slot s of the file is at offsets[i]; its bytes are the block's segments in
// region order (the same image as a tier slot), so one preadv/pwritev per block
// with an iovec per segment moves it, no staging copy.

struct DiskIoResult {
  size_t done;  // leading blocks moved (and, on reads, checked)
  int error;    // 0; an errno from the first failure; -1 a short transfer (EOF, full disk);
                // -2 a read block that failed its checksum
};

// Reads blocks[i] from fd at offsets[i], checking each against checksums[i];
// stops at the first failure.
DiskIoResult kv_disk_read(int fd, const int64_t* offsets, const uint64_t* checksums, size_t n,
                          uint8_t* const* regions, size_t num_regions, const size_t* segments,
                          const int64_t* blocks);

// Writes blocks[i] to fd at offsets[i] and their checksums to checksums[i];
// stops at the first failure.
DiskIoResult kv_disk_write(int fd, const int64_t* offsets, size_t n,
                           const uint8_t* const* regions, size_t num_regions,
                           const size_t* segments, const int64_t* blocks, uint64_t* checksums);

}  // namespace xllm
