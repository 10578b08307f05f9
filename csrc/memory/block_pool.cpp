// KV block pool with prefix cache; see block_pool.h for the design.
#include "memory/block_pool.h"

#include <algorithm>

#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>

namespace xllm {
namespace {

template <class... Parts>
[[noreturn]] void invalid(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw std::invalid_argument(os.str());
}

// xxHash64's round with a zero accumulator, then its merge into the state.
inline uint64_t absorb(uint64_t state, uint64_t word) {
  state ^= hash_rotl(word * kHashPrime2, 31) * kHashPrime1;
  return hash_rotl(state, 27) * kHashPrime1 + kHashPrime4;
}

}  // namespace

// ---- chained block hash ------------------------------------------------------

uint64_t hash_block_tokens(uint64_t parent_hash, const uint64_t* tokens, size_t num_tokens,
                           uint64_t extra) {
  // Seeding with the word count keeps blocks of different lengths apart even
  // where their words would otherwise line up.
  uint64_t h = kHashPrime5 + 8 * (static_cast<uint64_t>(num_tokens) + 2);
  h = absorb(h, parent_hash);
  for (size_t i = 0; i < num_tokens; ++i) h = absorb(h, tokens[i]);
  h = absorb(h, extra);
  return hash_avalanche(h);
}

void block_hashes(const uint64_t* tokens, size_t num_tokens, size_t block_size,
                  uint64_t parent_hash, uint64_t extra, uint64_t* out) {
  if (block_size < 1) invalid("block_size must be >= 1, got ", block_size);
  const size_t num_full = num_tokens / block_size;
  for (size_t b = 0; b < num_full; ++b) {
    parent_hash = hash_block_tokens(parent_hash, tokens + b * block_size, block_size, extra);
    out[b] = parent_hash;
  }
}

// ---- hash -> block map -------------------------------------------------------

BlockHashMap::BlockHashMap(size_t max_entries) {
  size_t capacity = 8;
  int bits = 3;
  while (capacity < 2 * max_entries) {
    capacity <<= 1;
    ++bits;
  }
  slots_.assign(capacity, Slot{0, -1});
  mask_ = capacity - 1;
  shift_ = 64 - bits;
}

int32_t BlockHashMap::find(uint64_t key) const {
  for (size_t i = home(key);; i = (i + 1) & mask_) {
    const Slot& s = slots_[i];
    if (s.block < 0) return -1;
    if (s.key == key) return s.block;
  }
}

bool BlockHashMap::insert(uint64_t key, int32_t block) {
  size_t i = home(key);
  for (; slots_[i].block >= 0; i = (i + 1) & mask_) {
    if (slots_[i].key == key) return false;
  }
  slots_[i] = Slot{key, block};
  ++size_;
  return true;
}

bool BlockHashMap::erase(uint64_t key, int32_t block) {
  size_t i = home(key);
  for (;; i = (i + 1) & mask_) {
    if (slots_[i].block < 0) return false;
    if (slots_[i].key == key) break;
  }
  if (slots_[i].block != block) return false;
  // Backward-shift deletion: pull later entries of the probe run into the hole
  // when their home lies at or before it, so lookups never need tombstones.
  size_t hole = i;
  for (size_t j = (hole + 1) & mask_; slots_[j].block >= 0; j = (j + 1) & mask_) {
    const size_t h = home(slots_[j].key);
    // Is h cyclically outside (hole, j]? Then the entry may move into the hole.
    const bool movable = hole <= j ? (h <= hole || h > j) : (h <= hole && h > j);
    if (movable) {
      slots_[hole] = slots_[j];
      hole = j;
    }
  }
  slots_[hole].block = -1;
  --size_;
  return true;
}

void BlockHashMap::clear() {
  for (Slot& s : slots_) s.block = -1;
  size_ = 0;
}

// ---- the pool ----------------------------------------------------------------

BlockPool::BlockPool(int64_t num_blocks)
    : num_blocks_(0), head_(0), tail_(0), cache_(num_blocks > 0 ? num_blocks : 0) {
  if (num_blocks < 2) {
    invalid("num_blocks must be >= 2 (block 0 is the reserved null block), got ", num_blocks);
  }
  if (num_blocks > std::numeric_limits<int32_t>::max() - 2) {
    invalid("num_blocks must be < 2**31 - 2, got ", num_blocks);
  }
  num_blocks_ = static_cast<int32_t>(num_blocks);
  head_ = num_blocks_;
  tail_ = num_blocks_ + 1;
  ref_.assign(num_blocks_, 0);
  hash_.assign(num_blocks_, 0);
  has_hash_.assign(num_blocks_, 0);
  retired_.assign(num_blocks_, 0);
  prev_.assign(num_blocks_ + 2, -1);
  next_.assign(num_blocks_ + 2, -1);
  prev_[head_] = -1;
  next_[head_] = tail_;
  prev_[tail_] = head_;
  next_[tail_] = -1;
  // The null block stays out of the free list for good; the rest start free
  // in id order, so a fresh pool hands out 1, 2, 3, ...
  for (int32_t b = 1; b < num_blocks_; ++b) link_tail(b);
}

void BlockPool::bad_block(int64_t block, const char* what, int64_t index) const {
  std::ostringstream where;
  where << what;
  if (index >= 0) where << "[" << index << "]";
  if (block == 0) {
    invalid(where.str(), " is the null block 0, which is never allocated, freed or cached");
  }
  invalid(where.str(), " = ", block, " is not a block id in [1, ", num_blocks_, ")");
}

void BlockPool::link_tail(int32_t block) {
  const int32_t last = prev_[tail_];
  next_[last] = block;
  prev_[block] = last;
  next_[block] = tail_;
  prev_[tail_] = block;
  ++num_free_;
}

void BlockPool::link_head(int32_t block) {
  const int32_t first = next_[head_];
  prev_[first] = block;
  next_[block] = first;
  prev_[block] = head_;
  next_[head_] = block;
  ++num_free_;
}

void BlockPool::unlink(int32_t block) {
  next_[prev_[block]] = next_[block];
  prev_[next_[block]] = prev_[block];
  prev_[block] = next_[block] = -1;
  --num_free_;
}

bool BlockPool::allocate(int64_t n, int32_t* out) {
  if (n < 0) invalid("n must be >= 0, got ", n);
  if (n > num_free_) return false;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t b = next_[head_];
    unlink(b);
    if (has_hash_[b]) {  // lazy eviction of the least recently freed cached block
      cache_.erase(hash_[b], b);
      has_hash_[b] = 0;
      note(hash_[b], false);
    }
    ref_[b] = 1;
    out[i] = b;
  }
  return true;
}

