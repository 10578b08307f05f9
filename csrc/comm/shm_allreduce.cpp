// Segment lifecycle: argument checks, create (rank 0) or open (others),
// claiming a rank, attaching, unlinking, closing. The collective itself is in
// shm_collective.cpp.
#include "comm/shm_allreduce.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <new>
#include <utility>
#include <sstream>

#include "comm/process_liveness.h"
#include "comm/shm_segment.h"

namespace xllm::comm {
namespace {

constexpr double kOpenRetrySeconds = 1e-3;

std::string os_error(const char* what, const std::string& name) {
  std::ostringstream os;
  os << what << " '" << name << "' failed: " << std::strerror(errno);
  return os.str();
}

}  // namespace

std::string ShmAllReduce::segment_name_for(const std::string& group) {
  if (group.empty() || group.size() > kMaxGroupLength) {
    std::ostringstream os;
    os << "argument 'group' must have 1 to " << kMaxGroupLength << " characters, got "
       << group.size();
    throw CommError(ErrorKind::kInvalidArgument, os.str());
  }
  for (char ch : group) {
    const bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                    (ch >= '0' && ch <= '9') || ch == '_' || ch == '-' || ch == '.';
    if (!ok) {
      throw CommError(ErrorKind::kInvalidArgument,
                      "argument 'group' may only contain letters, digits, '_', '-' and '.' "
                      "(it names a file in /dev/shm), got '" + group + "'");
    }
  }
  return "/xllm_ar_" + group;
}

ShmAllReduce::ShmAllReduce(const std::string& group, int rank, int world_size, double timeout_s,
                           int64_t buffer_bytes, InterruptCheck interrupt_check)
    : group_(group),
      name_(segment_name_for(group)),
      rank_(rank),
      world_size_(world_size),
      timeout_s_(timeout_s),
      buffer_bytes_(buffer_bytes),
      owner_pid_(static_cast<int>(getpid())),
      interrupt_check_(std::move(interrupt_check)) {
  std::ostringstream err;
  if (world_size < 1 || world_size > kMaxWorldSize) {
    err << "argument 'world_size' must be in [1, " << kMaxWorldSize << "], got " << world_size;
  } else if (rank < 0 || rank >= world_size) {
    err << "argument 'rank' must be in [0, world_size) = [0, " << world_size << "), got " << rank;
  } else if (!(timeout_s > 0) || !std::isfinite(timeout_s)) {
    err << "argument 'timeout' must be a finite number of seconds > 0, got " << timeout_s;
  } else if (buffer_bytes < kMinBufferBytes || buffer_bytes > kMaxBufferBytes ||
             buffer_bytes % 64 != 0) {
    err << "argument 'buffer_bytes' must be a multiple of 64 in [" << kMinBufferBytes << ", "
        << kMaxBufferBytes << "], got " << buffer_bytes;
  }
  if (!err.str().empty()) throw CommError(ErrorKind::kInvalidArgument, err.str());

  const double deadline = monotonic_now() + timeout_s_;
  try {
    if (rank_ == 0) {
      create_segment(deadline);
    } else {
      open_segment(deadline);
    }
    claim_rank();
    phase_call_ = 0;
    wait_deadline_ = deadline;  // attaching shares one deadline
    barrier("attach");
    wait_deadline_ = 0;
    if (rank_ == 0) {
      // Everyone holds a mapping now; the name is no longer needed, and
      // unlinking it means a crash from here on leaves nothing in /dev/shm.
      shm_unlink(name_.c_str());
      unlinked_ = true;
    }
  } catch (...) {
    if (claimed_) {
      control(rank_).state.store(kClosed, std::memory_order_release);
      wake_sleepers(header_);
    }
    release_segment();
    closed_.store(true, std::memory_order_release);
    throw;
  }
}

ShmAllReduce::~ShmAllReduce() { close(); }

RankControl& ShmAllReduce::control(int rank) const { return header_->ranks[rank]; }
char* ShmAllReduce::slot(int rank) const { return data_ + rank * buffer_bytes_; }
char* ShmAllReduce::result_area() const { return data_ + world_size_ * buffer_bytes_; }

void ShmAllReduce::map_segment(int fd, int64_t total_bytes) {
  void* p = mmap(nullptr, static_cast<size_t>(total_bytes), PROT_READ | PROT_WRITE,
                 MAP_SHARED | MAP_POPULATE, fd, 0);
  if (p == MAP_FAILED) throw CommError(ErrorKind::kState, os_error("mmap of", name_));
  header_ = static_cast<SegmentHeader*>(p);
  mapped_bytes_ = static_cast<size_t>(total_bytes);
  data_ = static_cast<char*>(p) + kDataOffset;
}

void ShmAllReduce::create_segment(double deadline) {
  const int64_t total = kDataOffset + (world_size_ + 1) * buffer_bytes_;
  for (;;) {
    // Whatever sits under our name is a leftover, unless its creator still lives.
    const int old = shm_open(name_.c_str(), O_RDWR | O_CLOEXEC, 0);
    if (old >= 0) {
      int creator = 0;
      uint64_t creator_start = 0;
      struct stat st;
      if (fstat(old, &st) == 0 && st.st_size >= static_cast<off_t>(sizeof(SegmentHeader))) {
        void* p = mmap(nullptr, sizeof(SegmentHeader), PROT_READ, MAP_SHARED, old, 0);
        if (p != MAP_FAILED) {
          const auto* h = static_cast<const SegmentHeader*>(p);
          if (h->magic.load(std::memory_order_acquire) == kMagic) {
            creator = h->creator_pid;
            creator_start = h->creator_start_time;
          }
          munmap(p, sizeof(SegmentHeader));
        }
      }
      ::close(old);
      if (creator != 0 && process_alive(creator, creator_start)) {
        std::ostringstream os;
        os << "ShmAllReduce group '" << group_ << "': the name is in use by a live group "
           << "(segment " << name_ << " created by pid " << creator
           << "); give this group another name or end that process";
        throw CommError(ErrorKind::kInvalidArgument, os.str());
      }
      if (shm_unlink(name_.c_str()) != 0 && errno != ENOENT) {
        throw CommError(ErrorKind::kState, os_error("removing the stale segment", name_));
      }
    } else if (errno != ENOENT) {
      throw CommError(ErrorKind::kState, os_error("shm_open of", name_));
    }

    const int fd = shm_open(name_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd >= 0) {
      created_ = true;
      if (ftruncate(fd, total) != 0) {
        const std::string msg = os_error("sizing the segment", name_);
        ::close(fd);
        throw CommError(ErrorKind::kState, msg);
      }
      // Reserve the pages now: a full /dev/shm is then an error here, not a SIGBUS later.
      const int rc = posix_fallocate(fd, 0, total);
      if (rc != 0 && rc != EOPNOTSUPP && rc != EINVAL) {
        ::close(fd);
        std::ostringstream os;
        os << "ShmAllReduce group '" << group_ << "': could not reserve " << total
           << " bytes of shared memory for " << name_ << " (" << std::strerror(rc)
           << "); lower buffer_bytes or enlarge /dev/shm";
        throw CommError(ErrorKind::kState, os.str());
      }
      try {
        map_segment(fd, total);
      } catch (...) {
        ::close(fd);
        throw;
      }
      ::close(fd);  // the mapping keeps the segment alive
      auto* h = new (header_) SegmentHeader;
      h->version = kVersion;
      h->world_size = world_size_;
      h->buffer_bytes = buffer_bytes_;
      h->total_bytes = total;
      h->creator_pid = owner_pid_;
      h->creator_start_time = process_start_time(owner_pid_);
      h->abort_state.store(kNoAbort, std::memory_order_relaxed);
      h->wake_seq.store(0, std::memory_order_relaxed);
      h->sleepers.store(0, std::memory_order_relaxed);
      for (int r = 0; r < kMaxWorldSize; ++r) {
        RankControl& c = h->ranks[r];
        c.arrived.store(0, std::memory_order_relaxed);
        c.cpu.store(-1, std::memory_order_relaxed);
        c.pid.store(0, std::memory_order_relaxed);
        c.state.store(kFree, std::memory_order_relaxed);
        c.start_time.store(0, std::memory_order_relaxed);
      }
      h->magic.store(kMagic, std::memory_order_release);
      return;
    }
    if (errno != EEXIST) throw CommError(ErrorKind::kState, os_error("shm_open of", name_));
    // Someone recreated the name between our check and our create: look again.
    if (monotonic_now() >= deadline) {
      throw CommError(ErrorKind::kTimeout, "ShmAllReduce group '" + group_ + "': segment " +
                                               name_ + " keeps being recreated by another process");
    }
    sleep_seconds(kOpenRetrySeconds);
  }
}

void ShmAllReduce::open_segment(double deadline) {
  std::string seen = "no segment under that name";
  for (;;) {
    const int fd = shm_open(name_.c_str(), O_RDWR | O_CLOEXEC, 0);
    if (fd < 0 && errno != ENOENT) {
      throw CommError(ErrorKind::kState, os_error("shm_open of", name_));
    }
    if (fd >= 0) {
      struct stat st;
      void* p = MAP_FAILED;
      if (fstat(fd, &st) == 0 && st.st_size >= static_cast<off_t>(sizeof(SegmentHeader))) {
        p = mmap(nullptr, sizeof(SegmentHeader), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
      } else {
        seen = "an empty segment (rank 0 may be creating it)";
      }
      if (p != MAP_FAILED) {
        auto* h = static_cast<SegmentHeader*>(p);
        std::ostringstream mismatch;
        bool live = false;
        if (h->magic.load(std::memory_order_acquire) != kMagic) {
          seen = "a segment that is not (yet) initialised";
        } else if (h->version != kVersion) {
          mismatch << "segment " << name_ << " has layout version " << h->version
                   << " but this build uses " << kVersion << " (mixed xllm versions?)";
        } else if (!process_alive(h->creator_pid, h->creator_start_time)) {
          seen = "only a stale segment from a crashed run (its creator, pid " +
                 std::to_string(h->creator_pid) + ", is dead)";
        } else if (h->world_size != world_size_) {
          mismatch << "argument 'world_size' is " << world_size_ << " but rank 0 created the group"
                   << " with world_size " << h->world_size << " (rank " << rank_ << ", pid "
                   << owner_pid_ << ")";
        } else if (h->buffer_bytes != buffer_bytes_) {
          mismatch << "argument 'buffer_bytes' is " << buffer_bytes_ << " but rank 0 created the "
                   << "group with buffer_bytes " << h->buffer_bytes << " (rank " << rank_ << ")";
        } else if (st.st_size < h->total_bytes) {
          mismatch << "segment " << name_ << " is " << st.st_size << " bytes, expected "
                   << h->total_bytes;
        } else {
          live = true;
        }
        if (!mismatch.str().empty()) {
          const std::string msg = "ShmAllReduce group '" + group_ + "': " + mismatch.str();
          // Tell the live ranks at once rather than let them time out.
          if (h->magic.load(std::memory_order_acquire) == kMagic) publish_abort_to(h, rank_, msg);
          munmap(p, sizeof(SegmentHeader));
          ::close(fd);
          throw CommError(ErrorKind::kInvalidArgument, msg);
        }
        const int64_t total = h->total_bytes;
        munmap(p, sizeof(SegmentHeader));
        if (live) {
          try {
            map_segment(fd, total);
          } catch (...) {
            ::close(fd);
            throw;
          }
          ::close(fd);
          return;
        }
      }
      ::close(fd);
    }
    if (interrupt_check_) interrupt_check_();  // nothing to abort yet: just propagate
    if (monotonic_now() >= deadline) {
      std::ostringstream os;
      os << "ShmAllReduce group '" << group_ << "' (rank " << rank_ << " of " << world_size_
         << "): timed out after " << timeout_s_ << " s waiting for rank 0 to create segment "
         << name_ << "; found " << seen << ". Is rank 0 running with the same group name?";
      throw CommError(ErrorKind::kTimeout, os.str());
    }
    sleep_seconds(kOpenRetrySeconds);
  }
}

void ShmAllReduce::claim_rank() {
  RankControl& me = control(rank_);
  int32_t holder = 0;
  if (!me.pid.compare_exchange_strong(holder, owner_pid_, std::memory_order_acq_rel)) {
    std::ostringstream os;
    os << "ShmAllReduce group '" << group_ << "': rank " << rank_ << " is already taken by pid "
       << holder << (process_alive(holder, me.start_time.load()) ? "" : " (now dead)")
       << "; every process of a group needs its own rank";
    publish_abort_to(header_, rank_, os.str());
    throw CommError(ErrorKind::kInvalidArgument, os.str());
  }
  me.start_time.store(process_start_time(owner_pid_), std::memory_order_relaxed);
  me.state.store(kAttached, std::memory_order_release);
  claimed_ = true;
}

void ShmAllReduce::release_segment() noexcept {
  if (created_ && !unlinked_) {
    shm_unlink(name_.c_str());
    unlinked_ = true;
  }
  if (header_ != nullptr) munmap(header_, mapped_bytes_);
  header_ = nullptr;
  data_ = nullptr;
  mapped_bytes_ = 0;
}

void ShmAllReduce::close() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (header_ == nullptr) return;
  // A forked child shares the mapping but is not a member: it only unmaps.
  if (claimed_ && static_cast<int>(getpid()) == owner_pid_) {
    control(rank_).state.store(kClosed, std::memory_order_release);
    wake_sleepers(header_);  // peers waiting for this rank learn at once that it left
  }
  release_segment();
  closed_.store(true, std::memory_order_release);
}

}  // namespace xllm::comm
