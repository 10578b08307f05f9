"""LLMEngine: owns the scheduler and the model runner and turns steps into request outputs.

One call of ``step()`` schedules a batch under the token budget, runs the model
once, appends the sampled tokens, applies stop conditions (token-level in the
scheduler; stop strings here, on the incrementally detokenized text) and returns
what changed. AsyncEngine (the server) drives it from its own thread.

With overlap scheduling (``EngineConfig.overlap_scheduling``) a helper thread
schedules step N+1 and prepares its inputs while step N computes on this thread; a
decode of N+1 whose token N is sampling gets it filled in when N is done. The model
stays on the engine's thread: on a CPU a second thread starting parallel work would
bring a second OpenMP team onto the same cores (the helper runs single-threaded).
Outputs are the same as without overlap.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from xllm import _C
from xllm.config import EngineConfig
from xllm.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from xllm.engine.speed_model import OnlineSpeedModel, chunk_attention
from xllm.kvcache.memory import PeerMemory
from xllm.kvcache.parts import PartLink
from xllm.kvcache.store import KVStore, KVStoreConfig
from xllm.layers.eplb import Placement, rank_loads, rebalance_experts
from xllm.layers.parallel import SINGLE, TensorParallel, check_tensor_parallel, head_shard
from xllm.loader import resolve_model
from xllm.loader.generation_config import GenerationConfig
from xllm.loader.model import load_model, resolve_dtype, resolve_weight_format
from xllm.models.config import ModelConfig
from xllm.ops.kv_cache import KV_CACHE_DTYPES, kv_row_width
from xllm.runtime.model_runner import ModelRunner, PreparedStep, RunnerOutput
from xllm.runtime.prompt_logprobs import PromptLogprobs
from xllm.runtime.tp import WorkerGroup, WorkerSpec, pin_to, rank_cores
from xllm.sampling_params import SamplingParams
from xllm.scheduler import Request, RequestStatus, Scheduler, SchedulerConfig, SchedulerOutput
from xllm.structured.grammar import GrammarCompiler
from xllm.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger("xllm.engine")


@dataclass
class _Completion:
    """Engine-side state of one of a request's n completions."""

    request: Request
    detokenizer: IncrementalDetokenizer
    text_end: int | None = None  # where a stop string cut the text
    emitted_chars: int = 0
    emitted_tokens: int = 0
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    completions: list[_Completion] = field(default_factory=list)
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.monotonic()))
    # With params.prompt_logprobs: entries for the prompt tokens scored so far (see
    # RequestOutput.prompt_logprobs), filled chunk by chunk by the first completion's request.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    prompt_token_ranks: list[int | None] | None = None
    # With params.pooling: the pooled hidden state so far (mean: the sum over the chunks
    # computed), then the normalized embedding once the prompt is through.
    pooled: torch.Tensor | None = None
    embedding: list[float] | None = None

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions)


