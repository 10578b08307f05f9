// KV block pool with prefix cache (the design of vLLM v1's BlockPool and
// FreeKVCacheBlockQueue), plus the chained block hash the prefix cache keys on.
//
// All `num_blocks` blocks exist from construction on; each has a ref count and
// an optional 64-bit block hash. Block 0 is the null block: block tables are
// padded with it, so it is never allocated, freed or cached.
//
// Every block whose ref count is 0 sits in one LRU free list, cached or not: an
// intrusive doubly linked list over prev/next index arrays with head and tail
// sentinels, so removing a block from the middle (a prefix-cache hit on a free
// block) is O(1). Allocation pops the head; freeing appends at the tail, a
// request's blocks in reverse order so its last block (the least likely to be a
// shared prefix) is evicted first. A free block keeps its hash, so a later
// request with the same prefix can revive it with touch(); its hash is dropped
// only when allocate() hands the block out again (lazy eviction).
//
// Invariant: a block carries a hash exactly when the hash map points to it.
// Caching a hash that already names another block leaves the second block
// uncached (both hold the same tokens; one copy in the cache is enough).
//
// Not thread-safe: the scheduler owns one pool and calls it from one thread.
// Errors throw std::invalid_argument (a Python ValueError through pybind11)
// naming the argument, and are raised before anything changes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <unordered_map>
#include <utility>
#include <vector>

namespace xllm {

// ---- chained block hash --------------------------------------------------
// One lane of xxHash64: every 64-bit word goes through xxHash64's round and
// merge step, then the state through its avalanche. A block's hash absorbs,
// in order, its parent's hash, each token id (as a 64-bit two's-complement
// word), and `extra` (LoRA id, multimodal content hash, ...), seeded with the
// word count. A 64-bit hash can collide (about n^2 / 2^65 for n distinct
// blocks); callers that keep the block's tokens should confirm a hit.

constexpr uint64_t kHashPrime1 = 0x9E3779B185EBCA87ULL;
constexpr uint64_t kHashPrime2 = 0xC2B2AE3D27D4EB4FULL;
constexpr uint64_t kHashPrime3 = 0x165667B19E3779F9ULL;
constexpr uint64_t kHashPrime4 = 0x85EBCA77C2B2AE63ULL;
constexpr uint64_t kHashPrime5 = 0x27D4EB2F165667C5ULL;

constexpr uint64_t hash_rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

constexpr uint64_t hash_avalanche(uint64_t h) {
  h ^= h >> 33;
  h *= kHashPrime2;
  h ^= h >> 29;
  h *= kHashPrime3;
  h ^= h >> 32;
  return h;
}

// The parent hash of a sequence's first block: a fixed seed ("xllm-kv"), so
// hashes agree across processes and machines (prefix-aware routing needs that).
constexpr uint64_t kRootBlockHash = hash_avalanche(0x786C6C6D2D6B7600ULL + kHashPrime5);

// tokens: [num_tokens] token ids as 64-bit words.
uint64_t hash_block_tokens(uint64_t parent_hash, const uint64_t* tokens, size_t num_tokens,
                           uint64_t extra);

// tokens: [num_tokens]; out: [num_tokens / block_size], one chained hash per
// full block (a trailing partial block gets none). block_size >= 1.
void block_hashes(const uint64_t* tokens, size_t num_tokens, size_t block_size,
                  uint64_t parent_hash, uint64_t extra, uint64_t* out);

// ---- hash -> block map ---------------------------------------------------
// Open addressing with linear probing and backward-shift deletion (no
// tombstones). It never holds more than num_blocks entries, so its capacity is
// fixed at construction (load factor <= 1/2) and it never rehashes.
class BlockHashMap {
 public:
  explicit BlockHashMap(size_t max_entries);
  // Returns the block for `key`, or -1.
  int32_t find(uint64_t key) const;
  // Inserts key -> block unless `key` is present; returns whether it inserted.
  bool insert(uint64_t key, int32_t block);
  // Removes `key` if it maps to `block`; returns whether it removed.
  bool erase(uint64_t key, int32_t block);
  void clear();
  size_t size() const { return size_; }

 private:
  struct Slot {
    uint64_t key;
    int32_t block;  // -1: empty
  };
  size_t home(uint64_t key) const { return (key * kHashPrime1) >> shift_; }

  std::vector<Slot> slots_;
  size_t mask_ = 0;
  int shift_ = 0;
  size_t size_ = 0;
};

// ---- the pool --------------------------------------------------------------
class BlockPool {
 public:
  explicit BlockPool(int64_t num_blocks);

  int64_t num_blocks() const { return num_blocks_; }
  int64_t num_free_blocks() const { return num_free_; }
  int64_t num_cached_blocks() const { return static_cast<int64_t>(cache_.size()); }

