#include "comm/tcp_collective.h"

#include <errno.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>

#include "comm/shm_reduce.h"
#include "comm/shm_segment.h"

namespace xllm::comm {
namespace {

int64_t trip_elem(ElemType type) { return type == ElemType::kFloat32 ? 4 : 2; }

// How long a rank waiting for bytes polls without sleeping (see recv_all).
constexpr double kSpinSeconds = 200e-6;

}  // namespace

TcpCollective::TcpCollective(int rank, int world_size, std::vector<int> fds, double timeout_s)
    : rank_(rank), world_size_(world_size), fds_(std::move(fds)), timeout_s_(timeout_s) {
  std::ostringstream err;
  if (world_size < 2 || rank < 0 || rank >= world_size) {
    err << "rank " << rank << " of world_size " << world_size
        << ": need world_size >= 2 and 0 <= rank < world_size";
  } else if (static_cast<int>(fds_.size()) != (rank == 0 ? world_size - 1 : 1)) {
    err << "rank " << rank << " needs " << (rank == 0 ? world_size - 1 : 1)
        << " connections, got " << fds_.size();
  } else if (!(timeout_s > 0) || !std::isfinite(timeout_s)) {
    err << "argument 'timeout' must be a finite number of seconds > 0, got " << timeout_s;
  }
  if (!err.str().empty()) throw CommError(ErrorKind::kInvalidArgument, err.str());
  if (rank == 0) {
    payloads_.resize(world_size);
    f32_srcs_.resize(world_size);
    bf16_srcs_.resize(world_size);
  }
}

void TcpCollective::check_usable() const {
  if (closed()) throw CommError(ErrorKind::kState, "the tensor-parallel TCP group is closed");
  if (!broken_.empty()) {
    throw CommError(ErrorKind::kState,
                    "the tensor-parallel TCP group is unusable after an earlier failure: " +
                        broken_);
  }
}

void TcpCollective::fail(ErrorKind kind, int peer, const std::string& what) {
  std::ostringstream os;
  os << "tensor-parallel TCP group (rank " << rank_ << " of " << world_size_ << "): rank "
     << peer << " " << what;
  broken_ = os.str();  // the byte streams are out of step now
  throw CommError(kind, broken_);
}

// The connection to `peer` (rank 0: workers 1..; a worker: rank 0).
void TcpCollective::send_all(int peer, const void* data, size_t n) {
  const int fd = fds_[rank_ == 0 ? peer - 1 : 0];
  const char* p = static_cast<const char*>(data);
  const double deadline = monotonic_now() + timeout_s_;
  while (n > 0) {
    const ssize_t k = ::send(fd, p, n, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (k > 0) {
      p += k;
      n -= static_cast<size_t>(k);
      continue;
    }
    if (k < 0 && errno == EINTR) continue;
    if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
      fail(ErrorKind::kPeerFailure, peer,
           std::string("is gone (sending: ") + std::strerror(errno) + ")");
    }
    if (closed()) fail(ErrorKind::kState, peer, "was being sent to when this rank closed");
    const double left = deadline - monotonic_now();
    if (left <= 0) fail(ErrorKind::kTimeout, peer, "took nothing for the whole timeout");
    pollfd pfd{fd, POLLOUT, 0};
    ::poll(&pfd, 1, static_cast<int>(std::min(left, 0.1) * 1000) + 1);
  }
}

void TcpCollective::recv_all(int peer, void* data, size_t n) {
  const int fd = fds_[rank_ == 0 ? peer - 1 : 0];
  char* p = static_cast<char*>(data);
  const double deadline = monotonic_now() + timeout_s_;
  while (n > 0) {
    const ssize_t k = ::recv(fd, p, n, MSG_DONTWAIT);
    if (k > 0) {
      p += k;
      n -= static_cast<size_t>(k);
      continue;
    }
    if (k == 0) fail(ErrorKind::kPeerFailure, peer, "closed its connection (died or left)");
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      fail(ErrorKind::kPeerFailure, peer,
           std::string("is gone (receiving: ") + std::strerror(errno) + ")");
    }
    if (closed()) fail(ErrorKind::kState, peer, "was being waited for when this rank closed");
    const double start = monotonic_now();
    const double left = deadline - start;
    if (left <= 0) {
      std::ostringstream os;
      os << "sent nothing for " << timeout_s_ << " s (alive but not arriving?)";
      fail(ErrorKind::kTimeout, peer, os.str());
    }
    // Spin a little first: a peer's part of a sum arrives within tens of microseconds,
    // and a blocking poll adds a sleep and a wake-up to each round trip.
    pollfd pfd{fd, POLLIN, 0};
    bool ready = false;
    while (!ready && monotonic_now() - start < kSpinSeconds) {
      ready = ::poll(&pfd, 1, 0) > 0;
      if (!ready) cpu_relax();
    }
    if (!ready) ::poll(&pfd, 1, static_cast<int>(std::min(left, 0.1) * 1000) + 1);
    wait_seconds_ += monotonic_now() - start;
  }
}

