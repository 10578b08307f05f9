// The native decoder stack: all layers of a Llama-family model (Llama, Mistral,
// Qwen2, Qwen3) in one call, for fp32 activations on the CPU with every projection
// in blocks (csrc/quant). The Python model (xllm/models/llama.py) is the reference
// and the path for every other case; this is the same computation without the
// ~15 tensor objects and ~40 Python-level calls per layer that dominated a decode
// step on a small model (about 300 us a layer here). Per layer, with h the residual
// stream:
//
//   x = rmsnorm(h += prev) -> qkv -> [q/k head norm] -> rope(q|k) -> KV write ->
//   paged attention (decode rows, then prefill rows) -> o_proj -> x = rmsnorm(h += o)
//   -> gate|up -> silu(gate) * up -> down_proj = prev
//
// and at the end rmsnorm(h += prev) with the final norm. Buffers are owned by the
// stack and grow to the largest batch seen, so steady-state steps allocate nothing.
//
// Tensor parallelism: a rank's stack holds its share of the heads and of the MLP (the
// sizes it is built with are the rank's), and with a `comm` group it sums the o_proj and
// down_proj outputs over the ranks (comm/collective.h: shared memory on one host, TCP
// between hosts) before they join the residual stream, which every rank then holds whole.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cstring>
#include <string>
#include <vector>

#include "attention/ops.h"
#include "comm/collective.h"
#include "common/tensor.h"
#include "layers/rowops.h"
#include "moe/moe.h"
#include "moe/route.h"
#include "quant/block_weight.h"

