#include "memory/kv_copy.h"

#include <immintrin.h>

#include <fcntl.h>
#include <sys/uio.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <vector>

#include "common/cpu_info.h"
#include "memory/block_pool.h"

namespace xllm {

namespace {

// Adds the whole 64-byte chunks of data[0, n) to the lanes; returns the bytes consumed.
size_t sum_chunks_scalar(const uint8_t* data, size_t n, uint64_t* a, uint64_t* b) {
  size_t i = 0;
  uint64_t w[8];
  for (; i + 64 <= n; i += 64) {
    std::memcpy(w, data + i, 64);
    for (int j = 0; j < 8; ++j) {
      a[j] += w[j];
      b[j] += a[j];
    }
  }
  return i;
}

// The whole 64-byte chunks of src[0, n) summed into the lanes and, unless kMode
// is kSumOnly, copied to dst in the same pass (kStream: streaming stores, past
// the cache: a tier's copy is not read again soon, and they spare the read of
// each destination line; dst must be 32-byte aligned). Returns the bytes done.
enum class Pass { kSumOnly, kCopy, kStream };

template <Pass kMode>
__attribute__((target("avx2"))) size_t sum_avx2(uint8_t* dst, const uint8_t* src, size_t n,
                                                uint64_t* a, uint64_t* b) {
  __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
  __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 4));
  __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
  __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 4));
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 32));
    if constexpr (kMode == Pass::kStream) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i), w0);
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 32), w1);
    } else if constexpr (kMode == Pass::kCopy) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), w0);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i + 32), w1);
    }
    a0 = _mm256_add_epi64(a0, w0);
    a1 = _mm256_add_epi64(a1, w1);
    b0 = _mm256_add_epi64(b0, a0);
    b1 = _mm256_add_epi64(b1, a1);
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(a), a0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(a + 4), a1);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(b), b0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(b + 4), b1);
  return i;
}

}  // namespace

void BlockChecksum::copy_update(uint8_t* dst, const uint8_t* src, size_t n, bool stream) {
  size_t done = 0;
  if (active_isa() >= Isa::kAvx2) {
    done = stream && reinterpret_cast<uintptr_t>(dst) % 32 == 0
               ? sum_avx2<Pass::kStream>(dst, src, n, a_, b_)
               : sum_avx2<Pass::kCopy>(dst, src, n, a_, b_);
    bytes_ += done;
  }
  std::memcpy(dst + done, src + done, n - done);
  update(dst + done, n - done);
}

void BlockChecksum::update(const uint8_t* data, size_t n) {
  const size_t done = active_isa() >= Isa::kAvx2
                          ? sum_avx2<Pass::kSumOnly>(nullptr, data, n, a_, b_)
                          : sum_chunks_scalar(data, n, a_, b_);
  if (done < n) {  // a tail: zero-padded to 64 bytes
    uint8_t tail[64] = {};
    std::memcpy(tail, data + done, n - done);
    sum_chunks_scalar(tail, 64, a_, b_);
  }
  bytes_ += n;
}

