"""Tensor-parallel workers: rank 0 (the engine process) schedules and samples; ranks 1..N-1
run their share of every forward pass, driven by one compact step message per step.

The step message (rank 0 -> all, ``ShmAllReduce.broadcast`` over the group's shared memory)
is one int32 array, not pickled objects. A worker keeps a mirror of each request it is
running (the tokens fed so far and the block ids), so a message carries a request's tokens
and block table once, when it starts or restarts, and after that only what changed:

    header   [kind, num_decodes, num_items, num_drop, num_tokens, num_blocks, num_rows]
             (kind 5 instead of 1: the sampled rows only take their greedy token)
    drop     [num_drop]        slots to forget (requests not scheduled this step)
    items    [num_items, 6]    slot, flags (1: reset, 2: samples), computed, new tokens,
                               tokens appended, blocks appended -- in the step's row order
    tokens   [num_tokens]      the items' appended tokens (a decode: its last sampled one)
    blocks   [num_blocks]      the items' appended block ids (the scheduler's new_block_ids)
    rows     [num_rows]        hidden rows whose logits score prompt tokens this step

Expert parallelism's rebalance is a message of its own between two steps: header
``[3, layers, physical experts, 0, 0, 0, 0]`` and the new physical-to-logical table; each
worker applies it (reading the experts it gains) before the next step.

So is the pool's memory (docs/kvcache.md, memory on demand): rank 0 maps page groups as its
pool needs blocks and unmaps idle ones; whenever that has changed, the message before the
next step (or, idle, at once) is header ``[4, blocks per group, groups, 0, 0, 0, 0]`` and
which of rank 0's groups are mapped. Each worker maps exactly its own groups that hold a
block of those, gives the rest back to the OS, then answers (a gather: its pid, memfd,
region size, regions and segment size, which rank 0 maps to reach whole blocks) before rank
0 goes on.

A request not scheduled in a step is dropped from the mirrors and sent whole if it comes
back (preempted, or left out by the token budget): rare, and it keeps the protocol free of
any other bookkeeping. Each worker then builds the same step inputs as rank 0 (the same
``ModelRunner.prepare``), runs its shard (the sums inside, ``xllm.layers.parallel``) and
joins the LM head's gather to rank 0. A decode step's message is about 40 bytes a request.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from xllm.scheduler import ScheduledRequest, SchedulerOutput

if TYPE_CHECKING:
    import torch

    from xllm.kvcache.memory import KVMemory

logger = logging.getLogger("xllm.tp")

_STEP, _STOP, _PLACE, _MEMORY, _STEP_ARGMAX = 1, 2, 3, 4, 5
_HEADER = 7
_RESET, _SAMPLES = 1, 2
# Waits between ranks inside a step; a dead rank is noticed within milliseconds regardless.
STEP_TIMEOUT_S = 60.0
# The group's per-rank slot: a step's activations (tokens x hidden fp32) in one chunk for
# batches up to about 2048 x 1024.
BUFFER_BYTES = 8 << 20
# How long a rank waiting for the others keeps its core before sleeping (ShmAllReduce's
# default). Longer waits were measured (bench.tp --busy-wait 0.001,0.005,0.05, in turns) and
# did not pay on the 2-core AMX VM: no steadier sums, and prompt steps 3-15% slower at 50 ms
# (the waiting rank's spinning takes from the computing one; docs/benchmarks.md).
BUSY_WAIT_S = 1e-3
# Ranks on other hosts (EngineConfig.tp_master): how long rank 0 waits for them to join, and
# the store key of the spec it publishes for them.
JOIN_TIMEOUT_S = 600.0
SPEC_KEY = "xllm/tp/spec"


class TimedGroup:
    """Rank 0's ShmAllReduce with the seconds spent in each collective counted (the metrics'
    allreduce and messaging time); the native stack's own sums are counted by the stack."""

    def __init__(self, comm: object) -> None:
        self.comm = comm
        self.reduce_seconds = 0.0  # allreduce and gather (the LM head)
        self.message_seconds = 0.0  # step messages

    def allreduce(self, x, bf16_sums: bool = False):  # noqa: ANN001, ANN201
        t0 = time.perf_counter()
        self.comm.allreduce(x, bf16_sums)
        self.reduce_seconds += time.perf_counter() - t0
        return x

    def gather(self, src, dst, rows: int = 1):  # noqa: ANN001, ANN201
        t0 = time.perf_counter()
        self.comm.gather(src, dst, rows)
        self.reduce_seconds += time.perf_counter() - t0
        return dst

    def broadcast(self, message: bytes | None, wait_forever: bool = False) -> bytes:
        t0 = time.perf_counter()
        out = self.comm.broadcast(message, wait_forever)
        self.message_seconds += time.perf_counter() - t0
        return out

    @property
    def native(self) -> object:
        return self.comm.native

    @property
    def wait_seconds(self) -> float:
        """Seconds this rank waited in collectives for ranks not yet there."""
        return self.comm.wait_seconds

    def alive(self) -> bool:
        """Whether the group's connections to its peers are open (TCP; always True on shared
        memory, where the workers' processes are watched instead)."""
        check = getattr(self.comm, "alive", None)
        return True if check is None else check()

    def close(self) -> None:
        self.comm.close()


