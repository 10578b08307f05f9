"""AsyncEngine: the LLMEngine on its own thread, fed through the native MPMC queue.

Threads and what each owns:

- the *engine thread* builds the LLMEngine (the model loads there, so a server can answer
  ``/health`` with 503 meanwhile), then loops: drain the inbox (new requests, aborts), run
  one ``step()``, hand each output to its request's stream, publish an ``EngineStats``
  snapshot. It blocks on the inbox only while it has nothing to do, so an idle engine costs
  no CPU and a busy one never waits for a client.
- the *asyncio loop* (the server) only pushes on the inbox and reads streams; it never
  touches the LLMEngine except through read-only, load-time facts (tokenizer, context
  length, model config).

Outputs cross back with ``loop.call_soon_threadsafe`` (no polling). A stream keeps at most
one pending output: when its client is slow, newer outputs are merged into it (texts and
token ids concatenated, the newest cumulative state kept), so a stalled client costs a few
strings of memory and never blocks the engine or other clients.

An exception out of ``step()`` is an engine fault: the state flips to ``failed`` (the
server's ``/health`` turns 503), every in-flight stream raises ``EngineDeadError`` and new
requests are refused with the same error, instead of hanging.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from xllm.config import EngineConfig
from xllm.engine.outputs import CompletionOutput, RequestOutput
from xllm.kvcache.store import KVStoreStats
from xllm.ops.queue import MPMCQueue, QueueClosed
from xllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from xllm.engine.llm_engine import LLMEngine
    from xllm.tokenizer import Tokenizer

__all__ = ["AsyncEngine", "EngineDeadError", "EngineOverloadedError", "EngineStats",
           "RequestStream"]

logger = logging.getLogger("xllm.engine")

LOADING, READY, FAILED, STOPPED = "loading", "ready", "failed", "stopped"
_DRAIN_BATCH = 256  # inbox items taken per pop; more wait for the next turn of the loop


class EngineDeadError(RuntimeError):
    """The engine is not running: it failed (to load or in a step) or was shut down."""


class EngineOverloadedError(RuntimeError):
    """Too many requests are waiting; the caller should retry later (HTTP 503)."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot published by the engine thread after each turn of its loop."""

    state: str = LOADING
    num_running: int = 0
    num_waiting: int = 0
    num_preemptions: int = 0  # since start; a request preempted twice counts twice
    kv_cache_usage: float = 0.0  # 0..1
    num_free_blocks: int = 0
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    num_unfinished_requests: int = 0  # requests the scheduler still holds (blocks or a place)
    num_steps: int = 0  # model steps run since start
    kv_store: KVStoreStats = KVStoreStats()
    model_busy_seconds: float = 0.0  # in model steps, since start
    model_idle_seconds: float = 0.0  # between back-to-back steps (the engine's own work)
    tp_reduce_seconds: float = 0.0  # tensor parallelism: sums and gathers on rank 0
    tp_message_seconds: float = 0.0  # tensor parallelism: step messages to the workers
    tp_wait_seconds: float = 0.0  # of those two, rank 0 waiting for ranks not yet there
    # Mixture of experts: tokens routed to each expert since start, [MoE layers][experts]
    # (the model's layer indices in moe_layers); expert-parallel rebalances since start.
    expert_counts: tuple[tuple[int, ...], ...] = ()
    moe_layers: tuple[int, ...] = ()
    num_rebalances: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        q = self.prefix_cache_queried_tokens
        return self.prefix_cache_hit_tokens / q if q else 0.0


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    priority: int
    offline: bool
    generated_token_ids: list[int] | None = None  # a resumed request's outputs so far
    generated_text: str = ""
    hold_kv: bool = False  # a prefill for a decode instance (LLMEngine.add_request)


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    fn: Callable[[LLMEngine], object]
    future: concurrent.futures.Future[object]


