// The collective itself: barriers, failure detection and the chunked
// copy-in / reduce-scatter / copy-out (see shm_allreduce.h for the protocol).
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <sstream>

#include "comm/process_liveness.h"
#include "comm/shm_allreduce.h"
#include "comm/shm_reduce.h"
#include "comm/shm_segment.h"

namespace xllm::comm {
namespace {

// Waiting for peers, in three stages. (1) Spin with pause while the rank we
// wait for runs on another CPU: on an idle host the last rank arrives within a
// phase's work (tens to hundreds of microseconds for a 1 MiB chunk), and spinning
// keeps this rank on its core. But a spinning rank must not hold the very core
// its peer needs, so it stops spinning as soon as that peer last arrived from
// this CPU. (2) Then sched_yield between checks: a peer sharing the core runs at
// once, and on an otherwise idle core the yield returns at once. (3) Then sleep
// on the segment's futex until an arrival wakes us. On a loaded 2-core host, a
// spin that ignored the peer's CPU made 64 KiB calls up to 40x slower whenever
// the scheduler put both ranks on one core; sleeping early cost ~3x at 1 MiB.
constexpr double kSpinSeconds = 200e-6;  // then yield until busy_wait_s_ (default 1 ms)
// A sleeping rank wakes at least this often to check its peers' liveness and
// the deadline (a dead process wakes nobody).
constexpr double kPeerCheckSeconds = 2e-3;

const char* type_name(int32_t type) {
  switch (type) {
    case static_cast<int32_t>(ElemType::kFloat32): return "float32";
    case static_cast<int32_t>(ElemType::kBFloat16): return "bfloat16";
    case static_cast<int32_t>(ElemType::kBroadcast): return "bytes (broadcast)";
    case static_cast<int32_t>(ElemType::kGather): return "bytes (gather)";
    case static_cast<int32_t>(ElemType::kFloat32Bf16Sums): return "float32 (bf16 sums)";
    default: return "nothing";
  }
}

}  // namespace

std::string ShmAllReduce::describe_phase(const char* phase) const {
  std::ostringstream os;
  if (phase_call_ == 0) {
    os << "while attaching";
  } else {
    os << "in call " << phase_call_ << " (chunk " << phase_chunk_ + 1 << " of " << phase_chunks_
       << ", " << phase << ")";
  }
  return os.str();
}

void ShmAllReduce::fail(ErrorKind kind, const std::string& what) {
  std::ostringstream os;
  os << "ShmAllReduce group '" << group_ << "' (rank " << rank_ << " of " << world_size_
     << ", pid " << owner_pid_ << "): " << what;
  const std::string message = os.str();
  if (kind == ErrorKind::kTimeout || kind == ErrorKind::kPeerFailure) {
    // The protocol cannot resume after a missing rank: stop the others now
    // rather than let each of them wait out its own timeout.
    publish_abort_to(header_, rank_, what);
    broken_ = message;
  }
  throw CommError(kind, message);
}

void ShmAllReduce::fail_from_abort() {
  std::ostringstream os;
  os << "ShmAllReduce group '" << group_ << "' (rank " << rank_ << " of " << world_size_
     << "): rank " << header_->abort_rank << " gave up on the group: " << header_->abort_message;
  broken_ = os.str();
  throw CommError(ErrorKind::kPeerFailure, broken_);
}

void ShmAllReduce::check_usable() const {
  std::ostringstream os;
  os << "ShmAllReduce group '" << group_ << "' (rank " << rank_ << " of " << world_size_ << ") ";
  if (header_ == nullptr) {
    throw CommError(ErrorKind::kState, os.str() + "is closed");
  }
  if (static_cast<int>(getpid()) != owner_pid_) {
    os << "was created in pid " << owner_pid_ << " and cannot be used in forked child pid "
       << getpid() << "; create a new group in the child";
    throw CommError(ErrorKind::kState, os.str());
  }
  if (!broken_.empty()) {
    throw CommError(ErrorKind::kState,
                    os.str() + "is unusable after an earlier failure; close it and create a new "
                               "group on every rank. The failure was: " + broken_);
  }
}

void ShmAllReduce::barrier(const char* phase) {
  const uint64_t target = ++barriers_;
  control(rank_).cpu.store(sched_getcpu(), std::memory_order_relaxed);
  control(rank_).arrived.store(target, std::memory_order_release);
  wake_sleepers(header_);
  wait_for_peers(target, phase);
}

void ShmAllReduce::wait_for_peers(uint64_t target, const char* phase) {
  int next = 0;  // ranks below `next` are known to have arrived
  auto all_arrived = [&] {
    while (next < world_size_ && control(next).arrived.load(std::memory_order_acquire) >= target) {
      ++next;
    }
    return next == world_size_;
  };
  if (all_arrived()) return;

  const double start = monotonic_now();
  struct WaitClock {  // adds this wait's length however it ends
    double start;
    double* total;
    ~WaitClock() { *total += monotonic_now() - start; }
  } clock{start, &wait_seconds_};
  double now = start;
  const int my_cpu = sched_getcpu();
  // Does a rank we still wait for need this CPU (it last arrived from it)?
  auto peer_needs_my_cpu = [&] {
    for (int r = next; r < world_size_; ++r) {
      const RankControl& c = control(r);
      if (c.arrived.load(std::memory_order_relaxed) < target &&
          c.cpu.load(std::memory_order_relaxed) == my_cpu) {
        return true;
      }
    }
    return false;
  };
  while (now - start < kSpinSeconds && !peer_needs_my_cpu()) {
    for (int i = 0; i < 32; ++i) {
      cpu_relax();
      if (all_arrived()) return;
    }
    now = monotonic_now();
  }
  while (now - start < busy_wait_s_) {
    sched_yield();
    if (all_arrived()) return;
    now = monotonic_now();
  }

  const double deadline = wait_deadline_ > 0 ? wait_deadline_ : start + timeout_s_;
  double next_check = start + kPeerCheckSeconds;
  header_->sleepers.fetch_add(1, std::memory_order_seq_cst);
  // Pairs with the fence in wake_sleepers: an arriving rank either sees us in
  // `sleepers` or we see its arrival below.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  struct SleeperGuard {
    SegmentHeader* header;
    ~SleeperGuard() { header->sleepers.fetch_sub(1, std::memory_order_seq_cst); }
  } guard{header_};
  for (;;) {
    // Read the wake sequence before checking: an arrival after the check bumps
    // it, and the futex then returns at once instead of sleeping.
    const uint32_t seq = header_->wake_seq.load(std::memory_order_seq_cst);
    if (all_arrived()) return;
    if (header_->abort_state.load(std::memory_order_acquire) == kAbortPublished) {
      fail_from_abort();
    }
    now = monotonic_now();
    if (now >= next_check) {
      check_missing_peers(target, phase);
      poll_interrupt(phase);
      now = monotonic_now();
      next_check = now + kPeerCheckSeconds;
    }
    if (now >= deadline) {
      next = 0;
      if (all_arrived()) return;
      std::ostringstream os;
      os << "timed out after " << timeout_s_ << " s " << describe_phase(phase) << " waiting for";
      const char* sep = " ";
      for (int r = 0; r < world_size_; ++r) {
        const RankControl& c = control(r);
        if (c.arrived.load(std::memory_order_acquire) >= target) continue;
        const int pid = c.pid.load(std::memory_order_acquire);
        os << sep << "rank " << r;
        if (pid == 0) {
          os << " (never attached: is it running with group '" << group_ << "' and world_size "
             << world_size_ << "?)";
        } else {
          os << " (pid " << pid << ", alive but not arriving)";
        }
        sep = ", ";
      }
      fail(ErrorKind::kTimeout, os.str());
    }
    futex_wait(&header_->wake_seq, seq, std::min(next_check, deadline) - now);
  }
}

