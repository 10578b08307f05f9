// moe_route: a mixture-of-experts router after its logits, fused (xllm/layers/moe.py:
// route_grouped is the torch reference).
//
// Per token, in one pass over its E logits:
//   scores  = softmax(logits) or sigmoid(logits)            (fp32, as torch computes them)
//   choice  = scores (+ bias: DeepSeek-V3's correction, for the choice only)
//   groups  (n_group > 1): each group ranked by its best choice (or the sum of its best
//           two); the topk_group best stay, the others' choice becomes mask_value
//   ids     = the top_k of choice, largest first (ties: the lower expert id first)
//   weights = scores[ids], renormalized to sum 1 (+ renorm_eps) when asked, times scale
// Tokens are independent: threads take blocks of tokens when there are enough of them.
#include <pybind11/pybind11.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "common/tensor.h"
#include "moe/route.h"

namespace xllm {
namespace py = pybind11;

namespace {

// Index of the largest value among v[0..n) not yet taken (ties: the lowest index).
inline int64_t best_free(const float* v, const uint8_t* taken, int64_t n) {
  int64_t best = -1;
  float bv = -std::numeric_limits<float>::infinity();
  for (int64_t e = 0; e < n; ++e) {
    if (taken[e]) continue;
    // NaN never wins; -inf wins only if nothing else is left.
    if (best < 0 ? !std::isnan(v[e]) : v[e] > bv) {
      best = e;
      bv = v[e];
    }
  }
  if (best < 0) {  // only NaNs left: the first of them
    for (int64_t e = 0; e < n; ++e) {
      if (!taken[e]) return e;
    }
  }
  return best;
}

// scores, choice [E], gscore [n_group] floats and taken [E], gkeep [n_group] flags: the
// calling thread's scratch.
void route_token(const RouteSpec& s, const float* logits, const float* bias, float* scores,
                 float* choice, float* gscore, uint8_t* taken, uint8_t* gkeep, int64_t* ids,
                 float* w) {
  const int64_t E = s.experts;
  if (s.sigmoid) {
    for (int64_t e = 0; e < E; ++e) scores[e] = 1.0f / (1.0f + std::exp(-logits[e]));
  } else {
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t e = 0; e < E; ++e) mx = std::max(mx, logits[e]);
    float sum = 0.0f;
    for (int64_t e = 0; e < E; ++e) {
      scores[e] = std::exp(logits[e] - mx);
      sum += scores[e];
    }
    const float inv = 1.0f / sum;
    for (int64_t e = 0; e < E; ++e) scores[e] *= inv;
  }
  for (int64_t e = 0; e < E; ++e) choice[e] = bias ? scores[e] + bias[e] : scores[e];
  std::fill(taken, taken + E, uint8_t{0});
  if (s.n_group > 1) {
    const int64_t per = E / s.n_group;
    for (int64_t g = 0; g < s.n_group; ++g) {
      const float* c = choice + g * per;
      float a = -std::numeric_limits<float>::infinity(), b = a;  // best two
      for (int64_t e = 0; e < per; ++e) {
        if (c[e] > a) {
          b = a;
          a = c[e];
        } else if (c[e] > b) {
          b = c[e];
        }
      }
      gscore[g] = s.group_top2 ? a + b : a;
    }
    std::fill(gkeep, gkeep + s.n_group, uint8_t{0});
    for (int64_t i = 0; i < s.topk_group; ++i) gkeep[best_free(gscore, gkeep, s.n_group)] = 1;
    for (int64_t g = 0; g < s.n_group; ++g) {
      if (!gkeep[g]) std::fill(choice + g * per, choice + (g + 1) * per, s.mask_value);
    }
  }
  float total = 0.0f;
  for (int64_t j = 0; j < s.top_k; ++j) {
    const int64_t e = best_free(choice, taken, E);
    taken[e] = 1;
    ids[j] = e;
    w[j] = scores[e];
    total += w[j];
  }
  // As the reference rounds: w / (sum + eps), then * scale.
  if (s.renormalize) {
    const float denom = total + s.renorm_eps;
    for (int64_t j = 0; j < s.top_k; ++j) w[j] /= denom;
  }
  if (s.scale != 1.0f) {
    for (int64_t j = 0; j < s.top_k; ++j) w[j] *= s.scale;
  }
}

}  // namespace