class StepMessage:
    """An encoded step. With overlap scheduling a decode's token may still be being sampled
    when its step is encoded: the message then has a hole there, filled by ``fill`` once the
    token is in its request (as the runner fills its own input row)."""

    __slots__ = ("array", "holes")

    def __init__(self, array: np.ndarray, holes: list[tuple[int, object, int]]) -> None:
        self.array = array
        self.holes = holes  # (offset in array, request, token position)

    def fill(self) -> None:
        for offset, req, position in self.holes:
            self.array[offset] = token_at(req, position)

    def set_argmax(self, argmax: bool) -> None:
        """Whether the step's sampled rows only take their greedy token (the LM head then
        gathers each rank's best instead of its logits: LMHead.forward)."""
        self.array[0] = _STEP_ARGMAX if argmax else _STEP


def token_at(req: object, position: int) -> int:
    """The request's token at ``position``, once the step that sampled it is in; 0 for a
    request that finished without it (its row's result is dropped)."""
    tokens = req.all_token_ids  # type: ignore[attr-defined]
    return tokens[position] if position < len(tokens) else 0


def encode_stop() -> bytes:
    return np.array([_STOP, 0, 0, 0, 0, 0, 0], dtype=np.int32).tobytes()


def encode_placement(phy2log: np.ndarray) -> bytes:
    layers, physical = phy2log.shape
    header = np.array([_PLACE, layers, physical, 0, 0, 0, 0], dtype=np.int32)
    return np.concatenate([header, phy2log.astype(np.int32).ravel()]).tobytes()


def encode_memory(mapped: list[bool], blocks_per_group: int) -> bytes:
    header = np.array([_MEMORY, blocks_per_group, len(mapped), 0, 0, 0, 0], dtype=np.int32)
    return np.concatenate([header, np.asarray(mapped, dtype=np.int32)]).tobytes()


@dataclass
class MemoryState:
    """Which of rank 0's page groups (``blocks_per_group`` blocks each) are mapped."""

    mapped: np.ndarray
    blocks_per_group: int