void ShmAllReduce::set_busy_wait(double seconds) {
  if (!(seconds >= 0 && seconds <= 1)) {
    throw CommError(ErrorKind::kInvalidArgument,
                    "argument 'busy_wait' must be between 0 and 1 seconds, got " +
                        std::to_string(seconds));
  }
  busy_wait_s_ = seconds;
}

void ShmAllReduce::poll_interrupt(const char* phase) {
  if (!interrupt_check_) return;
  try {
    interrupt_check_();
  } catch (...) {
    // This rank leaves mid-protocol: the others cannot complete without it.
    const std::string what = "rank " + std::to_string(rank_) + " was interrupted " +
                             describe_phase(phase) + " (e.g. KeyboardInterrupt)";
    publish_abort_to(header_, rank_, what);
    broken_ = "ShmAllReduce group '" + group_ + "': " + what;
    throw;
  }
}

void ShmAllReduce::check_missing_peers(uint64_t target, const char* phase) {
  for (int r = 0; r < world_size_; ++r) {
    const RankControl& c = control(r);
    if (c.arrived.load(std::memory_order_acquire) >= target) continue;
    const int pid = c.pid.load(std::memory_order_acquire);
    if (pid == 0) continue;  // not attached yet: only the deadline can tell
    const bool closed = c.state.load(std::memory_order_acquire) == kClosed;
    const bool dead = !closed && !process_alive(pid, c.start_time.load(std::memory_order_relaxed));
    if (!closed && !dead) continue;
    // It may have arrived just before leaving; then this barrier is complete for it.
    if (c.arrived.load(std::memory_order_acquire) >= target) continue;
    std::ostringstream os;
    os << "rank " << r << " (pid " << pid << ") "
       << (closed ? "closed its ShmAllReduce and left the group"
                  : "died (its process is gone or a zombie)")
       << " while this rank waited for it " << describe_phase(phase);
    fail(ErrorKind::kPeerFailure, os.str());
  }
}