void BlockPool::free(const int64_t* blocks, size_t n) {
  for (size_t i = 0; i < n; ++i) check_block(blocks[i], "blocks", static_cast<int64_t>(i));
  // Decrement first (a block may appear as often as it is held), undoing the
  // decrements on the first over-free so a failed call changes nothing.
  for (size_t i = 0; i < n; ++i) {
    const int64_t b = blocks[i];
    if (ref_[b] == 0) {
      for (size_t j = 0; j < i; ++j) ++ref_[blocks[j]];
      invalid("blocks[", i, "] = ", b, " is already free (ref count 0)");
    }
    --ref_[b];
  }
  // Tail-first: the request's last block joins the free list first, so it is
  // evicted before the prefix blocks other requests are likelier to share.
  for (size_t i = n; i-- > 0;) {
    const int32_t b = static_cast<int32_t>(blocks[i]);
    if (ref_[b] == 0 && !in_free_list(b)) link_tail(b);
  }
}

void BlockPool::touch(const int64_t* blocks, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    check_block(blocks[i], "blocks", static_cast<int64_t>(i));
    if (retired_[blocks[i]]) invalid("blocks[", i, "] = ", blocks[i], " is retired");
  }
  for (size_t i = 0; i < n; ++i) {
    const int32_t b = static_cast<int32_t>(blocks[i]);
    if (ref_[b] == 0) unlink(b);
    ++ref_[b];
  }
}

size_t BlockPool::lookup(const uint64_t* hashes, size_t n, int32_t* out) {
  size_t hit = 0;
  for (; hit < n; ++hit) {
    const int32_t b = cache_.find(hashes[hit]);
    if (b < 0) break;
    out[hit] = b;
  }
  queries_ += n;
  hits_ += hit;
  return hit;
}

void BlockPool::cache_blocks(const int64_t* blocks, const uint64_t* hashes, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const int64_t b = blocks[i];
    check_block(b, "blocks", static_cast<int64_t>(i));
    if (ref_[b] == 0) {
      invalid("blocks[", i, "] = ", b, " is free (ref count 0); cache a block while a "
              "request holds it");
    }
    if (has_hash_[b] && hash_[b] != hashes[i]) {
      invalid("blocks[", i, "] = ", b, " is already cached under hash ", hash_[b],
              ", not hashes[", i, "] = ", hashes[i], " (a full block's tokens never change)");
    }
  }
  // The same block listed twice with two hashes is only seen while applying;
  // undo this call's entries before raising.
  std::vector<size_t> added;
  for (size_t i = 0; i < n; ++i) {
    const int32_t b = static_cast<int32_t>(blocks[i]);
    if (has_hash_[b]) {
      if (hash_[b] == hashes[i]) continue;
      for (size_t j : added) {
        const int32_t a = static_cast<int32_t>(blocks[j]);
        cache_.erase(hash_[a], a);
        has_hash_[a] = 0;
      }
      invalid("blocks[", i, "] = ", b, " appears earlier in blocks with hash ", hash_[b],
              ", not hashes[", i, "] = ", hashes[i]);
    }
    // A hash that already names another block leaves this one uncached.
    if (cache_.insert(hashes[i], b)) {
      hash_[b] = hashes[i];
      has_hash_[b] = 1;
      added.push_back(i);
    }
  }
  for (size_t i : added) note(hashes[i], true);
}

