// Placeholder until this part lands; it exports nothing.
#include <pybind11/pybind11.h>
namespace xllm {
void register_vmm(pybind11::module_& m) {}
}  // namespace xllm