class StepEncoder:
    """Rank 0's side: turns each SchedulerOutput into a message against the workers' mirrors."""

    def __init__(self) -> None:
        self._live: dict[str, int] = {}  # request id -> slot
        self._tokens: dict[str, int] = {}  # tokens the workers hold, per request
        self._blocks: dict[str, int] = {}  # block ids the workers hold, per request
        self._next_slot = 0

    def encode(self, out: SchedulerOutput, prompt_rows: np.ndarray | None) -> StepMessage:
        scheduled = out.scheduled
        previous, live = self._live, {}
        items = np.empty((len(scheduled), 6), dtype=np.int32)
        tokens: list[int] = []
        blocks: list[int] = []
        holes: list[tuple[int, object, int]] = []  # (index in tokens, request, position)
        for i, item in enumerate(scheduled):
            req = item.request
            rid = req.request_id
            end = item.num_computed_tokens + item.num_new_tokens
            slot = previous.pop(rid, None)
            flags = _SAMPLES if item.samples else 0
            if slot is None or item.is_new:
                if slot is None:
                    slot = self._next_slot
                    self._next_slot = (self._next_slot + 1) & 0x7FFFFFFF
                flags |= _RESET
                first = 0
                new_blocks = req.block_ids
                self._blocks[rid] = len(new_blocks)
            else:
                first = self._tokens[rid]
                new_blocks = item.new_block_ids
                held = self._blocks[rid] + len(new_blocks)
                if held != len(req.block_ids):
                    raise RuntimeError(
                        f"request {rid!r}: the scheduler's new_block_ids leave the workers "
                        f"with {held} blocks, the request has {len(req.block_ids)}")
                self._blocks[rid] = held
            new_tokens = req.all_token_ids[first:end]
            known = first + len(new_tokens)
            if known < end:  # overlap: being sampled by the step in flight
                holes.extend((len(tokens) + len(new_tokens) + k, req, known + k)
                             for k in range(end - known))
                new_tokens = new_tokens + [0] * (end - known)
            self._tokens[rid] = end
            live[rid] = slot
            items[i] = (slot, flags, item.num_computed_tokens, item.num_new_tokens,
                        len(new_tokens), len(new_blocks))
            tokens.extend(new_tokens)
            blocks.extend(new_blocks)
        for rid in previous:  # not scheduled this step: the workers forget them
            del self._tokens[rid], self._blocks[rid]
        self._live = live
        rows = prompt_rows if prompt_rows is not None else np.empty(0, dtype=np.int64)
        header = np.array([_STEP, len(out.decodes), len(scheduled), len(previous), len(tokens),
                           len(blocks), len(rows)], dtype=np.int32)
        array = np.concatenate([
            header, np.fromiter(previous.values(), dtype=np.int32, count=len(previous)),
            items.reshape(-1), np.asarray(tokens, dtype=np.int32),
            np.asarray(blocks, dtype=np.int32), rows.astype(np.int32)])
        if holes:
            base = _HEADER + len(previous) + items.size
            holes = [(base + at, req, position) for at, req, position in holes]
        return StepMessage(array, holes)


class _Mirror:
    """A worker's copy of a request: what ``ModelRunner.prepare`` reads."""

    __slots__ = ("request_id", "all_token_ids", "block_ids")

    def __init__(self, slot: int) -> None:
        self.request_id = str(slot)
        self.all_token_ids: list[int] = []
        self.block_ids: list[int] = []


class StepDecoder:
    """A worker's side: applies each message to the mirrors and rebuilds the step."""

    def __init__(self) -> None:
        self.mirrors: dict[int, _Mirror] = {}

    def decode(self, message: bytes
               ) -> tuple[SchedulerOutput, np.ndarray, bool] | np.ndarray | MemoryState | None:
        """(the step, the prompt-scoring rows, whether its sampled rows take only their
        greedy token); a placement (expert parallelism's physical-to-logical table
        [layers, physical]); rank 0's mapped memory; or None for the stop message."""
        a = np.frombuffer(message, dtype=np.int32)
        kind, num_decodes, num_items, num_drop, num_tokens, num_blocks, num_rows = (
            int(v) for v in a[:_HEADER])
        if kind == _STOP:
            return None
        if kind == _PLACE:
            return a[_HEADER:_HEADER + num_decodes * num_items].astype(np.int64).reshape(
                num_decodes, num_items)
        if kind == _MEMORY:
            return MemoryState(a[_HEADER:_HEADER + num_items] != 0, num_decodes)
        if kind not in (_STEP, _STEP_ARGMAX):
            raise RuntimeError(f"unknown step message kind {kind}")
        at = _HEADER
        for slot in a[at:at + num_drop].tolist():
            self.mirrors.pop(slot, None)
        at += num_drop
        items = a[at:at + 6 * num_items].reshape(num_items, 6).tolist()
        at += 6 * num_items
        tokens = a[at:at + num_tokens].tolist()
        at += num_tokens
        blocks = a[at:at + num_blocks].tolist()
        at += num_blocks
        rows = a[at:at + num_rows].astype(np.int64)
        scheduled = []
        t = b = 0
        for slot, flags, computed, new, n_tokens, n_blocks in items:
            mirror = self.mirrors.get(slot)
            if mirror is None or flags & _RESET:
                mirror = self.mirrors[slot] = _Mirror(slot)
            mirror.all_token_ids.extend(tokens[t:t + n_tokens])
            mirror.block_ids.extend(blocks[b:b + n_blocks])
            t += n_tokens
            b += n_blocks
            scheduled.append(ScheduledRequest(mirror, new, computed, bool(flags & _SAMPLES),  # type: ignore[arg-type]
                                              bool(flags & _RESET)))
        out = SchedulerOutput(scheduled[:num_decodes], scheduled[num_decodes:], [],
                              sum(item.num_new_tokens for item in scheduled))
        return out, rows, kind == _STEP_ARGMAX


