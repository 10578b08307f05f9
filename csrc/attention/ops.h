// The three entry points of csrc/attention, bound in attention_bind.cpp. Each
// reads its torch tensors, releases the GIL, checks every argument (ValueError
// naming it) before writing anything, and runs the kernels on OpenMP threads.
#pragma once

#include <pybind11/pybind11.h>

#include "common/tensor.h"

namespace xllm::attn {
namespace py = pybind11;

void write_kv_cache(py::handle key, py::handle value, py::handle key_cache, py::handle value_cache,
                    py::handle slot_mapping);

// window: a sliding window in tokens (a query at position p sees keys (p - window, p]);
// 0 = none.
void paged_attention_decode(py::handle out, py::handle query, py::handle key_cache,
                            py::handle value_cache, py::handle block_tables, py::handle seq_lens,
                            double scale, int64_t window);

void paged_attention_prefill(py::handle out, py::handle query, py::handle key_cache,
                             py::handle value_cache, py::handle block_tables,
                             py::handle query_start_loc, py::handle seq_lens, double scale,
                             int64_t window);

// The same ops on tensors already read (csrc/model calls these). They check every
// argument the same way and touch no Python object, so they run without the GIL.
void write_kv_cache(const Tensor& key, const Tensor& value, const Tensor& key_cache,
                    const Tensor& value_cache, const Tensor& slot_mapping);
void paged_attention_decode(const Tensor& out, const Tensor& query, const Tensor& key_cache,
                            const Tensor& value_cache, const Tensor& block_tables,
                            const Tensor& seq_lens, double scale, int64_t window = 0);
void paged_attention_prefill(const Tensor& out, const Tensor& query, const Tensor& key_cache,
                             const Tensor& value_cache, const Tensor& block_tables,
                             const Tensor& query_start_loc, const Tensor& seq_lens,
                             double scale, int64_t window = 0);

}  // namespace xllm::attn