char* TcpCollective::payload(int rank, int64_t bytes) {
  std::vector<char>& buf = payloads_[rank];
  if (static_cast<int64_t>(buf.size()) < bytes) buf.resize(static_cast<size_t>(bytes));
  return buf.data();
}

std::string TcpCollective::collect(const Header& mine) {
  std::string mismatch;
  for (int r = 1; r < world_size_; ++r) {
    Header h{};
    recv_all(r, &h, sizeof(h));
    const bool same = h.kind == mine.kind && h.count == mine.count && h.rows == mine.rows;
    // The worker sent what its own header says: read exactly that, whatever it is.
    const int64_t bytes = h.kind == static_cast<int32_t>(ElemType::kGather)
                              ? h.count
                              : h.count * trip_elem(static_cast<ElemType>(h.kind));
    if (h.count < 0 || bytes < 0 || bytes > (int64_t{1} << 40)) {
      fail(ErrorKind::kPeerFailure, r, "sent a malformed header");
    }
    recv_all(r, payload(r, bytes), static_cast<size_t>(bytes));
    if (!same && mismatch.empty()) {
      std::ostringstream os;
      os << "every rank must make the same call (allreduce: the same number of elements and "
         << "dtype; gather: the same byte count and rows); rank 0 made kind " << mine.kind
         << " x " << mine.count << " (rows " << mine.rows << "), rank " << r << " kind "
         << h.kind << " x " << h.count << " (rows " << h.rows << ")";
      mismatch = os.str();
    }
  }
  return mismatch;
}

void TcpCollective::answer(const std::string& mismatch, const void* result, size_t n) {
  const Status st{mismatch.empty() ? 0 : 1, static_cast<int32_t>(mismatch.size())};
  for (int r = 1; r < world_size_; ++r) {
    send_all(r, &st, sizeof(st));
    if (!mismatch.empty()) {
      send_all(r, mismatch.data(), mismatch.size());
    } else if (n > 0) {
      send_all(r, result, n);
    }
  }
  if (!mismatch.empty()) throw CommError(ErrorKind::kInvalidArgument, mismatch);
}

void TcpCollective::receive_answer(void* result, size_t n) {
  Status st{};
  recv_all(0, &st, sizeof(st));
  if (st.code != 0) {
    if (st.length < 0 || st.length > (1 << 20)) {
      fail(ErrorKind::kPeerFailure, 0, "sent a malformed answer");
    }
    std::string message(static_cast<size_t>(st.length), '\0');
    recv_all(0, message.data(), message.size());
    throw CommError(ErrorKind::kInvalidArgument, message);
  }
  if (n > 0) recv_all(0, result, n);
}