@dataclass
class WorkerSpec:
    """What a worker process needs to build its shard (passed as JSON on its command line)."""

    model_dir: str
    dtype: str  # the compute dtype rank 0 resolved (float32 / bfloat16)
    kv_dtype: str
    weight_format: str
    block_size: int
    num_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    rank: int
    size: int
    group: str
    cores: list[int]
    timeout: float = STEP_TIMEOUT_S
    expert_parallel: bool = False
    num_redundant_experts: int = 0
    busy_wait: float = field(default_factory=lambda: BUSY_WAIT_S)  # the group's, every rank
    # What rank 0's connections to a remote worker's part server open with (a worker on
    # another host serves its share of the pool only to a connection that knows it).
    part_token: str = field(default_factory=lambda: uuid.uuid4().hex)
    # "cpu", or "cuda": rank r on device r (modulo the devices: gloo lets ranks share one).
    device: str = "cpu"
    # The model's sums: "native" (the shared-memory group), or a torch.distributed backend
    # ("nccl", "gloo") over the TCP store rank 0 serves on 127.0.0.1:dist_port.
    backend: str = "native"
    dist_port: int = 0
    # Rank 0's pool is mapped on demand (its memory messages say which groups); else each
    # worker allocates its share whole at start.
    kv_on_demand: bool = True

    def torch_device(self) -> torch.device:
        import torch

        if self.device == "cpu":
            return torch.device("cpu")
        return torch.device(self.device, self.rank % torch.cuda.device_count())


def rank_cores(size: int) -> list[list[int]]:
    """This process's CPUs split into ``size`` contiguous shares, one per rank."""
    cpus = sorted(os.sched_getaffinity(0))
    if size > len(cpus):
        raise ValueError(f"tensor_parallel_size {size} exceeds the {len(cpus)} CPU cores this "
                         "process may use: every rank needs a core of its own")
    per = len(cpus) // size
    return [cpus[r * per:(r + 1) * per] for r in range(size)]


