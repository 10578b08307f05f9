// What the tensor-parallel ranks' groups have in common, whatever carries the bytes: the
// shared-memory group of one host (comm/shm_allreduce.h) and the TCP group of ranks on
// several hosts (comm/tcp_collective.h). Native callers (the decoder stack) sum through it.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace xllm::comm {

// Why an operation failed; the binding maps each kind to a Python exception.
enum class ErrorKind {
  kInvalidArgument,  // ValueError: a bad argument or one that disagrees with the peers'
  kTimeout,          // TimeoutError: peers alive but did not arrive in time
  kPeerFailure,      // RuntimeError: a peer died, closed, or aborted the group
  kState,            // RuntimeError: closed/broken object, OS error
};

class CommError : public std::runtime_error {
 public:
  CommError(ErrorKind kind, const std::string& message)
      : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

// What a rank's current call is, as published in its call descriptor: the element
// type of an allreduce, or one of the byte collectives (every rank must make the same
// kind of call; a mismatch fails on every rank at the same barrier).
enum class ElemType : int32_t {
  kFloat32 = 1,
  kBFloat16 = 2,
  kBroadcast = 3,
  kGather = 4,
  kFloat32Bf16Sums = 5,  // float32 data, rounded to bf16 for the trip and the sum
};

// A gather's arguments (every implementation checks them alike).
inline void check_gather_args(int64_t nbytes, int64_t rows) {
  if (nbytes < 0) throw CommError(ErrorKind::kInvalidArgument, "argument 'nbytes' must be >= 0");
  if (rows < 1 || nbytes % rows != 0) {
    throw CommError(ErrorKind::kInvalidArgument,
                    "argument 'rows' must be >= 1 and divide nbytes (" + std::to_string(nbytes) +
                        "), got " + std::to_string(rows));
  }
}

class Collective {
 public:
  virtual ~Collective() = default;
  // In place. data: [numel] elements of `type` (kFloat32, kBFloat16 or kFloat32Bf16Sums);
  // every rank passes the same numel and type. Every element is summed in rank order, so
  // every rank gets the same bits.
  virtual void allreduce(void* data, int64_t numel, ElemType type) = 0;
  // `nbytes` from every rank into rank 0's `dst`, laid out [rows][world_size][nbytes /
  // rows] (see ShmAllReduce::gather); `dst` is unused on other ranks.
  virtual void gather(const void* src, int64_t nbytes, void* dst, int64_t rows) = 0;
  // Seconds this rank waited for peers that had not sent or arrived yet, since it joined.
  virtual double wait_seconds() const = 0;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
};

}  // namespace xllm::comm
