"""The instance side of the cluster: an ``xllm-server`` started with ``--master``/``--etcd``.

- :class:`InstanceServicer` serves ``Instance.Generate`` from the server's AsyncEngine. A
  resumed request (``generated_token_ids`` set) enters the engine with those tokens as its
  outputs so far, so it continues exactly as an uninterrupted run would, sampled ones too
  (the seeded draw's step, penalties, ``min_tokens``/``max_tokens``, stop strings spanning
  the resume point); text the first instance had not yet sent (a held-back partial
  character or stop-string tail) comes first.
- :class:`InstanceAgent` registers (``Master.Register``, or a leased etcd key) and beats
  every interval with the engine's load and its prefix cache as block-hash deltas (a full
  snapshot on the first beat, after a failed beat, on a resync request, and every
  ``full_every`` beats as a safety net).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

import grpc

from xllm.engine.async_engine import AsyncEngine, EngineDeadError, EngineOverloadedError
from xllm.engine.speed_model import profile_engine
from xllm.kvcache.mooncake import DESCRIBE_BYTES, MooncakeTransport, describe
from xllm.kvcache.transfer import (
    export_blocks,
    export_held,
    finish_fetch,
    gather_chunk,
    locate_held,
    plan_fetch,
    pull_blocks,
    receive_chunk,
    release_export,
)
from xllm.sampling_params import SamplingParams
from xllm.service.proto import instance_pb2, instance_pb2_grpc, master_pb2, master_pb2_grpc
from xllm.service.state import ROLES, Capacity, InstanceInfo, speed_to_proto
from xllm.service.tasks import stop_task, wait_at_most
from xllm.structured import GrammarSpec

__all__ = ["InstanceAgent", "InstanceServicer", "params_from_proto", "params_to_proto"]

_log = logging.getLogger("xllm.instance")


def params_to_proto(p: SamplingParams) -> instance_pb2.SamplingParams:
    msg = instance_pb2.SamplingParams(
        temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p,
        repetition_penalty=p.repetition_penalty, presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty, min_tokens=p.min_tokens, stop=p.stop,
        stop_token_ids=p.stop_token_ids, ignore_eos=p.ignore_eos,
        skip_special_tokens=p.skip_special_tokens,
        include_stop_str_in_output=p.include_stop_str_in_output)
    if p.seed is not None:
        msg.seed = p.seed
    if p.max_tokens is not None:
        msg.max_tokens = p.max_tokens
    if p.logprobs is not None:
        msg.logprobs = p.logprobs
    if p.logit_bias:
        msg.logit_bias.update(p.logit_bias)
    if p.structured is not None:
        msg.structured_kind, msg.structured_value = p.structured.kind, p.structured.value
    if p.pooling is not None:
        msg.pooling = p.pooling
    return msg


def params_from_proto(msg: instance_pb2.SamplingParams) -> SamplingParams:
    """The engine's params (the whole request's: a resumed request's generated tokens count
    against them in the engine). ValueError (naming the field) on bad values."""
    max_tokens = msg.max_tokens if msg.HasField("max_tokens") else None
    return SamplingParams(
        temperature=msg.temperature, top_p=msg.top_p or 1.0, top_k=msg.top_k, min_p=msg.min_p,
        seed=msg.seed if msg.HasField("seed") else None,
        repetition_penalty=msg.repetition_penalty or 1.0,
        presence_penalty=msg.presence_penalty, frequency_penalty=msg.frequency_penalty,
        max_tokens=max_tokens, min_tokens=msg.min_tokens,
        stop=list(msg.stop), stop_token_ids=list(msg.stop_token_ids), ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        skip_special_tokens=msg.skip_special_tokens,
        include_stop_str_in_output=msg.include_stop_str_in_output,
        logit_bias=dict(msg.logit_bias) or None,
        structured=GrammarSpec(msg.structured_kind, msg.structured_value)  # type: ignore[arg-type]
        if msg.structured_kind else None,
        pooling=msg.pooling or None)


class _Ewma:
    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha, self.value = alpha, 0.0

    def add(self, x: float) -> None:
        self.value = x if self.value == 0.0 else self.value + self.alpha * (x - self.value)


def _is_loopback(peer: str | None) -> bool:
    """Whether a gRPC peer string ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:...")
    is a caller on this host."""
    if not peer:
        return False
    return (peer.startswith(("ipv4:127.", "ipv6:[::1]", "unix:"))
            or peer.startswith("ipv6:[::ffff:127."))


# How long a request handed off in a role switch keeps its KV held for the next instance.
HANDOFF_HOLD_MS = 10_000


class HandedOff(Exception):  # noqa: N818 - an event, not a failure
    """Ends a request's stream on this instance: a role switch handed it to another."""


def _parts(msg: Any) -> list[tuple[int, int, int]]:
    """Where a same-host peer's KV memory is, from a FetchBlocksRequest or a BlockChunk:
    rank 0's (shm_*), then its other ranks' (shm_parts)."""
    return [(msg.shm_pid, msg.shm_fd, msg.shm_region_bytes),
            *((p.pid, p.fd, p.region_bytes) for p in msg.shm_parts)]