namespace xllm {
namespace py = pybind11;

namespace {

// A tensor view over a buffer the stack owns, for the attention entry points.
Tensor view(const char* name, void* data, DType dtype, std::initializer_list<int64_t> shape,
            std::initializer_list<int64_t> stride) {
  Tensor t;
  t.name = name;
  t.data = data;
  t.dtype = dtype;
  t.ndim = static_cast<int>(shape.size());
  int i = 0;
  for (int64_t s : shape) t.shape[i++] = s;
  i = 0;
  for (int64_t s : stride) t.stride[i++] = s;
  return t;
}

const float* vector_ptr(py::handle obj, const char* name, int64_t size) {
  const Tensor t = host_tensor(obj, name);
  check_dtype(t, DType::kFloat32);
  check_ndim(t, 1, "[size]");
  check_contiguous(t);
  check_dim(t, 0, size, "the model's size for it");
  return t.ptr<float>();
}

// A mixture-of-experts MLP: the router's rows (fp32), its routing, the experts, and where
// the tokens each expert gets are counted.
struct Moe {
  const BlockWeight* router;
  MoeExperts* experts;
  RouteSpec spec;
  const float* bias;  // V3's choice bias, or nullptr
  int64_t* counts;    // [E]
};

struct Layer {
  const BlockWeight *qkv, *o, *gate_up, *down;  // gate_up/down: nullptr in a MoE layer
  bool has_moe = false;
  Moe moe;
  const float *in_norm, *post_norm, *q_norm, *k_norm;  // q_norm/k_norm: nullptr without
  Tensor key_cache, value_cache;
  int64_t window = 0;  // sliding window of this layer's attention (0: none)
};

class DecoderStack {
 public:
  DecoderStack(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim,
               int64_t intermediate, double eps, double scale, py::handle cos_cache,
               py::handle sin_cache, py::handle final_norm, const py::list& layers,
               py::object comm, bool bf16_sums, const std::vector<int64_t>& windows)
      : h_(hidden), heads_(heads), kv_(kv_heads), hd_(head_dim), inter_(intermediate),
        eps_(static_cast<float>(eps)), scale_(scale) {
    if (hidden < 1 || heads < 1 || kv_heads < 1 || head_dim < 2 || intermediate < 1 ||
        heads % kv_heads || head_dim % 2) {
      fail("DecoderStack: inconsistent sizes (hidden ", hidden, ", heads ", heads, ", kv_heads ",
           kv_heads, ", head_dim ", head_dim, ", intermediate ", intermediate, ")");
    }
    q_size_ = heads * head_dim;
    qkv_size_ = q_size_ + 2 * kv_heads * head_dim;
    const Tensor cs = host_tensor(cos_cache, "cos_cache");
    const Tensor sn = host_tensor(sin_cache, "sin_cache");
    for (const Tensor* t : {&cs, &sn}) {
      check_dtype(*t, DType::kFloat32);
      check_ndim(*t, 2, "[max_position, head_dim / 2]");
      check_contiguous(*t);
      check_dim(*t, 1, head_dim / 2, "head_dim / 2");
    }
    check_dim(sn, 0, cs.size(0), "cos_cache.shape[0]");
    max_pos_ = cs.size(0);
    cos_ = cs.ptr<float>();
    sin_ = sn.ptr<float>();
    final_norm_ = vector_ptr(final_norm, "final_norm", hidden);
    refs_.append(cos_cache);
    refs_.append(sin_cache);
    refs_.append(final_norm);
    bf16_sums_ = bf16_sums;
    if (!comm.is_none()) {
      try {
        comm_ = &py::cast<comm::Collective&>(comm);
      } catch (const py::cast_error&) {
        fail("argument 'comm' must be None or an xllm._C.Collective (ShmAllReduce, "
             "TcpCollective)");
      }
      refs_.append(comm);
    }
    if (layers.empty()) fail("argument 'layers' must list at least one layer");
    if (!windows.empty() && windows.size() != layers.size()) {
      fail("argument 'windows' must give one sliding window per layer (0: none), or none; got ",
           windows.size(), " for ", layers.size(), " layers");
    }
    for (size_t i = 0; i < layers.size(); ++i) {
      py::tuple t = py::reinterpret_borrow<py::tuple>(layers[i]);
      if (t.size() != 10 && t.size() != 11) {
        fail("layers[", i, "] must be (qkv, o, gate_up, down, input_norm, post_norm, q_norm, "
             "k_norm, key_cache, value_cache[, moe])");
      }
      Layer l;
      l.qkv = &weight(t[0], i, "qkv", qkv_size_, hidden);
      l.o = &weight(t[1], i, "o", hidden, q_size_);
      if (t.size() == 11 && !t[10].is_none()) {
        l.has_moe = true;
        l.moe = moe_of(py::reinterpret_borrow<py::tuple>(t[10]), i, hidden);
        l.gate_up = l.down = nullptr;
      } else {
        l.gate_up = &weight(t[2], i, "gate_up", 2 * intermediate, hidden);
        l.down = &weight(t[3], i, "down", hidden, intermediate);
      }
      l.in_norm = vector_ptr(t[4], "input_norm", hidden);
      l.post_norm = vector_ptr(t[5], "post_norm", hidden);
      if (t[6].is_none() != t[7].is_none()) fail("layers[", i, "]: give both q_norm and k_norm");
      l.q_norm = t[6].is_none() ? nullptr : vector_ptr(t[6], "q_norm", head_dim);
      l.k_norm = t[7].is_none() ? nullptr : vector_ptr(t[7], "k_norm", head_dim);
      l.key_cache = host_tensor(t[8], "key_cache");
      l.value_cache = host_tensor(t[9], "value_cache");
      l.window = windows.empty() ? 0 : windows[i];
      if (l.window < 0) fail("windows[", i, "] must be >= 0, got ", l.window);
      refs_.append(t);
      layers_.push_back(l);
    }
  }

