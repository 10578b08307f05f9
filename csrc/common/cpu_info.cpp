#include "common/cpu_info.h"

#include <atomic>

#include "common/tensor.h"

namespace xllm {
namespace {

Isa detect() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

const Isa kDetected = detect();
std::atomic<int> g_active{static_cast<int>(kDetected)};

}  // namespace

Isa active_isa() { return static_cast<Isa>(g_active.load(std::memory_order_relaxed)); }

void set_isa_override(Isa isa) {
  if (static_cast<int>(isa) > static_cast<int>(kDetected)) {
    fail("this CPU does not support ", isa_name(isa), "; the best it supports is ",
         isa_name(kDetected));
  }
  g_active.store(static_cast<int>(isa), std::memory_order_relaxed);
}

const char* isa_name(Isa isa) { return isa == Isa::kAvx2 ? "avx2" : "scalar"; }

void register_cpu_info(py::module_& m) {
  m.def("cpu_isa", [] { return std::string(isa_name(active_isa())); },
        "The ISA the CPU kernels use now: 'avx2' or 'scalar'.");
  m.def("detected_isa", [] { return std::string(isa_name(kDetected)); },
        "The best ISA this CPU supports.");
  m.def(
      "set_cpu_isa",
      [](const std::string& name) {
        if (name == "avx2") set_isa_override(Isa::kAvx2);
        else if (name == "scalar") set_isa_override(Isa::kScalar);
        else fail("argument 'isa' must be 'avx2' or 'scalar', got '", name, "'");
      },
      py::arg("isa"), "Selects the CPU kernels' ISA ('avx2' or 'scalar'); tests use it.");
}

}  // namespace xllm
