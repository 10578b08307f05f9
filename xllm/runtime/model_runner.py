"""ModelRunner: turns a SchedulerOutput into tensors, runs the model, samples.

Every step's inputs (token ids, positions, slot mapping, block tables, sequence
lengths, query offsets) are written into host buffers allocated once at start-up
and handed to torch as zero-copy views, so a step allocates no per-request
tensors. Rows are ordered decodes first, then prefills (see AttentionMetadata).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from xllm.layers.attn_metadata import AttentionMetadata
from xllm.layers.sampler import Sampler, SamplingBatch
from xllm.models.config import ModelConfig
from xllm.runtime.prompt_logprobs import (
    PromptLogprobs,
    PromptSpan,
    find_prompt_spans,
    logit_slab_rows,
    score_prompt_spans,
    span_rows,
)
from xllm.runtime.tp import WorkerGroup
from xllm.scheduler import SchedulerOutput


@dataclass
class TokenLogprobs:
    """Logprobs of one sampled token: its own, its rank, and the top alternatives."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]  # (token id, logprob), best first


@dataclass
class RunnerOutput:
    # Aligned with SchedulerOutput.scheduled; [] where the step did not sample (a prompt chunk).
    sampled_token_ids: list[list[int]]
    # Aligned likewise; None where the request asked for no logprobs or did not sample.
    logprobs: list[TokenLogprobs | None]
    # Aligned likewise, the prompt tokens this step scored per request; None (the whole list)
    # when no request scored prompt tokens this step (see xllm.runtime.prompt_logprobs).
    prompt_logprobs: list[PromptLogprobs | None] | None = None