  // Pops `n` blocks from the free-list head into out: [n], ref count 1 each,
  // dropping any hash they carry. Returns false, changing nothing, when fewer
  // than n blocks are free.
  bool allocate(int64_t n, int32_t* out);

  // blocks: [n]. Decrements each ref count; the blocks that reach 0 join the
  // free-list tail in reverse order of `blocks`.
  void free(const int64_t* blocks, size_t n);

  // blocks: [n]. Increments each ref count, taking a free block off the free
  // list (a prefix-cache hit).
  void touch(const int64_t* blocks, size_t n);

  // hashes: [n]; out: [n]. Writes the blocks of the longest cached prefix of
  // `hashes` and returns its length. Counts n queries and that many hits.
  size_t lookup(const uint64_t* hashes, size_t n, int32_t* out);

  // blocks, hashes: [n]. Records each (full) block's hash. Blocks must be in
  // use; a block already cached under the same hash is left as it is.
  void cache_blocks(const int64_t* blocks, const uint64_t* hashes, size_t n);

  int32_t ref_count(int64_t block) const;
  // The block's hash, if it carries one.
  std::pair<bool, uint64_t> block_hash(int64_t block) const;

  // The free list in eviction order (head first).
  std::vector<int32_t> free_block_ids() const;

  // Drops every hash; refused (false) while any block is in use.
  bool reset_prefix_cache();

  // ---- memory on demand ---------------------------------------------------
  // A retired block is out of service: out of the free list, never allocated,
  // its hash dropped (its memory may be unmapped). The KV pool retires the
  // blocks of pages it unmaps and restores them when it maps pages again.

  // blocks: [n], each free (ref count 0) and not retired. Takes them out of the
  // free list and drops their hashes, appending the dropped hashes to
  // `evicted` (may be null).
  void retire(const int64_t* blocks, size_t n, std::vector<uint64_t>* evicted);
  // blocks: [n], each retired. Puts them at the free-list head in the given
  // order (empty blocks are handed out before cached ones).
  void restore(const int64_t* blocks, size_t n);
  int64_t num_retired_blocks() const { return num_retired_; }

  // ---- block events ---------------------------------------------------------
  // With events on, every hash the cache gains (cache_blocks) or loses (lazy
  // eviction in allocate, retire, reset_prefix_cache) is noted; drain_events
  // returns the net change since the previous drain -- the hashes now cached
  // that were not, and those no longer cached -- so a listener applying the
  // deltas in order holds exactly cached_hashes(). Off by default (no cost).
  void set_events(bool on);
  void drain_events(std::vector<uint64_t>* added, std::vector<uint64_t>* evicted);
  std::vector<uint64_t> cached_hashes() const;
  bool is_retired(int64_t block) const {
    check_block(block, "block", -1);
    return retired_[block] != 0;
  }

  // (queried blocks, hit blocks) counted by lookup() since the last reset.
  std::pair<uint64_t, uint64_t> prefix_cache_stats() const { return {queries_, hits_}; }
  void reset_prefix_cache_stats() { queries_ = hits_ = 0; }

 private:
  // Checks 1 <= block < num_blocks; `what` names the argument, `index` its
  // position in a list (-1: a scalar argument).
  void check_block(int64_t block, const char* what, int64_t index) const {
    if (block < 1 || block >= num_blocks_) bad_block(block, what, index);
  }
  [[noreturn]] void bad_block(int64_t block, const char* what, int64_t index) const;
  void link_tail(int32_t block);
  void link_head(int32_t block);
  // Sets retired_ of each block to `to` (each was checked to be 1 - to).
  void flip_retired(const int64_t* blocks, size_t n, uint8_t to);
  void unlink(int32_t block);
  bool in_free_list(int32_t block) const { return next_[block] >= 0; }

  int32_t num_blocks_;
  int32_t head_;  // sentinel index num_blocks
  int32_t tail_;  // sentinel index num_blocks + 1
  int64_t num_free_ = 0;
  std::vector<int32_t> ref_;
  std::vector<int32_t> prev_, next_;  // [num_blocks + 2]; -1: not in the free list
  std::vector<uint64_t> hash_;
  std::vector<uint8_t> has_hash_;
  std::vector<uint8_t> retired_;
  int64_t num_retired_ = 0;
  void note(uint64_t hash, bool present) {
    if (events_) changes_[hash] = present;
  }
  bool events_ = false;
  std::unordered_map<uint64_t, bool> changes_;  // hash -> cached now (last change wins)
  BlockHashMap cache_;
  uint64_t queries_ = 0, hits_ = 0;
};

}  // namespace xllm
