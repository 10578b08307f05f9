// Sums and gathers among tensor-parallel ranks on several hosts, over the TCP connections
// the Python group (xllm/ops/tcp_group.py) already holds: one from every worker to rank 0.
// No Python here; csrc/comm/tcp_collective_bind.cpp wraps it.
//
// A star through rank 0, one round trip a call:
//   allreduce: every worker sends [header][its data on the trip]; rank 0 reads them in rank
//     order, sums rank 0's + rank 1's + ... element by element (fp32; bf16 widened, summed
//     in fp32, rounded once), and sends [status][result] back to each worker. Every rank
//     ends with the same bits, as on shared memory (comm/shm_allreduce.h).
//   gather: every worker sends [header][its bytes]; rank 0 places them (rows side by side,
//     as ShmAllReduce::gather) and answers [status].
// The header (kind, numel or byte count, rows) is checked on rank 0: a call that disagrees
// with rank 0's fails on every rank with the same message (its bytes are drained, so the
// streams stay in step and the group stays usable). A connection that closes, errs or stays
// silent past the timeout fails the call (kPeerFailure / kTimeout) and breaks the group.
//
// The file descriptors belong to the Python sockets (which may be blocking or not): every
// read and write here is non-blocking (MSG_DONTWAIT) behind poll().
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "comm/collective.h"

namespace xllm::comm {

class TcpCollective : public Collective {
 public:
  // fds: rank 0, the workers' connections in rank order (world_size - 1 of them); a worker,
  // its one connection to rank 0.
  TcpCollective(int rank, int world_size, std::vector<int> fds, double timeout_s);

  void allreduce(void* data, int64_t numel, ElemType type) override;
  void gather(const void* src, int64_t nbytes, void* dst, int64_t rows = 1) override;
  double wait_seconds() const override { return wait_seconds_; }
  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  double timeout() const { return timeout_s_; }

  // Stops using the connections (the Python group closes them after); a call waiting on
  // another thread fails within a poll slice (at once if the connection is shut down too).
  // Idempotent.
  void close() { closed_.store(true, std::memory_order_release); }
  bool closed() const { return closed_.load(std::memory_order_acquire); }

 private:
  struct Header {
    int32_t kind;
    int32_t rank;
    int64_t count;  // allreduce: elements; gather: bytes
    int64_t rows;   // gather: rows of src (1 for an allreduce)
  };
  struct Status {
    int32_t code;     // 0: done; 1: the call disagreed with rank 0's (a message follows)
    int32_t length;   // of the message
  };

  void check_usable() const;
  [[noreturn]] void fail(ErrorKind kind, int peer, const std::string& what);
  void send_all(int peer, const void* data, size_t n);
  void recv_all(int peer, void* data, size_t n);
  // Rank 0: reads every worker's header and payload (into payload(r)); returns "" or what
  // disagreed with rank 0's header.
  std::string collect(const Header& mine);
  void answer(const std::string& mismatch, const void* result, size_t n);
  void receive_answer(void* result, size_t n);
  char* payload(int rank, int64_t bytes);

  int rank_;
  int world_size_;
  std::vector<int> fds_;
  double timeout_s_;
  double wait_seconds_ = 0;
  std::atomic<bool> closed_{false};
  std::string broken_;
  std::mutex mutex_;
  std::vector<std::vector<char>> payloads_;  // rank 0: each worker's data (grown, reused)
  std::vector<char> trip_, result_;  // this rank's data on the trip; rank 0's sum
  std::vector<const float*> f32_srcs_;  // rank 0: the sum's sources, in rank order
  std::vector<const uint16_t*> bf16_srcs_;
};

}  // namespace xllm::comm