RouteSpec make_route_spec(int64_t experts, int64_t top_k, const std::string& scoring,
                          bool renormalize, double renorm_eps, int64_t n_group,
                          int64_t topk_group, const std::string& group_score,
                          double mask_value, double scale) {
  const int64_t E = experts;
  if (scoring != "softmax" && scoring != "sigmoid") {
    fail("argument 'scoring' must be 'softmax' or 'sigmoid', got '", scoring, "'");
  }
  if (group_score != "max" && group_score != "top2sum") {
    fail("argument 'group_score' must be 'max' or 'top2sum', got '", group_score, "'");
  }
  if (E < 1 || top_k < 1 || top_k > E) {
    fail("top_k must be in [1, num_experts = ", E, "], got ", top_k);
  }
  if (n_group < 1 || E % n_group || topk_group < 1 || topk_group > n_group) {
    fail("n_group (", n_group, ") must divide the ", E, " experts and topk_group (", topk_group,
         ") be in [1, n_group]");
  }
  if (n_group > 1 && group_score == "top2sum" && E / n_group < 2) {
    fail("group_score 'top2sum' needs at least 2 experts per group");
  }
  return RouteSpec{E,           top_k,       n_group,
                   topk_group,  scoring == "sigmoid", renormalize,
                   group_score == "top2sum", static_cast<float>(renorm_eps),
                   static_cast<float>(mask_value), static_cast<float>(scale)};
}

void* expert_vector(py::handle obj, const char* name, DType dtype, int64_t experts) {
  if (obj.is_none()) return nullptr;
  const Tensor t = host_tensor(obj, name);
  check_dtype(t, dtype);
  check_ndim(t, 1, "[num_experts]");
  check_contiguous(t);
  check_dim(t, 0, experts, "num_experts");
  return t.data;
}

void route_tokens(const RouteSpec& s, const float* logits, int64_t T, const float* bias,
                  int64_t* ids, float* w, int64_t* counts) {
  const int64_t E = s.experts, k = s.top_k;
  // About 10 * E operations a token: threads only for prompt-sized batches.
  const int threads = T * E >= (int64_t{1} << 16) ? omp_get_max_threads() : 1;
#pragma omp parallel num_threads(threads)
  {
    thread_local std::vector<float> buf;
    thread_local std::vector<uint8_t> flags;
    buf.resize(static_cast<size_t>(2 * E + s.n_group));
    flags.resize(static_cast<size_t>(E + s.n_group));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      route_token(s, logits + t * E, bias, buf.data(), buf.data() + E, buf.data() + 2 * E,
                  flags.data(), flags.data() + E, ids + t * k, w + t * k);
    }
  }
  if (counts != nullptr) {
    for (int64_t i = 0; i < T * k; ++i) ++counts[ids[i]];
  }
}

namespace {

void moe_route(py::handle logits_obj, py::handle ids_obj, py::handle weights_obj, int64_t top_k,
               const std::string& scoring, bool renormalize, double renorm_eps, int64_t n_group,
               int64_t topk_group, const std::string& group_score, double mask_value,
               double scale, py::handle bias_obj, py::handle counts_obj) {
  const Tensor logits = host_tensor(logits_obj, "logits");
  const Tensor ids = host_tensor(ids_obj, "ids");
  const Tensor w = host_tensor(weights_obj, "weights");
  check_dtype(logits, DType::kFloat32);
  check_ndim(logits, 2, "[num_tokens, num_experts]");
  check_contiguous(logits);
  const int64_t T = logits.size(0), E = logits.size(1);
  check_dtype(ids, DType::kInt64);
  check_dtype(w, DType::kFloat32);
  for (const Tensor* t : {&ids, &w}) {
    check_ndim(*t, 2, "[num_tokens, top_k]");
    check_contiguous(*t);
    check_dim(*t, 0, T, "logits.shape[0]");
    check_dim(*t, 1, top_k, "top_k");
  }
  const RouteSpec s = make_route_spec(E, top_k, scoring, renormalize, renorm_eps, n_group,
                                      topk_group, group_score, mask_value, scale);
  const auto* bias = static_cast<const float*>(
      expert_vector(bias_obj, "bias", DType::kFloat32, E));
  auto* counts = static_cast<int64_t*>(expert_vector(counts_obj, "counts", DType::kInt64, E));
  py::gil_scoped_release release;
  route_tokens(s, logits.ptr<float>(), T, bias, ids.ptr<int64_t>(), w.ptr<float>(), counts);
}

}  // namespace

void register_moe_route(py::module_& m) {
  m.def("moe_route", &moe_route, py::arg("logits"), py::arg("ids"), py::arg("weights"),
        py::arg("top_k"), py::arg("scoring") = "softmax", py::arg("renormalize") = false,
        py::arg("renorm_eps") = 0.0, py::arg("n_group") = 1, py::arg("topk_group") = 1,
        py::arg("group_score") = "max", py::arg("mask_value") = 0.0, py::arg("scale") = 1.0,
        py::arg("bias") = py::none(), py::arg("counts") = py::none(),
        "A mixture-of-experts router after its logits [T, E] (fp32), fused: softmax or "
        "sigmoid scores, an optional choice bias, group limits, the top_k (largest first) "
        "into ids [T, top_k] int64 and their scores into weights [T, top_k] fp32, "
        "renormalized and scaled as asked (xllm/layers/moe.py: route_grouped); adds each "
        "token's choices to counts [E] int64 when given.");
}

}  // namespace xllm
