// xllm._C.MPMCQueue: the lock-free ring of mpmc_queue.h carrying Python objects
// between threads, and the QueueClosed exception.
//
// References and the GIL. The ring moves bare PyObject* and never touches a
// reference count. A push takes a strong reference with the GIL held *before*
// the pointer enters the ring (and drops it again, with the GIL, if the push
// fails); that reference belongs to the queue while the item is inside. A pop
// takes the pointer out and with it that reference: ownership moves to the
// popper, nothing is incremented or decremented, so popping with the GIL
// released (as the blocking pop does after waking) is safe - the object cannot
// die while in flight because its one queue reference is what is being moved.
// The popper hands it to Python as a new reference once it holds the GIL again.
// The destructor runs with the GIL (pybind11 deallocates under it) and drops
// the references of items still inside.
//
// Blocking calls release the GIL for the whole wait (a short spin, then a sleep
// on a condition variable inside the ring; producers signal only when someone
// sleeps). On the main thread the sleep is cut into slices so signal handlers
// (Ctrl-C) run between them, as they would in queue.Queue.get.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "queue/mpmc_queue.h"

namespace py = pybind11;

namespace xllm {
namespace {

using mpmc::Clock;
using mpmc::PopResult;
using mpmc::PushResult;

struct QueueClosedError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Longest a main-thread wait goes without running signal handlers.
constexpr auto kSignalPollInterval = std::chrono::milliseconds(100);
// Timeouts beyond this many seconds (about 30 years) mean "no deadline".
constexpr double kForeverSeconds = 1e9;
// Pops taken per step by pop_many before they are wrapped into the list.
constexpr std::size_t kPopChunk = 256;

unsigned long g_main_thread_ident = 0;  // threading.main_thread().ident

std::string repr(double x) {
  std::ostringstream os;
  os << x;
  return os.str();
}

// A parsed `timeout` argument: never blocks, blocks until a deadline, or forever.
struct Wait {
  bool blocking = true;
  mpmc::Deadline deadline;  // nullopt with blocking: no deadline
  double seconds = 0.0;     // for messages
};

Wait parse_timeout(const std::optional<double>& timeout) {
  Wait w;
  if (!timeout) return w;
  const double s = *timeout;
  if (std::isnan(s) || s < 0) {
    throw py::value_error("timeout must be None or a non-negative number of seconds, got " +
                          repr(s));
  }
  w.seconds = s;
  if (s == 0) {
    w.blocking = false;
  } else if (s < kForeverSeconds) {
    w.deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                    std::chrono::duration<double>(s));
  }
  return w;
}

[[noreturn]] void raise_timeout(const char* what, double seconds) {
  PyErr_SetString(PyExc_TimeoutError,
                  (std::string(what) + " timed out after " + repr(seconds) + " s").c_str());
  throw py::error_already_set();
}

// One attempt with the GIL released. Not py::gil_scoped_release: during
// interpreter shutdown PyEval_RestoreThread ends a daemon thread with
// pthread_exit, and its forced unwinding must not cross a noexcept destructor
// (that is std::terminate); from plain code it unwinds like CPython's own
// waits. References held across the wait are then leaked, never released
// without the GIL.
template <typename Attempt>
auto attempt_without_gil(Attempt& attempt, const mpmc::Deadline& slice) {
  PyThreadState* state = PyEval_SaveThread();
  decltype(attempt(slice)) r;
  try {
    r = attempt(slice);
  } catch (...) {  // e.g. std::system_error from the condition variable
    PyEval_RestoreThread(state);
    throw;
  }
  PyEval_RestoreThread(state);
  return r;
}

// Runs attempt(slice_deadline) with the GIL released until it returns something
// other than `timed_out` or the caller's deadline passes. On the main thread
// each attempt lasts at most kSignalPollInterval and signal handlers run between
// attempts (an exception from one propagates, with the GIL held).
template <typename R, typename Attempt>
R wait_without_gil(Attempt&& attempt, const mpmc::Deadline& deadline, R timed_out) {
  const bool main_thread = PyThread_get_thread_ident() == g_main_thread_ident;
  for (;;) {
    mpmc::Deadline slice = deadline;
    if (main_thread) {
      const auto poll = Clock::now() + kSignalPollInterval;
      if (!slice || poll < *slice) slice = poll;
    }
    const R r = attempt_without_gil(attempt, slice);
    if (r != timed_out) return r;
    if (deadline && Clock::now() >= *deadline) return timed_out;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
  }
}

// An integer argument the way operator.index reads it (TypeError for floats,
// strings, None), saturated to the int64 range so huge values reach the range
// checks as ValueErrors instead of failing the conversion.
std::int64_t index_arg(const py::handle& obj) {
  py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(obj.ptr()));
  if (!index) throw py::error_already_set();
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
  if (overflow > 0) return INT64_MAX;
  if (overflow < 0) return INT64_MIN;
  if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
  return v;
}