class WorkerGroup:
    """Rank 0's handle on the workers: spawns them, sends steps, stops them."""

    def __init__(self, specs: list[WorkerSpec], group: str,
                 remote: TimedGroup | None = None, size: int = 0, store: object = None
                 ) -> None:
        """``store``: rank 0's torch.distributed TCP store when the sums go through
        torch.distributed (the specs' backend and dist_port)."""
        from xllm.ops.allreduce import ShmAllReduce

        self.size = size or len(specs) + 1
        self.encoder = StepEncoder()
        self.closed = False
        # Rank 0's pool memory (set by the engine) and its version the workers last heard;
        # where each worker's share of the pool is (pid, memfd, region bytes, regions,
        # segment bytes), as each answered the latest memory message.
        self.memory: KVMemory | None = None
        self._memory_version = -1
        # (pid, memfd, region bytes, regions, segment bytes, the port of its part server: a
        # worker on another host, else 0)
        self.parts: list[tuple[int, ...]] = []
        self.part_token = ""  # what rank 0's connections to their part servers open with
        if remote is not None:  # ranks on other hosts, already joined: nothing to start
            self._logs, self.procs, self.comm = [], [], remote
            return
        self._logs = [tempfile.TemporaryFile(prefix=f"xllm-tp{s.rank}-") for s in specs]
        env = dict(os.environ, OMP_NUM_THREADS=str(len(specs[0].cores)) if specs else "1")
        self.procs = [
            subprocess.Popen([sys.executable, "-m", "xllm.runtime.worker",
                              json.dumps(asdict(s))], stdin=subprocess.DEVNULL,
                             stdout=log, stderr=subprocess.STDOUT, env=env)
            for s, log in zip(specs, self._logs, strict=True)]
        host = None
        try:
            host = ShmAllReduce(group, 0, self.size, timeout=STEP_TIMEOUT_S,
                                buffer_bytes=BUFFER_BYTES, busy_wait=specs[0].busy_wait)
            self.comm = TimedGroup(host if store is None else _dist_group(specs[0], host, 0,
                                                                          store))
        except Exception as e:
            if host is not None:
                host.close()
            self.kill()
            raise RuntimeError(f"tensor-parallel workers did not attach: {e}"
                               f"{self.worker_logs()}") from None
        self.closed = False

    @classmethod
    def start(cls, base: WorkerSpec) -> WorkerGroup:
        """Spawns ranks 1..size-1 of ``base`` (whose rank, group and cores are replaced)."""
        cores = rank_cores(base.size)
        group = f"tp_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        store = None
        if base.backend != "native":  # rank 0 serves the process group's rendezvous
            import datetime

            import torch.distributed as dist

            store = dist.TCPStore("127.0.0.1", 0, base.size, True, wait_for_workers=False,
                                  timeout=datetime.timedelta(seconds=base.timeout))
            base = replace(base, dist_port=store.port)
        specs = [WorkerSpec(**{**asdict(base), "rank": r, "group": group, "cores": cores[r]})
                 for r in range(1, base.size)]
        return cls(specs, group, store=store)

    @classmethod
    def remote(cls, base: WorkerSpec, master: str) -> WorkerGroup:
        """Rank 0 of a group whose workers run on other hosts: serves the rendezvous at
        ``master``, publishes ``base`` for them, and waits up to JOIN_TIMEOUT_S for all of
        them to join (each started on its host with ``python -m xllm.runtime.worker
        --master HOST:PORT --rank R``)."""
        from xllm.ops.tcp_group import TcpGroup

        comm = TcpGroup(master, 0, base.size, timeout=base.timeout, join_timeout=JOIN_TIMEOUT_S,
                        store_items={SPEC_KEY: json.dumps(asdict(base)).encode()})
        group = cls([], "", remote=TimedGroup(comm), size=base.size)
        group.part_token = base.part_token
        return group

    def wait_ready(self) -> None:
        """Blocks until every worker has loaded its shard (no deadline: a load takes as long
        as it takes; a worker that dies fails this at once, with its log)."""
        try:
            self.comm.broadcast(b"ready", wait_forever=True)
            self.comm.message_seconds = 0.0
        except Exception as e:
            self.kill()
            raise RuntimeError(f"a tensor-parallel worker failed while loading: {e}"
                               f"{self.worker_logs()}") from None

    def encode(self, out: SchedulerOutput, prompt_rows: np.ndarray | None) -> StepMessage:
        t0 = time.perf_counter()
        message = self.encoder.encode(out, prompt_rows)
        self.comm.message_seconds += time.perf_counter() - t0
        return message

    def send(self, message: StepMessage) -> None:
        self.comm.broadcast(message.array.tobytes())

    def sync_memory(self) -> None:
        """Tells the workers which page groups rank 0's pool has mapped, if that changed
        since they last heard (before a step that may write new blocks; when idle memory
        was given back), and waits until they have followed. Same thread as the step
        messages."""
        import torch

        memory = self.memory
        if memory is None or memory.version == self._memory_version:
            return
        self._memory_version = memory.version
        self.comm.broadcast(encode_memory(memory.mapped_groups(), memory.blocks_per_group))
        # Each worker answers once it has mapped and unmapped (rank 0 may write into its
        # share through its memfd right after: tier loads), saying where its share is.
        where = torch.zeros(self.size, 6, dtype=torch.int64)
        self.comm.gather(torch.zeros(6, dtype=torch.int64), where)
        self.parts = [tuple(int(v) for v in row) for row in where[1:].tolist()]

    def send_placement(self, phy2log: np.ndarray) -> None:
        """Tells the workers a new expert placement, applied before the next step."""
        self.comm.broadcast(encode_placement(phy2log))

    def worker_logs(self, tail: int = 2000) -> str:
        text = []
        for rank, log in enumerate(self._logs, start=1):
            try:
                log.seek(0)
                data = log.read().decode(errors="replace")[-tail:]
            except (OSError, ValueError):
                continue
            if data.strip():
                text.append(f"\n--- rank {rank} log (tail) ---\n{data}")
        return "".join(text)

    def close(self, timeout: float = 10.0) -> None:
        """Stops the workers (a stop message, then a kill for any that linger). Idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            self.comm.broadcast(encode_stop())
        except Exception:  # noqa: BLE001 - a worker already gone: it is stopped anyway
            pass
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        for log in self._logs:
            log.close()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        comm = getattr(self, "comm", None)
        if comm is not None:
            comm.close()

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs) and self.comm.alive()


def _dist_group(spec: WorkerSpec, host: object, rank: int, store: object = None) -> object:
    """The group whose sums go through torch.distributed (spec.backend), its step messages
    through ``host``; rank 0 passes the store it serves."""
    from xllm.ops.dist_group import DistGroup

    return DistGroup(host, spec.backend, ("127.0.0.1", spec.dist_port), rank, spec.size,
                     timeout=spec.timeout, store=store)


def pin_to(cores: list[int]) -> None:
    """Pins the calling thread (and the threads it starts) to ``cores`` and sizes torch's and
    the native kernels' thread pools to them."""
    import torch

    os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))


