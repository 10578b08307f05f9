// Python binding of the block pool and the chained block hash.
//
// The scheduler calls these a few times per step with lists of tens to
// thousands of ints, so the per-call cost is the conversion: lists are read
// through the sequence-fast item array and results are built as lists
// directly, never through pybind11's generic STL casters. Bad input raises
// ValueError naming the argument (std::invalid_argument from the core maps to
// ValueError too).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/tensor.h"
#include "memory/block_pool.h"

namespace xllm {
namespace {

// The items of a list or tuple, borrowed (any other iterable is copied into a
// list first).
class Items {
 public:
  Items(py::handle obj, const char* name) {
    PyObject* seq = PySequence_Fast(obj.ptr(), "");
    if (seq == nullptr) {
      PyErr_Clear();
      fail(name, " must be a sequence of ints, got ", Py_TYPE(obj.ptr())->tp_name);
    }
    seq_ = py::reinterpret_steal<py::object>(seq);
    size_ = static_cast<size_t>(PySequence_Fast_GET_SIZE(seq));
    items_ = PySequence_Fast_ITEMS(seq);
  }
  size_t size() const { return size_; }
  PyObject* operator[](size_t i) const { return items_[i]; }

 private:
  py::object seq_;
  size_t size_ = 0;
  PyObject** items_ = nullptr;
};

// Writes "name" or "name[index]" for messages (index < 0: a scalar argument).
std::string where(const char* name, int64_t index) {
  return index < 0 ? std::string(name) : std::string(name) + "[" + std::to_string(index) + "]";
}

// An int-like object (int, or anything with __index__ such as numpy ints) as
// a new reference.
py::object as_index(PyObject* item, const char* name, int64_t index) {
  if (PyLong_Check(item)) return py::reinterpret_borrow<py::object>(item);
  PyObject* idx = PyNumber_Index(item);
  if (idx == nullptr) {
    PyErr_Clear();
    fail(where(name, index), " must be an int, got ", Py_TYPE(item)->tp_name);
  }
  return py::reinterpret_steal<py::object>(idx);
}

int64_t to_int64(PyObject* item, const char* name, int64_t index) {
  int overflow = 0;
  long long v;
  if (PyLong_CheckExact(item)) {
    v = PyLong_AsLongLongAndOverflow(item, &overflow);
  } else {
    v = PyLong_AsLongLongAndOverflow(as_index(item, name, index).ptr(), &overflow);
  }
  if (overflow != 0) fail(where(name, index), " does not fit in a signed 64-bit int");
  return static_cast<int64_t>(v);
}

uint64_t to_uint64(PyObject* item, const char* name, int64_t index) {
  py::object num;
  if (!PyLong_CheckExact(item)) {
    num = as_index(item, name, index);
    item = num.ptr();
  }
  // PyLong_AsUnsignedLongLong converts multi-digit ints (most hashes) through a
  // generic byte-array path; checking sign and bit length (both O(1), long-lived
  // CPython functions) and then reading the low 64 bits is several times cheaper.
#if PY_VERSION_HEX >= 0x030E0000
  int sign = 0;
  PyLong_GetSign(item, &sign);
#else
  const int sign = _PyLong_Sign(item);
#endif
  if (sign < 0 || _PyLong_NumBits(item) > 64) {
    PyErr_Clear();
    fail(where(name, index), " must be in [0, 2**64), got ",
         py::repr(item).cast<std::string>());
  }
  return static_cast<uint64_t>(PyLong_AsUnsignedLongLongMask(item));
}

// Any 64-bit int, signed or unsigned, as its two's-complement word: token ids
// and extra keys hash the same whichever way the caller thinks of them.
uint64_t to_word(PyObject* item, const char* name, int64_t index) {
  int overflow = 0;
  long long v;
  py::object num;
  if (PyLong_CheckExact(item)) {
    v = PyLong_AsLongLongAndOverflow(item, &overflow);
  } else {
    num = as_index(item, name, index);
    v = PyLong_AsLongLongAndOverflow(num.ptr(), &overflow);
  }
  if (overflow == 0) return static_cast<uint64_t>(v);
  if (overflow < 0) fail(where(name, index), " must be in [-2**63, 2**64)");
  return to_uint64(item, name, index);
}

std::vector<int64_t> read_ids(py::handle obj, const char* name) {
  Items items(obj, name);
  std::vector<int64_t> out(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    out[i] = to_int64(items[i], name, static_cast<int64_t>(i));
  }
  return out;
}

std::vector<uint64_t> read_hashes(py::handle obj, const char* name) {
  Items items(obj, name);
  std::vector<uint64_t> out(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    out[i] = to_uint64(items[i], name, static_cast<int64_t>(i));
  }
  return out;
}

std::vector<uint64_t> read_words(py::handle obj, const char* name) {
  Items items(obj, name);
  std::vector<uint64_t> out(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    out[i] = to_word(items[i], name, static_cast<int64_t>(i));
  }
  return out;
}

template <class T, class MakeInt>
py::list make_list(const T* values, size_t n, MakeInt make_int) {
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(n));
  if (list == nullptr) throw py::error_already_set();
  for (size_t i = 0; i < n; ++i) {
    PyObject* v = make_int(values[i]);
    if (v == nullptr) {
      Py_DECREF(list);
      throw py::error_already_set();
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), v);
  }
  return py::reinterpret_steal<py::list>(list);
}