std::size_t checked_capacity(const py::handle& arg) {
  const std::int64_t capacity = index_arg(arg);
  const auto max = static_cast<std::int64_t>(mpmc::kMaxCapacity);
  if (capacity < 2 || capacity > max || (capacity & (capacity - 1)) != 0) {
    std::string hint;
    if (capacity > 2 && capacity < max) {
      std::int64_t up = 2;
      while (up < capacity) up <<= 1;
      hint = "; try " + std::to_string(up / 2) + " or " + std::to_string(up);
    }
    throw py::value_error("capacity must be a power of two >= 2 (and <= 2**30), got " +
                          py::str(arg).cast<std::string>() + hint);
  }
  return static_cast<std::size_t>(capacity);
}

class PyObjectQueue {
 public:
  explicit PyObjectQueue(const py::handle& capacity) : ring_(checked_capacity(capacity)) {}
  PyObjectQueue(const PyObjectQueue&) = delete;
  PyObjectQueue& operator=(const PyObjectQueue&) = delete;

  // Runs with the GIL held. No other thread can be inside a method (each call
  // holds a reference to the queue), so this drains everything. Items are
  // taken out first and released after, so finalizers see a consistent ring.
  ~PyObjectQueue() {
    ring_.close();
    std::vector<PyObject*> left;
    PyObject* item = nullptr;
    while (ring_.try_pop(item) == PopResult::kOk) left.push_back(item);
    for (PyObject* p : left) Py_DECREF(p);
  }

  std::size_t capacity() const { return ring_.capacity(); }
  std::size_t size() const { return ring_.size_approx(); }
  bool closed() const { return ring_.closed(); }
  void close() { ring_.close(); }

  bool try_push(const py::handle& obj) {
    py::object ref = py::reinterpret_borrow<py::object>(obj);  // the queue's reference
    switch (ring_.try_push(ref.ptr())) {
      case PushResult::kOk:
        ref.release();  // now owned by the ring
        return true;
      case PushResult::kFull:
        return false;
      default:
        throw QueueClosedError("push to a closed MPMCQueue");
    }
  }

  void push(const py::handle& obj, const std::optional<double>& timeout) {
    const Wait wait = parse_timeout(timeout);
    // The queue's reference, managed by hand: see attempt_without_gil.
    PyObject* ref = obj.ptr();
    Py_INCREF(ref);
    PushResult r = ring_.try_push(ref);
    if (r == PushResult::kFull && wait.blocking) {
      try {
        r = wait_without_gil([&](const mpmc::Deadline& d) { return ring_.push_wait(ref, d); },
                             wait.deadline, PushResult::kFull);
      } catch (const py::error_already_set&) {  // a signal handler raised; GIL held
        Py_DECREF(ref);
        throw;
      } catch (const std::exception&) {
        Py_DECREF(ref);
        throw;
      }
    }
    if (r == PushResult::kOk) return;  // the ring owns the reference now
    Py_DECREF(ref);
    if (r == PushResult::kClosed) throw QueueClosedError("push to a closed MPMCQueue");
    raise_timeout("push to a full MPMCQueue", wait.seconds);
  }