class LLMEngine:
    def __init__(self, config: EngineConfig, progress: bool = True) -> None:
        self.config = config
        torch.set_num_threads(config.threads)
        self.model_dir = resolve_model(config.model)
        self.model_config = ModelConfig.from_file(self.model_dir)
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        self.generation_config = GenerationConfig.from_dir(self.model_dir)
        self.eos_token_ids = set(self.generation_config.eos_token_ids) or set(
            self.tokenizer.eos_token_ids)
        # Structured outputs' grammars, compiled on their own thread and cached. Thread-safe:
        # AsyncEngine compiles a request's grammar before the request reaches this thread.
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size,
                                        self.eos_token_ids)
        self.device = torch.device(config.device)
        mc = self.model_config
        limit = mc.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's "
                             f"max_position_embeddings {limit}; use at most {limit}")
        self.max_model_len = config.max_model_len or limit
        self.dtype = resolve_dtype(config.dtype, mc, self.device, config.weight_format)
        # (Resolved once: load_model, the tensor-parallel workers and the KV identity get it.)
        self.weight_format = resolve_weight_format(config.weight_format, self.dtype, mc,
                                                   self.device, self.model_dir,
                                                   auto_dtype=config.dtype == "auto")
        kv_dtype = (self.dtype if config.kv_cache_dtype == "auto"
                    else KV_CACHE_DTYPES[config.kv_cache_dtype])
        tp_size = config.tensor_parallel_size
        if config.enable_expert_parallel and not mc.num_experts:
            raise ValueError(f"enable_expert_parallel places experts on the ranks, but "
                             f"{mc.architecture} here has no mixture-of-experts layers")
        for note in check_tensor_parallel(mc.num_attention_heads, mc.num_key_value_heads,
                                          mc.intermediate_size, tp_size):
            logger.warning("tensor parallelism: %s", note)
        kv_heads, kv_head_size, kv_tensors = mc.kv_cache_geometry()
        # Rank 0 reaches every rank's heads of a block (tiers, blocks between instances): in
        # place on one host, through the workers' part servers across hosts. A latent cache
        # (MLA) is the same on every rank: its parts are replicas.
        part_heads = _whole_block_parts(mc, kv_tensors, tp_size) if tp_size > 1 else None
        replicated = tp_size > 1 and kv_tensors == 1
        if kv_dtype == torch.int8 and kv_tensors != 2:
            raise ValueError(f"kv_cache_dtype int8 is for K/V caches; {mc.architecture}'s "
                             "latent cache (MLA) keeps auto, bfloat16 or float32")
        store_config = KVStoreConfig(
            num_blocks=2, num_layers=mc.num_hidden_layers, num_kv_heads=kv_heads,
            block_size=config.block_size, head_size=kv_row_width(kv_head_size, kv_dtype),
            tensors_per_layer=kv_tensors,
            dtype_bytes=kv_dtype.itemsize, on_demand=_kv_on_demand(self.device),
            cuda_device=(self.device.index or 0) if self.device.type == "cuda" else None,
            idle_seconds=config.kv_idle_release_s,
            cpu_tier_bytes=int(config.kv_offload_cpu_gb * (1 << 30)),
            disk_tier_dir=config.kv_offload_disk,
            disk_tier_bytes=int(config.kv_offload_disk_gb * (1 << 30)),
            identity=_kv_identity(self.model_dir, self.dtype, kv_dtype, self.weight_format))
        # The pool's block count is the whole model's (all heads): under TP every rank holds
        # its heads of the same blocks, so kv_cache_memory_gb bounds all ranks together.
        num_blocks = config.num_kv_blocks or max(
            2, int(config.kv_cache_memory_gb * (1 << 30)) // store_config.block_bytes)
        self.workers: WorkerGroup | None = None
        self._tp_wait_base = 0.0
        self._affinity: set[int] | None = None
        tp = SINGLE
        if tp_size > 1:
            spec = WorkerSpec(
                model_dir=str(self.model_dir), dtype=str(self.dtype).removeprefix("torch."),
                kv_dtype=str(kv_dtype).removeprefix("torch."),
                weight_format=self.weight_format, block_size=config.block_size,
                num_blocks=num_blocks, max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len, rank=0, size=tp_size, group="", cores=[],
                expert_parallel=config.enable_expert_parallel,
                num_redundant_experts=config.num_redundant_experts,
                device=self.device.type, backend=_tp_backend(config),
                kv_on_demand=store_config.on_demand)
            if config.tp_master is not None:  # the other ranks on other hosts, over TCP
                self.workers = WorkerGroup.remote(spec, config.tp_master)
            else:
                self.workers = WorkerGroup.start(spec)
                # Rank 0's compute runs on this thread (the server's engine thread, or the
                # caller's offline); pinned to the first share of the cores until close()
                # gives them back.
                self._affinity = os.sched_getaffinity(0)
                pin_to(rank_cores(tp_size)[0])
            tp = TensorParallel(0, tp_size, self.workers.comm,
                                bf16_sums=self.dtype == torch.bfloat16,
                                expert_parallel=config.enable_expert_parallel,
                                num_redundant_experts=config.num_redundant_experts)
        try:
            model = load_model(self.model_dir, mc, self.dtype, self.device, progress=progress,
                               weight_format=self.weight_format, tp=tp)
            if self.workers is not None:
                self.workers.wait_ready()
                self._tp_wait_base = self.workers.comm.wait_seconds  # (loading not counted)
        except BaseException:
            self._stop_workers()
            raise
        num_kv_heads = model.model.layers[0].self_attn.num_kv_heads  # this rank's
        self.num_kv_blocks = num_blocks
        self.kv_store = KVStore(replace(store_config, num_blocks=num_blocks,
                                        num_kv_heads=num_kv_heads, parts=tp_size,
                                        part_heads=() if replicated else part_heads or (),
                                        replicated=replicated))
        if self.workers is not None:  # their shares of the pool map and unmap as it does
            self.workers.memory = self.kv_store.memory
            self.workers.sync_memory()  # they build their shares now, and say where
            if part_heads and self.device.type == "cpu":  # tiers and peers: every rank's heads
                self._attach_worker_parts()
        self.runner = ModelRunner(
            model, mc, block_size=config.block_size,
            kv_caches=self.kv_store.kv_caches(kv_dtype, self.device),
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len, device=self.device, seed=config.seed,
            workers=self.workers)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            block_size=config.block_size, num_blocks=num_blocks,
            max_model_len=self.max_model_len,
            enable_prefix_caching=config.enable_prefix_caching, overlap=config.overlap,
            sliding_window=mc.sliding_window if mc.windowed_everywhere else 0),
            store=self.kv_store)
        # Overlap scheduling: the helper that schedules ahead, and the step it scheduled and
        # prepared for the next step() call.
        # Expert parallelism's load balancer: steps until the next rebalance (0: off), the
        # counts at the last one.
        self._eplb_interval = config.eplb_step_interval if config.enable_eplb else 0
        self._steps_to_rebalance = self._eplb_interval
        self._counts_at_rebalance = self.expert_counts()
        self.num_rebalances = 0
        self._helper: ThreadPoolExecutor | None = None
        if config.overlap:
            self._helper = ThreadPoolExecutor(1, thread_name_prefix="xllm-schedule",
                                              initializer=_single_threaded)
        self._next: tuple[SchedulerOutput, PreparedStep] | None = None
        # Held by whoever drives the engine (AsyncEngine's thread) while it uses the
        # scheduler; the synchronous step() lets go of it while the model computes, so work
        # that only touches free and cached KV blocks runs beside the step (a KV fetch's
        # plan and adoption: AsyncEngine.call_beside_step). None: nobody else waits for it.
        self.state_lock: threading.Lock | None = None
        self._states: dict[str, _RequestState] = {}
        self._owner: dict[str, tuple[_RequestState, _Completion]] = {}
        self._ids = itertools.count()
        # TTFT/TPOT as functions of length and batch, fitted from its own steps (the PD
        # planner's speed model; instances report it in their heartbeats).
        self.speed = OnlineSpeedModel()
        self._speed_sample: SchedulerOutput | None = None  # the step _account() will time
        # While the engine has work: the model's time (the runner's run(): forward passes,
        # LM head, sampler; its busy_seconds) and the rest of the wall time, when the model
        # waits on the engine (scheduling, step inputs, outputs, stop strings, the server
        # loop between steps), for /metrics and the benchmarks.
        self.model_busy_seconds = 0.0
        self.model_idle_seconds = 0.0
        self._last_step_end: float | None = None
        # The model, tokenizer and torch's own objects live as long as the process: moved out
        # of the collector's generations, the full collections that steps' garbage triggers
        # no longer walk them (they were ~1% of a batched decode's time in a profile).
        gc.collect()
        gc.freeze()

    # ---- requests -------------------------------------------------------------------------

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def add_request(self, request_id: str, prompt: str | list[int],
                    params: SamplingParams | None = None, priority: int = 0,
                    offline: bool = False, *, generated_token_ids: list[int] | None = None,
                    generated_text: str = "", hold_kv: bool = False) -> None:
        """Queues a request. ValueError if the prompt is empty or does not fit the context.

        ``generated_token_ids`` resumes a request (n = 1) another engine started: they become
        its outputs so far, so the sampler's step (seeded draws), penalties, ``min_tokens``
        and ``max_tokens`` continue exactly as in an uninterrupted run, and stop strings
        spanning the resume point are found. ``generated_text``: the text the client already
        has; outputs carry the full text and token ids, deltas only what follows.

        ``params.structured``: the request's grammar is compiled here unless cached (submit
        it to ``self.grammars`` first to keep the compile off this thread); a resumed
        request's grammar state is rebuilt from ``generated_token_ids``. ValueError for a
        spec that does not compile."""
        params = params or SamplingParams()
        generated = [int(t) for t in generated_token_ids or ()]
        if request_id in self._states:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            try:
                text, token_ids = None, [int(t) for t in prompt]
            except (TypeError, ValueError) as e:
                raise ValueError("a prompt is text or a list of token ids (integers); got "
                                 f"{type(prompt).__name__}: {str(prompt)[:60]}") from e
        if not token_ids:
            raise ValueError("the prompt is empty; give at least one token")
        vocab = self.model_config.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}); got one outside")
        room = self.max_model_len - len(token_ids)
        if room < 1:
            raise ValueError(f"the prompt has {len(token_ids)} tokens but the context holds "
                             f"{self.max_model_len} (max_model_len); shorten the prompt")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise ValueError(f"logit_bias names token id {max(params.logit_bias)}, outside the "
                             f"vocabulary [0, {vocab})")
        if generated:
            _check_resume(generated, params, vocab, room)
        compiled = None
        if params.structured is not None:
            compiled = self.grammars.compile(params.structured)
        if params.max_tokens is None:
            params = replace(params, max_tokens=room)
        state = _RequestState(request_id, text, token_ids, params)
        if params.prompt_logprobs is not None:
            state.prompt_logprobs, state.prompt_token_ranks = [None], [None]
        for i in range(params.n):
            child_params = params if params.seed is None else replace(params, seed=params.seed + i)
            if i and params.prompt_logprobs is not None:
                # Siblings share the prompt: the first completion scores it, and the others may
                # then take its blocks as a prefix hit.
                child_params = replace(child_params, prompt_logprobs=None)
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            # Siblings wait for the first completion's prompt blocks and take them as a
            # prefix hit, so the prompt is computed once for all n.
            first = state.completions[0].request.request_id if i else None
            req = Request(child_id, token_ids, child_params, eos_token_ids=self.eos_token_ids,
                          priority=priority, offline=offline, share_prefix_with=first)
            req.hold_kv = hold_kv  # a prefill whose blocks a decode instance will fetch
            if compiled is not None:
                req.grammar = self.grammars.matcher(compiled, generated)
            completion = _Completion(req, IncrementalDetokenizer(
                self.tokenizer, token_ids, skip_special_tokens=params.skip_special_tokens))
            if params.logprobs is not None:
                completion.logprobs = []
            if generated:
                _resume(completion, generated, generated_text)
            state.completions.append(completion)
            self._owner[child_id] = (state, completion)
        self._states[request_id] = state
        for completion in state.completions:
            self.scheduler.add_request(completion.request)

    def abort_request(self, request_ids: str | list[str]) -> None:
        """Stops requests at once and frees their KV blocks."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        children = []
        for rid in ids:
            state = self._states.pop(rid, None)
            if state is None:
                continue
            for c in state.completions:
                children.append(c.request.request_id)
                self._owner.pop(c.request.request_id, None)
        if children:
            self.scheduler.abort_requests(children)

    def migrate_out(self, request_id: str) -> bool:
        """Stops a request that is decoding and keeps the full blocks of its KV held under
        its id (as a finished prefill's are), for another instance to fetch and go on from
        (a role switch hands it over). False, and nothing changes, for a request that is
        unknown, has several completions, or has not produced a token yet. No output follows
        for it: the caller ends its stream."""
        state = self._states.get(request_id)
        if state is None or len(state.completions) != 1:
            return False
        req = state.completions[0].request
        if req.status is not RequestStatus.RUNNING or not req.output_token_ids:
            return False
        req.hold_kv = True
        del self._states[request_id]
        self._owner.pop(req.request_id, None)
        self.scheduler.finish_requests(req.request_id, "length")  # held, not freed
        return True

    def has_unfinished_requests(self) -> bool:
        """Requests not yet finished, or (overlap) a step scheduled ahead: step() again."""
        return bool(self._states) or self._next is not None

    @property
    def tp_reduce_seconds(self) -> float:
        """Seconds rank 0 spent summing and gathering with the other ranks (0 without TP)."""
        if self.workers is None:
            return 0.0
        return self.workers.comm.reduce_seconds + self.runner.model.comm_seconds

    @property
    def tp_wait_seconds(self) -> float:
        """Of tp_reduce_seconds and tp_message_seconds, the seconds rank 0 waited for ranks
        that had not arrived yet: the skew of the ranks' work (an uneven head split, a rank
        still decoding its step, a slower core), not the transfer. 0 without TP."""
        if self.workers is None:
            return 0.0
        return self.workers.comm.wait_seconds - self._tp_wait_base

    @property
    def tp_message_seconds(self) -> float:
        """Seconds rank 0 spent encoding and sending step messages (0 without TP)."""
        return self.workers.comm.message_seconds if self.workers is not None else 0.0

    # ---- the step -------------------------------------------------------------------------

    def _attach_worker_parts(self) -> None:
        """Lets the KV store reach whole blocks: the workers' shares of the pool mapped here
        (one host), or their part servers connected (ranks on other hosts)."""
        assert self.workers is not None
        c = self.kv_store.config
        per = c.part_regions
        if c.part_segment(0) != c.segment_bytes:
            raise RuntimeError(f"rank 0's KV segment is {c.segment_bytes} bytes, its part "
                               f"was computed as {c.part_segment(0)}")
        for rank, (_, _, _, count, seg, _) in enumerate(self.workers.parts, 1):
            if count != per or seg != c.part_segment(rank):
                raise RuntimeError(f"tensor-parallel rank {rank} reports {count} KV regions of "
                                   f"{seg}-byte segments; expected {per} of "
                                   f"{c.part_segment(rank)}")
        if self.config.tp_master is not None:
            comm = self.workers.comm.comm
            self.kv_store.attach_link(PartLink(
                [(comm.peer_host(rank), port)
                 for rank, (*_, port) in enumerate(self.workers.parts, 1)],
                [c.part_bytes(rank) for rank in range(1, c.parts)],
                token=self.workers.part_token))
            return
        where = [(pid, fd, region_bytes) for pid, fd, region_bytes, *_ in self.workers.parts]
        maps, regions = PeerMemory.parts(where, per)
        self.kv_store.attach_parts(regions, keep=maps, where=where)

    def maintain(self) -> float | None:
        """Background upkeep of the KV store between steps (publishing tier writes, giving
        idle KV memory back); returns the seconds until it is next due, None when nothing is
        pending. Idle callers sleep that long at most. Under tensor parallelism it also checks
        that every worker is alive (RuntimeError if one died: the engine cannot go on), at
        least once a second."""
        if self.workers is not None:
            if not self.workers.alive():
                raise RuntimeError("a tensor-parallel worker died while the engine was idle"
                                   f"{self.workers.worker_logs()}")
            due = self.kv_store.maintain()
            self.workers.sync_memory()  # memory given back: the workers give theirs too
            return 1.0 if due is None else min(due, 1.0)
        return self.kv_store.maintain()

    def close(self) -> None:
        """Stops the helper thread (overlap), the workers (tensor parallelism) and the KV
        store; idempotent. Call from the thread that built the engine: it unpins that
        thread."""
        if self._helper is not None:
            self._helper.shutdown()
        if self.kv_store.link is not None and self.workers is not None and self.workers.alive():
            self.kv_store.flush()  # write-backs read the remote ranks' parts: before they stop
        self._stop_workers()
        self.grammars.close()
        self.kv_store.close()

    def _stop_workers(self) -> None:
        if self.workers is not None:
            self.workers.close()
        if self._affinity is not None:
            os.sched_setaffinity(0, self._affinity)
            torch.set_num_threads(len(self._affinity))
            self._affinity = None

    # ---- expert parallelism ------------------------------------------------------------------

    @property
    def placement(self) -> Placement | None:
        """Where the MoE layers' experts live (expert parallelism), else None."""
        return self.runner.model.placement

    def expert_counts(self) -> np.ndarray:
        """[MoE layers, experts]: tokens routed to each expert since start."""
        return self.runner.model.expert_counts()

    def rebalance_experts(self, load: np.ndarray | None = None) -> Placement:
        """Recomputes the expert placement (DeepSeek's EPLB method, xllm.layers.eplb) from
        ``load`` [MoE layers, experts], by default the tokens each expert got since the last
        rebalance, and applies it on every rank before the next step: the workers first
        (a message in the step stream), then this rank. Each rank reads the experts it gains
        from the checkpoint. Outputs stay those of the same model (only the order in which
        the ranks' parts are summed changes). Returns the new placement."""
        current = self.placement
        if current is None:
            raise ValueError("rebalance_experts needs expert parallelism "
                             "(enable_expert_parallel with tensor_parallel_size >= 2)")
        counts = self.expert_counts()
        if load is None:
            load = counts - self._counts_at_rebalance
        load = np.asarray(load, dtype=np.float64)
        if load.shape != counts.shape:
            raise ValueError(f"load must be [MoE layers, experts] = {counts.shape}, got "
                             f"{load.shape}")
        mc = self.model_config
        placement = rebalance_experts(load + 1e-6, current.num_physical, mc.n_group, 1,
                                      current.num_ranks)
        assert self.workers is not None
        self.workers.send_placement(placement.phy2log)
        read = self.runner.model.apply_placement(placement.phy2log)
        self._counts_at_rebalance = counts
        self.num_rebalances += 1
        logger.info("experts rebalanced (%d read on rank 0); max/mean rank load %.2f -> %.2f",
                    read, _imbalance(load, current), _imbalance(load, placement))
        return placement

    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        if self._eplb_interval:
            self._steps_to_rebalance -= 1
            if self._steps_to_rebalance <= 0:
                self._steps_to_rebalance = self._eplb_interval
                self.rebalance_experts()
        busy_before = self.runner.busy_seconds
        # Before scheduling: finished write-backs published, landed prefetches in the prefix
        # cache (an admission whose prefetch is still going waits for it), idle memory freed.
        self.kv_store.maintain(busy=True)
        if self._helper is not None:
            return self._step_overlap(start, busy_before)
        out = self.scheduler.schedule()
        if not out.scheduled:
            self._last_step_end = None
            return []
        t0 = time.perf_counter()
        step = self.runner.prepare(out, send=True)
        self.runner.complete(step)
        lock = self.state_lock
        if lock is None:
            result = self.runner.run(step)
        else:  # the requests and their block tables are read: only the model runs now
            lock.release()
            try:
                result = self.runner.run(step)
            finally:
                lock.acquire()
        self._update(out, result, time.perf_counter() - t0)
        outputs = self._emit(out, result)
        self._account(start, busy_before)
        return outputs

    def _step_overlap(self, start: float, busy_before: float) -> list[RequestOutput]:
        """step() with the next step scheduled and prepared on the helper thread while this
        one computes (see the module doc)."""
        ahead = self._next
        self._next = None
        if ahead is not None and all(item.request.is_finished for item in ahead[0].scheduled):
            # Everything it held finished (stop strings, aborts) since it was scheduled.
            self.scheduler.update_from_output(ahead[0], [[] for _ in ahead[0].scheduled])
            ahead = None
        if ahead is None:
            ahead = self._schedule_ahead()
            if ahead is None:
                self._last_step_end = None
                return []
        out, step = ahead
        self.runner.complete(step)  # the tokens its decodes waited for are in by now
        store = self.kv_store
        store.step_began()  # (a tier load the helper starts waits for this step to end)
        helper = self._helper.submit(self._schedule_ahead)
        try:
            result = self.runner.run(step)
        except BaseException:
            store.step_ended()
            helper.exception()  # let it finish; the model's error is the one to report
            raise
        store.step_ended()
        self._next = helper.result()
        self._update(out, result, step.seconds)
        outputs = self._emit(out, result)
        self._account(start, busy_before)
        return outputs

    def _schedule_ahead(self) -> tuple[SchedulerOutput, PreparedStep] | None:
        out = self.scheduler.schedule()
        return (out, self.runner.prepare(out)) if out.scheduled else None

    def _update(self, out: SchedulerOutput, result: RunnerOutput, elapsed: float) -> None:
        """A computed step's tokens into the scheduler (and its timing into the models)."""
        if out.prefills:  # the prompt speed, for the KV store's swap-or-recompute choice
            self.kv_store.observe_prefill(out.num_batched_tokens - len(out.decodes), elapsed)
        self._speed_sample = out
        if result.prompt_logprobs is not None:
            self._absorb_prompt_logprobs(out, result.prompt_logprobs)
        if result.pooled is not None:
            self._absorb_pooled(out, result.pooled)
        self.scheduler.update_from_output(out, result.sampled_token_ids)

    def _emit(self, out: SchedulerOutput, result: RunnerOutput) -> list[RequestOutput]:
        """Detokenizes a step's tokens, applies stop strings, returns the outputs."""
        now = time.monotonic()
        touched: dict[str, _RequestState] = {}
        for item, new_ids, lp in zip(out.scheduled, result.sampled_token_ids, result.logprobs,
                                     strict=True):
            if not new_ids:
                continue
            owner = self._owner.get(item.request.request_id)
            if owner is None:
                continue
            state, completion = owner
            if completion.finish_reason is not None:
                continue  # overlap: a stop string ended it after this step was scheduled
            if state.metrics.first_token_time is None:
                state.metrics.first_token_time = now
            self._absorb(completion, new_ids, lp)
            touched[state.request_id] = state
        outputs = []
        for state in touched.values():
            scored = state.prompt_logprobs
            if scored is not None and len(scored) < len(state.prompt_token_ids):
                # A sibling (n > 1) sampled before the first completion finished scoring the
                # prompt: hold its tokens for the next output, so every output a caller sees
                # has the complete prompt logprobs (and the list is never appended to after).
                continue
            outputs.append(self._make_output(state))
            if state.finished:
                state.metrics.finished_time = now
                del self._states[state.request_id]
                for c in state.completions:
                    self._owner.pop(c.request.request_id, None)
        return outputs

    def _account(self, start: float, busy_before: float) -> None:
        """The model's busy and idle seconds over this step() call (and the gap before it,
        when the engine had work then)."""
        end = time.perf_counter()
        busy = self.runner.busy_seconds - busy_before
        wall = end - start
        if self._last_step_end is not None:  # back to back: the gap was the engine's too
            wall += start - self._last_step_end
        self.model_busy_seconds += busy
        self.model_idle_seconds += wall - busy
        self._last_step_end = end if self.has_unfinished_requests() else None
        out, self._speed_sample = self._speed_sample, None
        if out is not None:
            self._add_speed_sample(out, 1e3 * wall)

    def _add_speed_sample(self, out: SchedulerOutput, ms: float) -> None:
        """A step's whole cycle (``ms``: the model, the engine's own work and the gap before
        it when the engine had work then, what the next step waits for) into the speed
        model: a step sample, and a prefill or decode sample when it is one kind alone."""
        decodes = len(out.decodes)
        ctx = sum(d.num_computed_tokens for d in out.decodes)
        _, attn = chunk_attention([(p.num_computed_tokens, p.num_new_tokens)
                                   for p in out.prefills])
        sampled = decodes + sum(p.samples for p in out.prefills)
        self.speed.add_step(out.num_batched_tokens, decodes, sampled, attn, ctx, ms)
        if not out.prefills:
            self.speed.add_decode(decodes, ctx // decodes, ms)
        elif not decodes and len(out.prefills) == 1:
            one = out.prefills[0]
            if one.num_computed_tokens == 0 and one.samples:
                self.speed.add_prefill(one.num_new_tokens, ms)

    def _absorb_prompt_logprobs(self, out: SchedulerOutput,
                                scored: list[PromptLogprobs | None]) -> None:
        for item, chunk in zip(out.scheduled, scored, strict=True):
            owner = self._owner.get(item.request.request_id) if chunk is not None else None
            if owner is None or owner[0].prompt_logprobs is None:
                continue
            state = owner[0]
            entries, ranks = state.prompt_logprobs, state.prompt_token_ranks
            assert entries is not None and ranks is not None
            # A prompt preempted mid-way is recomputed from its start: keep the first scores.
            skip = len(entries) - chunk.start
            if skip < 0:
                raise RuntimeError(f"request {state.request_id!r}: prompt tokens "
                                   f"{len(entries)}..{chunk.start - 1} were never scored")
            prompt = state.prompt_token_ids
            for j in range(skip, len(chunk.logprobs)):
                entry = dict(chunk.top[j])
                entry[prompt[chunk.start + j]] = chunk.logprobs[j]
                entries.append(entry)
                ranks.append(chunk.ranks[j])

    def _absorb_pooled(self, out: SchedulerOutput,
                       pooled: list[tuple[int, torch.Tensor] | None]) -> None:
        """Embedding requests' chunks: summed (mean) or taken (last); the embedding is made
        once the prompt's last position is in. A prompt preempted mid-way restarts at 0."""
        for item, piece in zip(out.scheduled, pooled, strict=True):
            owner = self._owner.get(item.request.request_id) if piece is not None else None
            if owner is None:
                continue
            state = owner[0]
            start, vector = piece
            n = item.num_new_tokens
            mean = state.params.pooling == "mean"
            if mean:
                state.pooled = vector if start == 0 or state.pooled is None else (
                    state.pooled + vector)
            else:
                state.pooled = vector
            end = start + n
            if end == len(state.prompt_token_ids):
                v = state.pooled / end if mean else state.pooled
                state.embedding = torch.nn.functional.normalize(v, dim=0).tolist()

    def _absorb(self, completion: _Completion, new_ids: list[int], lp) -> None:  # noqa: ANN001
        req = completion.request
        params = req.sampling_params
        if completion.logprobs is not None and lp is not None:
            entry = {tid: val for tid, val in lp.top}
            entry[lp.token_id] = lp.logprob
            completion.logprobs.append(entry)
            completion.cumulative_logprob += lp.logprob
        before = len(completion.detokenizer.text)
        if (req.status is RequestStatus.FINISHED_STOPPED and new_ids
                and new_ids[-1] in req.stopping_token_ids
                and not params.include_stop_str_in_output):
            # The EOS or stop token that ended it is not text of the answer (as vLLM): with
            # skip_special_tokens off it would otherwise read "<|im_end|>" at the end.
            new_ids = new_ids[:-1]
        completion.detokenizer.step(new_ids)
        hit = None
        if params.stop:
            text = completion.detokenizer.text
            longest = max(len(s) for s in params.stop)
            hit = _find_stop(text, params.stop, max(0, before - longest + 1))
        if hit is not None:
            index, stop = hit
            completion.text_end = index + (len(stop) if params.include_stop_str_in_output else 0)
            completion.finish_reason, completion.stop_reason = "stop", stop
            if not req.is_finished:
                self.scheduler.finish_requests([req.request_id], "stop", stop)
        elif req.is_finished:
            completion.finish_reason = req.finish_reason
            completion.stop_reason = req.stop_reason
        if completion.finish_reason is not None:
            completion.detokenizer.finish()  # flush a held-back partial character

    def _visible_text(self, completion: _Completion) -> str:
        text = completion.detokenizer.text
        if completion.text_end is not None:
            return text[:completion.text_end]
        params = completion.request.sampling_params
        if completion.finish_reason is None and params.stop:
            # Hold back a tail that could still grow into a stop string.
            hold = max(len(s) for s in params.stop) - 1
            return text[:max(completion.emitted_chars, len(text) - hold)]
        return text

    def _make_output(self, state: _RequestState) -> RequestOutput:
        outputs, deltas = [], {}
        for i, c in enumerate(state.completions):
            text = self._visible_text(c)
            token_ids = list(c.request.output_token_ids)
            deltas[i] = (text[c.emitted_chars:], token_ids[c.emitted_tokens:])
            c.emitted_chars, c.emitted_tokens = len(text), len(token_ids)
            outputs.append(CompletionOutput(
                index=i, text=text, token_ids=token_ids, finish_reason=c.finish_reason,
                stop_reason=c.stop_reason, logprobs=c.logprobs,
                cumulative_logprob=c.cumulative_logprob if c.logprobs is not None else None))
        return RequestOutput(
            request_id=state.request_id, prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids, outputs=outputs, finished=state.finished,
            num_cached_tokens=max(c.request.num_cached_tokens for c in state.completions),
            metrics=state.metrics, deltas=deltas, prompt_logprobs=state.prompt_logprobs,
            prompt_token_ranks=state.prompt_token_ranks,
            embedding=state.embedding if state.finished else None)


def _single_threaded() -> None:
    """The overlap helper's thread: its torch and native calls run on it alone, never
    waking a second OpenMP team onto the model's cores (which halves the model's speed on a
    CPU it fills). torch first: its lazy per-thread set-up would undo the setting."""
    torch.get_num_threads()
    _C.set_thread_parallelism(1)


def _whole_block_parts(mc: ModelConfig, kv_tensors: int, size: int) -> tuple[int, ...]:
    """Each rank's KV heads under tensor parallelism: the parts of a whole block (KV tiers
    and blocks between instances move them). A latent cache (MLA, one tensor a layer) has
    one "head", the same on every rank."""
    from types import SimpleNamespace

    if kv_tensors != 2:
        return (1,) * size
    return tuple(head_shard(mc.num_attention_heads, mc.num_key_value_heads,
                            SimpleNamespace(size=size, rank=r)).num_kv_heads  # type: ignore[arg-type]
                 for r in range(size))


def _tp_backend(config: EngineConfig) -> str:
    """What the ranks' sums go through (EngineConfig.tp_backend resolved)."""
    if config.tp_backend == "gloo":
        return "gloo"
    return "native" if config.device == "cpu" else "nccl"


def _kv_on_demand(device: torch.device) -> bool:
    """Whether the KV pool's memory is mapped as blocks come into use: always on the CPU; on
    CUDA where the driver's VMM API is present, unless ``XLLM_CUDA_VMM=0`` asks for one
    allocation up front (the pool over cuMemMap has not run on a GPU in this project's
    sessions yet: the way back if it fails there)."""
    if device.type == "cpu":
        return True
    if device.type != "cuda" or os.environ.get("XLLM_CUDA_VMM", "1") == "0":
        return False
    from xllm.ops.cuda_vmm import supported

    return supported(device.index or 0)


def _kv_identity(model_dir, dtype: torch.dtype, kv_dtype: torch.dtype,  # noqa: ANN001
                 weight_format: str) -> tuple[tuple[str, str], ...]:
    """What KV bytes depend on beyond their shape: the model's config and weight files (name,
    size and a hash of their first and last MiB), the compute and cache dtypes and the weight
    format. A disk tier written under another identity is never read."""
    import hashlib

    items = [("dtype", str(dtype)), ("kv_dtype", str(kv_dtype)),
             ("weight_format", weight_format)]
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        if path.suffix not in (".json", ".safetensors", ".gguf", ".bin"):
            continue
        digest = hashlib.sha256()
        size = path.stat().st_size
        with open(path, "rb") as f:
            digest.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(size - (1 << 20))
                digest.update(f.read(1 << 20))
        items.append((str(path.relative_to(model_dir)), f"{size}:{digest.hexdigest()[:16]}"))
    return tuple(items)


def _check_resume(generated: list[int], params: SamplingParams, vocab: int, room: int) -> None:
    if params.n != 1:
        raise ValueError(f"generated_token_ids resumes one completion; n must be 1, got {params.n}")
    if min(generated) < 0 or max(generated) >= vocab:
        raise ValueError(f"generated_token_ids must be in [0, {vocab}); got one outside")
    limit = room if params.max_tokens is None else min(room, params.max_tokens)
    if len(generated) >= limit:
        raise ValueError(f"generated_token_ids holds {len(generated)} tokens, not fewer than "
                         f"the request's limit ({limit}, from max_tokens and the context): "
                         "nothing is left to generate")


def _resume(completion: _Completion, generated: list[int], sent_text: str) -> None:
    """Makes ``generated`` the completion's outputs so far, as if this engine had sampled
    them; the client has ``sent_text`` of their text (it may lag: a held-back partial
    character or stop-string tail), so the first delta starts there."""
    for t in generated:
        completion.request.append_output_token(t)
    completion.detokenizer.step(generated)
    text = completion.detokenizer.text
    completion.emitted_tokens = len(generated)
    completion.emitted_chars = len(sent_text) if text.startswith(sent_text) else len(text)


def _find_stop(text: str, stops: list[str], start: int) -> tuple[int, str] | None:
    """The earliest stop string in text[start:], as (index, stop)."""
    best = None
    for stop in stops:
        index = text.find(stop, start)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    return best


def _imbalance(load: np.ndarray, placement: Placement) -> float:
    """Max over mean rank load, averaged over the MoE layers (1.0: perfectly even)."""
    ranks = rank_loads(load, placement)
    mean = ranks.mean(1)
    return float(np.mean(ranks.max(1) / np.where(mean > 0, mean, 1.0)))

