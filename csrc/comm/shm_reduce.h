// The arithmetic of the shared-memory allreduce: sum the same slice of every
// rank's slot into the result area. Pure functions, no shared-memory protocol.
//
// Every element is summed in one fixed order, srcs[0] + srcs[1] + ... +
// srcs[n_src - 1], left to right, in fp32 and without FMA or reassociation, so
// the AVX2 and scalar paths give bit-identical results and so does any rank
// that reduces the slice. bf16 inputs are widened to fp32, summed, and rounded
// to bf16 once (round to nearest, ties to even; NaN becomes the canonical quiet
// NaN 0x7FC0, as torch does).
#pragma once

#include <cstdint>

namespace xllm::comm {

// srcs: [n_src] pointers, each to [n] floats; dst: [n] floats (may not alias srcs).
void reduce_sum_f32(const float* const* srcs, int n_src, float* dst, int64_t n);

// srcs: [n_src] pointers, each to [n] bf16 bit patterns; dst: [n] bf16 bit patterns.
void reduce_sum_bf16(const uint16_t* const* srcs, int n_src, uint16_t* dst, int64_t n);

// fp32 data that travels as bf16 (an allreduce with bf16 sums): src rounded to nearest
// even, as f32_to_bf16_rne; and back, exactly.
void convert_f32_to_bf16(const float* src, uint16_t* dst, int64_t n);
void convert_bf16_to_f32(const uint16_t* src, float* dst, int64_t n);

// fp32 -> bf16 with round to nearest even; shared with the kernels so both paths agree.
inline uint16_t f32_to_bf16_rne(float value) {
  uint32_t bits;
  __builtin_memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7F800000u) == 0x7F800000u && (bits & 0x007FFFFFu) != 0) return 0x7FC0;
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline float bf16_to_f32(uint16_t value) {
  uint32_t bits = static_cast<uint32_t>(value) << 16;
  float out;
  __builtin_memcpy(&out, &bits, sizeof(out));
  return out;
}

}  // namespace xllm::comm