  void forward(py::handle x_obj, py::handle positions_obj, py::handle slots_obj,
               int64_t num_decodes, py::handle decode_tables_obj, py::handle decode_lens_obj,
               py::handle prefill_tables_obj, py::handle prefill_starts_obj,
               py::handle prefill_lens_obj, py::handle out_obj) {
    const Tensor x = host_tensor(x_obj, "x");
    const Tensor out = host_tensor(out_obj, "out");
    for (const Tensor* t : {&x, &out}) {
      check_dtype(*t, DType::kFloat32);
      check_ndim(*t, 2, "[num_tokens, hidden_size]");
      check_contiguous(*t);
      check_dim(*t, 1, h_, "hidden_size");
    }
    const int64_t n = x.size(0);
    check_dim(out, 0, n, "x.shape[0]");
    const Tensor pos = host_tensor(positions_obj, "positions");
    check_dtype(pos, DType::kInt64);
    check_ndim(pos, 1, "[num_tokens]");
    check_contiguous(pos);
    check_dim(pos, 0, n, "x.shape[0]");
    const int64_t* pp = pos.ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
      if (pp[i] < 0 || pp[i] >= max_pos_) {
        fail("argument 'positions' holds ", pp[i], " at row ", i, "; positions must be in [0, ",
             max_pos_, ")");
      }
    }
    if (num_decodes < 0 || num_decodes > n) {
      fail("argument 'num_decodes' is ", num_decodes, "; it must be in [0, ", n, "]");
    }
    const Tensor slots = host_tensor(slots_obj, "slot_mapping");
    const Tensor dtables = host_tensor(decode_tables_obj, "decode_block_tables");
    const Tensor dlens = host_tensor(decode_lens_obj, "decode_seq_lens");
    const Tensor ptables = host_tensor(prefill_tables_obj, "prefill_block_tables");
    const Tensor pstarts = host_tensor(prefill_starts_obj, "prefill_query_start_loc");
    const Tensor plens = host_tensor(prefill_lens_obj, "prefill_seq_lens");
    if (n == 0) return;
    grow(n);
    const Isa isa = active_isa();
    py::gil_scoped_release release;

    float* res = residual_.data();
    float* normed = normed_.data();
    float* qkv = qkv_.data();
    float* attn = attn_.data();
    float* tmp = tmp_.data();
    float* gu = gate_up_.data();
    float* act = act_.data();
    const int64_t H = h_, QKV = qkv_size_, Q = q_size_, KVS = kv_ * hd_, I = inter_;
    const int64_t nd = num_decodes, np = n - nd;
    std::memcpy(res, x.data, static_cast<size_t>(n * H) * sizeof(float));
    for (size_t li = 0; li < layers_.size(); ++li) {
      const Layer& l = layers_[li];
      if (li == 0) {
        rowops::rms_norm(res, H, nullptr, 0, l.in_norm, eps_, n, H, normed, H, isa);
      } else {
        rowops::rms_norm(tmp, H, res, H, l.in_norm, eps_, n, H, normed, H, isa);
      }
      l.qkv->linear_raw(normed, H, n, qkv, QKV, isa);
      if (l.q_norm) {
        for (int64_t r = 0; r < n; ++r) {
          float* q = qkv + r * QKV;
          rowops::rms_norm(q, hd_, nullptr, 0, l.q_norm, eps_, heads_, hd_, q, hd_, isa);
          rowops::rms_norm(q + Q, hd_, nullptr, 0, l.k_norm, eps_, kv_, hd_, q + Q, hd_, isa);
        }
      }
      rowops::rotary(qkv, QKV, n, heads_ + kv_, hd_, hd_, pp, cos_, sin_, isa);
      const Tensor k = view("key", qkv + Q, DType::kFloat32, {n, kv_, hd_}, {QKV, hd_, 1});
      const Tensor v = view("value", qkv + Q + KVS, DType::kFloat32, {n, kv_, hd_}, {QKV, hd_, 1});
      attn::write_kv_cache(k, v, l.key_cache, l.value_cache, slots);
      if (nd > 0) {
        const Tensor q = view("query", qkv, DType::kFloat32, {nd, heads_, hd_}, {QKV, hd_, 1});
        const Tensor o = view("out", attn, DType::kFloat32, {nd, heads_, hd_}, {Q, hd_, 1});
        attn::paged_attention_decode(o, q, l.key_cache, l.value_cache, dtables, dlens, scale_,
                                     l.window);
      }
      if (np > 0) {
        const Tensor q =
            view("query", qkv + nd * QKV, DType::kFloat32, {np, heads_, hd_}, {QKV, hd_, 1});
        const Tensor o =
            view("out", attn + nd * Q, DType::kFloat32, {np, heads_, hd_}, {Q, hd_, 1});
        attn::paged_attention_prefill(o, q, l.key_cache, l.value_cache, ptables, pstarts, plens,
                                      scale_, l.window);
      }
      l.o->linear_raw(attn, Q, n, tmp, H, isa);
      reduce(tmp, n * H);
      rowops::rms_norm(tmp, H, res, H, l.post_norm, eps_, n, H, normed, H, isa);
      if (l.has_moe) {
        experts(l.moe, normed, n, tmp, isa);
        continue;  // experts are never tensor-parallel here (xllm/models/llama.py)
      }
      // One pass where the weight's format has it (bf16 tiles: no [n, 2I] product written).
      if (!l.gate_up->linear_glu_raw(normed, H, n, act, I, isa)) {
        l.gate_up->linear_raw(normed, H, n, gu, 2 * I, isa);
        rowops::silu_and_mul(gu, 2 * I, n, I, act, I, isa);
      }
      l.down->linear_raw(act, I, n, tmp, H, isa);
      reduce(tmp, n * H);
    }
    rowops::rms_norm(tmp, H, res, H, final_norm_, eps_, n, H, out.ptr<float>(), H, isa);
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  // Seconds spent summing over the ranks since construction (0 without a group).
  double comm_seconds() const { return comm_seconds_; }

