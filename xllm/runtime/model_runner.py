"""ModelRunner: turns a SchedulerOutput into tensors, runs the model, samples.

Every step's inputs (token ids, positions, slot mapping, block tables, sequence
lengths, query offsets) are written into host buffers allocated once at start-up
and handed to torch as zero-copy views, so a step allocates no per-request
tensors. Rows are ordered decodes first, then prefills (see AttentionMetadata).

A step is three calls, so that overlap scheduling can split them across threads:
``prepare`` (read the scheduler's output into one of two buffer sets, build the
sampling batch and the workers' step message), ``complete`` (fill in the tokens a
previous step was still sampling when this one was prepared, send the message) and
``run`` (the forward pass, LM head and sampler; it reads only the prepared step,
never a request, so it may run on another thread while the engine goes on, and the
synchronous engine lets others use the scheduler's state meanwhile).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from xllm.layers.attn_metadata import AttentionMetadata
from xllm.layers.sampler import (
    Sampler,
    SamplerOutput,
    SamplingBatch,
    argmax_only,
    has_penalties,
    plain_greedy,
)
from xllm.models.config import ModelConfig
from xllm.runtime.prompt_logprobs import (
    PromptLogprobs,
    PromptSpan,
    find_prompt_spans,
    logit_slab_rows,
    score_prompt_spans,
    span_rows,
)
from xllm.runtime.tp import StepMessage, WorkerGroup, token_at
from xllm.scheduler import SchedulerOutput
from xllm.structured.grammar import new_bitmask


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
    # Aligned likewise, embedding requests' pooled hidden states of this step's chunk:
    # (first position, fp32 vector: the chunk's sum for mean pooling, the prompt's last
    # hidden state for last pooling); None where none (the whole list: no such request).
    pooled: list[tuple[int, torch.Tensor] | None] | None = None


@dataclass
class PoolSpan:
    """An embedding request's prompt chunk in a step: hidden rows [row, row + count)."""

    index: int  # in SchedulerOutput.scheduled
    row: int
    count: int
    start: int  # the chunk's first position
    last_only: bool  # last pooling: only the row of the prompt's last token


def find_pool_spans(out: SchedulerOutput) -> list[PoolSpan] | None:
    """The step's pooling work; None (the usual case) when no embedding request prefills.
    Last pooling takes only the chunk holding the prompt's last token."""
    spans: list[PoolSpan] | None = None
    row = 0
    # All rows: a one-token prompt's step is scheduled as a decode.
    for j, item in enumerate(out.scheduled):
        request = item.request
        mode = request.sampling_params.pooling
        n = item.num_new_tokens
        if mode is not None and not request.output_token_ids:
            start = item.num_computed_tokens
            if mode == "mean" or start + n == request.num_prompt_tokens:
                spans = spans or []
                spans.append(PoolSpan(j, row, n, start, mode == "last"))
        row += n
    return spans


class _Buffers:
    """One step's host buffers; the runner has two, so that a step can be prepared while the
    previous one still runs from the other."""

    def __init__(self, max_tokens: int, max_num_seqs: int, max_blocks_per_seq: int) -> None:
        self.input_ids = np.zeros(max_tokens, dtype=np.int64)
        self.positions = np.zeros(max_tokens, dtype=np.int64)
        self.block_tables = np.zeros((max_num_seqs, max_blocks_per_seq), dtype=np.int32)
        self.seq_lens = np.zeros(max_num_seqs, dtype=np.int32)
        self.query_start = np.zeros(max_num_seqs + 1, dtype=np.int32)
        self.bitmask: torch.Tensor | None = None  # structured outputs: made at first use

    def token_bitmask(self, vocab_size: int) -> torch.Tensor:
        """The step's structured-output bitmask rows [max_num_seqs, ceil(vocab / 32)]."""
        if self.bitmask is None:
            self.bitmask = new_bitmask(self.block_tables.shape[0], vocab_size)
        return self.bitmask