class ModelRunner:
    def __init__(self, model: torch.nn.Module, model_config: ModelConfig, *, block_size: int,
                 kv_caches: list[tuple[torch.Tensor, torch.Tensor]], max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, device: torch.device,
                 seed: int = 0, workers: WorkerGroup | None = None) -> None:
        self.model = model
        # Tensor parallelism: the other ranks, sent every step before it runs (xllm.runtime.tp).
        self.workers = workers
        self.config = model_config
        self.block_size = block_size
        self.device = device
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        if len(kv_caches) != model_config.num_hidden_layers:
            raise ValueError(f"kv_caches has {len(kv_caches)} layers; the model has "
                             f"{model_config.num_hidden_layers}")
        self.kv_caches = kv_caches  # per layer (key, value): xllm.kvcache.KVStore.kv_caches
        model.bind_kv_caches(self.kv_caches)
        max_tokens = max_num_batched_tokens
        self._input_ids = np.zeros(max_tokens, dtype=np.int64)
        self._positions = np.zeros(max_tokens, dtype=np.int64)
        self._row_of_token = np.zeros(max_tokens, dtype=np.int64)
        self._block_tables = np.zeros((max_num_seqs, self.max_blocks_per_seq), dtype=np.int32)
        self._seq_lens = np.zeros(max_num_seqs, dtype=np.int32)
        self._query_start = np.zeros(max_num_seqs + 1, dtype=np.int32)
        self._arange = np.arange(max_model_len + 1, dtype=np.int64)
        self.sampler = Sampler(seed=seed)
        # Seconds in the model itself (forward passes, LM head), for the idle-share metric.
        self.forward_seconds = 0.0

    def kv_cache_bytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.kv_caches)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        return tensor if self.device.type == "cpu" else tensor.to(self.device, non_blocking=True)

    def prepare(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor,
                                                     AttentionMetadata, np.ndarray]:
        """Fills the step's buffers; returns input ids, positions, metadata, sampling rows."""
        scheduled = out.scheduled
        num_decodes = len(out.decodes)
        n = 0
        last_rows = []
        for i, item in enumerate(scheduled):
            req, start, count = item.request, item.num_computed_tokens, item.num_new_tokens
            tokens = req.all_token_ids
            end = n + count
            if count == 1:
                self._input_ids[n] = tokens[start]
                self._positions[n] = start
                self._row_of_token[n] = i
            else:
                self._input_ids[n:end] = tokens[start:start + count]
                self._positions[n:end] = self._arange[start:start + count]
                self._row_of_token[n:end] = i
            blocks = req.block_ids
            self._block_tables[i, :len(blocks)] = blocks
            self._seq_lens[i] = start + count
            if item.samples:
                last_rows.append(end - 1)
            n = end
        num_seqs = len(scheduled)
        positions = self._positions[:n]
        block_index = positions // self.block_size
        slots = (self._block_tables[self._row_of_token[:n], block_index].astype(np.int64)
                 * self.block_size + positions % self.block_size)
        # Prefill query offsets, relative to the first prefill token.
        prefill_counts = [item.num_new_tokens for item in out.prefills]
        self._query_start[0] = 0
        if prefill_counts:
            np.cumsum(prefill_counts, out=self._query_start[1:len(prefill_counts) + 1])
        num_prefills = num_seqs - num_decodes
        metadata = AttentionMetadata(
            slot_mapping=self._to_device(slots),
            num_decode_tokens=num_decodes,
            decode_block_tables=self._to_device(self._block_tables[:num_decodes]),
            decode_seq_lens=self._to_device(self._seq_lens[:num_decodes]),
            prefill_block_tables=self._to_device(self._block_tables[num_decodes:num_seqs]),
            prefill_query_start_loc=self._to_device(self._query_start[:num_prefills + 1]),
            prefill_seq_lens=self._to_device(self._seq_lens[num_decodes:num_seqs]),
            num_prefill_tokens=n - num_decodes,
        )
        return (self._to_device(self._input_ids[:n]), self._to_device(positions), metadata,
                np.asarray(last_rows, dtype=np.int64))

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        scheduled = out.scheduled
        if not scheduled:
            return RunnerOutput([], [])
        spans = find_prompt_spans(out)
        if self.workers is not None:
            self.workers.send(out, span_rows(spans) if spans else None)
        input_ids, positions, metadata, last_rows = self.prepare(out)
        t0 = time.perf_counter()
        hidden = self.model(input_ids, positions, metadata)
        self.forward_seconds += time.perf_counter() - t0
        sampling = [item for item in scheduled if item.samples]
        sampled: list[list[int]] = [[] for _ in scheduled]
        logprobs: list[TokenLogprobs | None] = [None] * len(scheduled)
        prompt_logprobs = self._score_prompts(out, spans, hidden)
        if not sampling:
            return RunnerOutput(sampled, logprobs, prompt_logprobs)
        t0 = time.perf_counter()
        logits = self.model.compute_logits(hidden[torch.from_numpy(last_rows).to(hidden.device)])
        self.forward_seconds += time.perf_counter() - t0
        reqs = [item.request for item in sampling]
        batch = SamplingBatch.build(
            [r.sampling_params for r in reqs], [r.prompt_token_ids for r in reqs],
            [r.output_token_ids for r in reqs], vocab_size=logits.shape[-1],
            device=logits.device, suppress_token_ids=[self._suppressed(r) for r in reqs])
        result = self.sampler(logits, batch)
        token_ids = result.token_ids.tolist()
        want_logprobs = result.logprobs is not None
        if want_logprobs:
            lp = result.logprobs.tolist()
            lp_ids = result.logprob_token_ids.tolist()
            ranks = result.ranks.tolist()
        j = 0
        for i, item in enumerate(scheduled):
            if not item.samples:
                continue
            sampled[i] = [token_ids[j]]
            k = item.request.sampling_params.logprobs
            if want_logprobs and k is not None:
                logprobs[i] = TokenLogprobs(token_ids[j], lp[j][0], ranks[j],
                                            list(zip(lp_ids[j][1:k + 1], lp[j][1:k + 1],
                                                     strict=True)))
            j += 1
        return RunnerOutput(sampled, logprobs, prompt_logprobs)

    @torch.inference_mode()
    def execute_shard(self, out: SchedulerOutput, prompt_rows: np.ndarray) -> None:
        """A tensor-parallel worker's step: the same inputs as rank 0 (``out`` is rebuilt from
        the step message), this rank's share of the forward pass, and its part of every LM
        head call rank 0 makes (prompt scoring in the same slabs first, then sampling)."""
        if not out.scheduled:
            return
        input_ids, positions, metadata, last_rows = self.prepare(out)
        hidden = self.model(input_ids, positions, metadata)
        if len(prompt_rows):
            rows = hidden.index_select(0, torch.from_numpy(prompt_rows))
            step = logit_slab_rows(self.config.vocab_size)
            for a in range(0, rows.shape[0], step):
                self.model.compute_logits(rows[a:a + step])
        if len(last_rows):
            self.model.compute_logits(hidden[torch.from_numpy(last_rows)])

    def _score_prompts(self, out: SchedulerOutput, spans: list[PromptSpan] | None,
                       hidden: torch.Tensor) -> list[PromptLogprobs | None] | None:
        """Prompt logprobs of the requests that asked, aligned with ``out.scheduled``."""
        if spans is None:
            return None
        scored = score_prompt_spans(out, spans, hidden, self.model.compute_logits,
                                    self.config.vocab_size)
        result: list[PromptLogprobs | None] = [None] * len(out.scheduled)
        for span, item in zip(spans, scored, strict=True):
            result[span.index] = item
        return result

    @staticmethod
    def _suppressed(req) -> list[int]:  # noqa: ANN001 - a scheduler Request
        """EOS and stop ids are masked while a request is below its min_tokens."""
        params = req.sampling_params
        if len(req.output_token_ids) >= params.min_tokens:
            return []
        ids = list(params.stop_token_ids)
        if not params.ignore_eos:
            ids.extend(req.eos_token_ids)
        return ids