  py::object try_pop(const py::object& default_value) {
    PyObject* item = nullptr;
    switch (ring_.try_pop(item)) {
      case PopResult::kOk:
        return py::reinterpret_steal<py::object>(item);
      case PopResult::kEmpty:
        return default_value;
      default:
        throw QueueClosedError("pop from a closed and empty MPMCQueue");
    }
  }

  py::object pop(const std::optional<double>& timeout) {
    const Wait wait = parse_timeout(timeout);
    PyObject* item = nullptr;
    PopResult r = ring_.try_pop(item);
    if (r == PopResult::kEmpty && wait.blocking) {
      r = wait_without_gil([&](const mpmc::Deadline& d) { return ring_.pop_wait(item, d); },
                           wait.deadline, PopResult::kEmpty);
    }
    if (r == PopResult::kClosed) throw QueueClosedError("pop from a closed and empty MPMCQueue");
    if (r == PopResult::kEmpty) raise_timeout("pop from an empty MPMCQueue", wait.seconds);
    return py::reinterpret_steal<py::object>(item);
  }

  std::size_t push_many(const py::handle& items) {
    if (PyUnicode_Check(items.ptr()) || PyBytes_Check(items.ptr()) ||
        PyByteArray_Check(items.ptr()) || !PySequence_Check(items.ptr())) {
      throw py::type_error(
          "items must be a sequence such as a list or tuple (not str/bytes, not an iterator: "
          "the items that do not fit stay with the caller), got " +
          std::string(Py_TYPE(items.ptr())->tp_name));
    }
    py::object fast = py::reinterpret_steal<py::object>(
        PySequence_Fast(items.ptr(), "items must be a sequence"));
    if (!fast) throw py::error_already_set();
    if (ring_.closed()) throw QueueClosedError("push to a closed MPMCQueue");
    const auto n = static_cast<std::size_t>(PySequence_Fast_GET_SIZE(fast.ptr()));
    PyObject** objs = PySequence_Fast_ITEMS(fast.ptr());  // [n], borrowed
    // No more than a full ring can go in, so only that many get a reference.
    const std::size_t offered = std::min(n, ring_.capacity());
    for (std::size_t i = 0; i < offered; ++i) Py_INCREF(objs[i]);
    PushResult stop = PushResult::kOk;
    const std::size_t pushed = ring_.try_push_many(objs, offered, &stop);
    for (std::size_t i = pushed; i < offered; ++i) Py_DECREF(objs[i]);
    if (pushed == 0 && stop == PushResult::kClosed) {
      throw QueueClosedError("push to a closed MPMCQueue");
    }
    return pushed;
  }

  py::list pop_many(const py::handle& max_items_arg, const std::optional<double>& timeout) {
    const std::int64_t max_items = index_arg(max_items_arg);
    if (max_items < 1) {
      throw py::value_error("max_items must be >= 1, got " +
                            py::str(max_items_arg).cast<std::string>());
    }
    const Wait wait = parse_timeout(timeout);
    const std::size_t limit =
        static_cast<std::size_t>(std::min<std::uint64_t>(max_items, ring_.capacity()));
    py::list out;
    PopResult stop = drain_into(out, limit);
    if (out.empty() && stop == PopResult::kEmpty && wait.blocking) {
      PyObject* first = nullptr;
      stop = wait_without_gil([&](const mpmc::Deadline& d) { return ring_.pop_wait(first, d); },
                              wait.deadline, PopResult::kEmpty);
      if (stop == PopResult::kOk) {
        append_stolen(out, &first, 1);
        if (limit > 1) drain_into(out, limit - 1);
      }
    }
    if (out.empty() && stop == PopResult::kClosed) {
      throw QueueClosedError("pop from a closed and empty MPMCQueue");
    }
    return out;
  }