@dataclass
class PreparedStep:
    """A step ready to run: its inputs and everything ``run`` needs, nothing it must read
    from the requests."""

    out: SchedulerOutput
    buffers: _Buffers
    num_tokens: int
    metadata: AttentionMetadata
    last_rows: np.ndarray  # hidden rows that sample, in scheduled order
    spans: list[PromptSpan] | None
    pool_spans: list[PoolSpan] | None
    # Input rows whose token a step in flight was sampling at prepare time:
    # (row, request, position); complete() reads them from the request.
    pending: list[tuple[int, object, int]]
    sampling: SamplingBatch | None  # None: no row samples, or complete() builds it
    message: StepMessage | None = None  # the workers' step (tensor parallelism)
    sent: bool = False  # the workers have it already (prepare with send=True)
    # Tensor parallelism, every sampled row plain greedy: the LM head gathers the ranks'
    # best tokens, and the sampler is not needed (argmax_only).
    argmax: bool = False
    seconds: float = 0.0  # run()'s wall time


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
        self._buffers = [_Buffers(max_tokens, max_num_seqs, self.max_blocks_per_seq)
                         for _ in range(2)]
        self._next_buffers = 0
        self._row_of_token = np.zeros(max_tokens, dtype=np.int64)
        self._arange = np.arange(max_model_len + 1, dtype=np.int64)
        self.sampler = Sampler(seed=seed)
        # Seconds in run(): the model's step (forward pass, prompt scoring, LM head, sampler),
        # for the idle-share metric.
        self.busy_seconds = 0.0

    def kv_cache_bytes(self) -> int:
        return sum(k.numel() * k.element_size() * (1 if k is v else 2) for k, v in self.kv_caches)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        return tensor if self.device.type == "cpu" else tensor.to(self.device, non_blocking=True)

    def _fill(self, out: SchedulerOutput, buf: _Buffers,
              pending: list[tuple[int, object, int]] | None) -> tuple[int, AttentionMetadata,
                                                                       np.ndarray]:
        """Writes the step's inputs into ``buf``; returns the token count, the attention
        metadata and the sampling rows. A decode whose token is not known yet (overlap) is
        listed in ``pending`` (a worker's mirrors always know theirs: pending is None)."""
        scheduled = out.scheduled
        num_decodes = len(out.decodes)
        input_ids, positions_buf = buf.input_ids, buf.positions
        block_tables, seq_lens = buf.block_tables, buf.seq_lens
        n = 0
        last_rows = []
        for i, item in enumerate(scheduled):
            req, start, count = item.request, item.num_computed_tokens, item.num_new_tokens
            tokens = req.all_token_ids
            end = n + count
            if count == 1:
                if start < len(tokens):
                    input_ids[n] = tokens[start]
                else:  # being sampled by the step in flight
                    assert pending is not None
                    pending.append((n, req, start))
                positions_buf[n] = start
                self._row_of_token[n] = i
            else:
                input_ids[n:end] = tokens[start:start + count]
                positions_buf[n:end] = self._arange[start:start + count]
                self._row_of_token[n:end] = i
            blocks = req.block_ids
            block_tables[i, :len(blocks)] = blocks
            seq_lens[i] = start + count
            if item.samples:
                last_rows.append(end - 1)
            n = end
        num_seqs = len(scheduled)
        positions = positions_buf[:n]
        block_index = positions // self.block_size
        slots = (block_tables[self._row_of_token[:n], block_index].astype(np.int64)
                 * self.block_size + positions % self.block_size)
        # Prefill query offsets, relative to the first prefill token.
        prefill_counts = [item.num_new_tokens for item in out.prefills]
        query_start = buf.query_start
        query_start[0] = 0
        if prefill_counts:
            np.cumsum(prefill_counts, out=query_start[1:len(prefill_counts) + 1])
        num_prefills = num_seqs - num_decodes
        metadata = AttentionMetadata(
            slot_mapping=self._to_device(slots),
            num_decode_tokens=num_decodes,
            decode_block_tables=self._to_device(block_tables[:num_decodes]),
            decode_seq_lens=self._to_device(seq_lens[:num_decodes]),
            prefill_block_tables=self._to_device(block_tables[num_decodes:num_seqs]),
            prefill_query_start_loc=self._to_device(query_start[:num_prefills + 1]),
            prefill_seq_lens=self._to_device(seq_lens[num_decodes:num_seqs]),
            num_prefill_tokens=n - num_decodes,
        )
        return n, metadata, np.asarray(last_rows, dtype=np.int64)

    def _take_buffers(self) -> _Buffers:
        buf = self._buffers[self._next_buffers]
        self._next_buffers ^= 1
        return buf

    def prepare(self, out: SchedulerOutput, send: bool = False) -> PreparedStep:
        """Reads the step from the scheduler's output and the requests into the next buffer
        set (the one the step before last used). With overlap scheduling a decode's token
        may still be being sampled by the step in flight: complete() fills it in.

        ``send`` (the synchronous engine, where every input token is known): the workers get
        the step first, so they decode it and fill their inputs while this rank fills its
        own, rather than after (rank 0 then waits for them at the step's first sum)."""
        buf = self._take_buffers()
        spans = find_prompt_spans(out)
        message, sent, argmax = None, False, False
        if self.workers is not None:
            message = self.workers.encode(out, span_rows(spans) if spans else None)
            if send and not message.holes:
                argmax = self._plain_greedy(out)
                self._send(message, argmax)
                sent = True
        pending: list[tuple[int, object, int]] = []
        n, metadata, last_rows = self._fill(out, buf, pending)
        step = PreparedStep(out, buf, n, metadata, last_rows, spans, find_pool_spans(out),
                            pending, None, message, sent, argmax=argmax and len(last_rows) > 0)
        if len(last_rows):
            step.sampling = self._sampling_batch(out, buf, ready=not pending)
            if step.argmax and not argmax_only(step.sampling):
                raise RuntimeError("a step sent as plain greedy has rows that sample otherwise")
        return step

    def _plain_greedy(self, out: SchedulerOutput) -> bool:
        """Whether every row that samples this step takes the argmax of its raw logits (its
        sampling batch will be ``argmax_only``), from the requests alone: the workers hear
        it with the step, before the batch is built."""
        samples = False
        for item in out.scheduled:
            if item.samples:
                req = item.request
                if (not plain_greedy(req.sampling_params) or req.grammar is not None
                        or self._suppressed(req)):
                    return False
                samples = True
        return samples

    def _send(self, message: StepMessage, argmax: bool) -> None:
        """Sends the workers the step, saying whether its sampled rows take only their
        greedy token (then the LM head gathers each rank's best, not its logits)."""
        assert self.workers is not None
        message.set_argmax(argmax)
        self.workers.sync_memory()  # groups this step's new blocks need, mapped first
        self.workers.send(message)

    def complete(self, step: PreparedStep) -> None:
        """Fills in the tokens pending at prepare time (now in their requests; a request
        finished meanwhile gets a placeholder, its row's result is dropped) and the sampling
        batch if it had to wait for them, and sends the workers the step."""
        if step.pending:
            input_ids = step.buffers.input_ids
            for row, req, position in step.pending:
                input_ids[row] = token_at(req, position)
            if step.message is not None:
                step.message.fill()
            if step.sampling is None and len(step.last_rows):
                step.sampling = self._sampling_batch(step.out, step.buffers, ready=True)
        if self.workers is not None and not step.sent:
            step.argmax = argmax_only(step.sampling)
            self._send(step.message, step.argmax)
            step.sent = True

    def _sampling_batch(self, out: SchedulerOutput, buf: _Buffers,
                        ready: bool) -> SamplingBatch | None:
        """The step's sampling batch; None when some outputs are still pending (not ready)
        and a row with pending outputs has penalties or a grammar, which need their values.
        Fills the structured-output bitmask of the rows that have a grammar."""
        reqs = [item.request for item in out.scheduled if item.samples]
        pending = None
        if not ready:
            pending = [r.num_pending_outputs - 1 for r in reqs]  # this step's own is not one
            if any(k and (has_penalties(r.sampling_params) or r.grammar is not None)
                   for k, r in zip(pending, reqs, strict=True)):
                return None
        # A grammar that has ended (its stop token accepted) masks nothing: its request is
        # finished (overlap: the row's result is dropped) or ignores EOS (the next token
        # ends it, see Scheduler.update_from_output).
        mask_rows = [j for j, r in enumerate(reqs)
                     if r.grammar is not None and not r.grammar.is_terminated()]
        bitmask = None
        if mask_rows:
            bitmask = buf.token_bitmask(self.config.vocab_size)[:len(mask_rows)]
            for i, j in enumerate(mask_rows):
                reqs[j].grammar.fill_next_token_bitmask(bitmask, i)
        return SamplingBatch.build(
            [r.sampling_params for r in reqs], [r.prompt_token_ids for r in reqs],
            [r.output_token_ids for r in reqs], vocab_size=self.config.vocab_size,
            device=self.device, num_pending=pending,
            suppress_token_ids=[self._suppressed(r, k)
                                for r, k in zip(reqs, pending or [0] * len(reqs), strict=True)],
            mask_rows=mask_rows or None, bitmask=bitmask)

    @torch.inference_mode()
    def run(self, step: PreparedStep) -> RunnerOutput:
        """The model, prompt scoring, LM head and sampler for a completed step."""
        t_start = time.perf_counter()
        out = step.out
        scheduled = out.scheduled
        buf, n = step.buffers, step.num_tokens
        hidden = self.model(self._to_device(buf.input_ids[:n]),
                            self._to_device(buf.positions[:n]), step.metadata)
        sampled: list[list[int]] = [[] for _ in scheduled]
        logprobs: list[TokenLogprobs | None] = [None] * len(scheduled)
        prompt_logprobs = self._score_prompts(out, step.spans, hidden)
        pooled = None if step.pool_spans is None else _pool(step.pool_spans, hidden,
                                                            len(scheduled))
        if not len(step.last_rows):
            self._done(step, t_start)
            return RunnerOutput(sampled, logprobs, prompt_logprobs, pooled)
        assert step.sampling is not None, "run() before complete()"
        rows = hidden[torch.from_numpy(step.last_rows).to(hidden.device)]
        if step.argmax:  # (tensor parallelism: the ranks' best tokens, not their logits)
            result = SamplerOutput(self.model.compute_logits(rows, argmax=True))
        else:
            result = self.sampler(self.model.compute_logits(rows), step.sampling)
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
            k = step.sampling.params[j].logprobs
            if want_logprobs and k is not None:
                logprobs[i] = TokenLogprobs(token_ids[j], lp[j][0], ranks[j],
                                            list(zip(lp_ids[j][1:k + 1], lp[j][1:k + 1],
                                                     strict=True)))
            j += 1
        self._done(step, t_start)
        return RunnerOutput(sampled, logprobs, prompt_logprobs, pooled)

    def _done(self, step: PreparedStep, t_start: float) -> None:
        step.seconds = time.perf_counter() - t_start
        self.busy_seconds += step.seconds

    @torch.inference_mode()
    def execute_shard(self, out: SchedulerOutput, prompt_rows: np.ndarray,
                      argmax: bool = False) -> None:
        """A tensor-parallel worker's step: the same inputs as rank 0 (``out`` is rebuilt from
        the step message), this rank's share of the forward pass, and its part of every LM
        head call rank 0 makes (prompt scoring in the same slabs first, then sampling:
        ``argmax``, its best tokens only)."""
        if not out.scheduled:
            return
        buf = self._take_buffers()
        n, metadata, last_rows = self._fill(out, buf, None)
        hidden = self.model(self._to_device(buf.input_ids[:n]),
                            self._to_device(buf.positions[:n]), metadata)
        if len(prompt_rows):
            rows = hidden.index_select(0, torch.from_numpy(prompt_rows))
            step = logit_slab_rows(self.config.vocab_size)
            for a in range(0, rows.shape[0], step):
                self.model.compute_logits(rows[a:a + step])
        if len(last_rows):
            self.model.compute_logits(hidden[torch.from_numpy(last_rows)], argmax=argmax)

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
    def _suppressed(req, pending: int = 0) -> list[int]:  # noqa: ANN001 - a scheduler Request
        """EOS and stop ids are masked while a request is below its min_tokens (counting
        ``pending`` outputs still being sampled)."""
        params = req.sampling_params
        if len(req.output_token_ids) + pending >= params.min_tokens:
            return []
        ids = list(params.stop_token_ids)
        if not params.ignore_eos:
            ids.extend(req.eos_token_ids)
        return ids


def _pool(spans: list[PoolSpan], hidden: torch.Tensor,
          n: int) -> list[tuple[int, torch.Tensor] | None]:
    """Each span's piece of its request's embedding, in fp32 (see RunnerOutput.pooled)."""
    pooled: list[tuple[int, torch.Tensor] | None] = [None] * n
    for span in spans:
        if span.last_only:
            vector = hidden[span.row + span.count - 1].float().clone()
        else:
            vector = hidden[span.row:span.row + span.count].float().sum(0)
        pooled[span.index] = (span.start, vector)
    return pooled
