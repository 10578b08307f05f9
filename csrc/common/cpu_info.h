// Run-time ISA dispatch: kernels are compiled for several ISAs (target
// attributes) and one is picked per call from what this CPU supports.
#pragma once

namespace xllm {

enum class Isa : int { kScalar = 0, kAvx2 = 1 };

// The best ISA this CPU supports, unless lowered by set_isa_override().
Isa active_isa();
// Forces a lower ISA (tests use this to exercise the scalar path); kAvx2 on a
// CPU without AVX2/FMA is refused with ValueError.
void set_isa_override(Isa isa);
const char* isa_name(Isa isa);

}  // namespace xllm
