// Bounded multi-producer multi-consumer queue: Dmitry Vyukov's ring of cells
// with per-cell sequence numbers (1024cores.net, "Bounded MPMC queue"), plus a
// close flag folded into the enqueue counter and blocking waits for when the
// ring is empty or full. Header-only C++17 with no Python: the pybind11 layer
// (queue_bind.cpp) and the ThreadSanitizer stress program (queue_stress.cpp)
// both use it.
//
// How it works. Capacity C is a power of two. Cell i starts with seq = i.
// A producer reads enqueue_pos p; the cell p % C is free for it when its seq
// == p; it claims p by CAS enqueue_pos p -> p+1, writes the item and publishes
// it with seq = p+1 (release). A consumer at dequeue_pos p waits for seq ==
// p+1, claims p by CAS, reads the item and frees the cell for the producer one
// lap later with seq = p+C (release). Positions are 64-bit and never wrap.
//
// Guarantees
// - Bounded: at most C items. When full, try_push returns kFull and leaves the
//   item with the caller; push_wait sleeps until a pop frees a cell or its
//   deadline passes.
// - Order: every item takes a position when its push claims it, and items leave
//   in position order (one global FIFO over claims). So each producer's items
//   come out in the order it pushed them (FIFO per producer), and each consumer
//   sees every producer's items in increasing order. Pushes from different
//   producers that overlap in time are ordered by whichever CAS won; pushes
//   that do not overlap keep their real-time order.
// - Linearizable: a successful push or pop takes effect at its position CAS.
//   kEmpty / kFull are exact except in one window: a thread that has claimed a
//   cell but not yet published or freed it (a few instructions, longer only if
//   it is preempted there). Meanwhile try_pop may answer kEmpty although items
//   claimed later are already published, and try_push kFull although a pop has
//   already taken its item. Blocking waits never return on that state: the
//   late thread's publish wakes them.
// - Progress: no locks on the push/pop path, only atomic loads, one CAS and one
//   release store; a failed CAS means another thread claimed a position, so
//   the system as a whole moves on. Not wait-free: one thread can lose CASes
//   indefinitely. And strictly speaking not lock-free either: a thread stalled
//   between claim and publish holds up that one cell (others get kEmpty/kFull
//   there, they do not spin on it).
// - Memory ordering: cell seq is stored with release and loaded with acquire,
//   so an item's bytes are visible to the consumer that sees its seq (and the
//   consumer's read happens before the next lap's write). The position CASes
//   are relaxed: they only hand out positions; the cell seq carries the data.
//   Waking sleepers is a Dekker handshake: each side does a seq_cst fence
//   between publishing its own step and reading the other side's (waiter
//   count vs cell seq), so either the sleeper's re-check sees the item or the
//   producer sees the sleeper and signals it. Producers pay one fence and one
//   load per push; the mutex and condition variable are touched only when
//   somebody sleeps.
// - size_approx() is enqueue_pos - dequeue_pos read at two instants, clamped to
//   [0, C]: claimed-but-unpublished pushes count as in, claimed pops as out.
//   Under concurrency it is a hint, exact when the queue is quiescent.
// - close() sets a bit in enqueue_pos with one atomic OR, so it is ordered
//   against every push: a push either claimed its position before the close
//   (its item will be delivered) or fails with kClosed. Pops go on draining;
//   once the ring is empty and closed they return kClosed, for good.
// T must be trivially copyable: cells copy it with plain assignments and the
// queue never destroys one (the owner of the values, e.g. the Python layer with
// its references, drains what is left).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace xllm::mpmc {

enum class PushResult { kOk, kFull, kClosed };
enum class PopResult { kOk, kEmpty, kClosed };

using Clock = std::chrono::steady_clock;
using Deadline = std::optional<Clock::time_point>;  // nullopt: wait without a deadline

inline constexpr std::size_t kCacheLine = 64;
inline constexpr std::size_t kMaxCapacity = std::size_t{1} << 30;
// Tries before a blocked push/pop goes to sleep: about a microsecond or two,
// long enough to catch a hand-off already in flight, too short to burn a core.
inline constexpr int kSpinTries = 64;

inline bool is_valid_capacity(std::size_t capacity) {
  return capacity >= 2 && capacity <= kMaxCapacity && (capacity & (capacity - 1)) == 0;
}

inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

