"""Scheduler: continuous batching over the paged KV cache, vLLM v1 style.

No prefill or decode phase: each request has ``num_computed_tokens`` of ``num_tokens`` and
every step spends one token budget (``max_num_batched_tokens``) on their next tokens, in
this order:

1. online running requests (a decode's one token, or the next chunk of a prompt),
2. online waiting requests, most important first, the last one chunked to fit the budget,
3. offline running requests,
4. offline waiting requests,

so offline work only gets the budget, seats (``max_num_seqs``) and blocks online work
leaves. When a running request needs a block the pool lacks, the least important running
request (offline first, then larger ``priority``, then later arrival) is preempted by
recompute; if that is the request itself, scheduling stops for this step. A waiting request
may preempt running requests it outranks by class or priority (an online arrival evicts
offline work), never ones of its own class and priority.

Siblings (n > 1): a request with ``share_prefix_with`` waits, outside the queue, until its
leader's prompt blocks are cached, then takes them as a prefix hit.

Overlap scheduling (``SchedulerConfig.overlap``): schedule() may be called again while the
previous output is still computing, before its update_from_output. Each request counts the
tokens of such steps (``num_inflight_tokens``, computed after ``num_computed_tokens``) and the
tokens they sample (``num_pending_outputs``); the next step continues after them, a decode
whose input token is the one being sampled (the runner fills it in once known). A request
whose in-flight step will end it by length is not scheduled again. One finished while a step
computing it is in flight (a stop string, an abort) keeps its blocks until that step is
through update_from_output: nothing else may write them while the step can. Tokens, stops
and blocks come out exactly as without overlap; only the decisions of a step lag one step
behind what the previous one sampled.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

from xllm.ops.block_pool import BlockPool, BlockPoolProtocol
from xllm.scheduler.config import SchedulerConfig
from xllm.scheduler.kv_cache_manager import KVCacheManager
from xllm.scheduler.output import ScheduledRequest, SchedulerOutput, SchedulerStats
from xllm.scheduler.policy import WaitingQueue, importance_key, least_important, outranks
from xllm.scheduler.request import FINISH_REASONS, Request, RequestStatus

if TYPE_CHECKING:
    from xllm.kvcache.store import KVStore

__all__ = ["Scheduler"]

_RUNNING = RequestStatus.RUNNING
_PREEMPTED = RequestStatus.PREEMPTED
_STOPPED = RequestStatus.FINISHED_STOPPED
_LENGTH = RequestStatus.FINISHED_LENGTH


class _Step:
    """One schedule() call's working state."""

    __slots__ = ("budget", "scheduled", "preempted", "stopped", "blocked")

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.scheduled: dict[str, ScheduledRequest] = {}  # insertion order = row order
        self.preempted: dict[str, None] = {}  # ordered set
        self.stopped = False  # a running request preempted itself: schedule nothing more
        self.blocked = False  # a waiting head could not be admitted: admit no one after it


