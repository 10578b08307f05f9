// Sum-allreduce among the processes of one host through a POSIX shared-memory
// segment. No Python here; csrc/comm/shm_allreduce_bind.cpp wraps it.
//
// Segment `/xllm_ar_<group>`: a header (magic, world size, buffer size, one
// control block per rank with its pid and barrier counter), then world_size
// input slots of buffer_bytes each and one result area of buffer_bytes.
//
// One call, per chunk of at most buffer_bytes:
//   1. every rank copies its chunk into its own slot;          barrier A
//   2. rank j sums slice j of all slots, in rank order, into
//      slice j of the result area (reduce-scatter);             barrier B
//   3. every rank copies the whole result back into its tensor.
// Why two barriers suffice: a rank rewrites its slot (step 1 of the next chunk)
// only after B, when every rank has finished reading slots; the result area is
// rewritten (step 2 of the next chunk) only after the next A, which no rank
// reaches before it has finished copying the result out.
//
// Barrier: each rank owns a monotonic counter of the barriers it has reached
// (release store); it waits until every counter has reached its own (acquire
// loads). Nothing is ever reset, so the segment serves call after call.
//
// Failures never hang: every wait has a deadline (`timeout_s`), checks that the
// ranks it waits for are alive (kill(pid, 0) plus /proc state and start time,
// so zombies and reused pids count as dead) and that no rank has aborted the
// group. The first rank that fails publishes its message in the header so the
// others fail at once with it; the object is then broken for good.
//
// Name policy: rank 0 owns the name. A segment left under it by a crashed run
// (its creator is dead) is unlinked by rank 0 before it creates a fresh one
// with O_CREAT|O_EXCL; a segment whose creator is alive means another live
// group uses the name, which is an error. Other ranks open the name with retry,
// skip stale or half-initialised segments, and check magic, version, world size
// and buffer size. Rank 0 unlinks the name as soon as every rank has attached,
// so a later crash leaves nothing behind in /dev/shm.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>

#include "comm/collective.h"

namespace xllm::comm {

struct SegmentHeader;
struct RankControl;

class ShmAllReduce : public Collective {
 public:
  static constexpr int kMaxWorldSize = 64;
  static constexpr int64_t kMinBufferBytes = 4096;
  static constexpr int64_t kMaxBufferBytes = int64_t{1} << 30;
  static constexpr size_t kMaxGroupLength = 200;
  static constexpr int64_t kDefaultBufferBytes = int64_t{1} << 20;
  static constexpr double kDefaultTimeoutSeconds = 30.0;
  static constexpr double kDefaultBusyWaitSeconds = 1e-3;

  // Called about every 2 ms while this rank waits for peers (never on the fast
  // path); if it throws, the rank gives up on the group like on a failure and
  // the exception propagates. The binding uses it to let Ctrl-C interrupt a wait.
  using InterruptCheck = std::function<void()>;

  // Blocks until all world_size ranks have attached (or throws after timeout_s).
  ShmAllReduce(const std::string& group, int rank, int world_size, double timeout_s,
               int64_t buffer_bytes, InterruptCheck interrupt_check = {});
  ~ShmAllReduce();
  ShmAllReduce(const ShmAllReduce&) = delete;
  ShmAllReduce& operator=(const ShmAllReduce&) = delete;

  // In place. data: [numel] elements of `type`; every rank must pass the same
  // numel and type (checked; a mismatch throws kInvalidArgument on every rank
  // and leaves the group usable). numel == 0 returns at once without syncing.
  // kFloat32Bf16Sums: float32 data, each rank's rounded to bf16, summed as bf16 data
  // is (fp32 sums, rounded once) and widened back: half the bytes of a float32 sum.
  void allreduce(void* data, int64_t numel, ElemType type) override;

  // Rank 0 sends `message` to every rank; every other rank receives it into `message`
  // (replacing what it held). Messages of any length pass in chunks of buffer_bytes.
  // wait_forever: the first barrier has no deadline on any rank (a worker idle between
  // steps; rank 0 waiting for workers still loading), still failing at once if a rank
  // dies, closes or aborts.
  void broadcast(std::string& message, bool wait_forever);

