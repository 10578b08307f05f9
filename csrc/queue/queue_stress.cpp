// Stress program for the MPMC ring (mpmc_queue.h), meant to run under
// ThreadSanitizer. Build and run (see docs/ops.md):
//
//   cmake -S . -B build/tsan -DXLLM_TSAN_STRESS=ON ... && cmake --build build/tsan --target queue_stress
//   build/tsan/queue_stress [items_per_producer]
//
// Several producers and consumers share a small ring so it keeps hitting full
// and empty; every push/pop flavour is mixed in (try, batch, blocking with and
// without deadlines). It checks that the multiset of popped items equals the
// pushed one (nothing lost, nothing duplicated), that each consumer sees each
// producer's items in increasing order (FIFO per producer), that close() wakes
// sleepers on both sides, and that deadlines time out. Exit status 0 means every
// check passed; TSAN adds its own report and exit status on a data race.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "queue/mpmc_queue.h"

namespace {

using xllm::mpmc::BoundedQueue;
using xllm::mpmc::Clock;
using xllm::mpmc::PopResult;
using xllm::mpmc::PushResult;

constexpr int kProducers = 4;
constexpr int kConsumers = 4;
constexpr std::size_t kCapacity = 64;

std::atomic<int> g_failures{0};

void fail(const std::string& what) {
  std::fprintf(stderr, "FAILED: %s\n", what.c_str());
  g_failures.fetch_add(1);
}

// Item = producer id in the high half, 1-based sequence number in the low half.
std::uint64_t make_item(int producer, std::uint64_t seq) {
  return (static_cast<std::uint64_t>(producer) << 32) | seq;
}

void produce(BoundedQueue<std::uint64_t>& q, int id, std::uint64_t count) {
  std::uint64_t seq = 1;
  while (seq <= count) {
    switch (seq % 4) {
      case 0: {  // spin on try_push
        while (q.try_push(make_item(id, seq)) == PushResult::kFull) std::this_thread::yield();
        ++seq;
        break;
      }
      case 1: {  // blocking push without a deadline
        if (q.push_wait(make_item(id, seq), std::nullopt) != PushResult::kOk) fail("push_wait");
        ++seq;
        break;
      }
      case 2: {  // blocking push with a short deadline, retried on timeout
        PushResult r;
        while ((r = q.push_wait(make_item(id, seq), Clock::now() + std::chrono::microseconds(200))) ==
               PushResult::kFull) {
        }
        if (r != PushResult::kOk) fail("push_wait with deadline");
        ++seq;
        break;
      }
      default: {  // a batch, pushing the rest after a partial result
        std::uint64_t batch[8];
        std::size_t n = 0;
        while (n < 8 && seq + n <= count) {
          batch[n] = make_item(id, seq + n);
          ++n;
        }
        std::size_t done = 0;
        while (done < n) {
          done += q.try_push_many(batch + done, n - done);
          if (done < n) std::this_thread::yield();
        }
        seq += n;
        break;
      }
    }
  }
}

// Pops until the queue is closed and drained; checks per-producer order.
void consume(BoundedQueue<std::uint64_t>& q, int id, std::vector<std::uint64_t>& popped) {
  std::vector<std::uint64_t> last_seen(kProducers, 0);
  auto take = [&](std::uint64_t item) {
    const int producer = static_cast<int>(item >> 32);
    const std::uint64_t seq = item & 0xffffffffu;
    if (producer < 0 || producer >= kProducers || seq == 0) {
      fail("consumer " + std::to_string(id) + " popped a value nobody pushed");
      return;
    }
    if (seq <= last_seen[producer]) {
      fail("consumer " + std::to_string(id) + " saw producer " + std::to_string(producer) +
           " item " + std::to_string(seq) + " after " + std::to_string(last_seen[producer]));
    }
    last_seen[producer] = seq;
    popped.push_back(item);
  };
  for (std::uint64_t round = 0;; ++round) {
    std::uint64_t item = 0;
    PopResult r;
    switch ((round + id) % 4) {
      case 0:
        r = q.pop_wait(item, std::nullopt);
        if (r == PopResult::kOk) take(item);
        break;
      case 1:
        r = q.pop_wait(item, Clock::now() + std::chrono::microseconds(300));
        if (r == PopResult::kOk) take(item);
        break;
      case 2: {
        std::uint64_t batch[16];
        const std::size_t n = q.try_pop_many(batch, 16, &r);
        for (std::size_t i = 0; i < n; ++i) take(batch[i]);
        if (n > 0) r = PopResult::kOk;
        break;
      }
      default:
        r = q.try_pop(item);
        if (r == PopResult::kOk) take(item);
        break;
    }
    if (r == PopResult::kClosed) return;
    if (r == PopResult::kEmpty) std::this_thread::yield();
  }
}

void check_contention(std::uint64_t per_producer) {
  BoundedQueue<std::uint64_t> q(kCapacity);
  std::vector<std::vector<std::uint64_t>> popped(kConsumers);
  std::vector<std::thread> consumers, producers;
  for (int c = 0; c < kConsumers; ++c) {
    consumers.emplace_back(consume, std::ref(q), c, std::ref(popped[c]));
  }
  for (int p = 0; p < kProducers; ++p) producers.emplace_back(produce, std::ref(q), p, per_producer);
  for (auto& t : producers) t.join();
  q.close();  // consumers drain what is left, then see kClosed
  for (auto& t : consumers) t.join();

  // Multiset equality: every (producer, seq) popped exactly once.
  std::vector<std::uint8_t> seen(kProducers * per_producer, 0);
  std::size_t total = 0;
  for (const auto& list : popped) {
    for (std::uint64_t item : list) {
      const std::uint64_t slot = (item >> 32) * per_producer + (item & 0xffffffffu) - 1;
      if (seen[slot]++ != 0) fail("item popped twice: " + std::to_string(item));
    }
    total += list.size();
  }
  if (total != seen.size()) {
    fail("popped " + std::to_string(total) + " items, pushed " + std::to_string(seen.size()));
  }
  if (q.size_approx() != 0) fail("size after draining is not 0");
  std::printf("contention: %d producers x %llu items, %d consumers, capacity %zu: %zu popped\n",
              kProducers, static_cast<unsigned long long>(per_producer), kConsumers, kCapacity,
              total);
}

void check_close_wakes_sleepers() {
  // Consumers asleep on an empty ring wake with kClosed.
  BoundedQueue<std::uint64_t> empty(4);
  std::atomic<int> woke{0};
  std::vector<std::thread> sleepers;
  for (int i = 0; i < 3; ++i) {
    sleepers.emplace_back([&] {
      std::uint64_t item;
      if (empty.pop_wait(item, std::nullopt) == PopResult::kClosed) woke.fetch_add(1);
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  empty.close();
  for (auto& t : sleepers) t.join();
  if (woke.load() != 3) fail("close() did not wake every sleeping consumer");

  // Producers asleep on a full ring wake with kClosed; items inside still drain.
  BoundedQueue<std::uint64_t> full(2);
  full.try_push(1);
  full.try_push(2);
  std::thread producer([&] {
    if (full.push_wait(3, std::nullopt) != PushResult::kClosed) fail("push_wait after close");
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  full.close();
  producer.join();
  std::uint64_t a = 0, b = 0, c = 0;
  if (full.try_push(4) != PushResult::kClosed) fail("try_push after close");
  if (full.try_pop(a) != PopResult::kOk || full.try_pop(b) != PopResult::kOk || a != 1 || b != 2) {
    fail("items pushed before close() were not drained in order");
  }
  if (full.try_pop(c) != PopResult::kClosed) fail("pop on a closed, drained ring");
  std::printf("close: wakes sleeping consumers and producers, drains what was inside\n");
}

void check_deadline() {
  BoundedQueue<std::uint64_t> q(2);
  std::uint64_t item;
  const auto start = Clock::now();
  const PopResult r = q.pop_wait(item, start + std::chrono::milliseconds(20));
  const auto waited = Clock::now() - start;
  if (r != PopResult::kEmpty) fail("pop_wait on an empty ring did not time out");
  if (waited < std::chrono::milliseconds(20)) fail("pop_wait returned before its deadline");
  q.try_push(1);
  q.try_push(2);
  if (q.push_wait(3, Clock::now() + std::chrono::milliseconds(5)) != PushResult::kFull) {
    fail("push_wait on a full ring did not time out");
  }
  std::printf("deadlines: pop and push time out\n");
}

}  // namespace

int main(int argc, char** argv) {
  std::uint64_t per_producer = 100000;
  if (argc > 1) per_producer = std::strtoull(argv[1], nullptr, 10);
  if (per_producer == 0 || per_producer >= (std::uint64_t{1} << 32)) {
    std::fprintf(stderr, "usage: %s [items_per_producer in 1..2^32-1]\n", argv[0]);
    return 2;
  }
  const auto start = Clock::now();
  check_contention(per_producer);
  check_close_wakes_sleepers();
  check_deadline();
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (g_failures.load() != 0) {
    std::printf("queue_stress: %d check(s) FAILED in %.2f s\n", g_failures.load(), seconds);
    return 1;
  }
  std::printf("queue_stress: all checks passed in %.2f s\n", seconds);
  return 0;
}