void ShmAllReduce::check_call_descriptors(int64_t numel, ElemType type, int parity) {
  bool same = true;
  // A broadcast's receivers do not know the length: only the kind of call must agree.
  const bool any_numel = type == ElemType::kBroadcast;
  for (int r = 0; r < world_size_; ++r) {
    same = same &&
           (any_numel || control(r).call_numel[parity].load(std::memory_order_relaxed) == numel) &&
           control(r).call_type[parity].load(std::memory_order_relaxed) ==
               static_cast<int32_t>(type);
  }
  if (same) return;
  // Every rank sees the same descriptors and raises the same error at the same
  // barrier, so the counters stay in step and the group remains usable.
  std::ostringstream os;
  os << "ShmAllReduce group '" << group_ << "' (rank " << rank_ << " of " << world_size_
     << "): every rank must make the same call (allreduce: the same number of elements and "
     << "dtype; gather: the same byte count; broadcast: all at once); call " << phase_call_
     << " got";
  for (int r = 0; r < world_size_; ++r) {
    os << (r ? ", " : " ") << "rank " << r << ": "
       << control(r).call_numel[parity].load(std::memory_order_relaxed) << " x "
       << type_name(control(r).call_type[parity].load(std::memory_order_relaxed));
  }
  throw CommError(ErrorKind::kInvalidArgument, os.str());
}

int ShmAllReduce::begin_call(int64_t numel, ElemType type) {
  check_usable();
  // Fail at once if a peer gave up, even where this rank's next barrier happens
  // to be complete already (peers may have arrived before giving up).
  if (header_->abort_state.load(std::memory_order_acquire) == kAbortPublished) fail_from_abort();
  const int parity = static_cast<int>(calls_ & 1);
  ++calls_;
  RankControl& me = control(rank_);
  me.call_numel[parity].store(numel, std::memory_order_relaxed);
  me.call_type[parity].store(static_cast<int32_t>(type), std::memory_order_relaxed);
  phase_call_ = calls_;
  return parity;
}

