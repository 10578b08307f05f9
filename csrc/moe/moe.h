// MoeExperts: a mixture-of-experts MLP's experts in one native call (Qwen3-MoE, Mixtral).
//
// Given the routing (each token's top-k expert ids and weights, from the router in
// xllm/layers/moe.py), forward():
//   1. counts each expert's (token, slot) pairs and lays them out by expert (a counting
//      sort, O(T * k), no per-expert scan of the tokens);
//   2. gathers the rows so each expert's tokens are one contiguous block;
//   3. per expert that has tokens: gate_up = x_e @ W13_e^T, act = silu(gate) * up,
//      y_e = act @ W2_e^T, each a BlockWeight::linear_raw over the whole block (any weight
//      format: f32 / bf16 rows, bf16_gemm, int8; the linears thread over output tiles);
//   4. out[t] = sum_j w[t, j] * y[slot(t, j)], j in order (deterministic, no atomics).
// An id of -1 is a pair another rank computes (expert parallelism): it is skipped, and out
// holds this rank's part of the sum.
// The work buffers belong to the object and only grow; one thread at a time may call it
// (the engine thread).
#pragma once

#include <pybind11/pybind11.h>

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/tensor.h"
#include "layers/rowops.h"
#include "quant/block_weight.h"

namespace xllm {
namespace py = pybind11;

class MoeExperts {
 public:
  MoeExperts(const py::list& gate_up, const py::list& down) {
    if (gate_up.size() == 0 || gate_up.size() != down.size()) {
      fail("gate_up and down must list the same number (>= 1) of BlockWeights, got ",
           gate_up.size(), " and ", down.size());
    }
    for (size_t e = 0; e < gate_up.size(); ++e) {
      const BlockWeight& gu = weight(gate_up[e], "gate_up", e);
      const BlockWeight& dn = weight(down[e], "down", e);
      if (e == 0) {
        hidden_ = gu.cols();
        inter_ = dn.cols();
      }
      if (gu.cols() != hidden_ || gu.rows() != 2 * inter_ || dn.rows() != hidden_ ||
          dn.cols() != inter_) {
        fail("expert ", e, ": gate_up is [", gu.rows(), ", ", gu.cols(), "] and down [",
             dn.rows(), ", ", dn.cols(), "]; every expert needs [", 2 * inter_, ", ", hidden_,
             "] and [", hidden_, ", ", inter_, "]");
      }
      gate_up_.push_back(&gu);
      down_.push_back(&dn);
    }
    keep_ = py::make_tuple(gate_up, down);  // the weights live as long as this object
  }

  int64_t num_experts() const { return static_cast<int64_t>(gate_up_.size()); }

  void forward(py::handle x_obj, py::handle ids_obj, py::handle w_obj, py::handle out_obj) {
    const Tensor x = host_tensor(x_obj, "x");
    const Tensor ids = host_tensor(ids_obj, "ids");
    const Tensor w = host_tensor(w_obj, "weights");
    const Tensor out = host_tensor(out_obj, "out");
    check_dtype(x, DType::kFloat32);
    check_dtype(out, DType::kFloat32);
    check_dtype(ids, DType::kInt64);
    check_dtype(w, DType::kFloat32);
    check_ndim(x, 2, "[num_tokens, hidden_size]");
    check_ndim(out, 2, "[num_tokens, hidden_size]");
    check_ndim(ids, 2, "[num_tokens, top_k]");
    check_ndim(w, 2, "[num_tokens, top_k]");
    for (const Tensor* t : {&x, &out, &ids, &w}) check_contiguous(*t);
    const int64_t T = x.size(0), k = ids.size(1), E = num_experts();
    check_dim(x, 1, hidden_, "the experts' hidden size");
    check_dim(out, 0, T, "x.shape[0]");
    check_dim(out, 1, hidden_, "the experts' hidden size");
    check_dim(ids, 0, T, "x.shape[0]");
    check_dim(w, 0, T, "x.shape[0]");
    check_dim(w, 1, k, "ids.shape[1]");
    const int64_t* id = ids.ptr<int64_t>();
    for (int64_t i = 0; i < T * k; ++i) {
      if (id[i] < -1 || id[i] >= E) {
        fail("argument 'ids' holds ", id[i], " at ", i, "; expert ids must be in [0, ", E,
             ") (or -1: another rank's)");
      }
    }
    const Isa isa = active_isa();
    py::gil_scoped_release release;
    run(x.ptr<float>(), T, k, id, w.ptr<float>(), out.ptr<float>(), isa);
  }