  // Gathers `nbytes` from every rank (the same count on each, checked) into rank 0's
  // `dst`; `dst` is unused on other ranks. `src` is `rows` rows of nbytes / rows bytes
  // (rows divides nbytes), and `dst` is laid out [rows][world_size][nbytes / rows]: row i
  // of every rank, in rank order, then row i + 1 (rows = 1: [world_size][nbytes]; rows =
  // n: n rows of logits whose columns are split over the ranks, joined). Rank 0's own part
  // goes straight from src to dst.
  void gather(const void* src, int64_t nbytes, void* dst, int64_t rows = 1) override;

  // How long a rank that waits for its peers keeps its CPU (spinning, then yielding) before
  // it sleeps on the segment's futex (default kDefaultBusyWaitSeconds). Longer keeps a
  // sleeping peer's wake-up off the next barrier, at the price of a CPU that a computing
  // rank may share (bench.tp --busy-wait measures both). kInvalidArgument unless
  // 0 <= seconds <= 1.
  void set_busy_wait(double seconds);
  double busy_wait() const { return busy_wait_s_; }

  // Seconds this rank has waited at barriers for peers that had not arrived yet, since it
  // joined (the skew between ranks' work, plus wake-ups; not the copies and sums).
  double wait_seconds() const override { return wait_seconds_; }

  // Leaves the group: peers still waiting for this rank fail at once. Idempotent.
  void close();

  bool closed() const { return closed_.load(std::memory_order_acquire); }
  const std::string& group() const { return group_; }
  const std::string& segment_name() const { return name_; }
  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  double timeout() const { return timeout_s_; }
  int64_t buffer_bytes() const { return buffer_bytes_; }

  // "/xllm_ar_<group>"; throws kInvalidArgument naming 'group' if it is not a
  // valid name (1..200 characters from [A-Za-z0-9_.-]).
  static std::string segment_name_for(const std::string& group);

 private:
  void create_segment(double deadline);
  void open_segment(double deadline);
  void map_segment(int fd, int64_t total_bytes);
  void claim_rank();
  void release_segment() noexcept;
  RankControl& control(int rank) const;
  char* slot(int rank) const;
  char* result_area() const;

  // Arrives at the next barrier and waits for every rank to reach it.
  void barrier(const char* phase);
  void wait_for_peers(uint64_t target, const char* phase);
  // Throws if a rank that has not reached `target` is dead or has left.
  void check_missing_peers(uint64_t target, const char* phase);
  std::string describe_phase(const char* phase) const;
  [[noreturn]] void fail(ErrorKind kind, const std::string& what);
  [[noreturn]] void fail_from_abort();
  void publish_abort(const std::string& message) noexcept;
  void check_usable() const;
  void poll_interrupt(const char* phase);
  void check_call_descriptors(int64_t numel, ElemType type, int parity);
  // Starts a non-empty call: usable, not aborted, descriptor published; returns its parity.
  int begin_call(int64_t numel, ElemType type);

  std::string group_;
  std::string name_;
  int rank_;
  int world_size_;
  double timeout_s_;
  double busy_wait_s_ = kDefaultBusyWaitSeconds;
  double wait_seconds_ = 0;
  int64_t buffer_bytes_;
  int owner_pid_;
  InterruptCheck interrupt_check_;

  int fd_ = -1;
  SegmentHeader* header_ = nullptr;  // the whole mapping starts here
  size_t mapped_bytes_ = 0;
  char* data_ = nullptr;  // [world_size + 1][buffer_bytes]: the slots, then the result area
  bool created_ = false;   // rank 0 made the segment (and so may unlink its name)
  bool unlinked_ = false;
  bool claimed_ = false;   // this process holds control(rank_)

  uint64_t barriers_ = 0;  // barriers this rank has reached; equal on all ranks between calls
  uint64_t calls_ = 0;     // non-empty calls made; picks the descriptor slot by parity
  std::string broken_;     // non-empty once a failure has left the group unusable
  double wait_deadline_ = 0;  // > 0: an absolute deadline for waits (attaching); else per wait
  // Where this rank is, for error messages: call number (0 while attaching), chunk.
  uint64_t phase_call_ = 0;
  int64_t phase_chunk_ = 0;
  int64_t phase_chunks_ = 0;
  std::mutex mutex_;       // one collective at a time per object
  std::atomic<bool> closed_{false};
};

}  // namespace xllm::comm
