// Run-time ISA dispatch: kernels are compiled for several ISAs (target
// attributes) and one is picked per call from what this CPU supports.
//
// The levels are ordered; each includes everything below it:
//   scalar  - baseline x86-64 (or any other architecture)
//   avx2    - AVX2 + FMA (+ F16C)
//   avx512      - AVX-512 F/BW/VL/DQ with VNNI int8 dot products (Cascade Lake, Ice Lake);
//                 an AVX-512 CPU without VNNI (Skylake-SP/X) runs the avx2 kernels
//   avx512_bf16 - avx512 plus AVX512-BF16 dot products (Cooper Lake, Sapphire Rapids and
//                 later, Zen 4 and later): the bf16 linears' VDPBF16PS
//   amx         - avx512_bf16 plus AMX tiles with bf16 and int8, once the OS has granted
//                 this process the tile state (arch_prctl ARCH_REQ_XCOMP_PERM)
// A kernel for a level runs on every level above it until that level has its own.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace xllm {

// kAvx512: AVX-512 F/BW/VL/DQ with VNNI (Cascade Lake, Ice Lake and later); kAvx512Bf16
// adds AVX512-BF16 (Cooper Lake, Zen 4, Sapphire Rapids); kAmx adds AMX-BF16/INT8 tiles.
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4 };

// The best ISA this CPU supports, unless lowered by set_isa_override().
Isa active_isa();
// The best ISA this CPU (and OS) supports.
Isa detected_isa();
// Forces a lower ISA (tests use this to run every level); a level above the
// detected one is refused with ValueError.
void set_isa_override(Isa isa);
const char* isa_name(Isa isa);

// Each feature flag the kernels care about and whether this CPU (and OS) has it.
std::vector<std::pair<std::string, bool>> cpu_features();

}  // namespace xllm