// Where threads sleep when the ring is empty (consumers) or full (producers).
// The waiter count lets the other side skip the mutex and the syscall when
// nobody sleeps, which is the common case under load.
class alignas(kCacheLine) WaitSet {
 public:
  // Call after the release store that made progress (a published item, a
  // freed cell, the close bit). `all` wakes every sleeper (batches, close).
  void notify(bool all) {
    // Pairs with the fence in wait(): either that sleeper's re-check sees our
    // store, or this load sees its count.
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (waiters_.load(std::memory_order_relaxed) == 0) return;
    // Taking the mutex orders us after a sleeper that counted itself but has
    // not reached cv_.wait yet: it holds the mutex until it does.
    { std::lock_guard<std::mutex> guard(mutex_); }
    if (all) {
      cv_.notify_all();
    } else {
      cv_.notify_one();
    }
  }

  // Sleeps until ready() returns true or the deadline passes; ready() runs
  // under the mutex after every wake-up (and once after a timeout), so a wake
  // taken by a faster thread just sends this one back to sleep. Returns the
  // last ready() result. ready() must not call notify() on any WaitSet of the
  // same queue (that would take a second mutex under this one).
  template <typename Ready>
  bool wait(Ready&& ready, const Deadline& deadline) {
    std::unique_lock<std::mutex> lock(mutex_);
    waiters_.fetch_add(1, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    bool ok = ready();
    while (!ok) {
      if (!deadline) {
        cv_.wait(lock);
      } else if (cv_.wait_until(lock, *deadline) == std::cv_status::timeout) {
        ok = ready();
        break;
      }
      ok = ready();
    }
    waiters_.fetch_sub(1, std::memory_order_relaxed);
    return ok;
  }

 private:
  std::atomic<std::uint32_t> waiters_{0};
  std::mutex mutex_;
  std::condition_variable cv_;
};

template <typename T>
class BoundedQueue {
  static_assert(std::is_trivially_copyable_v<T> && std::is_default_constructible_v<T>,
                "cells hold T by plain copies and never destroy one");

 public:
  explicit BoundedQueue(std::size_t capacity) : mask_(checked(capacity) - 1) {
    cells_ = std::make_unique<Cell[]>(capacity);
    for (std::size_t i = 0; i < capacity; ++i) cells_[i].seq.store(i, std::memory_order_relaxed);
  }
  BoundedQueue(const BoundedQueue&) = delete;
  BoundedQueue& operator=(const BoundedQueue&) = delete;

  std::size_t capacity() const { return mask_ + 1; }

  // A hint under concurrency (see the header comment), exact when quiescent.
  std::size_t size_approx() const {
    const std::uint64_t deq = dequeue_pos_.load(std::memory_order_acquire);
    const std::uint64_t enq = enqueue_pos_.load(std::memory_order_acquire) & ~kClosedBit;
    const std::uint64_t n = enq > deq ? enq - deq : 0;
    return static_cast<std::size_t>(std::min<std::uint64_t>(n, capacity()));
  }

  bool closed() const { return enqueue_pos_.load(std::memory_order_acquire) & kClosedBit; }

  // Refuses all later pushes and wakes every sleeper. Idempotent.
  void close() {
    enqueue_pos_.fetch_or(kClosedBit, std::memory_order_acq_rel);
    not_empty_.notify(true);
    not_full_.notify(true);
  }

  PushResult try_push(const T& value) {
    const PushResult r = push_quiet(value);
    if (r == PushResult::kOk) not_empty_.notify(false);
    return r;
  }

  PopResult try_pop(T& out) {
    const PopResult r = pop_quiet(out);
    if (r == PopResult::kOk) not_full_.notify(false);
    return r;
  }

  // Pushes items in order until the ring is full or closed; returns how many
  // went in (a prefix of items). *stop, if given, says why it stopped early.
  std::size_t try_push_many(const T* items /* [n] */, std::size_t n, PushResult* stop = nullptr) {
    std::size_t done = 0;
    PushResult r = PushResult::kOk;
    while (done < n && (r = push_quiet(items[done])) == PushResult::kOk) ++done;
    if (stop != nullptr) *stop = r;
    if (done > 0) not_empty_.notify(done > 1);
    return done;
  }

  // Pops up to max items into out in queue order; returns how many.
  std::size_t try_pop_many(T* out /* [max] */, std::size_t max, PopResult* stop = nullptr) {
    std::size_t done = 0;
    PopResult r = PopResult::kOk;
    while (done < max && (r = pop_quiet(out[done])) == PopResult::kOk) ++done;
    if (stop != nullptr) *stop = r;
    if (done > 0) not_full_.notify(done > 1);
    return done;
  }