// The pool as Python sees it: the core pool plus one int object per block id,
// made the first time the id is returned and reused after. Returning ids is
// then an incref per block instead of an int allocation (and the list's
// teardown a decref instead of a free), which is most of what allocate() costs.
class BoundPool {
 public:
  explicit BoundPool(int64_t num_blocks)
      : pool(num_blocks), ids_(static_cast<size_t>(num_blocks), nullptr) {}
  BoundPool(const BoundPool&) = delete;
  BoundPool& operator=(const BoundPool&) = delete;
  ~BoundPool() {
    for (PyObject* id : ids_) Py_XDECREF(id);  // pybind11 deallocates with the GIL held
  }

  // blocks: [n] ids in [0, num_blocks).
  py::list block_list(const int32_t* blocks, size_t n) {
    return make_list(blocks, n, [this](int32_t b) -> PyObject* {
      PyObject*& id = ids_[static_cast<size_t>(b)];
      if (id == nullptr && (id = PyLong_FromLong(b)) == nullptr) return nullptr;
      Py_INCREF(id);
      return id;
    });
  }

  BlockPool pool;

 private:
  std::vector<PyObject*> ids_;  // [num_blocks]; owned references, nullptr until first used
};

py::list hash_list(const uint64_t* hashes, size_t n) {
  return make_list(hashes, n, [](uint64_t h) { return PyLong_FromUnsignedLongLong(h); });
}

}  // namespace

