// The mixture-of-experts router after its logits (route.cpp): the Python op _C.moe_route and
// the native decoder stack both route through route_tokens.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common/tensor.h"

namespace xllm {
namespace py = pybind11;

struct RouteSpec {
  int64_t experts, top_k, n_group, topk_group;
  bool sigmoid, renormalize, group_top2;
  float renorm_eps, mask_value, scale;
};

// A checked spec for `experts` experts (ValueError naming what does not fit).
RouteSpec make_route_spec(int64_t experts, int64_t top_k, const std::string& scoring,
                          bool renormalize, double renorm_eps, int64_t n_group,
                          int64_t topk_group, const std::string& group_score,
                          double mask_value, double scale);

// A 1-D contiguous [experts] tensor argument of `dtype` (the choice bias, the counts), or
// nullptr for None.
void* expert_vector(py::handle obj, const char* name, DType dtype, int64_t experts);

// Each of T tokens' top_k experts (ids [T, top_k], largest first) and weights [T, top_k]
// from its logits [T, E] (bias: the choice-only correction, or nullptr); adds every choice to
// counts [E] when given. Threads over the tokens for prompt-sized batches; the scratch is
// each thread's, kept between calls.
void route_tokens(const RouteSpec& s, const float* logits, int64_t T, const float* bias,
                  int64_t* ids, float* w, int64_t* counts);

}  // namespace xllm