  // Blocking push: spins briefly, then sleeps until a cell frees up, the queue
  // closes (kClosed) or the deadline passes (kFull).
  PushResult push_wait(const T& value, const Deadline& deadline) {
    PushResult r = PushResult::kFull;
    for (int i = 0; i < kSpinTries && r == PushResult::kFull; ++i) {
      r = push_quiet(value);
      if (r == PushResult::kFull) cpu_relax();
    }
    if (r == PushResult::kFull) {
      not_full_.wait([&] { return (r = push_quiet(value)) != PushResult::kFull; }, deadline);
    }
    if (r == PushResult::kOk) not_empty_.notify(false);
    return r;
  }

  // Blocking pop: spins briefly, then sleeps until an item arrives, the queue is
  // closed and drained (kClosed) or the deadline passes (kEmpty).
  PopResult pop_wait(T& out, const Deadline& deadline) {
    PopResult r = PopResult::kEmpty;
    for (int i = 0; i < kSpinTries && r == PopResult::kEmpty; ++i) {
      r = pop_quiet(out);
      if (r == PopResult::kEmpty) cpu_relax();
    }
    if (r == PopResult::kEmpty) {
      not_empty_.wait([&] { return (r = pop_quiet(out)) != PopResult::kEmpty; }, deadline);
    }
    if (r == PopResult::kOk) not_full_.notify(false);
    return r;
  }

 private:
  // Positions stay far below 2^63, so the top bit of enqueue_pos is free to
  // mean "closed"; every producer CAS on enqueue_pos then also checks it.
  static constexpr std::uint64_t kClosedBit = std::uint64_t{1} << 63;

  struct Cell {
    std::atomic<std::uint64_t> seq;
    T value;
  };

  static std::size_t checked(std::size_t capacity) {
    if (!is_valid_capacity(capacity)) {
      throw std::invalid_argument("capacity must be a power of two between 2 and 2^30, got " +
                                  std::to_string(capacity));
    }
    return capacity;
  }

  PushResult push_quiet(const T& value) {
    std::uint64_t pos = enqueue_pos_.load(std::memory_order_relaxed);
    for (;;) {
      if (pos & kClosedBit) return PushResult::kClosed;
      Cell& cell = cells_[pos & mask_];
      const std::uint64_t seq = cell.seq.load(std::memory_order_acquire);
      const auto diff = static_cast<std::int64_t>(seq - pos);
      if (diff == 0) {
        // On failure the CAS reloads pos (possibly with the closed bit).
        if (enqueue_pos_.compare_exchange_weak(pos, pos + 1, std::memory_order_relaxed,
                                               std::memory_order_relaxed)) {
          cell.value = value;
          cell.seq.store(pos + 1, std::memory_order_release);
          return PushResult::kOk;
        }
      } else if (diff < 0) {
        // The cell still holds the item from one lap ago: full (closed wins).
        return (enqueue_pos_.load(std::memory_order_relaxed) & kClosedBit) ? PushResult::kClosed
                                                                             : PushResult::kFull;
      } else {
        pos = enqueue_pos_.load(std::memory_order_relaxed);  // another producer got there first
      }
    }
  }

  PopResult pop_quiet(T& out) {
    std::uint64_t pos = dequeue_pos_.load(std::memory_order_relaxed);
    for (;;) {
      Cell& cell = cells_[pos & mask_];
      const std::uint64_t seq = cell.seq.load(std::memory_order_acquire);
      const auto diff = static_cast<std::int64_t>(seq - (pos + 1));
      if (diff == 0) {
        if (dequeue_pos_.compare_exchange_weak(pos, pos + 1, std::memory_order_relaxed,
                                               std::memory_order_relaxed)) {
          out = cell.value;
          cell.seq.store(pos + mask_ + 1, std::memory_order_release);
          return PopResult::kOk;
        }
      } else if (diff < 0) {
        // Nothing published at pos, and pos is current (a popped cell would
        // show seq >= pos + C). Closed for good only if nobody claimed pos
        // before the close; otherwise a push is still landing there.
        const std::uint64_t enq = enqueue_pos_.load(std::memory_order_acquire);
        return (enq & kClosedBit) && (enq & ~kClosedBit) == pos ? PopResult::kClosed
                                                                 : PopResult::kEmpty;
      } else {
        pos = dequeue_pos_.load(std::memory_order_relaxed);  // another consumer got there first
      }
    }
  }

  // Read-mostly fields first, then each hot counter on its own cache line so
  // producers and consumers do not bounce one line between them.
  const std::size_t mask_;
  std::unique_ptr<Cell[]> cells_;
  alignas(kCacheLine) std::atomic<std::uint64_t> enqueue_pos_{0};
  alignas(kCacheLine) std::atomic<std::uint64_t> dequeue_pos_{0};
  WaitSet not_empty_;  // consumers sleep here
  WaitSet not_full_;   // producers sleep here
};

}  // namespace xllm::mpmc