void register_block_pool(py::module_& m) {
  m.attr("ROOT_HASH") = py::int_(kRootBlockHash);

  m.def(
      "hash_block_tokens",
      [](py::handle parent_hash, py::handle token_ids, py::handle extra) {
        const uint64_t parent = to_uint64(parent_hash.ptr(), "parent_hash", -1);
        const uint64_t key = to_word(extra.ptr(), "extra", -1);
        const std::vector<uint64_t> tokens = read_words(token_ids, "token_ids");
        const uint64_t h = hash_block_tokens(parent, tokens.data(), tokens.size(), key);
        return py::reinterpret_steal<py::int_>(PyLong_FromUnsignedLongLong(h));
      },
      py::arg("parent_hash"), py::arg("token_ids"), py::arg("extra") = 0,
      "Chained hash of one block: its parent's hash, its token ids and an extra key.");

  m.def(
      "block_hashes",
      [](py::handle token_ids, py::handle block_size, py::handle parent_hash, py::handle extra) {
        const int64_t bs = to_int64(block_size.ptr(), "block_size", -1);
        if (bs < 1) fail("block_size must be >= 1, got ", bs);
        const uint64_t parent = to_uint64(parent_hash.ptr(), "parent_hash", -1);
        const uint64_t key = to_word(extra.ptr(), "extra", -1);
        const std::vector<uint64_t> tokens = read_words(token_ids, "token_ids");
        std::vector<uint64_t> out(tokens.size() / static_cast<size_t>(bs));
        block_hashes(tokens.data(), tokens.size(), static_cast<size_t>(bs), parent, key,
                     out.data());
        return hash_list(out.data(), out.size());
      },
      py::arg("token_ids"), py::arg("block_size"), py::arg("parent_hash") = kRootBlockHash,
      py::arg("extra") = 0, "Chained hashes of every full block of token_ids.");

  py::class_<BoundPool>(m, "BlockPool",
                        "KV block pool: ref counts, an LRU free list and a prefix cache.")
      .def(py::init([](py::handle num_blocks) {
             return new BoundPool(to_int64(num_blocks.ptr(), "num_blocks", -1));
           }),
           py::arg("num_blocks"))
      .def_property_readonly("num_blocks", [](const BoundPool& b) { return b.pool.num_blocks(); })
      .def_property_readonly("num_free_blocks",
                             [](const BoundPool& b) { return b.pool.num_free_blocks(); })
      .def_property_readonly("num_cached_blocks",
                             [](const BoundPool& b) { return b.pool.num_cached_blocks(); })
      .def(
          "allocate",
          [](BoundPool& bound, py::handle n) -> py::object {
            const int64_t count = to_int64(n.ptr(), "n", -1);
            if (count < 0) fail("n must be >= 0, got ", count);
            if (count > bound.pool.num_free_blocks()) return py::none();
            std::vector<int32_t> out(static_cast<size_t>(count));
            bound.pool.allocate(count, out.data());
            return bound.block_list(out.data(), out.size());
          },
          py::arg("n"))
      .def(
          "free",
          [](BoundPool& bound, py::handle blocks) {
            const std::vector<int64_t> ids = read_ids(blocks, "blocks");
            bound.pool.free(ids.data(), ids.size());
          },
          py::arg("blocks"))
      .def(
          "touch",
          [](BoundPool& bound, py::handle blocks) {
            const std::vector<int64_t> ids = read_ids(blocks, "blocks");
            bound.pool.touch(ids.data(), ids.size());
          },
          py::arg("blocks"))
      .def(
          "lookup",
          [](BoundPool& bound, py::handle hashes) {
            const std::vector<uint64_t> keys = read_hashes(hashes, "hashes");
            std::vector<int32_t> out(keys.size());
            const size_t hit = bound.pool.lookup(keys.data(), keys.size(), out.data());
            return bound.block_list(out.data(), hit);
          },
          py::arg("hashes"))
      .def(
          "cache_blocks",
          [](BoundPool& bound, py::handle blocks, py::handle hashes) {
            const std::vector<int64_t> ids = read_ids(blocks, "blocks");
            const std::vector<uint64_t> keys = read_hashes(hashes, "hashes");
            if (ids.size() != keys.size()) {
              fail("blocks and hashes must have the same length, got ", ids.size(), " and ",
                   keys.size());
            }
            bound.pool.cache_blocks(ids.data(), keys.data(), ids.size());
          },
          py::arg("blocks"), py::arg("hashes"))
      .def(
          "ref_count",
          [](const BoundPool& bound, py::handle block) {
            return bound.pool.ref_count(to_int64(block.ptr(), "block", -1));
          },
          py::arg("block"))
      .def(
          "block_hash",
          [](const BoundPool& bound, py::handle block) -> py::object {
            const auto [cached, h] = bound.pool.block_hash(to_int64(block.ptr(), "block", -1));
            if (!cached) return py::none();
            return py::reinterpret_steal<py::int_>(PyLong_FromUnsignedLongLong(h));
          },
          py::arg("block"))
      .def("free_block_ids",
           [](BoundPool& bound) {
             const std::vector<int32_t> ids = bound.pool.free_block_ids();
             return bound.block_list(ids.data(), ids.size());
           })
      .def("reset_prefix_cache", [](BoundPool& bound) { return bound.pool.reset_prefix_cache(); })
      .def(
          "retire",
          [](BoundPool& bound, py::handle blocks) {
            const std::vector<int64_t> ids = read_ids(blocks, "blocks");
            std::vector<uint64_t> evicted;
            bound.pool.retire(ids.data(), ids.size(), &evicted);
            return hash_list(evicted.data(), evicted.size());
          },
          py::arg("blocks"))
      .def(
          "restore",
          [](BoundPool& bound, py::handle blocks) {
            const std::vector<int64_t> ids = read_ids(blocks, "blocks");
            bound.pool.restore(ids.data(), ids.size());
          },
          py::arg("blocks"))
      .def(
          "set_events", [](BoundPool& bound, bool on) { bound.pool.set_events(on); },
          py::arg("on"))
      .def("drain_events",
           [](BoundPool& bound) {
             std::vector<uint64_t> added, evicted;
             bound.pool.drain_events(&added, &evicted);
             return py::make_tuple(hash_list(added.data(), added.size()),
                                   hash_list(evicted.data(), evicted.size()));
           })
      .def("cached_hashes",
           [](BoundPool& bound) {
             const std::vector<uint64_t> h = bound.pool.cached_hashes();
             return hash_list(h.data(), h.size());
           })
      .def_property_readonly("num_retired_blocks",
                             [](const BoundPool& b) { return b.pool.num_retired_blocks(); })
      .def(
          "is_retired",
          [](const BoundPool& bound, py::handle block) {
            return bound.pool.is_retired(to_int64(block.ptr(), "block", -1));
          },
          py::arg("block"))
      .def(
          "prefix_cache_stats",
          [](BoundPool& bound, bool reset) {
            const auto stats = bound.pool.prefix_cache_stats();
            if (reset) bound.pool.reset_prefix_cache_stats();
            return py::make_tuple(stats.first, stats.second);
          },
          py::arg("reset") = false)
      .def("__repr__", [](BoundPool& bound) {
        return "BlockPool(num_blocks=" + std::to_string(bound.pool.num_blocks()) +
               ", free=" + std::to_string(bound.pool.num_free_blocks()) +
               ", cached=" + std::to_string(bound.pool.num_cached_blocks()) + ")";
      });
}

}  // namespace xllm
