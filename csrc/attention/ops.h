// The three entry points of csrc/attention, bound in attention_bind.cpp. Each
// reads its torch tensors, checks every argument (ValueError naming it) before
// writing anything, then releases the GIL and runs the kernels on OpenMP threads.
#pragma once

#include <pybind11/pybind11.h>

namespace xllm::attn {
namespace py = pybind11;

void write_kv_cache(py::handle key, py::handle value, py::handle key_cache, py::handle value_cache,
                    py::handle slot_mapping);

void paged_attention_decode(py::handle out, py::handle query, py::handle key_cache,
                            py::handle value_cache, py::handle block_tables, py::handle seq_lens,
                            double scale);

void paged_attention_prefill(py::handle out, py::handle query, py::handle key_cache,
                             py::handle value_cache, py::handle block_tables,
                             py::handle query_start_loc, py::handle seq_lens, double scale);

}  // namespace xllm::attn
