// The boundary between Python tensors and native code.
//
// _C never links libtorch. A torch.Tensor crosses into C++ as what it is made
// of: its data pointer, shape, strides (in elements), dtype and whether it lives
// in host memory. Every op checks its arguments here, and every failed check is
// a Python ValueError that names the argument, so a wrong call never reaches a
// kernel.
#pragma once

#include <pybind11/pybind11.h>

#include <array>
#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <string>

namespace xllm {
namespace py = pybind11;

enum class DType : int { kFloat32, kBFloat16, kFloat16, kInt32, kInt64, kUInt8, kInt8, kOther };

const char* dtype_name(DType dtype);
int64_t dtype_size(DType dtype);

constexpr int kMaxDims = 6;

struct Tensor {
  std::string name;  // the argument's name, for error messages
  void* data = nullptr;
  int ndim = 0;
  std::array<int64_t, kMaxDims> shape{};
  std::array<int64_t, kMaxDims> stride{};  // in elements
  DType dtype = DType::kOther;

  int64_t size(int dim) const { return shape[dim < 0 ? dim + ndim : dim]; }
  int64_t numel() const;
  bool is_contiguous() const;
  std::string shape_str() const;
  template <class T>
  T* ptr() const { return static_cast<T*>(data); }
};

// Reads a host tensor (any object with data_ptr(), shape, stride(), dtype and
// is_cpu, i.e. a torch.Tensor). Raises ValueError naming `name` otherwise.
Tensor host_tensor(py::handle obj, const char* name);

template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw py::value_error(os.str());
}

void check_dtype(const Tensor& t, DType expected);
void check_dtype(const Tensor& t, std::initializer_list<DType> allowed);
void check_contiguous(const Tensor& t);
void check_ndim(const Tensor& t, int ndim, const char* layout);
// t.shape[dim] must equal `expected`; `what` says where that number comes from.
void check_dim(const Tensor& t, int dim, int64_t expected, const std::string& what);

}  // namespace xllm
