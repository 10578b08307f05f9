// The mixture-of-experts router after its logits, one token at a time (route.cpp; the
// Python op _C.moe_route and the native decoder stack both call it).
#pragma once

#include <cstdint>

namespace xllm {

struct RouteSpec {
  int64_t experts, top_k, n_group, topk_group;
  bool sigmoid, renormalize, group_top2;
  float renorm_eps, mask_value, scale;
};

// One token's top_k experts (ids, largest first) and weights from its logits [E] (bias: the
// choice-only correction, or nullptr). scores, choice [E], gscore [n_group] floats and
// taken [E], gkeep [n_group] flags: the calling thread's scratch.
void route_token(const RouteSpec& s, const float* logits, const float* bias, float* scores,
                 float* choice, float* gscore, uint8_t* taken, uint8_t* gkeep, int64_t* ids,
                 float* w);

}  // namespace xllm