def _put_parts(msg: Any, parts: list[tuple[int, int, int]]) -> None:
    """The inverse of :func:`_parts`: ``parts`` written into a FetchBlocksRequest or a
    BlockChunk."""
    (msg.shm_pid, msg.shm_fd, msg.shm_region_bytes), *others = parts
    msg.shm_parts.extend(instance_pb2.ShmPart(pid=p, fd=f, region_bytes=b)
                         for p, f, b in others)


class InstanceServicer(instance_pb2_grpc.InstanceServicer):
    def __init__(self, engine: AsyncEngine, role: str = "mixed") -> None:
        self.engine = engine
        self.role = role  # what it serves now (SetRole changes it; heartbeats report it)
        self.ttft_ms, self.tpot_ms, self.prefill_tps = _Ewma(), _Ewma(), _Ewma()
        self._streams: dict[str, Any] = {}
        # Dispatch ids of requests submitted to the engine since the agent last took them.
        # Appended right after engine.generate() has queued the request in the engine's
        # FIFO inbox, on the event loop, so whatever the agent takes before queuing its
        # load snapshot is counted by that snapshot (see InstanceAgent._beat_loop).
        self._admitted: list[int] = []
        self._peers: dict[str, instance_pb2_grpc.InstanceStub] = {}
        self._reading_holds: set[str] = set()  # prefill holds a fetch is reading now
        self._background: set[asyncio.Future[None]] = set()
        self._peer_channels: list[grpc.aio.Channel] = []
        # Set by InstanceRuntime with --kv-mooncake: peers on other hosts read blocks over it.
        self.mooncake: MooncakeTransport | None = None

    # ---- KV blocks between instances (docs/kvcache.md) -------------------------------------

    async def FetchBlocks(self, request: instance_pb2.FetchBlocksRequest,  # noqa: N802
                          context: grpc.aio.ServicerContext) -> Any:
        shm = None
        local = _is_loopback(context.peer())
        if request.shm_pid and local:  # shared memory only for a caller on this host
            shm = (_parts(request), list(request.shm_blocks))
        key = request.release_hold
        loop = asyncio.get_running_loop()
        store = self.engine.engine.kv_store
        held = self.engine.engine.scheduler.kv.holds.get(key) if key else None
        if held is not None and request.pull and local and \
                (where := store.memory_parts()) is not None:
            # Same host: say where the held blocks are; the client copies them on its own
            # core and releases the hold after (this instance stays on its prefills).
            blocks = locate_held(store, held, list(request.block_hashes), request.first,
                                 request.layout)
            chunk = instance_pb2.BlockChunk(first=request.first, count=len(blocks),
                                            blocks=blocks)
            _put_parts(chunk, where)
            yield chunk
            return
        if held is not None:
            self._reading_holds.add(key)
        try:
            if held is not None:  # a prefill's held blocks: no wait for the engine's step
                export = await loop.run_in_executor(None, functools.partial(
                    export_held, store, held, list(request.block_hashes), request.first,
                    request.layout, shm))
            elif request.block_hashes:
                fut = self.engine.call_beside_step(functools.partial(
                    export_blocks, hashes=list(request.block_hashes),
                    tokens=list(request.token_ids), first=request.first,
                    layout=request.layout, shm=shm))
                export = await asyncio.wrap_future(fut)
            else:
                export = None  # only a release
        except (EngineDeadError, EngineOverloadedError) as e:
            self._reading_holds.discard(key)
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        if export is None or export.sources is None:  # same host: already in its memory
            if export is not None:
                yield instance_pb2.BlockChunk(first=export.first, count=export.count,
                                              checksums=export.checksums)
            if key:
                self._reading_holds.discard(key)
                await self._release_hold(key)
            return
        mooncake = self.mooncake if request.mooncake and shm is None else None
        try:
            start = 0
            # Mooncake: where the blocks are, a piece at a time (the client reads a piece
            # while the next is summed here), up to a block it cannot read (disk)
            per_piece = max(1, DESCRIBE_BYTES // store.config.block_bytes)
            while mooncake is not None and start < export.count:
                piece = export.sources[start:start + per_piece]
                addresses, strides, sums = await loop.run_in_executor(
                    None, describe, store, piece)
                if sums:  # (an address and a stride per part of each block)
                    yield instance_pb2.BlockChunk(
                        first=export.first + start, count=len(sums), checksums=sums,
                        mc_session=mooncake.session, mc_addresses=addresses,
                        mc_strides=strides)
                start += len(sums)
                if len(sums) < len(piece):
                    break
            # the rest (disk-tier blocks, or all without Mooncake) streamed, each chunk
            # gathered (off the loop) while the previous one travels
            per = max(1, FETCH_CHUNK_BYTES // store.config.block_bytes)
            starts = list(range(start, export.count, per))

            def gather(i: int) -> asyncio.Future[tuple[list[int], bytes]]:
                k = min(per, export.count - i)
                return loop.run_in_executor(None, gather_chunk, store, export, i, k)

            ahead = gather(starts[0]) if starts else None
            for j, i in enumerate(starts):
                assert ahead is not None
                sums, data = await ahead
                ahead = gather(starts[j + 1]) if j + 1 < len(starts) else None
                if sums:
                    yield instance_pb2.BlockChunk(first=export.first + i, count=len(sums),
                                                  checksums=sums, data=data)
                if len(sums) < min(per, export.count - i):
                    break  # a tier read failed: the client recomputes the rest
            if ahead is not None:
                await ahead  # never leave a gather running past the unpinning
            if mooncake is not None:
                # The end; the pins stay until the client has read and hangs up (bounded).
                yield instance_pb2.BlockChunk(first=export.first + export.count, count=0)
                await asyncio.sleep(FETCH_TIMEOUT_S)
        finally:
            if export.own_pins:
                with contextlib.suppress(Exception):
                    await asyncio.wrap_future(self.engine.call_beside_step(
                        functools.partial(release_export, export=export)))
            if key:
                self._reading_holds.discard(key)
                await self._release_hold(key)

    async def _release_hold(self, key: str) -> None:
        """Lets go of a finished prefill's held blocks (not while a fetch reads them)."""
        if key in self._reading_holds:
            return  # the fetch releases it when it is done
        with contextlib.suppress(Exception):
            await asyncio.wrap_future(self.engine.call_beside_step(
                lambda e: e.scheduler.kv.release_hold(key)))

    async def fetch_from_peer(self, peer: str, context: list[int], peer_blocks: int,
                              peer_hold: str = "") -> int:
        """Fetches the prompt blocks ``peer`` holds and this instance lacks, when that costs
        less than recomputing them (plan_fetch decides); returns the blocks adopted (in the
        prefix cache by then: a request added next finds them). Never raises: a peer that
        fails, stalls or sends a bad block leaves the rest to be recomputed. The plan and
        the adoption run beside the engine's step (while its model computes), not after
        it."""
        try:
            fut = self.engine.call_beside_step(functools.partial(
                plan_fetch, prompt=context, peer_blocks=peer_blocks,
                same_host=self.same_host(peer), force=bool(peer_hold),
                mooncake=self.mooncake is not None))
            plan = await asyncio.wrap_future(fut)
        except Exception:  # noqa: BLE001 - the engine is busy or stopping: just compute
            plan = None
        if plan is None:
            if peer_hold:  # nothing to fetch (held here already, or cheaper to compute)
                self._release_peer_hold_soon(peer, peer_hold)
            return 0
        store = self.engine.engine.kv_store  # type: ignore[union-attr]
        path = "shm" if plan.shm is not None else "grpc"
        mooncake = self.mooncake if plan.shm is None else None
        req = instance_pb2.FetchBlocksRequest(block_hashes=plan.hashes, token_ids=plan.tokens,
                                              first=plan.first, layout=plan.layout,
                                              release_hold=peer_hold,
                                              pull=plan.shm is not None and bool(peer_hold),
                                              mooncake=mooncake is not None)
        if plan.shm is not None:
            _put_parts(req, plan.shm)
            req.shm_blocks.extend(plan.blocks)
        call = None
        landing: asyncio.Future[bool] | None = None  # the previous chunk, landing off the loop
        loop = asyncio.get_running_loop()
        plan.started = time.perf_counter()
        pulled = False
        try:
            call = self._peer_stub(peer).FetchBlocks(req, timeout=FETCH_TIMEOUT_S)
            it = call.__aiter__()
            while True:
                try:
                    chunk = await wait_at_most(it.__anext__(), FETCH_STALL_S)
                except StopAsyncIteration:
                    break
                if chunk.data and path != "mooncake":
                    path = "grpc"  # the peer could not map this memory: it streamed
                if landing is not None and not await landing:
                    landing = None
                    break
                if chunk.mc_session and mooncake is not None:  # read them from the peer
                    landing = loop.run_in_executor(
                        None, mooncake.receive, store, plan, chunk.first, chunk.mc_session,
                        list(chunk.mc_addresses), list(chunk.mc_strides),
                        list(chunk.checksums))
                    path = "mooncake"
                    continue
                if mooncake is not None and not chunk.count and not chunk.data:
                    break  # the end of a Mooncake answer: the peer waits for us to hang up
                if chunk.shm_pid:  # pull: the peer said where its held blocks are
                    landing = loop.run_in_executor(
                        None, pull_blocks, store, plan, chunk.first, _parts(chunk),
                        list(chunk.blocks))
                    pulled = True
                    continue
                landing = loop.run_in_executor(None, receive_chunk, store, plan, chunk.first,
                                               chunk.count, list(chunk.checksums), chunk.data)
        except Exception as e:  # noqa: BLE001 - dead, stalled or refusing peer: recompute
            _log.info("KV fetch from %s stopped after %d blocks: %r", peer, plan.filled, e)
        finally:
            if landing is not None:
                # finished before the blocks are adopted or freed, and before hanging up: a
                # Mooncake peer keeps the blocks pinned until then
                with contextlib.suppress(Exception):
                    await landing
            if call is not None:
                call.cancel()
            if pulled:  # the peer kept its hold for the copy: let it go now
                self._release_peer_hold_soon(peer, peer_hold)
        try:
            fut = self.engine.call_beside_step(functools.partial(
                finish_fetch, plan=plan, path=path))
            return await asyncio.wrap_future(fut)  # type: ignore[return-value]
        except Exception:  # noqa: BLE001 - the engine stopped: nothing to adopt into
            return 0

    @staticmethod
    def same_host(peer: str) -> bool:
        """Whether a peer's gRPC address is on this host (then the shared-memory path is
        tried first; the peer streams if it cannot map this instance's memory)."""
        host = peer.rsplit(":", 1)[0].strip("[]")
        return host in ("127.0.0.1", "localhost", "::1", socket.gethostname())

    def _release_peer_hold_soon(self, peer: str, key: str) -> None:
        """Releases a peer's hold in the background (the request need not wait for it)."""
        task = asyncio.ensure_future(self._release_peer_hold(peer, key))
        self._background.add(task)  # referenced until done
        task.add_done_callback(self._background.discard)

    async def _release_peer_hold(self, peer: str, key: str) -> None:
        """Tells a prefill peer its hold on a prompt's blocks is no longer needed: a
        FetchBlocks asking for nothing."""
        with contextlib.suppress(Exception):
            call = self._peer_stub(peer).FetchBlocks(
                instance_pb2.FetchBlocksRequest(release_hold=key), timeout=FETCH_STALL_S)
            async for _ in call:
                pass

    def _peer_stub(self, address: str) -> instance_pb2_grpc.InstanceStub:
        stub = self._peers.get(address)
        if stub is None:
            channel = grpc.aio.insecure_channel(address, options=[
                ("grpc.max_receive_message_length", 2 * FETCH_CHUNK_BYTES)])
            self._peer_channels.append(channel)
            stub = self._peers[address] = instance_pb2_grpc.InstanceStub(channel)
        return stub

    async def close_peers(self) -> None:
        for channel in self._peer_channels:
            await channel.close()
        self._peer_channels.clear()
        self._peers.clear()

    def take_admitted(self) -> list[int]:
        """The dispatch ids submitted since the previous call (the agent's next beat)."""
        ids, self._admitted = self._admitted, []
        return ids

    def untake_admitted(self, ids: list[int]) -> None:
        """Gives back ids a beat could not vouch for (its load snapshot failed)."""
        self._admitted[:0] = ids

    async def Generate(self, request: instance_pb2.GenerateRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> Any:
        prompt = list(request.prompt_token_ids)
        generated = list(request.generated_token_ids)
        if (request.hold_kv_ms and self.role == "decode") or (
                request.kv_peer_hold and self.role == "prefill"):
            # Work of a role it no longer serves (a switch crossed the dispatch): the master
            # sends it elsewhere.
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"this instance serves the {self.role} role now")
        if request.kv_peer and request.kv_peer_blocks:
            await self.fetch_from_peer(request.kv_peer, prompt + generated,
                                       request.kv_peer_blocks, request.kv_peer_hold)
        try:
            params = params_from_proto(request.sampling_params)
            stream = self.engine.generate(prompt, params, request_id=request.request_id or None,
                                          priority=request.priority, offline=request.offline,
                                          generated_token_ids=generated,
                                          generated_text=request.generated_text,
                                          hold_kv=request.hold_kv_ms > 0)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except EngineOverloadedError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        if request.dispatch_id:
            self._admitted.append(request.dispatch_id)
        start = time.monotonic()
        first: float | None = None
        self._streams[stream.request_id] = stream
        handed_off = False
        try:
            async with stream:
                async for out in stream:
                    c = out.outputs[0]
                    text, ids = out.deltas.get(0, ("", []))
                    now = time.monotonic()
                    if ids and first is None:
                        first = now
                        self.ttft_ms.add(1000.0 * (now - start))
                        uncached = len(prompt) + len(generated) - out.num_cached_tokens
                        if now > start:
                            self.prefill_tps.add(max(uncached, 1) / (now - start))
                    msg = instance_pb2.GenerateResponse(token_ids=ids, text_delta=text)
                    if c.logprobs is not None and ids:
                        msg.logprobs.extend(_logprobs(ids, c.logprobs[len(c.logprobs) - len(ids):]))
                    if c.finish_reason is not None:
                        msg.finish_reason = c.finish_reason
                        if isinstance(c.stop_reason, int):
                            msg.stop_token_id = c.stop_reason
                        elif isinstance(c.stop_reason, str):
                            msg.stop_string = c.stop_reason
                        n_new = len(c.token_ids) - len(generated)  # outputs hold both
                        if first is not None and n_new > 1:
                            self.tpot_ms.add(1000.0 * (now - first) / (n_new - 1))
                        msg.usage.CopyFrom(instance_pb2.Usage(
                            prompt_tokens=len(prompt), completion_tokens=len(c.token_ids),
                            cached_tokens=out.num_cached_tokens))
                        if out.embedding is not None:
                            msg.embedding.extend(out.embedding)
                    yield msg
        except HandedOff:
            # A role switch handed the request off: its KV is held under its id until the
            # next instance fetches it (or the hold times out); the master resumes it there.
            handed_off = True
            yield instance_pb2.GenerateResponse(handoff_hold=stream.request_id)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        finally:
            self._streams.pop(stream.request_id, None)
            if request.hold_kv_ms or handed_off:  # held KV: released when fetched, or then
                key = stream.request_id
                asyncio.get_running_loop().call_later(
                    (request.hold_kv_ms or HANDOFF_HOLD_MS) / 1000.0,
                    lambda: asyncio.ensure_future(self._release_hold(key)))

    async def SetRole(self, request: instance_pb2.SetRoleRequest,  # noqa: N802
                      context: grpc.aio.ServicerContext) -> instance_pb2.SetRoleResponse:
        if request.role not in ("mixed", "prefill", "decode"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"role must be mixed, prefill or decode, got {request.role!r}")
        self.role = request.role  # from now on, work of the old role is refused
        # What it must see through before confirming: nothing to become mixed; prompts not
        # yet at their first token to become decode (what decodes is decode work already);
        # everything to become prefill -- where, with migrate, whatever is decoding (now,
        # or once its first token is out) is handed off instead of finished here.
        holding = set(self._streams)
        if request.role == "mixed":
            holding.clear()
        elif request.role == "decode":
            holding = {rid for rid in holding if not self._streams[rid].started}
        migrate = request.migrate and request.role == "prefill"
        tried: set[str] = set()
        migrated = 0
        deadline = time.monotonic() + request.drain_timeout_ms / 1000.0
        while True:
            if migrate:
                ready = [rid for rid in holding - tried
                         if rid in self._streams and self._streams[rid].started]
                tried.update(ready)
                moved = await self._hand_off(ready) if ready else []
                holding.difference_update(moved)
                migrated += len(moved)
            left = holding & set(self._streams)
            if not left or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.02)
        return instance_pb2.SetRoleResponse(
            role=self.role, drained=len(holding) - len(left), still_running=len(left),
            migrated=migrated)

    async def _hand_off(self, ids: list[str]) -> list[str]:
        """Stops these decoding requests with their KV held (on the engine thread) and ends
        their streams with the hold's key; the ones it could hand off."""
        try:
            moved = await asyncio.wrap_future(self.engine.call_on_engine_thread(
                lambda e: [rid for rid in ids if e.migrate_out(rid)]))
        except (EngineDeadError, EngineOverloadedError):
            return []
        for rid in moved:
            stream = self._streams.get(rid)
            if stream is not None:
                stream.fail(HandedOff(rid))
        return moved

    async def Abort(self, request: instance_pb2.AbortRequest,  # noqa: N802
                    context: grpc.aio.ServicerContext) -> instance_pb2.AbortResponse:
        stream = self._streams.get(request.request_id)
        if stream is not None:
            stream.abort()
        return instance_pb2.AbortResponse(found=stream is not None)


def _logprobs(ids: list[int], entries: list[dict[int, float]]) -> list[instance_pb2.TokenLogprob]:
    out = []
    for tid, entry in zip(ids, entries, strict=False):
        top = sorted(entry.items(), key=lambda kv: -kv[1])
        out.append(instance_pb2.TokenLogprob(
            token_id=tid, logprob=entry.get(tid, float("-inf")),
            top_token_ids=[t for t, _ in top], top_logprobs=[v for _, v in top]))
    return out


@dataclass(slots=True)
class _Snapshot:
    """The engine's state between two steps, read on the engine thread."""

    # Tier name -> (added, evicted): the block hashes gained and lost since the previous
    # snapshot (the KV store's block events; "pool" and the tiers below it).
    deltas: dict[str, tuple[list[int], list[int]]]
    full: dict[str, list[int]] | None  # tier name -> every hash it holds (when asked)
    prefill: int  # prompt tokens queued and not yet computed
    offline: int  # running offline requests
    num_waiting: int
    num_running: int
    kv_usage: float
    load_rates: dict[str, float]  # tier name -> measured load bandwidth, bytes/s
    block_bytes: int
    speed: master_pb2.SpeedModel | None  # the engine's fitted speed model, once it has one


def _profile_speed(engine: Any) -> None:
    """On the engine thread: seeds its online speed model with a short profile."""
    engine.speed.seed(*profile_engine(engine))


def _engine_snapshot(engine: Any, full: bool) -> _Snapshot:
    """On the engine thread. The load is read here too, not from AsyncEngine.stats()
    (published after each step): this runs after every request queued in the inbox before
    it was added to the scheduler, which the beat's admitted dispatch ids rely on. The
    prefix caches travel as the KV store's block events (what changed), never as a walk
    over the pool; ``full`` adds every hash held (a resync)."""
    sched = engine.scheduler
    store = engine.kv_store
    if not store.events_enabled:
        store.enable_events()  # the first beat of an incarnation is full: nothing is missed
    deltas = store.drain_events()
    prefill = offline = 0
    for r in sched.requests.values():
        left = r.num_tokens - r.num_computed_tokens  # 1 while decoding: its last token
        prefill += left if left > 1 else 0
        offline += r.offline and r.num_computed_tokens > 0
    st = sched.stats()
    return _Snapshot(deltas, store.cached_hashes() if full else None, prefill, offline,
                     st.num_waiting, st.num_running, st.kv_cache_usage, store.load_rates(),
                     store.config.block_bytes, speed_to_proto(engine.speed))


_TIER_PROTO = {"cpu": master_pb2.KV_TIER_CPU, "disk": master_pb2.KV_TIER_DISK}


def _tier_deltas(snapshot: _Snapshot | None, full: bool) -> list[master_pb2.PrefixCacheDelta]:
    """The tiers below the pool, as one delta each (``full``: everything they hold)."""
    if snapshot is None:
        return []
    source = snapshot.full if full else snapshot.deltas
    assert source is not None
    out = []
    for name, tier in _TIER_PROTO.items():
        if name not in source:
            continue
        if full:
            out.append(master_pb2.PrefixCacheDelta(full=True, added=source[name], tier=tier))
        else:
            added, evicted = source[name]
            out.append(master_pb2.PrefixCacheDelta(added=added, evicted=evicted, tier=tier))
    return out


FETCH_CHUNK_BYTES = 4 << 20  # a streamed chunk of blocks (the peer channel accepts 2x)
FETCH_STALL_S = 2.0  # a peer silent this long between chunks is given up on
FETCH_TIMEOUT_S = 30.0  # a whole fetch

MAX_CARRIED_IDS = 65536  # per master: admitted dispatch ids waiting for a beat that lands


class _MasterLink:
    """One master this instance beats to, and what that master has of its prefix cache.
    At most one beat is in flight per master, so a slow master delays only its own beats."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = master_pb2_grpc.MasterStub(self.channel)
        self.full = True  # its next beat must be a full snapshot
        self.inflight: asyncio.Task[None] | None = None
        # Admitted dispatch ids this master has not received yet: a beat it misses (one
        # still in flight, or failed) carries them to the next. Late is harmless (the
        # load counted them earlier); bounded, as the master also settles a dispatch when
        # its stream starts or ends.
        self.admitted: list[int] = []

    def carry(self, ids: list[int]) -> None:
        self.admitted.extend(ids)
        if len(self.admitted) > MAX_CARRIED_IDS:
            del self.admitted[: len(self.admitted) - MAX_CARRIED_IDS]

    async def close(self) -> None:
        if self.inflight is not None:
            self.inflight.cancel()
        await self.channel.close()


class InstanceAgent:
    """Registers this instance and keeps it alive in the masters' registries.

    ``master``: the master's gRPC address (embedded registry); or ``etcd``: the etcd
    endpoint (the key is leased there, and beats go to every master listed under
    ``/xllm/leader/``, re-read every ``MASTER_REFRESH_S``). Runs on the server's event loop
    until :meth:`close`.
    """

    def __init__(self, engine: AsyncEngine, servicer: InstanceServicer, info: InstanceInfo, *,
                 master: str | None = None, etcd: str | None = None,
                 full_every: int = 40) -> None:
        if (master is None) == (etcd is None):
            raise ValueError("give exactly one of master (HOST:PORT) or etcd (HOST:PORT)")
        self.engine, self.servicer, self.info = engine, servicer, info
        self.master, self.etcd = master, etcd
        self.full_every = full_every
        self.incarnation_id = 0
        self.interval_s = 0.25
        self._task: asyncio.Task[None] | None = None
        self._links: dict[str, _MasterLink] = {}
        self._etcd_lease: Any = None
        self._etcd_client: Any = None
        self._refreshed = 0.0  # when the masters were last listed (etcd)
        self._verdict: str | None = None  # "stale" / "unknown" from a master's answer

    @staticmethod
    def capacity_of(engine: AsyncEngine) -> Capacity:
        c, e = engine.config, engine.engine
        return Capacity(max_num_seqs=c.max_num_seqs,
                        max_num_batched_tokens=c.max_num_batched_tokens,
                        num_kv_blocks=e.num_kv_blocks, block_size=c.block_size,
                        max_model_len=e.max_model_len)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="instance-agent")

    async def close(self) -> None:
        """Stops beating and deregisters (the master resumes nothing: requests finished)."""
        await stop_task(self._task)
        with contextlib.suppress(Exception):
            if self._etcd_lease is not None:
                await self._etcd_lease.close()
            elif self.incarnation_id and self.master in self._links:
                stub = self._links[self.master].stub
                await asyncio.wait_for(stub.Deregister(master_pb2.DeregisterRequest(
                    instance_id=self.info.instance_id, incarnation_id=self.incarnation_id)), 1.0)
        if self._etcd_client is not None:
            with contextlib.suppress(Exception):
                await self._etcd_client.close()
        for link in list(self._links.values()):
            await link.close()
        self._links.clear()

    async def _refresh_masters(self, force: bool = False) -> None:
        """Keeps one link per master: the one given (embedded), or those in etcd."""
        if self.etcd is None:
            assert self.master is not None
            if self.master not in self._links:
                self._links[self.master] = _MasterLink(self.master)
            return
        from xllm.service.etcd_registry import MASTER_REFRESH_S, master_addresses

        now = time.monotonic()
        if not force and self._links and now - self._refreshed < MASTER_REFRESH_S:
            return
        try:
            addresses = set(await master_addresses(self._etcd_client, timeout=1.0))
        except Exception as e:  # etcd unreachable: keep beating the masters known
            _log.debug("listing masters failed: %r", e)
            return
        self._refreshed = now
        for address in addresses - self._links.keys():
            self._links[address] = _MasterLink(address)
        for address in self._links.keys() - addresses:  # that master is gone
            await self._links.pop(address).close()

    async def _register(self) -> None:
        info = InstanceInfo(self.info.instance_id, self.info.address, self.info.model,
                            self.info.role, self.capacity_of(self.engine))
        if self.etcd is not None:
            from xllm.service.etcd_registry import EtcdInstanceLease, connect

            if self._etcd_client is None:
                self._etcd_client = await connect(self.etcd)
                self._etcd_lease = EtcdInstanceLease(self._etcd_client)
            self.incarnation_id = await self._etcd_lease.register(info)
            return
        await self._refresh_masters()
        assert self.master is not None
        resp = await self._links[self.master].stub.Register(
            master_pb2.RegisterRequest(info=info.to_proto()), timeout=2.0)
        self.incarnation_id = resp.incarnation_id
        self.interval_s = max(resp.heartbeat_interval_ms, 10) / 1000.0

    async def _run(self) -> None:
        while True:  # (re)register, then beat until told to register again
            try:
                await self._register()
                _log.info("registered %s as incarnation %d", self.info.instance_id,
                          self.incarnation_id)
                if not await self._beat_loop():
                    return  # STALE: a newer incarnation of this id exists
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the master or etcd is not reachable yet: retry
                _log.warning("registration failed (%s); retrying", e)
                await asyncio.sleep(0.5)

    async def _beat_loop(self) -> bool:
        """Beats until the registration is gone (True: register again) or stale (False)."""
        seq = 0
        prefill = offline = 0
        self._verdict = None
        for link in self._links.values():
            link.full = True  # a new incarnation: every master starts from a snapshot
        next_beat = time.monotonic()
        while True:
            next_beat += self.interval_s
            await asyncio.sleep(max(0.0, next_beat - time.monotonic()))
            if self._verdict == "stale":
                _log.warning("a newer incarnation of %s exists; stopping", self.info.instance_id)
                return False
            if self._verdict == "unknown":
                return True  # declared dead, or the master restarted: register again
            if self._etcd_lease is not None and not self._etcd_lease.alive:
                return True
            await self._refresh_masters(force=not self._links)
            seq += 1
            s = self.servicer
            # Taken BEFORE the snapshot is queued: the engine's inbox is FIFO, so every
            # request these ids name is in the scheduler when the snapshot reads its load.
            admitted = s.take_admitted()
            snapshot: _Snapshot | None = None
            periodic = seq % self.full_every == 0
            want_full = periodic or any(link.full for link in self._links.values())
            try:  # the snapshot waits for the current step; never longer than half a beat
                fut = self.engine.call_on_engine_thread(
                    functools.partial(_engine_snapshot, full=want_full))
                snapshot = await wait_at_most(asyncio.wrap_future(fut), self.interval_s / 2)
            except Exception as e:  # slow step, engine stopping: beat without a delta
                if not isinstance(e, (TimeoutError, EngineDeadError, EngineOverloadedError)):
                    _log.warning("prefix-cache snapshot failed: %r", e)
                # The late snapshot still drains the block events: every master must resync.
                for link in self._links.values():
                    link.full = True
            if snapshot is not None:
                prefill, offline = snapshot.prefill, snapshot.offline
                waiting, running, kv = snapshot.num_waiting, snapshot.num_running, snapshot.kv_usage
            else:  # the last published stats may predate those requests: report them later
                s.untake_admitted(admitted)
                admitted = []
                stats = self.engine.stats()
                waiting, running, kv = stats.num_waiting, stats.num_running, stats.kv_cache_usage
            rates = snapshot.load_rates if snapshot is not None else {}
            load = master_pb2.LoadReport(
                num_waiting=waiting, num_running=running,
                num_waiting_prefill_tokens=prefill, kv_usage=kv,
                ttft_ms=s.ttft_ms.value, tpot_ms=s.tpot_ms.value,
                prefill_tokens_per_s=s.prefill_tps.value, num_offline_running=offline,
                role=ROLES[s.role],
                cpu_tier_load_bytes_per_s=rates.get("cpu", 0.0),
                disk_tier_load_bytes_per_s=rates.get("disk", 0.0),
                kv_block_bytes=snapshot.block_bytes if snapshot is not None else 0,
                speed=snapshot.speed if snapshot is not None else None)
            # Without a fresh snapshot the deltas are empty (every link resyncs next beat).
            pool_added, pool_evicted = (snapshot.deltas["pool"] if snapshot is not None
                                        else ([], []))
            delta = master_pb2.PrefixCacheDelta(added=pool_added, evicted=pool_evicted)
            tier_delta = _tier_deltas(snapshot, full=False)
            has_full = snapshot is not None and snapshot.full is not None
            if has_full:
                assert snapshot is not None and snapshot.full is not None
                whole = master_pb2.PrefixCacheDelta(full=True, added=snapshot.full["pool"])
                tier_whole = _tier_deltas(snapshot, full=True)
            for link in self._links.values():
                link.carry(admitted)
                if link.inflight is not None and not link.inflight.done():
                    link.full = True  # it misses this beat, so its next one is full
                    continue
                full = (link.full or periodic) and has_full
                link.full = link.full and not full  # until its answer says otherwise
                req = master_pb2.HeartbeatRequest(
                    instance_id=self.info.instance_id, incarnation_id=self.incarnation_id,
                    seq=seq, load=load, prefix_cache=whole if full else delta,
                    tier_caches=tier_whole if full else tier_delta,
                    admitted_dispatch_ids=link.admitted)
                link.admitted = []
                link.inflight = asyncio.create_task(self._beat(link, req))

    async def _beat(self, link: _MasterLink, req: master_pb2.HeartbeatRequest) -> None:
        try:
            resp = await link.stub.Heartbeat(req, timeout=max(2 * self.interval_s, 0.5))
        except Exception as e:  # unreachable, timed out, channel closed: never unhandled
            _log.debug("heartbeat to %s failed: %r", link.address, e)
            link.full = True  # the master may have missed this delta
            if req.incarnation_id == self.incarnation_id:  # and these ids: the next beat
                ids = list(req.admitted_dispatch_ids)
                link.admitted[:0] = ids[-MAX_CARRIED_IDS:]
            return
        if req.incarnation_id != self.incarnation_id:
            return  # an answer about the previous incarnation
        if resp.status == master_pb2.HeartbeatResponse.STATUS_STALE:
            self._verdict = "stale"
        elif resp.status == master_pb2.HeartbeatResponse.STATUS_UNKNOWN:
            link.full = True
            if self.etcd is None:
                self._verdict = "unknown"
            # etcd: that master's watch may not have seen the key yet; keep beating
        elif resp.resync_prefix_cache:
            link.full = True


class InstanceRuntime:
    """The gRPC ``Instance`` server plus the agent, as ``xllm-server --master/--etcd`` runs
    them beside the HTTP server, on its event loop."""

    def __init__(self, engine: AsyncEngine, *, master: str | None, etcd: str | None,
                 host: str = "127.0.0.1", grpc_port: int = 0, instance_id: str | None = None,
                 model: str = "", role: str = "mixed", profile_speed: bool = False,
                 kv_mooncake: str | None = None) -> None:
        self.engine = engine
        self.profile_speed = profile_speed
        self.servicer = InstanceServicer(engine, role)
        self.mooncake: MooncakeTransport | None = None
        if kv_mooncake is not None:
            if engine.config.device != "cpu":
                raise ValueError("--kv-mooncake serves the CPU engine's KV memory; the CUDA "
                                 "path is not built")
            # The session names the address peers reach this host at.
            self.mooncake = MooncakeTransport(
                socket.gethostname() if host in ("0.0.0.0", "::", "") else host, kv_mooncake)
        self.server = grpc.aio.server()
        instance_pb2_grpc.add_InstanceServicer_to_server(self.servicer, self.server)
        self.port = self.server.add_insecure_port(f"{host}:{grpc_port}")
        if self.port == 0:
            raise ValueError(f"grpc_port: cannot listen on {host}:{grpc_port}")
        address = f"{host}:{self.port}"
        self.info = InstanceInfo(instance_id or address, address, model, role)
        self.agent = InstanceAgent(engine, self.servicer, self.info, master=master, etcd=etcd)

    async def start(self) -> None:
        """Serves Generate at once; registers once the engine is ready (the agent's capacity
        report needs the loaded engine)."""
        await self.server.start()
        self._waiter = asyncio.create_task(self._register_when_ready())

    async def _register_when_ready(self) -> None:
        while not self.engine.wait_ready(0):
            if self.engine.state not in ("loading", "ready"):
                return  # the load failed: nothing to register
            await asyncio.sleep(0.05)
        if self.mooncake is not None:  # the KV memory exists now: let peers read it
            self.mooncake.serve(self.engine.engine.kv_store)  # type: ignore[union-attr]
            self.servicer.mooncake = self.mooncake
            _log.info("KV blocks served and fetched over Mooncake (session %s)",
                      self.mooncake.session)
        if self.profile_speed:  # before registering: no request competes with the profile
            t0 = time.monotonic()
            await asyncio.wrap_future(self.engine.call_on_engine_thread(_profile_speed))
            _log.info("speed profile taken in %.1f s", time.monotonic() - t0)
        self.agent.start()

    async def close(self, grace_s: float = 1.0) -> None:
        await stop_task(self._waiter)
        await self.agent.close()
        await self.server.stop(grace_s)
        await self.servicer.close_peers()
        if self.mooncake is not None:
            self.mooncake.close()