class Scheduler:
    """Decides, step by step, which tokens of which requests the model computes."""

    def __init__(
        self,
        config: SchedulerConfig,
        block_pool: BlockPoolProtocol | None = None,
        store: KVStore | None = None,
    ) -> None:
        if not isinstance(config, SchedulerConfig):
            raise ValueError(f"config must be a SchedulerConfig, got {type(config).__name__}")
        if block_pool is None:
            block_pool = store.pool if store is not None else BlockPool(config.num_blocks)
        elif block_pool.num_blocks != config.num_blocks:
            raise ValueError(
                f"block_pool has {block_pool.num_blocks} blocks but config.num_blocks is "
                f"{config.num_blocks}; make them agree"
            )
        self.config = config
        self.block_size = config.block_size
        self.max_seq_len = config.max_seq_len
        self.kv = KVCacheManager(
            block_pool, config.block_size, config.enable_prefix_caching, store=store,
            window=config.sliding_window,
        )
        self.requests: dict[str, Request] = {}  # every unfinished request
        # Indexed by request.offline: running requests in admission order, waiting queues.
        self._running: tuple[dict[str, Request], dict[str, Request]] = ({}, {})
        self._waiting = (WaitingQueue(), WaitingQueue())
        # Leader id -> [(sibling, tokens the leader must have computed first)].
        self._deferred: dict[str, list[tuple[Request, int]]] = {}
        self._num_waiting = 0  # queued + deferred
        self._num_preempted = 0
        self._next_seq = 0
        # Outputs scheduled and not yet through update_from_output, oldest first: at most one,
        # or two with overlap scheduling.
        self._outstanding: deque[SchedulerOutput] = deque()
        self._max_outstanding = 2 if config.overlap else 1
        # Finished while a step computing them is in flight: the blocks they still hold are
        # freed when their last such step is through update_from_output (a hold took its
        # full blocks already).
        self._release_later: dict[str, Request] = {}

    # ---- metrics ---------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running[0]) + len(self._running[1])

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def num_preempted(self) -> int:
        """Preemptions since start (a request preempted twice counts twice)."""
        return self._num_preempted

    @property
    def kv_cache_usage(self) -> float:
        return self.kv.usage

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Prompt tokens served from the prefix cache / tokens looked up, over admissions."""
        return self.kv.prefix_cache_hit_rate

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=self.num_running,
            num_waiting=self._num_waiting,
            num_preempted=self._num_preempted,
            kv_cache_usage=self.kv.usage,
            prefix_cache_queried_tokens=self.kv.queried_tokens,
            prefix_cache_hit_tokens=self.kv.hit_tokens,
        )

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    def running_requests(self) -> list[Request]:
        return [*self._running[0].values(), *self._running[1].values()]

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached block; refused (False) while any request holds blocks."""
        return self.kv.reset_prefix_cache()

    # ---- requests in -----------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queues a new request. ValueError for a duplicate id, a request already added, or
        a prompt that could never run (longer than max_model_len, or more blocks than the
        pool has). A request may arrive with outputs already (resumed from another engine):
        its prompt and outputs are then computed together, as after a preemption."""
        if not isinstance(request, Request):
            raise ValueError(f"request must be a Request, got {type(request).__name__}")
        rid = request.request_id
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use by an unfinished request")
        if request.seq >= 0 or request.status is not RequestStatus.WAITING:
            raise ValueError(f"request {rid!r} was already added to a scheduler; make a new one")
        cfg = self.config
        n = request.num_tokens  # the prompt, plus the outputs of a resumed request
        if n > cfg.max_model_len:
            raise ValueError(
                f"request {rid!r}: prompt has {n} tokens, more than max_model_len = "
                f"{cfg.max_model_len}; shorten the prompt"
            )
        blocks = -(-n // cfg.block_size)
        if blocks > cfg.num_usable_blocks:
            raise ValueError(
                f"request {rid!r}: prompt of {n} tokens needs {blocks} KV blocks of "
                f"{cfg.block_size} tokens, but the pool has only {cfg.num_usable_blocks}; "
                "shorten the prompt or give the KV cache more blocks"
            )
        request.seq = self._next_seq
        self._next_seq += 1
        self.requests[rid] = request
        self._num_waiting += 1
        wait = self._sibling_wait(request)
        if wait is None:
            self._waiting[request.offline].push(request)
        else:
            self._deferred.setdefault(wait[0].request_id, []).append((request, wait[1]))
        if self.kv.store is not None:
            # Its prefix in a tier below the pool starts landing now, while steps run; keep
            # a step's worth of blocks free for the running requests.
            self.kv.prefetch(request, min_free_blocks=cfg.max_num_batched_tokens
                             // cfg.block_size + self.num_running)

    def _sibling_wait(self, request: Request) -> tuple[Request, int] | None:
        """(leader, tokens it must compute first) when request should wait for its leader's
        prompt blocks, else None."""
        if request.share_prefix_with is None or not self.kv.enable_prefix_caching:
            return None
        leader = self.requests.get(request.share_prefix_with)
        if leader is None or leader is request:
            return None
        a, b = leader.prompt_token_ids, request.prompt_token_ids
        common = 0
        limit = min(len(a), len(b))
        while common < limit and a[common] == b[common]:
            common += 1
        bs = self.block_size
        need = min(common // bs, (request.num_tokens - 1) // bs) * bs
        if need == 0 or leader.num_computed_tokens >= need:
            return None
        return leader, need

    def _release_siblings(self, leader: Request) -> None:
        """Queues the siblings deferred behind leader that no longer need to wait: all of them
        when leader stops running (preempted or finished), else those it has caught up."""
        waiting = self._deferred.pop(leader.request_id, None)
        if not waiting:
            return
        computed = leader.num_computed_tokens if leader.status is _RUNNING else None
        still: list[tuple[Request, int]] = []
        for sibling, need in waiting:
            if sibling.is_finished:
                continue
            if computed is not None and computed < need:
                still.append((sibling, need))
            else:
                self._waiting[sibling.offline].push(sibling)
        if still:
            self._deferred[leader.request_id] = still

    # ---- requests out ----------------------------------------------------------------

    def finish_requests(
        self, request_ids: Iterable[str] | str, reason: str, stop_reason: int | str | None = None
    ) -> list[Request]:
        """Finishes requests at once ("stop" for a stop string the engine found, "length",
        "abort"), freeing their blocks. Unknown or finished ids are ignored (they may have
        finished in the same step). Returns the requests finished by this call."""
        status = FINISH_REASONS.get(reason)
        if status is None:
            raise ValueError(f"reason must be one of {sorted(FINISH_REASONS)}, got {reason!r}")
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        done = []
        for rid in request_ids:
            request = self.requests.get(rid)
            if request is not None:
                self._finish(request, status, stop_reason)
                done.append(request)
        return done

    def abort_requests(self, request_ids: Iterable[str] | str) -> list[Request]:
        return self.finish_requests(request_ids, "abort")

    def _finish(
        self, request: Request, status: RequestStatus, stop_reason: int | str | None
    ) -> None:
        if request.status is _RUNNING:
            del self._running[request.offline][request.request_id]
            hold = request.hold_kv and status is not RequestStatus.FINISHED_ABORTED
            if self._max_outstanding > 1 and request.num_inflight_tokens:
                # Overlap: a step in flight still writes its KV. A hold takes the full blocks
                # now (that step cannot write those); the rest wait for the step.
                if hold:
                    self.kv.hold(request, keep_rest=True)
                self._release_later[request.request_id] = request
            elif hold:
                self.kv.hold(request)  # a prefill's prompt, kept for its decode instance
            else:
                self.kv.free(request)
        else:  # waiting: lazily out of its queue, or out of a leader's deferred list
            self._waiting[request.offline].discard(request)
            self._num_waiting -= 1
        request.status = status
        request.stop_reason = stop_reason
        del self.requests[request.request_id]
        self._release_siblings(request)

    # ---- one step --------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Picks this step's tokens. The output must be passed to update_from_output before
        the next schedule() -- or, with overlap scheduling, before the one after."""
        if len(self._outstanding) >= self._max_outstanding:
            raise RuntimeError(
                "schedule() called again before update_from_output() consumed the previous "
                "SchedulerOutput (on a failed step, abort its requests and pass [] for each)"
            )
        step = _Step(self.config.max_num_batched_tokens)
        for offline in (False, True):
            self._schedule_running(step, offline)
            self._schedule_waiting(step, offline)
        decodes, prefills = [], []
        for sr in step.scheduled.values():
            (decodes if sr.num_new_tokens == 1 and sr.samples else prefills).append(sr)
            request = sr.request
            request.num_inflight_tokens += sr.num_new_tokens
            if sr.samples:
                request.num_pending_outputs += 1
        out = SchedulerOutput(
            decodes=decodes,
            prefills=prefills,
            preempted_ids=list(step.preempted),
            num_batched_tokens=self.config.max_num_batched_tokens - step.budget,
        )
        if decodes or prefills:  # an empty step has nothing to consume
            self._outstanding.append(out)
        return out

    def _schedule_running(self, step: _Step, offline: bool) -> None:
        # The hot loop of every step (one pass per running request): locals, no calls into
        # the pool unless the request crosses into a new block.
        bs = self.block_size
        allocate = self.kv.allocate_slots
        window = self.kv.window
        scheduled = step.scheduled
        for request in list(self._running[offline].values()):
            budget = step.budget
            if budget <= 0 or step.stopped:
                return
            if request.status is not _RUNNING:  # preempted earlier in this step
                continue
            if window and request.num_computed_tokens - window + 1 >= (
                    request.num_released_blocks + 1) * bs:
                self.kv.release_outside_window(request)
            computed = request.num_computed_tokens + request.num_inflight_tokens
            num_tokens = len(request.all_token_ids)
            pending = request.num_pending_outputs
            if pending:  # overlap: continues after a step in flight
                num_tokens += pending
                max_out = request.max_output_tokens
                if num_tokens >= self.max_seq_len or (
                    max_out is not None
                    and len(request.output_token_ids) + pending >= max_out
                ):
                    continue  # that step ends it by length
            n = num_tokens - computed
            if n > budget:
                n = budget
            if len(request.block_ids) * bs >= computed + n:
                new_blocks: list[int] = []
            else:
                while True:
                    new_blocks = allocate(request, n)  # type: ignore[assignment]
                    if new_blocks is not None:
                        break
                    # least_important() is never more important than request; when it is
                    # the request itself nothing can make room for it this step.
                    victim = least_important(self._running[1].values(), self._running[0].values())
                    assert victim is not None
                    self._preempt(step, victim)
                    if victim is request:
                        step.stopped = True
                        return
                budget = step.budget  # preempting a request scheduled earlier refunds it
            scheduled[request.request_id] = ScheduledRequest(
                request, n, computed, computed + n == num_tokens, False, new_blocks
            )
            step.budget = budget - n

    def _schedule_waiting(self, step: _Step, offline: bool) -> None:
        queue = self._waiting[offline]
        online_queue = self._waiting[False]
        while not step.stopped and not step.blocked:
            request = queue.peek()
            if request is None:
                return
            if offline and len(online_queue):
                # Online work queued since phase 2 (siblings released by a preemption or a
                # finish) still comes before offline admissions.
                step.blocked = True
                return
            # The head waits, and nothing behind it jumps the line: not in its queue, and not
            # in the offline queue either, even if a later preemption refunds some budget.
            if (
                step.budget <= 0
                or request.request_id in step.preempted
                or not self._admit(step, request)
            ):
                step.blocked = True
                return

    def _admit(self, step: _Step, request: Request) -> bool:
        """Admits the head of a waiting queue, preempting requests it outranks if it must."""
        kv = self.kv
        victims: list[Request] | None = None
        if request.num_inflight_tokens or request.request_id in self._release_later:
            # Overlap: preempted while a step computing it is in flight (it is readmitted
            # once that step's outputs are in), or a new request under the id of one whose
            # blocks are not yet released.
            return False
        if self.num_running >= self.config.max_num_seqs:  # no seat: cheap refusal first
            victims = self._outranked_by(request)
            if not victims:
                return False
        computed = kv.get_computed_blocks(request)
        n = min(request.num_tokens - computed.num_tokens, step.budget)
        new_blocks = None if victims else kv.allocate_slots(request, n, computed)
        if new_blocks is None:
            # Slow path: make room only if preempting what request outranks can suffice.
            if victims is None:
                victims = self._outranked_by(request)
            room = kv.num_free_blocks + sum(len(v.block_ids) - v.num_released_blocks
                                            for v in victims)
            if room < kv.num_blocks_needed(request, n, computed):
                return False
            victims.sort(key=importance_key, reverse=True)  # least important first
            for victim in victims:
                self._preempt(step, victim)
                new_blocks = kv.allocate_slots(request, n, computed)
                if new_blocks is not None:
                    break
            if new_blocks is None:  # shared blocks made the estimate optimistic
                return False
        self._waiting[request.offline].remove(request)
        self._num_waiting -= 1
        hit_tokens = kv.load_tier_hits(request, computed)  # tier hits land in the new blocks
        if request.num_preemptions == 0:
            request.num_cached_tokens = hit_tokens
        request.num_computed_tokens = hit_tokens
        request.status = _RUNNING
        self._running[request.offline][request.request_id] = request
        self._record(step, request, n, new_blocks, is_new=True)
        return True

    def _outranked_by(self, request: Request) -> list[Request]:
        """Running requests that request may preempt (it outranks them by class/priority)."""
        return [v for group in self._running for v in group.values() if outranks(request, v)]

    def _record(
        self, step: _Step, request: Request, n: int, new_blocks: list[int], is_new: bool
    ) -> None:
        computed = request.num_computed_tokens
        step.scheduled[request.request_id] = ScheduledRequest(
            request, n, computed, computed + n == request.num_tokens, is_new, new_blocks
        )
        step.budget -= n

    def _preempt(self, step: _Step, victim: Request) -> None:
        """Preemption: blocks freed, outputs kept, back into its class's queue under its
        original key. Its tokens are recomputed with the prompt, except what the prefix cache
        still holds at readmission -- and, with a tier below the pool, what the KV manager
        swapped out (written down) when that costs less than recomputing. With overlap, a
        victim a step in flight still computes gives its blocks back at once all the same:
        only later steps of this scheduler can take them, and they run after that one."""
        rid = victim.request_id
        del self._running[victim.offline][rid]
        undone = step.scheduled.pop(rid, None)
        if undone is not None:  # already scheduled this step: give its tokens back
            step.budget += undone.num_new_tokens
        self.kv.free(victim, preempted=True)
        victim.num_computed_tokens = 0
        victim.status = RequestStatus.PREEMPTED
        victim.num_preemptions += 1
        self._num_preempted += 1
        self._waiting[victim.offline].push(victim)
        self._num_waiting += 1
        step.preempted[rid] = None
        self._release_siblings(victim)

    # ---- after the model ran ---------------------------------------------------------

    def update_from_output(
        self, out: SchedulerOutput, sampled_token_ids: list[list[int]]
    ) -> list[Request]:
        """Advances each scheduled request by its computed tokens, appends its sampled
        tokens ([] for a step that does not sample), applies token-level stop conditions,
        registers newly full blocks in the prefix cache and frees finished requests' blocks.
        Returns the requests that finished in this step. Checks everything before changing
        anything."""
        if out.is_empty:  # never outstanding: nothing to consume
            return []
        if not self._outstanding or out is not self._outstanding[0]:
            raise ValueError(
                "out must be the oldest SchedulerOutput returned by schedule() and not yet "
                "consumed; each output can be consumed only once"
            )
        scheduled = out.scheduled
        if len(sampled_token_ids) != len(scheduled):
            raise ValueError(
                f"sampled_token_ids has {len(sampled_token_ids)} entries but the step "
                f"scheduled {len(scheduled)} requests; give one list per scheduled request"
            )
        for i, (sr, tokens) in enumerate(zip(scheduled, sampled_token_ids, strict=True)):
            if sr.request.status > _PREEMPTED:
                continue  # aborted or stopped by the engine while the step ran
            if len(tokens) == 1 and sr.samples:  # the usual case, checked without a generator
                t = tokens[0]
                if type(t) is int and t >= 0:
                    continue
            if sr.samples != bool(tokens):
                raise ValueError(
                    f"sampled_token_ids[{i}] for request {sr.request.request_id!r} must "
                    + ("hold the sampled token(s)" if sr.samples else "be [] (a partial prefill)")
                    + f", got {tokens!r}"
                )
            if not all(type(t) is int and t >= 0 for t in tokens):
                raise ValueError(f"sampled_token_ids[{i}] must hold non-negative ints: {tokens!r}")
        self._outstanding.popleft()

        advanced: list[Request] = []
        stopped: list[tuple[Request, RequestStatus, int | None]] = []
        max_seq_len = self.max_seq_len
        release = self._release_later
        for sr, tokens in zip(scheduled, sampled_token_ids, strict=True):
            request = sr.request
            request.num_inflight_tokens -= sr.num_new_tokens
            if sr.samples:
                request.num_pending_outputs -= 1
            status = request.status
            if status > _PREEMPTED:  # finished while the step ran
                if release and not request.num_inflight_tokens and request.request_id in release:
                    self.kv.free(release.pop(request.request_id))
                continue
            if status is _RUNNING:
                request.num_computed_tokens = sr.num_computed_tokens + sr.num_new_tokens
                advanced.append(request)
            # else preempted after this step was scheduled (overlap): its blocks are gone and
            # it recomputes, but the token it sampled here is its next one all the same.
            grammar = request.grammar
            for token in tokens:
                if grammar is not None and not grammar.accept_token(token):
                    # Cannot happen under the sampler's mask, except past the grammar's end
                    # (ignore_eos): the output is complete, the token is dropped.
                    stopped.append((request, _STOPPED, None))
                    break
                request.output_token_ids.append(token)
                request.all_token_ids.append(token)
                # Token-level stops (stop strings are the engine's): EOS / stop ids, not
                # before min_tokens; then max_tokens and the context length.
                num_out = len(request.output_token_ids)
                if token in request.stopping_token_ids and num_out >= request.min_tokens:
                    reason = None if token in request.eos_token_ids else token
                    if reason is None and request.sampling_params.ignore_eos:
                        reason = token  # also a stop id
                    stopped.append((request, _STOPPED, reason))
                    break  # tokens past a stop are dropped
                max_out = request.max_output_tokens
                if (max_out is not None and num_out >= max_out) or len(
                    request.all_token_ids
                ) >= max_seq_len:
                    stopped.append((request, _LENGTH, None))
                    break
        # Register full blocks while their requests still hold them, then free the finished.
        self.kv.cache_full_blocks(advanced)
        for request, status, stop_reason in stopped:
            self._finish(request, status, stop_reason)
        if self._deferred:
            for request in advanced:
                if request.request_id in self._deferred and not request.is_finished:
                    self._release_siblings(request)
        return [request for request, _, _ in stopped]