void TcpCollective::allreduce(void* data, int64_t numel, ElemType type) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_usable();
  if (numel < 0) throw CommError(ErrorKind::kInvalidArgument, "argument 'numel' must be >= 0");
  if (type != ElemType::kFloat32 && type != ElemType::kBFloat16 &&
      type != ElemType::kFloat32Bf16Sums) {
    throw CommError(ErrorKind::kInvalidArgument, "allreduce sums float32 or bfloat16 only");
  }
  if (numel == 0) return;
  const bool widen = type == ElemType::kFloat32Bf16Sums;
  const int64_t bytes = numel * trip_elem(type);
  // This rank's data on the trip: rounded to bf16 for bf16 sums, else as it is.
  const char* mine = static_cast<const char*>(data);
  if (widen) {
    if (static_cast<int64_t>(trip_.size()) < bytes) trip_.resize(static_cast<size_t>(bytes));
    convert_f32_to_bf16(static_cast<const float*>(data),
                        reinterpret_cast<uint16_t*>(trip_.data()), numel);
    mine = trip_.data();
  }
  const Header header{static_cast<int32_t>(type), rank_, numel, 1};
  if (rank_ != 0) {
    send_all(0, &header, sizeof(header));
    send_all(0, mine, static_cast<size_t>(bytes));
    if (widen) {
      receive_answer(trip_.data(), static_cast<size_t>(bytes));
      convert_bf16_to_f32(reinterpret_cast<const uint16_t*>(trip_.data()),
                          static_cast<float*>(data), numel);
    } else {
      receive_answer(data, static_cast<size_t>(bytes));
    }
    return;
  }
  const std::string mismatch = collect(header);
  if (!mismatch.empty()) {
    answer(mismatch, nullptr, 0);  // throws
  }
  if (static_cast<int64_t>(result_.size()) < bytes) result_.resize(static_cast<size_t>(bytes));
  if (type == ElemType::kFloat32) {
    f32_srcs_[0] = static_cast<const float*>(data);
    for (int r = 1; r < world_size_; ++r) {
      f32_srcs_[r] = reinterpret_cast<const float*>(payloads_[r].data());
    }
    reduce_sum_f32(f32_srcs_.data(), world_size_, reinterpret_cast<float*>(result_.data()),
                   numel);
  } else {
    bf16_srcs_[0] = reinterpret_cast<const uint16_t*>(mine);
    for (int r = 1; r < world_size_; ++r) {
      bf16_srcs_[r] = reinterpret_cast<const uint16_t*>(payloads_[r].data());
    }
    reduce_sum_bf16(bf16_srcs_.data(), world_size_,
                    reinterpret_cast<uint16_t*>(result_.data()), numel);
  }
  answer("", result_.data(), static_cast<size_t>(bytes));
  if (widen) {
    convert_bf16_to_f32(reinterpret_cast<const uint16_t*>(result_.data()),
                        static_cast<float*>(data), numel);
  } else {
    std::memcpy(data, result_.data(), static_cast<size_t>(bytes));
  }
}

void TcpCollective::gather(const void* src, int64_t nbytes, void* dst, int64_t rows) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_usable();
  check_gather_args(nbytes, rows);
  if (nbytes == 0) return;
  const Header header{static_cast<int32_t>(ElemType::kGather), rank_, nbytes, rows};
  if (rank_ != 0) {
    send_all(0, &header, sizeof(header));
    send_all(0, src, static_cast<size_t>(nbytes));
    receive_answer(nullptr, 0);
    return;
  }
  const std::string mismatch = collect(header);
  if (!mismatch.empty()) answer(mismatch, nullptr, 0);  // throws
  const int64_t row = nbytes / rows;
  char* out = static_cast<char*>(dst);
  for (int r = 0; r < world_size_; ++r) {
    const char* from = r == 0 ? static_cast<const char*>(src) : payloads_[r].data();
    for (int64_t i = 0; i < rows; ++i) {
      std::memcpy(out + (i * world_size_ + r) * row, from + i * row, static_cast<size_t>(row));
    }
  }
  answer("", nullptr, 0);
}

}  // namespace xllm::comm
