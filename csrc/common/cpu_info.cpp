#include "common/cpu_info.h"

#include <omp.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "common/tensor.h"

namespace xllm {
namespace {

struct Features {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512_vnni = false, avx512_bf16 = false, avx_vnni = false;
  bool amx_tile = false, amx_bf16 = false, amx_int8 = false;
  bool os_avx = false, os_avx512 = false, os_amx = false;  // state the OS saves for us
};

#if defined(__x86_64__)
bool bit(unsigned reg, int i) { return (reg >> i) & 1u; }

unsigned long long xgetbv0() {
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}

// Linux keeps the AMX tile data (8 KiB a thread) out of every process until it asks:
// without this, the first tile instruction dies with SIGILL. The grant is per process.
bool request_amx_permission() {
  constexpr int kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023;
  constexpr int kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return false;
  unsigned long long granted = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &granted) != 0) return false;
  return (granted >> kXfeatureXtiledata) & 1u;
}
#endif

Features probe() {
  Features f;
#if defined(__x86_64__)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = bit(c, 27);
  f.fma = bit(c, 12);
  f.f16c = bit(c, 29);
  const unsigned long long xcr0 = osxsave ? xgetbv0() : 0;
  f.os_avx = (xcr0 & 0x6) == 0x6;                  // SSE and AVX state
  f.os_avx512 = f.os_avx && (xcr0 & 0xE0) == 0xE0;  // opmask, ZMM0-15 upper, ZMM16-31
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  f.avx2 = bit(b, 5);
  f.avx512f = bit(b, 16);
  f.avx512dq = bit(b, 17);
  f.avx512bw = bit(b, 30);
  f.avx512vl = bit(b, 31);
  f.avx512_vnni = bit(c, 11);
  f.amx_bf16 = bit(d, 22);
  f.amx_tile = bit(d, 24);
  f.amx_int8 = bit(d, 25);
  unsigned a1, b1, c1, d1;
  __cpuid_count(7, 1, a1, b1, c1, d1);
  f.avx_vnni = bit(a1, 4);
  f.avx512_bf16 = bit(a1, 5);
  // XTILECFG and XTILEDATA (bits 17, 18) must be in XCR0, and Linux must grant them.
  f.os_amx = f.os_avx512 && f.amx_tile && (xcr0 & 0x60000) == 0x60000 &&
             request_amx_permission();
#endif
  return f;
}

const Features kFeatures = probe();

Isa detect(const Features& f) {
  const bool avx2 = f.os_avx && f.avx2 && f.fma && f.f16c;
  // Skylake-SP has AVX-512 without VNNI: it runs the avx2 level, whose int8 kernels do
  // without VPDPBUSD.
  const bool avx512 = avx2 && f.os_avx512 && f.avx512f && f.avx512bw && f.avx512vl &&
                      f.avx512dq && f.avx512_vnni;
  const bool avx512_bf16 = avx512 && f.avx512_bf16;
  const bool amx = avx512_bf16 && f.os_amx && f.amx_bf16 && f.amx_int8;
  return amx           ? Isa::kAmx
         : avx512_bf16 ? Isa::kAvx512Bf16
         : avx512      ? Isa::kAvx512
         : avx2        ? Isa::kAvx2
                       : Isa::kScalar;
}

constexpr const char* kNames[] = {"scalar", "avx2", "avx512", "avx512_bf16", "amx"};
constexpr int kLevels = sizeof(kNames) / sizeof(kNames[0]);
constexpr const char* kMaxIsaEnv = "XLLM_MAX_CPU_ISA";

// The level XLLM_MAX_CPU_ISA names (-1: unset; kLevels: not a level, refused at import).
int env_max_level() {
  const char* env = std::getenv(kMaxIsaEnv);
  if (!env || !*env) return -1;
  for (int i = 0; i < kLevels; ++i) {
    if (std::strcmp(env, kNames[i]) == 0) return i;
  }
  return kLevels;
}

// The CPU's level, capped by XLLM_MAX_CPU_ISA (as oneDNN's ONEDNN_MAX_CPU_ISA caps its
// own): the whole process, and the workers it starts, then run as on a CPU of that level.
Isa capped(Isa best) {
  const int cap = env_max_level();
  return cap < 0 || cap >= static_cast<int>(best) ? best : static_cast<Isa>(cap);
}