 private:
  const BlockWeight& weight(py::handle obj, size_t layer, const char* name, int64_t rows,
                            int64_t cols) {
    const BlockWeight* w = nullptr;
    try {
      w = &py::cast<const BlockWeight&>(obj);
    } catch (const py::cast_error&) {
      fail("layers[", layer, "].", name, " must be an xllm._C.BlockWeight");
    }
    if (w->rows() != rows || w->cols() != cols) {
      fail("layers[", layer, "].", name, " is [", w->rows(), ", ", w->cols(), "]; the model needs [",
           rows, ", ", cols, "]");
    }
    return *w;
  }

  Moe moe_of(const py::tuple& t, size_t layer, int64_t hidden) {
    // (router, experts, counts, top_k, scoring, renormalize, renorm_eps, n_group,
    //  topk_group, group_score, mask_value, scale, bias)
    if (t.size() != 13) fail("layers[", layer, "].moe must have 13 entries");
    Moe m;
    try {
      m.experts = &py::cast<MoeExperts&>(t[1]);
    } catch (const py::cast_error&) {
      fail("layers[", layer, "].moe's experts must be an xllm._C.MoeExperts");
    }
    const int64_t E = m.experts->num_experts();
    m.router = &weight(t[0], layer, "router", E, hidden);
    m.counts = static_cast<int64_t*>(expert_vector(t[2], "counts", DType::kInt64, E));
    if (m.counts == nullptr) fail("layers[", layer, "].moe needs its counts tensor");
    m.spec = make_route_spec(E, py::cast<int64_t>(t[3]), py::cast<std::string>(t[4]),
                             py::cast<bool>(t[5]), py::cast<double>(t[6]),
                             py::cast<int64_t>(t[7]), py::cast<int64_t>(t[8]),
                             py::cast<std::string>(t[9]), py::cast<double>(t[10]),
                             py::cast<double>(t[11]));
    m.bias = static_cast<const float*>(expert_vector(t[12], "moe bias", DType::kFloat32, E));
    return m;
  }