def _merge(old: RequestOutput, new: RequestOutput) -> RequestOutput:
    """One output standing for both: new's cumulative state, old's deltas followed by new's."""
    deltas = dict(new.deltas)
    for index, (text, ids) in old.deltas.items():
        more_text, more_ids = deltas.get(index, ("", []))
        deltas[index] = (text + more_text, ids + more_ids)
    return replace(new, deltas=deltas)


def _run_call(call: _Call, engine: LLMEngine) -> None:
    if not call.future.set_running_or_notify_cancel():
        return
    try:
        call.future.set_result(call.fn(engine))
    except Exception as e:  # the caller's fault: report it to the caller, keep stepping
        call.future.set_exception(e)


def _snapshot(out: RequestOutput) -> RequestOutput:
    """The engine keeps appending to each completion's logprobs list; hand over a copy."""
    if any(c.logprobs is not None for c in out.outputs):
        out.outputs = [c if c.logprobs is None else
                       CompletionOutput(c.index, c.text, c.token_ids, c.finish_reason,
                                        c.stop_reason, list(c.logprobs), c.cumulative_logprob)
                       for c in out.outputs]
    return out


class RequestStream:
    """The outputs of one request, as an async iterator ending after the finished output.

    Use it as ``async with stream:`` (or call ``abort()``): leaving early aborts the request
    so its KV blocks are freed at the engine's next turn.
    """

    def __init__(self, request_id: str, engine: AsyncEngine,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self._engine = engine
        self._loop = loop
        self._event = asyncio.Event()  # touched on the loop thread only
        self._lock = threading.Lock()
        self._pending: RequestOutput | None = None
        self._error: BaseException | None = None
        self._wake_scheduled = False
        self.started = False  # the engine produced a first output (engine thread writes)
        self.finished = False  # the consumer received the finished output or an error

    # ---- engine thread -------------------------------------------------------------------

    def _put(self, out: RequestOutput | None, error: BaseException | None = None) -> None:
        with self._lock:
            self.started = True
            if error is not None:
                self._error = error
            elif self._pending is None:
                self._pending = out
            else:
                self._pending = _merge(self._pending, out)  # type: ignore[arg-type]
            wake = not self._wake_scheduled
            self._wake_scheduled = True
        if wake:
            try:
                self._loop.call_soon_threadsafe(self._event.set)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    # ---- loop thread ---------------------------------------------------------------------

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        while True:
            if self.finished:
                raise StopAsyncIteration
            # Clear before looking: a wake-up scheduled after the look sets it again.
            self._event.clear()
            with self._lock:
                out, error = self._pending, self._error
                self._pending = None
                self._wake_scheduled = False
            if out is not None:
                if out.finished:
                    self._done()
                return out
            if error is not None:
                self._done()
                raise error
            await self._event.wait()

    def _done(self) -> None:
        self.finished = True
        self._engine._streams.pop(self.request_id, None)

    def fail(self, error: BaseException) -> None:
        """Ends the stream with ``error`` after the outputs already produced (from any
        thread): for a request the engine no longer runs here (handed off)."""
        self._put(None, error)

    def abort(self) -> None:
        """Stops the request if it is still running (idempotent)."""
        if not self.finished:
            self._done()
            self._engine._abort(self.request_id)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.abort()


class AsyncEngine:
    """Runs an LLMEngine on a thread of its own; ``generate()`` from any asyncio loop.

    ``engine_factory`` (default: ``LLMEngine(config)``) runs on the engine thread.
    """

    # The OpenAI layer serves prompt logprobs (echo + logprobs) only from engines saying so.
    supports_prompt_logprobs = True

    def __init__(self, config: EngineConfig, *, inbox_capacity: int = 4096,
                 engine_factory: Callable[[], LLMEngine] | None = None) -> None:
        self.config = config
        self._factory = engine_factory or self._default_factory
        self._inbox = MPMCQueue(inbox_capacity)
        # Aborts must never be lost: one that finds the inbox full waits here instead.
        self._overflow_aborts: list[str] = []
        self._overflow_lock = threading.Lock()
        self._streams: dict[str, RequestStream] = {}
        self._ids = itertools.count()
        self._engine: LLMEngine | None = None
        self._stats = EngineStats()
        self._error: str | None = None
        self._stopping = False
        # The scheduler's state: the engine thread holds it except while it waits for work
        # and while the model computes (LLMEngine.state_lock); call_beside_step takes it.
        self._state_lock = threading.Lock()
        self._beside_waiting = 0  # calls waiting for the lock (the one beside thread writes)
        self._beside = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="xllm-beside")
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xllm-engine", daemon=True)

    def _default_factory(self) -> LLMEngine:
        from xllm.engine.llm_engine import LLMEngine

        return LLMEngine(self.config, progress=False)

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def state(self) -> str:
        return self._stats.state

    @property
    def error(self) -> str | None:
        """Why the engine failed, when it did."""
        return self._error

    @property
    def engine(self) -> LLMEngine:
        """The LLMEngine, for its load-time facts (tokenizer, max_model_len, model_config).

        Only the engine thread may call its methods."""
        if self._engine is None:
            raise EngineDeadError(self._error or "the engine is still loading")
        return self._engine

    # The model's facts (EngineClient), once loaded: EngineDeadError before.

    @property
    def model_path(self) -> str:
        return str(self.config.model)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.model_config.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.engine.model_config.hidden_size

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Blocks until the engine has loaded or failed; True when it is ready."""
        self._ready.wait(timeout)
        return self.state == READY

    def stats(self) -> EngineStats:
        return self._stats

    def num_unstarted(self) -> int:
        """Requests submitted that have no output yet (queued in the inbox or the scheduler)."""
        return sum(1 for s in list(self._streams.values()) if not s.started)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stops the engine thread; requests still running fail with EngineDeadError."""
        self._stopping = True
        self._inbox.close()
        if self._thread.is_alive():
            self._thread.join(timeout)
        # Calls still queued run and raise EngineDeadError (a cancelled future would reach
        # an awaiting coroutine as its own cancellation).
        self._beside.shutdown(wait=False)

    # ---- requests ------------------------------------------------------------------------

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def generate(self, prompt: str | list[int], params: SamplingParams, *,
                 request_id: str | None = None, priority: int = 0,
                 offline: bool = False, generated_token_ids: list[int] | None = None,
                 generated_text: str = "", hold_kv: bool = False) -> RequestStream:
        """Submits a request and returns its stream. Call from the loop that will read it.
        ``generated_token_ids``/``generated_text`` resume a request another engine started
        (see ``LLMEngine.add_request``).

        EngineDeadError when the engine is not ready, EngineOverloadedError when the inbox
        is full, ValueError (from the stream) when the engine rejects the request.
        """
        if self.state != READY or self._stopping:
            raise EngineDeadError(self._error or f"the engine is {self.state}, not ready")
        rid = request_id or self.new_request_id()
        if rid in self._streams:
            raise ValueError(f"request id {rid!r} is already in use")
        stream = RequestStream(rid, self, asyncio.get_running_loop())
        self._streams[rid] = stream
        add = _Add(rid, prompt, params, priority, offline, generated_token_ids, generated_text,
                   hold_kv)
        if params.structured is not None and self._engine is not None:
            # Compile the grammar first, on the compiler's thread: the request reaches the
            # engine thread once it is compiled (cached), so no step waits for a compile.
            compiling = self._engine.grammars.submit(params.structured)
            if not compiling.done():
                compiling.add_done_callback(lambda f: self._add_compiled(add, stream, f))
                return stream
        error = self._push(add)
        if error is not None:
            self._streams.pop(rid, None)
            raise error
        return stream

    def _push(self, add: _Add) -> Exception | None:
        """Queues ``add`` for the engine thread; the error to report when it cannot."""
        try:
            pushed = self._inbox.try_push(add)
        except QueueClosed:
            pushed = None
        if pushed:
            return None
        if pushed is None:
            return EngineDeadError(self._error or "the engine is shutting down")
        return EngineOverloadedError(f"the engine's inbox is full ({self._inbox.capacity} "
                                     "requests queued); retry later")

    def _add_compiled(self, add: _Add, stream: RequestStream,
                      compiled: concurrent.futures.Future[object]) -> None:
        """The compiler's thread, a request's grammar compiled (or not): on to the engine, or
        the error (a ValueError saying what is wrong with the spec) to the stream."""
        if self._streams.get(add.request_id) is not stream:
            return  # aborted meanwhile
        if compiled.cancelled():
            error: BaseException | None = EngineDeadError(
                self._error or "the engine is shutting down")
        else:
            error = compiled.exception() or self._push(add)
        if error is not None:
            stream._put(None, error)

    def call_on_engine_thread(self, fn: Callable[[LLMEngine], object]
                              ) -> concurrent.futures.Future[object]:
        """Runs ``fn(engine)`` on the engine thread between two steps; its result (or
        exception) arrives in the returned future. For readers of scheduler state that only
        the engine thread may touch (the cluster agent's prefix-cache snapshot). Keep ``fn``
        short: the engine does not step while it runs. EngineDeadError when not running,
        EngineOverloadedError when the inbox is full."""
        future: concurrent.futures.Future[object] = concurrent.futures.Future()
        if self.state != READY or self._stopping:
            raise EngineDeadError(self._error or f"the engine is {self.state}, not ready")
        try:
            pushed = self._inbox.try_push(_Call(fn, future))
        except QueueClosed:
            raise EngineDeadError(self._error or "the engine is shutting down") from None
        if not pushed:
            raise EngineOverloadedError("the engine's inbox is full")
        return future

    def call_beside_step(self, fn: Callable[[LLMEngine], object]
                         ) -> concurrent.futures.Future[object]:
        """Runs ``fn(engine)`` as soon as the scheduler's state is free: between two steps,
        or while the model computes a step (the synchronous engine lets go of it then; with
        overlap scheduling, whose helper schedules during the model, only between steps).
        Only for ``fn`` that changes nothing a computing step reads: free and cached KV
        blocks, holds and the KV store's counters (a KV fetch's plan and adoption, an
        export's pins), never a request. On a worker thread; the result (or exception)
        arrives in the returned future. EngineDeadError when the engine is not running."""
        if self.state != READY or self._stopping:
            raise EngineDeadError(self._error or f"the engine is {self.state}, not ready")

        def run() -> object:
            self._beside_waiting += 1
            try:
                self._state_lock.acquire()
            finally:
                self._beside_waiting -= 1
            try:
                if self.state != READY or self._stopping:
                    raise EngineDeadError(self._error or "the engine is shutting down")
                return fn(self.engine)
            finally:
                self._state_lock.release()

        try:
            return self._beside.submit(run)
        except RuntimeError:  # shut down meanwhile
            raise EngineDeadError(self._error or "the engine is shutting down") from None

    def _abort(self, request_id: str) -> None:
        try:
            if self._inbox.try_push(_Abort(request_id)):
                return
        except QueueClosed:
            return  # the engine thread is stopping and aborts everything itself
        with self._overflow_lock:
            self._overflow_aborts.append(request_id)

    # ---- the engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            engine = self._factory()
        except BaseException as e:  # noqa: BLE001 - any load failure is reported, not raised
            logger.exception("the engine failed to load")
            self._fail(f"the engine failed to load: {type(e).__name__}: {e}")
            self._ready.set()
            return
        self._engine = engine
        engine.state_lock = self._state_lock
        engine.grammars.warm()  # structured outputs' first request compiles only its grammar
        self._publish(engine, READY)
        self._ready.set()
        try:
            self._loop(engine)
        except BaseException as e:  # noqa: BLE001 - an engine fault must not hang clients
            logger.exception("engine step failed; failing all in-flight requests")
            with self._state_lock:
                self._fail(f"engine fault: {type(e).__name__}: {e}")
            return
        with self._state_lock:  # no call beside a step from here on
            try:  # the KV store finishes its writes (a disk tier keeps them for the next run)
                engine.close()
            except Exception:  # noqa: BLE001 - shutting down regardless
                logger.exception("closing the KV store failed")
            self._fail("the engine was shut down", state=STOPPED)

    def _loop(self, engine: LLMEngine) -> None:
        lock = self._state_lock
        lock.acquire()
        try:
            self._turns(engine, lock)
        finally:
            lock.release()

    def _turns(self, engine: LLMEngine, lock: threading.Lock) -> None:
        """The engine loop, holding ``lock`` but while it waits for work (and while the
        model computes: LLMEngine.step lets go of it)."""
        steps = 0
        while not self._stopping:
            if self._beside_waiting:  # a call waits for the lock: let it in first (a busy
                lock.release()  # engine with nothing to compute would never let go)
                while self._beside_waiting:
                    time.sleep(0)
                lock.acquire()
            idle = not engine.has_unfinished_requests()
            try:
                # Idle: sleep in the queue (GIL released) until work or close() arrives, or
                # until the KV store's upkeep is due (giving idle memory back).
                timeout = engine.maintain() if idle else 0.0
                if timeout == 0.0:
                    items = self._inbox.pop_many(_DRAIN_BATCH, timeout=0.0)
                else:
                    lock.release()
                    try:
                        items = self._inbox.pop_many(_DRAIN_BATCH, timeout=timeout)
                    finally:
                        lock.acquire()
            except QueueClosed:
                return
            if self._overflow_aborts:
                with self._overflow_lock:
                    items += [_Abort(rid) for rid in self._overflow_aborts]
                    self._overflow_aborts.clear()
            for item in items:
                if isinstance(item, _Abort):
                    engine.abort_request(item.request_id)
                    continue
                if isinstance(item, _Call):
                    _run_call(item, engine)
                    continue
                stream = self._streams.get(item.request_id)
                if stream is None:
                    continue  # aborted before it reached the engine
                try:
                    engine.add_request(item.request_id, item.prompt, item.params,
                                       priority=item.priority, offline=item.offline,
                                       generated_token_ids=item.generated_token_ids,
                                       generated_text=item.generated_text,
                                       hold_kv=item.hold_kv)
                except ValueError as e:
                    stream._put(None, e)
            if engine.has_unfinished_requests():
                outputs = engine.step()
                steps += 1
                for out in outputs:
                    stream = self._streams.get(out.request_id)
                    if stream is not None:
                        stream._put(_snapshot(out))
            self._publish(engine, READY, steps)

    def _publish(self, engine: LLMEngine, state: str, steps: int = 0) -> None:
        sched = engine.scheduler
        s = sched.stats()
        self._stats = EngineStats(
            state=state, num_running=s.num_running, num_waiting=s.num_waiting,
            num_preemptions=s.num_preempted, kv_cache_usage=s.kv_cache_usage,
            num_free_blocks=sched.kv.num_free_blocks,
            prefix_cache_queried_tokens=s.prefix_cache_queried_tokens,
            prefix_cache_hit_tokens=s.prefix_cache_hit_tokens,
            num_unfinished_requests=len(sched.requests), num_steps=steps,
            kv_store=engine.kv_store.stats(), model_busy_seconds=engine.model_busy_seconds,
            model_idle_seconds=engine.model_idle_seconds,
            tp_reduce_seconds=engine.tp_reduce_seconds,
            tp_message_seconds=engine.tp_message_seconds,
            tp_wait_seconds=engine.tp_wait_seconds,
            expert_counts=tuple(map(tuple, engine.expert_counts().tolist())),
            moe_layers=engine.model_config.sparse_layers,
            num_rebalances=engine.num_rebalances)

    def _fail(self, message: str, state: str = FAILED) -> None:
        self._error = message
        self._stats = replace(self._stats, state=state)
        self._inbox.close()
        error = EngineDeadError(message)
        streams = list(self._streams.values())
        self._streams.clear()
        for stream in streams:
            stream._put(None, error)
        if self._engine is not None and state == STOPPED:
            # Free the blocks of whatever was left; after a fault the engine is not trusted.
            self._engine.abort_request([s.request_id for s in streams])