const Isa kDetected = capped(detect(kFeatures));
std::atomic<int> g_active{static_cast<int>(kDetected)};

}  // namespace

Isa active_isa() { return static_cast<Isa>(g_active.load(std::memory_order_relaxed)); }

Isa detected_isa() { return kDetected; }

void set_isa_override(Isa isa) {
  if (static_cast<int>(isa) > static_cast<int>(kDetected)) {
    fail("this CPU does not support ", isa_name(isa), "; the best it supports is ",
         isa_name(kDetected));
  }
  g_active.store(static_cast<int>(isa), std::memory_order_relaxed);
}

const char* isa_name(Isa isa) { return kNames[static_cast<int>(isa)]; }

std::vector<std::pair<std::string, bool>> cpu_features() {
  const Features& f = kFeatures;
  return {
      {"avx2", f.os_avx && f.avx2},
      {"fma", f.os_avx && f.fma},
      {"f16c", f.os_avx && f.f16c},
      {"avx512f", f.os_avx512 && f.avx512f},
      {"avx512bw", f.os_avx512 && f.avx512bw},
      {"avx512vl", f.os_avx512 && f.avx512vl},
      {"avx512dq", f.os_avx512 && f.avx512dq},
      {"avx512_vnni", f.os_avx512 && f.avx512_vnni},
      {"avx512_bf16", f.os_avx512 && f.avx512_bf16},
      {"avx_vnni", f.os_avx && f.avx_vnni},
      {"amx_tile", f.os_amx},
      {"amx_bf16", f.os_amx && f.amx_bf16},
      {"amx_int8", f.os_amx && f.amx_int8},
  };
}

void register_cpu_info(py::module_& m) {
  if (env_max_level() == kLevels) {
    throw py::value_error(std::string("environment variable ") + kMaxIsaEnv + "='" +
                          std::getenv(kMaxIsaEnv) + "' is not an ISA level; use one of "
                          "'scalar', 'avx2', 'avx512', 'avx512_bf16', 'amx' (or unset it)");
  }
  m.def("cpu_isa", [] { return std::string(isa_name(active_isa())); },
        "The ISA level the CPU kernels use now: 'scalar', 'avx2', 'avx512', 'avx512_bf16' or "
        "'amx'.");
  m.def("detected_isa", [] { return std::string(isa_name(kDetected)); },
        "The best ISA level this CPU (and OS) supports, or the lower one the environment "
        "variable XLLM_MAX_CPU_ISA names.");
  m.def(
      "cpu_isas",
      [] {
        py::list out;
        for (int i = 0; i <= static_cast<int>(kDetected); ++i) out.append(kNames[i]);
        return out;
      },
      "Every ISA level this CPU can run, lowest first (tests run each).");
  m.def(
      "cpu_features",
      [] {
        py::dict out;
        for (const auto& [name, have] : cpu_features()) out[py::str(name)] = have;
        return out;
      },
      "{feature: bool} for the instruction sets the kernels use. AVX-512 and AMX count only "
      "when the OS saves their state; AMX only once Linux granted this process the tiles.");
  m.def(
      "set_cpu_isa",
      [](const std::string& name) {
        for (int i = 0; i < kLevels; ++i) {
          if (name == kNames[i]) return set_isa_override(static_cast<Isa>(i));
        }
        fail("argument 'isa' must be 'scalar', 'avx2', 'avx512', 'avx512_bf16' or 'amx', got '",
             name, "'");
      },
      py::arg("isa"),
      "Selects the CPU kernels' ISA level (any level up to detected_isa()); tests use it.");
  m.def(
      "set_thread_parallelism",
      [](int threads) {
        if (threads < 1) fail("argument 'threads' must be >= 1, got ", threads);
        omp_set_num_threads(threads);
      },
      py::arg("threads"),
      "Threads the OpenMP parallel regions started by the CALLING thread use (torch's and the "
      "native kernels'; its own setting, unlike torch.set_num_threads). A helper thread that "
      "must not start a second team of workers on cores the model's team uses sets 1.");
}

}  // namespace xllm