uint64_t BlockChecksum::digest() const {
  uint64_t h = hash_avalanche(bytes_ + kHashPrime5);
  for (int j = 0; j < 8; ++j) {
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

void kv_gather_blocks(const uint8_t* const* regions, size_t num_regions, const size_t* segments,
                      const int64_t* blocks, size_t n, uint8_t* dst, size_t slot_bytes,
                      const int64_t* slots, uint64_t* checksums) {
  for (size_t i = 0; i < n; ++i) {
    const size_t b = static_cast<size_t>(blocks[i]);
    uint8_t* out = dst + static_cast<size_t>(slots[i]) * slot_bytes;
    BlockChecksum c;
    for (size_t r = 0; r < num_regions; ++r) {
      c.copy_update(out, regions[r] + b * segments[r], segments[r], /*stream=*/true);
      out += segments[r];
    }
    checksums[i] = c.digest();
  }
  _mm_sfence();  // the streamed stores are visible before the slots are published
}

void kv_copy_blocks(const uint8_t* const* src_regions, const int64_t* src_blocks,
                    uint8_t* const* dst_regions, const int64_t* dst_blocks, size_t n,
                    size_t num_regions, const size_t* segments, uint64_t* checksums) {
  for (size_t i = 0; i < n; ++i) {
    const size_t sb = static_cast<size_t>(src_blocks[i]);
    const size_t db = static_cast<size_t>(dst_blocks[i]);
    BlockChecksum c;
    for (size_t r = 0; r < num_regions; ++r) {
      c.copy_update(dst_regions[r] + db * segments[r], src_regions[r] + sb * segments[r],
                    segments[r], /*stream=*/true);
    }
    checksums[i] = c.digest();
  }
  _mm_sfence();
}

void kv_blocks_checksums(const uint8_t* const* regions, size_t num_regions,
                         const size_t* segments, const int64_t* blocks, size_t n,
                         uint64_t* checksums) {
  for (size_t i = 0; i < n; ++i) {
    const size_t b = static_cast<size_t>(blocks[i]);
    BlockChecksum c;
    for (size_t r = 0; r < num_regions; ++r) c.update(regions[r] + b * segments[r], segments[r]);
    checksums[i] = c.digest();
  }
}

size_t kv_scatter_blocks(const uint8_t* src, size_t slot_bytes, const int64_t* slots,
                         const uint64_t* checksums, size_t n, uint8_t* const* regions,
                         size_t num_regions, const size_t* segments, const int64_t* blocks) {
  for (size_t i = 0; i < n; ++i) {
    const size_t b = static_cast<size_t>(blocks[i]);
    const uint8_t* in = src + static_cast<size_t>(slots[i]) * slot_bytes;
    BlockChecksum c;
    for (size_t r = 0; r < num_regions; ++r) {
      // Streamed too: a prefix of many blocks outgrows the caches anyway, and the stores
      // then cost no read of the lines they replace (0.55x -> 0.8x of memcpy's rate).
      c.copy_update(regions[r] + b * segments[r], in, segments[r], /*stream=*/true);
      in += segments[r];
    }
    if (c.digest() != checksums[i]) {
      _mm_sfence();
      return i;
    }
  }
  _mm_sfence();  // visible to the attention kernels' threads on other cores
  return n;
}

namespace {

// Moves one block with preadv/pwritev, resuming after partial transfers.
// Returns 0, an errno, or -1 when the file ended or the device took nothing.
template <bool kRead>
int move_block(int fd, int64_t offset, std::vector<iovec>& iov) {
  size_t first = 0;
  while (first < iov.size()) {
    const int count = static_cast<int>(std::min<size_t>(iov.size() - first, IOV_MAX));
    const ssize_t got = kRead ? preadv(fd, iov.data() + first, count, offset)
                              : pwritev(fd, iov.data() + first, count, offset);
    if (got < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (got == 0) return -1;
    offset += got;
    size_t left = static_cast<size_t>(got);
    while (left > 0 && first < iov.size()) {  // drop what moved; trim a partial iovec
      if (left >= iov[first].iov_len) {
        left -= iov[first].iov_len;
        ++first;
      } else {
        iov[first].iov_base = static_cast<uint8_t*>(iov[first].iov_base) + left;
        iov[first].iov_len -= left;
        left = 0;
      }
    }
  }
  return 0;
}

void block_iov(std::vector<iovec>& iov, const uint8_t* const* regions, size_t num_regions,
               const size_t* segments, int64_t block) {
  const size_t b = static_cast<size_t>(block);
  for (size_t r = 0; r < num_regions; ++r) {
    iov[r].iov_base = const_cast<uint8_t*>(regions[r] + b * segments[r]);
    iov[r].iov_len = segments[r];
  }
}

uint64_t block_sum(const uint8_t* const* regions, size_t num_regions, const size_t* segments,
                   int64_t block) {
  const size_t b = static_cast<size_t>(block);
  BlockChecksum c;
  for (size_t r = 0; r < num_regions; ++r) c.update(regions[r] + b * segments[r], segments[r]);
  return c.digest();
}

}  // namespace

DiskIoResult kv_disk_read(int fd, const int64_t* offsets, const uint64_t* checksums, size_t n,
                          uint8_t* const* regions, size_t num_regions, const size_t* segments,
                          const int64_t* blocks) {
  // Ask for every slot up front (runs of adjacent slots as one range), so the device reads
  // ahead while earlier blocks are copied and checked, as it does for one sequential read.
  int64_t slot_bytes = 0;
  for (size_t r = 0; r < num_regions; ++r) slot_bytes += static_cast<int64_t>(segments[r]);
  for (size_t i = 0; i < n;) {
    size_t j = i + 1;
    while (j < n && offsets[j] == offsets[j - 1] + slot_bytes) ++j;
    posix_fadvise(fd, offsets[i], static_cast<off_t>(j - i) * slot_bytes, POSIX_FADV_WILLNEED);
    i = j;
  }
  std::vector<iovec> iov(num_regions);
  for (size_t i = 0; i < n; ++i) {
    block_iov(iov, regions, num_regions, segments, blocks[i]);
    const int err = move_block<true>(fd, offsets[i], iov);
    if (err != 0) return {i, err};
    if (block_sum(regions, num_regions, segments, blocks[i]) != checksums[i]) return {i, -2};
  }
  return {n, 0};
}

DiskIoResult kv_disk_write(int fd, const int64_t* offsets, size_t n,
                           const uint8_t* const* regions, size_t num_regions,
                           const size_t* segments, const int64_t* blocks, uint64_t* checksums) {
  std::vector<iovec> iov(num_regions);
  for (size_t i = 0; i < n; ++i) {
    checksums[i] = block_sum(regions, num_regions, segments, blocks[i]);
    block_iov(iov, regions, num_regions, segments, blocks[i]);
    const int err = move_block<false>(fd, offsets[i], iov);
    if (err != 0) return {i, err};
  }
  return {n, 0};
}

}  // namespace xllm