void ShmAllReduce::allreduce(void* data, int64_t numel, ElemType type) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_usable();
  if (header_->abort_state.load(std::memory_order_acquire) == kAbortPublished) fail_from_abort();
  if (numel < 0) throw CommError(ErrorKind::kInvalidArgument, "argument 'numel' must be >= 0");
  if (numel == 0) return;
  if (type != ElemType::kFloat32 && type != ElemType::kBFloat16 &&
      type != ElemType::kFloat32Bf16Sums) {
    throw CommError(ErrorKind::kInvalidArgument, "allreduce sums float32 or bfloat16 only");
  }
  const int parity = begin_call(numel, type);
  // `elem`: bytes an element has in the slots (the trip); `data_elem`: in the caller's data.
  const bool widen = type == ElemType::kFloat32Bf16Sums;
  const int64_t elem = type == ElemType::kFloat32 ? 4 : 2;
  const int64_t data_elem = widen ? 4 : elem;
  // Slots to the caller's data, converting bf16 back to float32 where the trip narrowed it.
  auto copy_out = [&](char* to, const char* from, int64_t count) {
    if (widen) {
      convert_bf16_to_f32(reinterpret_cast<const uint16_t*>(from), reinterpret_cast<float*>(to),
                          count);
    } else {
      std::memcpy(to, from, static_cast<size_t>(count * elem));
    }
  };

  const int64_t chunk_elems = buffer_bytes_ / elem;
  // Slices start on 64-byte boundaries so no two ranks write one cache line of the result.
  const int64_t line_elems = 64 / elem;
  phase_chunks_ = (numel + chunk_elems - 1) / chunk_elems;
  char* bytes = static_cast<char*>(data);
  std::array<const float*, kMaxWorldSize> f32_srcs;
  std::array<const uint16_t*, kMaxWorldSize> bf16_srcs;
  for (int64_t chunk = 0; chunk < phase_chunks_; ++chunk) {
    phase_chunk_ = chunk;
    const int64_t first = chunk * chunk_elems;
    const int64_t n = std::min(chunk_elems, numel - first);
    if (widen) {
      convert_f32_to_bf16(reinterpret_cast<const float*>(bytes) + first,
                          reinterpret_cast<uint16_t*>(slot(rank_)), n);
    } else {
      std::memcpy(slot(rank_), bytes + first * elem, static_cast<size_t>(n * elem));
    }
    barrier("after copy-in");
    if (chunk == 0) check_call_descriptors(numel, type, parity);

    const int64_t per_rank = ((n + world_size_ - 1) / world_size_ + line_elems - 1) /
                             line_elems * line_elems;
    const int64_t lo = std::min(n, rank_ * per_rank);
    const int64_t hi = std::min(n, lo + per_rank);
    if (hi > lo) {
      char* dst = result_area() + lo * elem;
      if (type == ElemType::kFloat32) {
        for (int r = 0; r < world_size_; ++r) {
          f32_srcs[r] = reinterpret_cast<const float*>(slot(r) + lo * elem);
        }
        reduce_sum_f32(f32_srcs.data(), world_size_, reinterpret_cast<float*>(dst), hi - lo);
      } else {
        for (int r = 0; r < world_size_; ++r) {
          bf16_srcs[r] = reinterpret_cast<const uint16_t*>(slot(r) + lo * elem);
        }
        reduce_sum_bf16(bf16_srcs.data(), world_size_, reinterpret_cast<uint16_t*>(dst), hi - lo);
      }
      // Our own slice is hot in cache and final: copy it out now, before the
      // barrier, where it overlaps with waiting for the slowest rank.
      copy_out(bytes + (first + lo) * data_elem, dst, hi - lo);
    }
    barrier("after reduce");
    // The other ranks' slices: [0, lo) and [hi, n).
    char* out = bytes + first * data_elem;
    copy_out(out, result_area(), lo);
    copy_out(out + hi * data_elem, result_area() + hi * elem, n - hi);
  }
}