  // tmp [n, H] = the MoE layer's output for normed [n, H]: logits, routing (counted), experts.
  void experts(const Moe& m, const float* normed, int64_t n, float* tmp, Isa isa) {
    const int64_t E = m.spec.experts, k = m.spec.top_k;
    if (static_cast<int64_t>(logits_.size()) < n * E) logits_.resize(n * E);
    if (static_cast<int64_t>(ids_.size()) < n * k) {
      ids_.resize(n * k);
      wts_.resize(n * k);
    }
    m.router->linear_raw(normed, h_, n, logits_.data(), E, isa);
    route_tokens(m.spec, logits_.data(), n, m.bias, ids_.data(), wts_.data(), m.counts);
    m.experts->run(normed, n, k, ids_.data(), wts_.data(), tmp, isa);
  }

  // Sums a row-parallel projection's partial output over the ranks, in place.
  void reduce(float* data, int64_t numel) {
    if (comm_ == nullptr) return;
    const auto t0 = std::chrono::steady_clock::now();
    comm_->allreduce(data, numel,
                     bf16_sums_ ? comm::ElemType::kFloat32Bf16Sums : comm::ElemType::kFloat32);
    comm_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }

  void grow(int64_t n) {
    if (n <= capacity_) return;
    capacity_ = n;
    residual_.resize(n * h_);
    normed_.resize(n * h_);
    tmp_.resize(n * h_);
    qkv_.resize(n * qkv_size_);
    attn_.resize(n * q_size_);
    gate_up_.resize(n * 2 * inter_);
    act_.resize(n * inter_);
  }

  int64_t h_, heads_, kv_, hd_, inter_, q_size_ = 0, qkv_size_ = 0, max_pos_ = 0;
  float eps_;
  double scale_;
  const float *cos_ = nullptr, *sin_ = nullptr, *final_norm_ = nullptr;
  std::vector<Layer> layers_;
  comm::Collective* comm_ = nullptr;  // kept alive by refs_
  double comm_seconds_ = 0;
  bool bf16_sums_ = false;  // the sums travel as bf16 (a model computing in bf16)
  py::list refs_;  // keeps every tensor and weight the raw pointers point into alive
  int64_t capacity_ = 0;
  std::vector<float> residual_, normed_, tmp_, qkv_, attn_, gate_up_, act_;
  // Mixture-of-experts layers: router logits and the routing.
  std::vector<float> logits_, wts_;
  std::vector<int64_t> ids_;
};

}  // namespace

void register_decoder_stack(py::module_& m) {
  py::class_<DecoderStack>(m, "DecoderStack",
                           "All decoder layers of a Llama-family model in one native call "
                           "(fp32 CPU, block weights); see xllm/models/llama.py.")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, double, py::handle,
                    py::handle, py::handle, const py::list&, py::object, bool,
                    const std::vector<int64_t>&>(),
           py::arg("hidden_size"), py::arg("num_heads"), py::arg("num_kv_heads"),
           py::arg("head_dim"), py::arg("intermediate_size"), py::arg("eps"), py::arg("scale"),
           py::arg("cos_cache"), py::arg("sin_cache"), py::arg("final_norm"), py::arg("layers"),
           py::arg("comm") = py::none(), py::arg("bf16_sums") = false,
           py::arg("windows") = std::vector<int64_t>{})
      .def("forward", &DecoderStack::forward, py::arg("x"), py::arg("positions"),
           py::arg("slot_mapping"), py::arg("num_decodes"), py::arg("decode_block_tables"),
           py::arg("decode_seq_lens"), py::arg("prefill_block_tables"),
           py::arg("prefill_query_start_loc"), py::arg("prefill_seq_lens"), py::arg("out"),
           "out [T, hidden] = final norm of the stack applied to embeddings x [T, hidden]; "
           "writes every layer's K/V at slot_mapping.")
      .def_property_readonly("num_layers", &DecoderStack::num_layers)
      .def_property_readonly("comm_seconds", &DecoderStack::comm_seconds,
                             "Seconds spent in the tensor-parallel sums since construction.");
}

}  // namespace xllm
