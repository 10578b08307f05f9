#include "common/tensor.h"

namespace xllm {
namespace {

// torch dtype objects, looked up once; compared by identity afterwards.
struct DTypeTable {
  py::object f32, bf16, f16, i32, i64, u8, i8;
};

const DTypeTable& dtype_table() {
  // Leaked on purpose: destroying Python objects after interpreter shutdown crashes.
  static DTypeTable* table = [] {
    py::module_ torch = py::module_::import("torch");
    return new DTypeTable{torch.attr("float32"), torch.attr("bfloat16"), torch.attr("float16"),
                          torch.attr("int32"),   torch.attr("int64"),    torch.attr("uint8"),
                          torch.attr("int8")};
  }();
  return *table;
}

DType to_dtype(py::handle dtype) {
  const DTypeTable& t = dtype_table();
  PyObject* p = dtype.ptr();
  if (p == t.f32.ptr()) return DType::kFloat32;
  if (p == t.bf16.ptr()) return DType::kBFloat16;
  if (p == t.f16.ptr()) return DType::kFloat16;
  if (p == t.i32.ptr()) return DType::kInt32;
  if (p == t.i64.ptr()) return DType::kInt64;
  if (p == t.u8.ptr()) return DType::kUInt8;
  if (p == t.i8.ptr()) return DType::kInt8;
  return DType::kOther;
}

}  // namespace

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
    case DType::kUInt8: return "uint8";
    case DType::kInt8: return "int8";
    default: return "an unsupported dtype";
  }
}

int64_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: case DType::kInt32: return 4;
    case DType::kBFloat16: case DType::kFloat16: return 2;
    case DType::kInt64: return 8;
    case DType::kUInt8: case DType::kInt8: return 1;
    default: return 0;
  }
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

bool Tensor::is_contiguous() const {
  int64_t expected = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    if (shape[i] != 1 && stride[i] != expected) return false;
    expected *= shape[i];
  }
  return true;
}

std::string Tensor::shape_str() const {
  std::ostringstream os;
  os << "[";
  for (int i = 0; i < ndim; ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

namespace {

// Attribute names as interned Python strings, made once: looking an attribute up by a
// C string builds and hashes a new str each time, which dominated a call's cost.
struct Names {
  PyObject *data_ptr, *is_cpu, *shape, *stride, *dtype;
};

const Names& names() {
  static const Names n{PyUnicode_InternFromString("data_ptr"), PyUnicode_InternFromString("is_cpu"),
                       PyUnicode_InternFromString("shape"), PyUnicode_InternFromString("stride"),
                       PyUnicode_InternFromString("dtype")};
  return n;
}

// A new reference to obj.<name>, or a Python error turned into a C++ exception.
py::object get(py::handle obj, PyObject* name) {
  PyObject* r = PyObject_GetAttr(obj.ptr(), name);
  if (!r) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(r);
}

py::object call(py::handle obj, PyObject* name) {
  PyObject* r = PyObject_CallMethodNoArgs(obj.ptr(), name);
  if (!r) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(r);
}

int64_t as_int(PyObject* o) {
  const long long v = PyLong_AsLongLong(o);
  if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
  return v;
}

}  // namespace

Tensor host_tensor(py::handle obj, const char* name) {
  const Names& n = names();
  PyObject* is_cpu = PyObject_GetAttr(obj.ptr(), n.is_cpu);
  if (!is_cpu) {
    PyErr_Clear();
    fail("argument '", name, "' must be a torch.Tensor, got ",
         py::str(py::type::handle_of(obj).attr("__name__")).cast<std::string>());
  }
  const int cpu = PyObject_IsTrue(is_cpu);
  Py_DECREF(is_cpu);
  if (cpu != 1) {
    if (cpu < 0) throw py::error_already_set();
    fail("argument '", name, "' must be a CPU tensor, got one on ",
         py::str(obj.attr("device")).cast<std::string>());
  }
  Tensor t;
  t.name = name;
  py::object shape = get(obj, n.shape);
  py::object stride = call(obj, n.stride);
  if (!PyTuple_Check(shape.ptr()) || !PyTuple_Check(stride.ptr())) {
    fail("argument '", name, "' must be a torch.Tensor (its shape and stride() are not tuples)");
  }
  const Py_ssize_t ndim = PyTuple_GET_SIZE(shape.ptr());
  if (ndim > static_cast<Py_ssize_t>(kMaxDims)) {
    fail("argument '", name, "' has ", ndim, " dimensions; at most ", kMaxDims,
         " are supported");
  }
  t.ndim = static_cast<int>(ndim);
  for (int i = 0; i < t.ndim; ++i) {
    t.shape[i] = as_int(PyTuple_GET_ITEM(shape.ptr(), i));
    t.stride[i] = as_int(PyTuple_GET_ITEM(stride.ptr(), i));
  }
  t.dtype = to_dtype(get(obj, n.dtype));
  py::object ptr = call(obj, n.data_ptr);
  t.data = PyLong_AsVoidPtr(ptr.ptr());
  if (!t.data && PyErr_Occurred()) throw py::error_already_set();
  return t;
}

void check_dtype(const Tensor& t, DType expected) {
  if (t.dtype != expected) {
    fail("argument '", t.name, "' must be ", dtype_name(expected), ", got ", dtype_name(t.dtype));
  }
}

void check_dtype(const Tensor& t, std::initializer_list<DType> allowed) {
  for (DType d : allowed) {
    if (t.dtype == d) return;
  }
  std::ostringstream os;
  bool first = true;
  for (DType d : allowed) {
    os << (first ? "" : " or ") << dtype_name(d);
    first = false;
  }
  fail("argument '", t.name, "' must be ", os.str(), ", got ", dtype_name(t.dtype));
}

void check_contiguous(const Tensor& t) {
  if (!t.is_contiguous()) {
    fail("argument '", t.name, "' must be contiguous (call .contiguous() first); shape ",
         t.shape_str());
  }
}

void check_ndim(const Tensor& t, int ndim, const char* layout) {
  if (t.ndim != ndim) {
    fail("argument '", t.name, "' must have ", ndim, " dimensions ", layout, ", got shape ",
         t.shape_str());
  }
}

void check_dim(const Tensor& t, int dim, int64_t expected, const std::string& what) {
  if (t.size(dim) != expected) {
    fail("argument '", t.name, "' has size ", t.size(dim), " in dimension ", dim, " but ", what,
         " is ", expected, " (shape ", t.shape_str(), ")");
  }
}

}  // namespace xllm