void ShmAllReduce::broadcast(std::string& message, bool wait_forever) {
  std::lock_guard<std::mutex> lock(mutex_);
  const bool root = rank_ == 0;
  const int parity = begin_call(root ? static_cast<int64_t>(message.size()) : -1,
                                ElemType::kBroadcast);
  // Rank 0's length is in its descriptor; the receivers read it after the first barrier.
  int64_t total = root ? static_cast<int64_t>(message.size()) : 0;
  phase_chunks_ = 1;
  for (int64_t chunk = 0; chunk < phase_chunks_; ++chunk) {
    phase_chunk_ = chunk;
    const int64_t first = chunk * buffer_bytes_;
    if (root) {
      std::memcpy(slot(0), message.data() + first,
                  static_cast<size_t>(std::min(buffer_bytes_, total - first)));
    }
    if (chunk == 0 && wait_forever) {
      // No deadline for the first arrival, liveness still checked: a receiver idles until
      // rank 0 has the next message; rank 0 waits for ranks still starting up.
      wait_deadline_ = std::numeric_limits<double>::infinity();
      try {
        barrier("waiting for the first arrival");
      } catch (...) {
        wait_deadline_ = 0;
        throw;
      }
      wait_deadline_ = 0;
    } else {
      barrier("after rank 0's copy-in");
    }
    if (chunk == 0) {
      check_call_descriptors(-1, ElemType::kBroadcast, parity);
      total = control(0).call_numel[parity].load(std::memory_order_relaxed);
      phase_chunks_ = std::max<int64_t>(1, (total + buffer_bytes_ - 1) / buffer_bytes_);
      if (!root) message.resize(static_cast<size_t>(total));
    }
    if (!root) {
      std::memcpy(message.data() + first, slot(0),
                  static_cast<size_t>(std::min(buffer_bytes_, total - first)));
    }
    barrier("after copy-out");
  }
}

namespace {

// Bytes [first, first + n) of a rank's part (rows of row_bytes) to where they go in a
// gathered [rows][world][row_bytes] layout.
void place_rows(char* dst, const char* from, int64_t first, int64_t n, int64_t row_bytes,
                int world, int rank) {
  int64_t at = first;
  const int64_t end = first + n;
  while (at < end) {
    const int64_t row = at / row_bytes, col = at % row_bytes;
    const int64_t len = std::min(row_bytes - col, end - at);
    std::memcpy(dst + (row * world + rank) * row_bytes + col, from + (at - first),
                static_cast<size_t>(len));
    at += len;
  }
}

}  // namespace

void ShmAllReduce::gather(const void* src, int64_t nbytes, void* dst, int64_t rows) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_usable();
  check_gather_args(nbytes, rows);
  if (nbytes == 0) return;
  const int parity = begin_call(nbytes, ElemType::kGather);
  const char* in = static_cast<const char*>(src);
  char* out = static_cast<char*>(dst);
  const int64_t row_bytes = nbytes / rows;
  if (rank_ == 0) place_rows(out, in, 0, nbytes, row_bytes, world_size_, 0);
  phase_chunks_ = (nbytes + buffer_bytes_ - 1) / buffer_bytes_;
  for (int64_t chunk = 0; chunk < phase_chunks_; ++chunk) {
    phase_chunk_ = chunk;
    const int64_t first = chunk * buffer_bytes_;
    const int64_t n = std::min(buffer_bytes_, nbytes - first);
    if (rank_ != 0) std::memcpy(slot(rank_), in + first, static_cast<size_t>(n));
    barrier("after copy-in");
    if (chunk == 0) check_call_descriptors(nbytes, ElemType::kGather, parity);
    if (rank_ == 0) {
      for (int r = 1; r < world_size_; ++r) {
        place_rows(out, slot(r), first, n, row_bytes, world_size_, r);
      }
    }
    barrier("after rank 0's copy-out");
  }
}

}  // namespace xllm::comm
