// Registers the paged-attention ops and the KV cache write in xllm._C.
// Layout and conventions: xllm/ops/kv_cache.py; references: xllm/ops/attention_ref.py.
#include <pybind11/pybind11.h>

#include "attention/ops.h"

namespace xllm {
namespace py = pybind11;

void register_attention(py::module_& m) {
  using H = py::handle;  // picks the Python-facing overloads
  m.def("write_kv_cache", static_cast<void (*)(H, H, H, H, H)>(&attn::write_kv_cache), py::arg("key"), py::arg("value"),
        py::arg("key_cache"), py::arg("value_cache"), py::arg("slot_mapping"),
        "Scatters key/value [num_tokens, num_kv_heads, head_size] (float32 or bfloat16) into "
        "the paged caches [num_blocks, num_kv_heads, block_size, head_size] (float32 or "
        "bfloat16, rounded to nearest even) at slot_mapping [num_tokens] (int64 or int32; "
        "slot = block * block_size + offset, -1 skipped).");
  m.def("paged_attention_decode",
        static_cast<void (*)(H, H, H, H, H, H, double, int64_t)>(&attn::paged_attention_decode),
        py::arg("out"), py::arg("query"), py::arg("key_cache"), py::arg("value_cache"),
        py::arg("block_tables"), py::arg("seq_lens"), py::arg("scale"), py::arg("window") = 0,
        "out[i] = attention of query[i] ([num_seqs, num_heads, head_size], the sequence's last "
        "token) over its seq_lens[i] cached tokens listed by block_tables[i] (int32), or over "
        "its last `window` of them (0: all; blocks before the window are not read). fp32 "
        "compute and output; GQA/MQA; seq_len 0 gives zeros.");
  m.def("paged_attention_prefill",
        static_cast<void (*)(H, H, H, H, H, H, H, double, int64_t)>(
            &attn::paged_attention_prefill),
        py::arg("out"), py::arg("query"), py::arg("key_cache"), py::arg("value_cache"),
        py::arg("block_tables"), py::arg("query_start_loc"), py::arg("seq_lens"),
        py::arg("scale"), py::arg("window") = 0,
        "Causal attention of query rows query_start_loc[i]:query_start_loc[i+1] (the last "
        "tokens of a context of seq_lens[i] tokens, all already cached) over sequence i's paged "
        "context, each row within its last `window` keys (0: all); writes out [num_tokens, "
        "num_heads, head_size] float32.");
}

}  // namespace xllm
