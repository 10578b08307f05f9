"""A tensor-parallel group whose sums go through torch.distributed: NCCL for ranks on CUDA
devices, gloo where asked (any device; the CPU tests of this path).

``DistGroup(host, backend, address, rank, world_size)`` keeps the step messages on ``host``
(the shared-memory group of xllm.ops.allreduce: bytes between the processes of one host)
and sends the model's tensors -- the row-parallel sums, the LM head's gathers -- through a
torch.distributed process group of its own (``ProcessGroupNCCL`` / ``ProcessGroupGloo``
made directly over a TCPStore at ``address``, so several engines in one process never share
torch's global default group). The same interface as ``ShmAllReduce``: ``allreduce``,
``gather``, ``broadcast``, ``close``; no ``native`` group (the native decoder stack runs on
the CPU's shared-memory group only).

NCCL's ring sums give every rank the same bits, as the native group does, so ranks stay in
step; the order of the sum differs from the native group's, so outputs may differ from it
where fp32 rounding flips a near tie. Timeouts: every collective is bounded by ``timeout``
(a rank that died fails the others' next collective instead of hanging them).
"""

from __future__ import annotations

import datetime
from typing import Any

import torch

BACKENDS = ("gloo", "nccl")


class DistGroup:
    def __init__(self, host: Any, backend: str, address: tuple[str, int], rank: int,
                 world_size: int, timeout: float = 60.0, store: Any = None) -> None:
        """``store``: rank 0's TCPStore, already listening at ``address`` (the other ranks
        connect to it)."""
        import torch.distributed as dist

        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.host = host
        self.backend = backend
        self.rank = rank
        self.world_size = world_size
        wait = datetime.timedelta(seconds=timeout)
        if store is None:
            store = dist.TCPStore(address[0], address[1], world_size, rank == 0, timeout=wait)
        self._store = store  # (rank 0's serves the others until the group closes)
        prefixed = dist.PrefixStore("xllm/tp", store)
        if backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = wait
            self._pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
        else:
            self._pg = dist.ProcessGroupGloo(prefixed, rank, world_size, wait)
        self.closed = False

    def allreduce(self, tensor: torch.Tensor, bf16_sums: bool = False) -> torch.Tensor:
        """Sums ``tensor`` over the ranks in place (``bf16_sums``: a float32 tensor travels
        and is summed as bf16, then widened back)."""
        if tensor.numel() == 0:
            return tensor
        wire = tensor
        if bf16_sums and tensor.dtype == torch.float32:
            wire = wire.to(torch.bfloat16)
        if self.backend == "gloo" and wire.is_cuda:
            wire = wire.cpu()  # (gloo sums host memory)
        self._pg.allreduce([wire]).wait()
        if wire is not tensor:
            tensor.copy_(wire)
        return tensor

    def gather(self, src: torch.Tensor, dst: torch.Tensor | None, rows: int = 1
               ) -> torch.Tensor | None:
        """Rank 0's ``dst`` (any device) gets every rank's ``src`` in rank order, as
        ``ShmAllReduce.gather`` lays it out (``rows``: joined row by row); the others pass
        None. A CPU ``src`` under NCCL goes through the host group."""
        if self.backend == "nccl" and not src.is_cuda:
            return self.host.gather(src, dst, rows)
        import torch.distributed as dist

        src = src.contiguous() if self.backend == "nccl" else src.cpu().contiguous()
        opts = dist.GatherOptions()
        opts.rootRank = 0
        if self.rank != 0:
            self._pg.gather([], [src], opts).wait()
            return None
        assert dst is not None
        parts = [torch.empty_like(src) for _ in range(self.world_size)]
        self._pg.gather([parts], [src], opts).wait()
        joined = torch.stack([p.reshape(rows, -1) for p in parts], dim=1)  # [rows, size, row]
        dst.view(rows, self.world_size, -1).copy_(joined)
        return dst

    def broadcast(self, message: bytes | None, wait_forever: bool = False) -> bytes:
        """Step messages: the host group's broadcast."""
        return self.host.broadcast(message, wait_forever)

    @property
    def native(self) -> None:
        return None

    @property
    def wait_seconds(self) -> float:
        return self.host.wait_seconds

    def alive(self) -> bool:
        check = getattr(self.host, "alive", None)
        return True if check is None else check()

    def close(self) -> None:
        """Leaves both groups (idempotent); ranks waiting for this one fail."""
        if self.closed:
            return
        self.closed = True
        self.host.close()
        shutdown = getattr(self._pg, "shutdown", None)
        if shutdown is not None and self.backend == "nccl":
            try:
                shutdown()
            except Exception:  # noqa: BLE001 (a peer already gone)
                pass
        self._pg = None