 private:
  static const BlockWeight& weight(py::handle obj, const char* name, size_t e) {
    try {
      return py::cast<const BlockWeight&>(obj);
    } catch (const py::cast_error&) {
      fail(name, "[", e, "] must be an xllm._C.BlockWeight");
    }
  }

 public:
  // out [T, H] = this rank's part of the experts' weighted sum (ids checked by the caller:
  // each in [-1, E)); the native decoder stack calls it directly.
  void run(const float* x, int64_t T, int64_t k, const int64_t* id, const float* w, float* out,
           Isa isa) {
    const int64_t E = num_experts(), H = hidden_, I = inter_, pairs = T * k;
    std::fill(out, out + T * H, 0.0f);
    // 1. counting sort of this rank's (token, slot) pairs by expert
    offset_.assign(E + 1, 0);
    for (int64_t i = 0; i < pairs; ++i) {
      if (id[i] >= 0) ++offset_[id[i] + 1];
    }
    for (int64_t e = 0; e < E; ++e) offset_[e + 1] += offset_[e];
    const int64_t P = offset_[E];
    if (P == 0) return;
    next_.assign(offset_.begin(), offset_.end() - 1);
    row_of_.resize(P);
    slot_.resize(pairs);
    for (int64_t i = 0; i < pairs; ++i) {
      if (id[i] < 0) {
        slot_[i] = -1;
        continue;
      }
      const int64_t pos = next_[id[i]]++;
      row_of_[pos] = i / k;
      slot_[i] = pos;
    }
    grow(xs_, P * H);
    grow(ys_, P * H);
    grow(gu_, P * 2 * I);
    grow(act_, P * I);
    // 2. gather
    const int threads = P * H >= (int64_t{1} << 16) ? omp_get_max_threads() : 1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t p = 0; p < P; ++p) {
      std::memcpy(xs_.data() + p * H, x + row_of_[p] * H, H * sizeof(float));
    }
    // 3. the experts with tokens, each over its block of rows. With a few rows per expert
    //    (decode) the threads take whole experts (each GEMM then runs on one thread: a
    //    nested region is inactive), sparing two fork/joins per expert; otherwise the
    //    experts go in turn and each GEMM spreads over the threads.
    active_.clear();
    for (int64_t e = 0; e < E; ++e) {
      if (offset_[e + 1] > offset_[e]) active_.push_back(e);
    }
    const int64_t A = static_cast<int64_t>(active_.size());
    auto expert = [&](int64_t e) {
      const int64_t n = offset_[e + 1] - offset_[e], at = offset_[e];
      gate_up_[e]->linear_raw(xs_.data() + at * H, H, n, gu_.data() + at * 2 * I, 2 * I, isa);
      rowops::silu_and_mul(gu_.data() + at * 2 * I, 2 * I, n, I, act_.data() + at * I, I, isa);
      down_[e]->linear_raw(act_.data() + at * I, I, n, ys_.data() + at * H, H, isa);
    };
    const int64_t nt = omp_get_max_threads();
    if (A >= 2 && nt > 1 && (P <= kRowsPerExpertToSpread * A || A >= kExpertsPerThread * nt)) {
#pragma omp parallel for schedule(dynamic, 1)
      for (int64_t a = 0; a < A; ++a) expert(active_[a]);
    } else {  // no enclosing region: even a one-thread team would serialize the GEMMs' own
      for (int64_t a = 0; a < A; ++a) expert(active_[a]);
    }
    // 4. weighted sum per token, slots in order
    const int combine = T * k * H >= (int64_t{1} << 16) ? omp_get_max_threads() : 1;
#pragma omp parallel for schedule(static) num_threads(combine)
    for (int64_t t = 0; t < T; ++t) {
      float* o = out + t * H;
      for (int64_t j = 0; j < k; ++j) {
        if (slot_[t * k + j] < 0) continue;
        const float wt = w[t * k + j];
        const float* y = ys_.data() + slot_[t * k + j] * H;
        for (int64_t c = 0; c < H; ++c) o[c] += wt * y[c];
      }
    }
  }

 private:
  static void grow(std::vector<float>& buf, int64_t n) {
    if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  }

  int64_t hidden_ = 0, inter_ = 0;
  std::vector<const BlockWeight*> gate_up_, down_;
  py::object keep_;
  // Decode-sized work: threads take whole experts when the rows per expert are this few.
  static constexpr int64_t kRowsPerExpertToSpread = 4;
  // Or when there are this many active experts a thread: enough to balance whole experts.
  static constexpr int64_t kExpertsPerThread = 8;
  std::vector<int64_t> offset_, next_, row_of_, slot_, active_;
  std::vector<float> xs_, ys_, gu_, act_;
};

}  // namespace xllm