def worker_main(spec: WorkerSpec, comm: object | None = None) -> int:
    """A worker's life: attach (``comm``: a group already joined, for ranks on other hosts),
    load the shard, then one forward per step message."""
    import torch

    from xllm.kvcache.memory import KVMemory
    from xllm.kvcache.parts import PartServer
    from xllm.layers.parallel import TensorParallel
    from xllm.loader.model import TORCH_DTYPES, load_model
    from xllm.models.config import ModelConfig
    from xllm.ops.allreduce import ShmAllReduce
    from xllm.ops.kv_cache import (
        KV_CACHE_DTYPES,
        allocate_kv_caches,
        kv_cache_shape,
        kv_row_width,
    )
    from xllm.runtime.model_runner import ModelRunner

    pin_to(spec.cores)
    device = spec.torch_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    server = None
    if comm is None:
        comm = ShmAllReduce(spec.group, spec.rank, spec.size, timeout=spec.timeout,
                            buffer_bytes=BUFFER_BYTES, busy_wait=spec.busy_wait)
        if spec.backend != "native":
            comm = _dist_group(spec, comm, spec.rank)
    else:  # on another host than rank 0: it reads and writes this share over a connection
        server = PartServer(comm.local_host(), spec.part_token)
    try:
        tp = TensorParallel(spec.rank, spec.size, comm, bf16_sums=spec.dtype == "bfloat16",
                            expert_parallel=spec.expert_parallel,
                            num_redundant_experts=spec.num_redundant_experts)
        model_dir = Path(spec.model_dir)
        config = ModelConfig.from_file(model_dir)
        model = load_model(model_dir, config, TORCH_DTYPES[spec.dtype], device,
                           progress=False, weight_format=spec.weight_format, tp=tp)
        attn = model.model.layers[0].self_attn
        _, head_size, per_layer = config.kv_cache_geometry()
        kv_dtype = KV_CACHE_DTYPES[spec.kv_dtype]
        row = kv_row_width(head_size, kv_dtype)

        def build(blocks_per_group: int | None) -> tuple[KVMemory | None, ModelRunner]:
            # Its heads of the pool, on memory mapped as rank 0's pool maps its own (the
            # memory messages), in groups of as many blocks as rank 0's where the pages
            # allow: nothing until rank 0 says so, given back when rank 0 gives back.
            # (blocks_per_group None: rank 0's pool is not on demand; this share is whole.)
            shape = kv_cache_shape(spec.num_blocks, attn.num_kv_heads, spec.block_size, row)
            memory = None
            if blocks_per_group is None:
                caches = allocate_kv_caches(config.num_hidden_layers, spec.num_blocks,
                                            attn.num_kv_heads, spec.block_size, row, kv_dtype,
                                            device, per_layer)
            else:
                memory = KVMemory(
                    spec.num_blocks, config.num_hidden_layers,
                    attn.num_kv_heads * spec.block_size * row * kv_dtype.itemsize,
                    tensors_per_layer=per_layer, blocks_per_group=blocks_per_group,
                    cuda_device=device.index if device.type == "cuda" else None)
                caches = memory.tensors(shape, kv_dtype)
            runner = ModelRunner(model, config, block_size=spec.block_size, kv_caches=caches,
                                 max_num_seqs=spec.max_num_seqs,
                                 max_num_batched_tokens=spec.max_num_batched_tokens,
                                 max_model_len=spec.max_model_len, device=device)
            return memory, runner

        comm.broadcast(None, wait_forever=True)  # "ready": every rank has loaded
        decoder = StepDecoder()
        # Built at rank 0's first memory message, before any step (or now, whole).
        memory, runner = build(None) if not spec.kv_on_demand else (None, None)
        while True:
            step = decoder.decode(comm.broadcast(None, wait_forever=True))
            if step is None:
                return 0
            if isinstance(step, np.ndarray):  # expert parallelism: a new placement
                model.apply_placement(step)
                continue
            if isinstance(step, MemoryState):  # rank 0's pool mapped or gave back memory
                if memory is None:
                    memory, runner = build(step.blocks_per_group)
                if server is None:
                    memory.follow(step.mapped, step.blocks_per_group)
                else:
                    with server.lock:  # (not while rank 0 reads or writes through it)
                        memory.follow(step.mapped, step.blocks_per_group)
                        server.memory = memory
                comm.gather(torch.tensor([os.getpid(), getattr(memory.vmm, "fd", -1),
                                          memory.region_bytes,
                                          memory.num_regions, memory.segment_bytes,
                                          0 if server is None else server.port],
                                         dtype=torch.int64), None)
                continue
            if runner is None:
                raise RuntimeError("a step came before rank 0 said which KV memory is mapped")
            runner.execute_shard(*step)
    finally:
        if server is not None:
            server.close()
        comm.close()