  std::string repr() const {
    std::ostringstream os;
    os << "<MPMCQueue capacity=" << capacity() << " size~" << size()
       << (closed() ? " closed" : "") << ">";
    return os.str();
  }

 private:
  // Pops up to limit items (with the GIL held) and appends them to out.
  PopResult drain_into(py::list& out, std::size_t limit) {
    PyObject* chunk[kPopChunk];
    PopResult stop = PopResult::kOk;
    while (limit > 0) {
      const std::size_t n = ring_.try_pop_many(chunk, std::min(limit, kPopChunk), &stop);
      append_stolen(out, chunk, n);
      limit -= n;
      if (stop != PopResult::kOk) break;
    }
    return stop;
  }

  // Appends owned references; on failure releases those not yet appended.
  static void append_stolen(py::list& out, PyObject** items /* [n] */, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) {
      const int rc = PyList_Append(out.ptr(), items[i]);
      Py_DECREF(items[i]);  // the list holds its own reference now (or failed)
      if (rc != 0) {
        for (std::size_t j = i + 1; j < n; ++j) Py_DECREF(items[j]);
        throw py::error_already_set();
      }
    }
  }

  mpmc::BoundedQueue<PyObject*> ring_;
};

}  // namespace

void register_queue(py::module_& m) {
  g_main_thread_ident =
      py::module_::import("threading").attr("main_thread")().attr("ident").cast<unsigned long>();

  auto closed = py::register_exception<QueueClosedError>(m, "QueueClosed", PyExc_RuntimeError);
  closed.attr("__doc__") =
      "Raised by a push on a closed MPMCQueue, and by a pop once it is closed and empty.";

  py::class_<PyObjectQueue>(m, "MPMCQueue", R"doc(
Bounded lock-free multi-producer multi-consumer queue of Python objects
(Vyukov ring). See xllm.ops.queue for the full contract.

MPMCQueue(capacity): capacity must be a power of two >= 2.
)doc")
      .def(py::init<const py::handle&>(), py::arg("capacity"))
      .def("try_push", &PyObjectQueue::try_push, py::arg("item"),
           "Push without blocking; False if the queue is full. QueueClosed if closed.")
      .def("push", &PyObjectQueue::push, py::arg("item"), py::arg("timeout") = py::none(),
           "Push, waiting with the GIL released while full. TimeoutError after timeout "
           "seconds (None: no limit; 0: do not wait). QueueClosed if closed.")
      .def("try_pop", &PyObjectQueue::try_pop, py::arg("default") = py::none(),
           "Pop without blocking; default if the queue is empty. QueueClosed if closed and "
           "empty.")
      .def("pop", &PyObjectQueue::pop, py::arg("timeout") = py::none(),
           "Pop, waiting with the GIL released while empty. TimeoutError after timeout "
           "seconds (None: no limit; 0: do not wait). QueueClosed if closed and empty.")
      .def("push_many", &PyObjectQueue::push_many, py::arg("items"),
           "Push a prefix of the sequence items without blocking; returns how many went in.")
      .def("pop_many", &PyObjectQueue::pop_many, py::arg("max_items"),
           py::arg("timeout") = 0.0,
           "Pop up to max_items (at most capacity); waits up to timeout for the first one "
           "and returns [] on timeout. QueueClosed if closed and empty.")
      .def("close", &PyObjectQueue::close,
           "Refuse later pushes and wake every waiter; items inside can still be popped.")
      .def_property_readonly("capacity", &PyObjectQueue::capacity)
      .def_property_readonly("size", &PyObjectQueue::size,
                             "Approximate number of items inside (exact when no thread is "
                             "pushing or popping).")
      .def_property_readonly("closed", &PyObjectQueue::closed)
      .def("__len__", &PyObjectQueue::size)
      .def("__repr__", &PyObjectQueue::repr);
}

}  // namespace xllm
