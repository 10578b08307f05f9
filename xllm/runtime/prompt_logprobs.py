"""Prompt logprobs: each prompt token's logprob given the tokens before it, and the top-k.

The model's hidden row at position ``p`` predicts token ``p + 1``, so a prefill chunk covering
positions ``[s, s + c)`` of a prompt of ``P`` tokens scores prompt tokens ``s + 1 .. min(s + c,
P - 1)``; the chunk's row at ``P - 1`` predicts the first *generated* token (the sampler's job).
Prompt token 0 has no logprob. Chunks of one prompt arrive over several steps; the engine
accumulates them.

Only the rows of requests that asked are scored: they are gathered once per step into one
``[m, hidden]`` block, which goes through the LM head and a log-softmax in fp32 together (in
slabs of at most ``_LOGITS_BYTES`` of logits, so a long prompt chunk cannot allocate
gigabytes). A step where nobody asks costs one attribute check per prefill request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from xllm.layers.sampler import topk_two_level
from xllm.scheduler import SchedulerOutput

__all__ = ["PromptLogprobs", "PromptSpan", "find_prompt_spans", "score_prompt_spans"]

_LOGITS_BYTES = 256 << 20  # fp32 logits per slab (1365 rows of a 49152-token vocabulary)


@dataclass
class PromptLogprobs:
    """Scores of the consecutive prompt tokens ``start .. start + len(logprobs) - 1``."""

    start: int  # index in the prompt of the first token scored (>= 1)
    logprobs: list[float]  # each token's logprob given the prompt before it
    ranks: list[int]  # 1 + the number of tokens the model found likelier at that position
    top: list[list[tuple[int, float]]]  # per token: k alternatives (token id, logprob), best first


@dataclass
class PromptSpan:
    """Prompt tokens one scheduled request scores this step."""

    index: int  # in SchedulerOutput.scheduled
    row: int  # the hidden row of position ``start - 1`` (rows are the step's tokens in order)
    start: int  # first prompt index scored
    count: int  # tokens scored
    k: int  # alternatives the request asked for


def find_prompt_spans(out: SchedulerOutput) -> list[PromptSpan] | None:
    """The step's prompt-scoring work; None (the usual case) when no request needs any.

    Decodes never do (a one-token step scores the position after the prompt), and a request
    that already has outputs had its whole prompt scored before a preemption made it recompute.
    """
    spans: list[PromptSpan] | None = None
    row = len(out.decodes)
    for j, item in enumerate(out.prefills):
        request = item.request
        k = request.sampling_params.prompt_logprobs
        if k is not None and not request.output_token_ids:
            first = item.num_computed_tokens
            stop = min(first + item.num_new_tokens, request.num_prompt_tokens - 1)
            if stop > first:
                if spans is None:
                    spans = []
                spans.append(PromptSpan(len(out.decodes) + j, row, first + 1, stop - first, k))
        row += item.num_new_tokens
    return spans


def span_rows(spans: list[PromptSpan]) -> np.ndarray:
    """The hidden rows the spans score, in order (int64)."""
    return np.concatenate([np.arange(s.row, s.row + s.count) for s in spans])


def logit_slab_rows(vocab_size: int) -> int:
    """Rows of logits computed at once while scoring prompts (tensor-parallel ranks follow
    the same slabs, since the LM head is a collective there)."""
    return max(1, _LOGITS_BYTES // (4 * vocab_size))


def score_prompt_spans(
    out: SchedulerOutput,
    spans: list[PromptSpan],
    hidden: torch.Tensor,
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    vocab_size: int,
) -> list[PromptLogprobs]:
    """One PromptLogprobs per span: ``compute_logits`` (the LM head, [m, H] -> fp32 [m, V])
    on the spans' hidden rows, log-softmax, the prompt token's logprob and rank, the top k."""
    scheduled = out.scheduled
    if len(spans) == 1:
        s = spans[0]
        rows = hidden[s.row : s.row + s.count]  # a view: no gather
    else:
        rows = hidden.index_select(0, torch.from_numpy(span_rows(spans)).to(hidden.device))
    targets = torch.tensor(
        [
            t
            for s in spans
            for t in scheduled[s.index].request.prompt_token_ids[s.start : s.start + s.count]
        ],
        dtype=torch.int64,
        device=hidden.device,
    ).unsqueeze(1)
    k = min(max(s.k for s in spans), vocab_size)
    m = rows.shape[0]
    step = logit_slab_rows(vocab_size)
    chosen_parts, rank_parts, top_lp_parts, top_id_parts = [], [], [], []
    for a in range(0, m, step):
        b = min(m, a + step)
        logits = compute_logits(rows[a:b]).float()
        # log_softmax(x)[t] = x[t] - logsumexp(x): only the logsumexp is a pass over the row,
        # so the [m, V] log-softmax itself is never materialised.
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        target_logit = logits.gather(1, targets[a:b])
        chosen_parts.append((target_logit - lse).squeeze(1))
        # An int32 sum of the comparison runs about twice as fast as the default int64 one.
        rank_parts.append(1 + (logits > target_logit).sum(-1, dtype=torch.int32))
        if k:
            values, ids = topk_two_level(logits, k)
            top_lp_parts.append(values - lse)
            top_id_parts.append(ids)
    chosen = torch.cat(chosen_parts).tolist()
    ranks = torch.cat(rank_parts).tolist()
    top_lp = torch.cat(top_lp_parts).tolist() if k else None
    top_ids = torch.cat(top_id_parts).tolist() if k else None
    results = []
    a = 0
    for s in spans:
        b = a + s.count
        if s.k and top_lp is not None and top_ids is not None:
            top = [
                list(zip(ids[: s.k], lps[: s.k], strict=True))
                for ids, lps in zip(top_ids[a:b], top_lp[a:b], strict=True)
            ]
        else:
            top = [[] for _ in range(s.count)]
        results.append(PromptLogprobs(s.start, chosen[a:b], ranks[a:b], top))
        a = b
    return results
