// What the two forms of prefill attention share: a call's checked arguments and its work
// items (prefill.cpp: the vector kernels; prefill_amx.cpp: AMX tiles for a bf16 cache).
#pragma once

#include <cstdint>
#include <vector>

#include "attention/attend.h"

namespace xllm::attn {

// One prefill call's arguments, already checked (prefill.cpp): a query row per token.
struct Prefill : PagedCall {
  const int32_t* starts;  // [num_seqs + 1] query_start_loc
};

// A tile of query tokens of one sequence (times the KV head's query heads, which every KV
// head repeats).
struct Item {
  int32_t seq, first;  // first: the tile's first query token within its sequence
  int32_t ntok;        // query tokens in the tile
  int64_t cost;        // query tokens x keys visited, for ordering
};

// Every sequence's query tokens in tiles of tile_tokens, largest cost first, so the long
// tiles at the end of a prompt do not finish last.
std::vector<Item> query_tiles(const Prefill& a, int tile_tokens);

// Runs the call on the matrix units: scores and weighted sums as bf16 products with fp32
// sums (the query times the scale and the softmax weights are rounded to bf16; the max,
// exp and sums are fp32). Needs a CPU at the amx level and a bf16 or q8 cache (q8 rows
// are widened to bf16 as they are packed); returns false,
// having done nothing, where the shapes do not suit it (head_size not a multiple of 32 or
// above 128, more than 16 query heads per KV head, or too large a context to pack).
bool prefill_amx(const Prefill& a);

}  // namespace xllm::attn