int32_t BlockPool::ref_count(int64_t block) const {
  check_block(block, "block", -1);
  return ref_[block];
}

std::pair<bool, uint64_t> BlockPool::block_hash(int64_t block) const {
  check_block(block, "block", -1);
  return {has_hash_[block] != 0, hash_[block]};
}

std::vector<int32_t> BlockPool::free_block_ids() const {
  std::vector<int32_t> ids;
  ids.reserve(static_cast<size_t>(num_free_));
  for (int32_t b = next_[head_]; b != tail_; b = next_[b]) ids.push_back(b);
  return ids;
}

bool BlockPool::reset_prefix_cache() {
  // Like vLLM: a block in use may be shared through its hash right now, so the
  // cache is only dropped when nothing is in use.
  if (num_free_ + num_retired_ != num_blocks_ - 1) return false;
  if (events_) {
    for (int32_t b = 1; b < num_blocks_; ++b) {
      if (has_hash_[b]) note(hash_[b], false);
    }
  }
  cache_.clear();
  for (auto& h : has_hash_) h = 0;
  return true;
}

void BlockPool::flip_retired(const int64_t* blocks, size_t n, uint8_t to) {
  // Every block was checked to be in the other state, so a block found already flipped
  // is listed twice: undo and refuse, before anything else changed.
  for (size_t i = 0; i < n; ++i) {
    const int64_t b = blocks[i];
    if (retired_[b] == to) {
      for (size_t j = 0; j < i; ++j) retired_[blocks[j]] = static_cast<uint8_t>(1 - to);
      invalid("blocks[", i, "] = ", b, " appears twice");
    }
    retired_[b] = to;
  }
}

void BlockPool::retire(const int64_t* blocks, size_t n, std::vector<uint64_t>* evicted) {
  for (size_t i = 0; i < n; ++i) {
    const int64_t b = blocks[i];
    check_block(b, "blocks", static_cast<int64_t>(i));
    if (retired_[b]) invalid("blocks[", i, "] = ", b, " is already retired");
    if (ref_[b] != 0) {
      invalid("blocks[", i, "] = ", b, " is in use (ref count ", ref_[b],
              "); retire only free blocks");
    }
  }
  flip_retired(blocks, n, 1);
  for (size_t i = 0; i < n; ++i) {
    const int32_t b = static_cast<int32_t>(blocks[i]);
    unlink(b);
    if (has_hash_[b]) {
      cache_.erase(hash_[b], b);
      has_hash_[b] = 0;
      note(hash_[b], false);
      if (evicted != nullptr) evicted->push_back(hash_[b]);
    }
  }
  num_retired_ += static_cast<int64_t>(n);
}

void BlockPool::set_events(bool on) {
  events_ = on;
  if (!on) changes_.clear();
}

void BlockPool::drain_events(std::vector<uint64_t>* added, std::vector<uint64_t>* evicted) {
  for (const auto& [hash, present] : changes_) (present ? added : evicted)->push_back(hash);
  changes_.clear();
  std::sort(added->begin(), added->end());  // a deterministic order (the twin's too)
  std::sort(evicted->begin(), evicted->end());
}

std::vector<uint64_t> BlockPool::cached_hashes() const {
  std::vector<uint64_t> out;
  out.reserve(cache_.size());
  for (int32_t b = 1; b < num_blocks_; ++b) {
    if (has_hash_[b]) out.push_back(hash_[b]);
  }
  return out;
}

void BlockPool::restore(const int64_t* blocks, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const int64_t b = blocks[i];
    check_block(b, "blocks", static_cast<int64_t>(i));
    if (!retired_[b]) invalid("blocks[", i, "] = ", b, " is not retired");
  }
  flip_retired(blocks, n, 0);
  // Linked at the head last block first, so blocks[0] ends up first in line.
  for (size_t i = n; i-- > 0;) link_head(static_cast<int32_t>(blocks[i]));
  num_retired_ -= static_cast<int64_t>(n);
}

}  // namespace xllm