def _cores(text: str) -> list[int]:
    cores: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        cores.extend(range(int(a), int(b or a) + 1))
    return cores


def remote_main(argv: list[str]) -> int:
    """A worker on another host than rank 0: joins at --master, takes rank 0's spec (its
    model directory unless --model names this host's copy) and runs as worker_main."""
    from xllm.ops.tcp_group import TcpGroup

    parser = argparse.ArgumentParser(
        prog="python -m xllm.runtime.worker",
        description="A tensor-parallel worker rank on another host than the engine (rank 0, "
                    "started with --tensor-parallel-size N --tp-master HOST:PORT).")
    parser.add_argument("--master", required=True, help="rank 0's HOST:PORT (its tp_master)")
    parser.add_argument("--rank", type=int, required=True, help="this rank, 1..N-1")
    parser.add_argument("--model", help="the model directory on this host (default: rank "
                        "0's path)")
    parser.add_argument("--cores", type=_cores, help="CPUs to pin to, e.g. 0-7 (default: "
                        "all this process may use)")
    args = parser.parse_args(argv)
    comm = TcpGroup(args.master, args.rank, None, timeout=STEP_TIMEOUT_S,
                    join_timeout=JOIN_TIMEOUT_S)
    try:
        spec = WorkerSpec(**json.loads(comm.get(SPEC_KEY)))
        spec = replace(spec, rank=args.rank, model_dir=args.model or spec.model_dir,
                       cores=args.cores or sorted(os.sched_getaffinity(0)))
    except BaseException:
        comm.close()
        raise
    return worker_main(spec, comm)


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    argv = sys.argv[1:]
    remote = bool(argv) and argv[0].startswith("-")
    rank = "?"
    try:
        if remote:
            return remote_main(argv)
        spec = WorkerSpec(**json.loads(argv[0]))
        rank = spec.rank
        return worker_main(spec)
    except (RuntimeError, TimeoutError) as e:  # rank 0 gone or failed: nothing left to serve
        print(f"xllm tp worker rank {rank}: {e}", file=sys.stderr)
        return 1
