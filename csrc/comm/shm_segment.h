// The shared-memory segment's layout, shared by the lifecycle code
// (shm_allreduce.cpp) and the collective (shm_collective.cpp). Private to csrc/comm.
//
//   [SegmentHeader, padded to 4 KiB][slot 0] ... [slot world_size-1][result area]
//
// each slot and the result area being buffer_bytes long.
#pragma once

#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "comm/shm_allreduce.h"

namespace xllm::comm {

constexpr uint64_t kMagic = 0x31726131'6d6c6c78ull;  // "xllm1ar1" little-endian
constexpr uint32_t kVersion = 1;
constexpr int64_t kDataAlign = 4096;

enum RankState : int32_t { kFree = 0, kAttached = 1, kClosed = 2 };
enum AbortState : int32_t { kNoAbort = 0, kAbortWriting = 1, kAbortPublished = 2 };

// One per rank. `arrived` is polled by every rank at every barrier, so it sits
// alone on its cache line; the rest changes at most once per call.
struct alignas(128) RankControl {
  std::atomic<uint64_t> arrived;  // barriers this rank has reached
  std::atomic<int32_t> cpu;       // the CPU it last arrived from (a scheduling hint only)
  char pad[64 - sizeof(std::atomic<uint64_t>) - sizeof(std::atomic<int32_t>)];
  std::atomic<int32_t> pid;            // 0 until the rank attaches
  std::atomic<int32_t> state;          // RankState
  std::atomic<uint64_t> start_time;    // /proc start time: tells a reused pid apart
  std::atomic<int64_t> call_numel[2];  // what the rank passed to its current call,
  std::atomic<int32_t> call_type[2];   // indexed by call parity (see check_call_descriptors)
};

struct SegmentHeader {
  std::atomic<uint64_t> magic;  // stored (release) last, once everything below is set
  uint32_t version;
  int32_t world_size;
  int64_t buffer_bytes;
  int64_t total_bytes;
  int32_t creator_pid;
  uint64_t creator_start_time;
  // Sleeping waiters: a rank that has waited longer than its spin budget counts
  // itself in `sleepers` and futex-waits on `wake_seq`; a rank that arrives at a
  // barrier while sleepers > 0 bumps wake_seq and wakes them. (Its own line:
  // every arrival reads `sleepers`.)
  alignas(64) std::atomic<uint32_t> wake_seq;
  std::atomic<uint32_t> sleepers;
  alignas(64) std::atomic<int32_t> abort_state;  // AbortState; the first failing rank writes it
  int32_t abort_rank;
  char abort_message[1024];
  RankControl ranks[ShmAllReduce::kMaxWorldSize];
};

static_assert(std::atomic<uint64_t>::is_always_lock_free, "shared atomics must be lock-free");
static_assert(std::atomic<int64_t>::is_always_lock_free, "shared atomics must be lock-free");
static_assert(std::atomic<int32_t>::is_always_lock_free, "shared atomics must be lock-free");

constexpr int64_t kDataOffset =
    (static_cast<int64_t>(sizeof(SegmentHeader)) + kDataAlign - 1) / kDataAlign * kDataAlign;

inline double monotonic_now() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

inline void sleep_seconds(double s) {
  timespec ts{static_cast<time_t>(s), static_cast<long>((s - std::floor(s)) * 1e9)};
  nanosleep(&ts, nullptr);
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

// Sleeps until *word != expected, a wake-up, or `seconds` pass. The segment is
// MAP_SHARED, so this is a process-shared futex (no FUTEX_PRIVATE_FLAG).
inline void futex_wait(std::atomic<uint32_t>* word, uint32_t expected, double seconds) {
  timespec ts{static_cast<time_t>(seconds), static_cast<long>((seconds - std::floor(seconds)) * 1e9)};
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, expected, &ts, nullptr, 0);
}

// Call after publishing anything a sleeping waiter may be waiting for (a barrier
// arrival, a closed or aborted state). The fence orders that store before the
// load of `sleepers`; the waiter registers in `sleepers` before it rechecks, so
// either it sees the store or this sees it and wakes it.
inline void wake_sleepers(SegmentHeader* h) {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (h->sleepers.load(std::memory_order_relaxed) == 0) return;
  h->wake_seq.fetch_add(1, std::memory_order_seq_cst);
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&h->wake_seq), FUTEX_WAKE, INT_MAX, nullptr,
          nullptr, 0);
}

// Writes `message` as the group's abort reason unless another rank got there first.
inline void publish_abort_to(SegmentHeader* h, int rank, const std::string& message) noexcept {
  int32_t expected = kNoAbort;
  if (!h->abort_state.compare_exchange_strong(expected, kAbortWriting, std::memory_order_acq_rel)) {
    return;
  }
  h->abort_rank = rank;
  const size_t n = std::min(message.size(), sizeof(h->abort_message) - 1);
  std::memcpy(h->abort_message, message.data(), n);
  h->abort_message[n] = '\0';
  h->abort_state.store(kAbortPublished, std::memory_order_release);
  wake_sleepers(h);
}

}  // namespace xllm::comm
