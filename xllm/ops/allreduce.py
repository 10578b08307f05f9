"""Sum-allreduce among the processes of one host through POSIX shared memory.

``ShmAllReduce(group, rank, world_size)`` joins (rank 0: creates) the segment
``/dev/shm/xllm_ar_<group>``; once every rank has attached, each
``allreduce(tensor)`` sums the tensor over all ranks in place. The native side
(``csrc/comm/``) copies each rank's data into its slot, lets rank ``j`` sum slice
``j`` of every slot in rank order (reduce-scatter), and copies the whole result
back, in chunks of ``buffer_bytes``. Because each element is summed by one rank
in one fixed order, every rank gets bit-identical results, equal to
:func:`allreduce_reference`.

Failures raise instead of hanging: ``TimeoutError`` when a peer is alive but does
not arrive within ``timeout`` seconds, ``RuntimeError`` when a peer died, closed
its object, or another rank gave up (the message names the group, the missing
ranks and what happened), ``ValueError`` for bad arguments, including tensors
whose size or dtype differ between ranks. After a timeout or a peer failure the
group is unusable; every rank must create a new one.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType

import torch

# Per-slot chunk size. The segment holds world_size + 1 of them; larger tensors
# are processed chunk by chunk.
DEFAULT_BUFFER_BYTES = 1 << 20
DEFAULT_TIMEOUT = 30.0


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"argument '{name}' must be an int, got {type(value).__name__}")
    return value


class ShmAllReduce:
    """A group of ``world_size`` processes on this host that sum tensors together.

    Construction blocks until all ranks have attached (``TimeoutError`` after
    ``timeout`` seconds). ``group`` names the segment (letters, digits, ``_-.``,
    at most 200 characters), so groups with different names never collide.
    Rank 0 owns the name: it removes a segment left by a crashed run under the
    same name, refuses one whose creator is still alive, and unlinks the name
    once all ranks have attached. ``timeout`` bounds every wait for peers. ``busy_wait``:
    seconds a waiting rank keeps its CPU (spinning, then yielding) before it sleeps
    (default 1 ms; longer keeps a sleeping peer's wake-up off the next barrier, at the price
    of a CPU a computing rank may share).
    """

    def __init__(
        self,
        group: str,
        rank: int,
        world_size: int,
        timeout: float = DEFAULT_TIMEOUT,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        busy_wait: float | None = None,
    ) -> None:
        from xllm import _C

        if not isinstance(group, str):
            raise ValueError(f"argument 'group' must be a str, got {type(group).__name__}")
        rank = _check_int("rank", rank)
        world_size = _check_int("world_size", world_size)
        buffer_bytes = _check_int("buffer_bytes", buffer_bytes)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise ValueError(
                f"argument 'timeout' must be a number of seconds, got {type(timeout).__name__}"
            )
        self._impl = _C.ShmAllReduce(group, rank, world_size, float(timeout), buffer_bytes)
        if busy_wait is not None:
            if isinstance(busy_wait, bool) or not isinstance(busy_wait, (int, float)):
                raise ValueError(f"argument 'busy_wait' must be a number of seconds, got "
                                 f"{type(busy_wait).__name__}")
            self._impl.busy_wait = float(busy_wait)

    def allreduce(self, tensor: torch.Tensor, bf16_sums: bool = False) -> torch.Tensor:
        """Sums ``tensor`` over all ranks in place and returns it.

        ``tensor`` must be a contiguous CPU tensor of float32 or bfloat16 with the
        same number of elements and dtype on every rank (bf16 is summed in fp32
        and rounded once). An empty tensor returns at once without synchronising.
        The GIL is released while waiting for the other ranks. ``bf16_sums`` (every
        rank alike): a float32 tensor is rounded to bf16 for the trip and the sum, then
        widened back -- half the bytes, bf16's precision.
        """
        self._impl.allreduce(tensor, bf16_sums)
        return tensor

    def broadcast(self, message: bytes | None, wait_forever: bool = False) -> bytes:
        """Rank 0 sends ``message`` to every rank and gets it back; every other rank passes
        None and gets rank 0's message. Any length (chunks of ``buffer_bytes``).
        ``wait_forever``: the first wait has no timeout on any rank (a worker idle between
        steps, rank 0 waiting for workers that still load); it still fails at once if a rank
        dies or leaves."""
        return self._impl.broadcast(message, wait_forever)

    def gather(self, src: torch.Tensor, dst: torch.Tensor | None, rows: int = 1
               ) -> torch.Tensor | None:
        """Rank 0's ``dst`` gets every rank's ``src`` in rank order (``dst`` holds world_size
        times src's bytes, e.g. ``[world_size, *src.shape]``) and is returned; the other
        ranks pass None and get None. ``src`` is contiguous, of the same size on every rank.
        ``rows``: src is that many rows and dst joins them row by row, ``[rows, world_size,
        row]`` (a ``[n, c]`` src per rank into a ``[n, world_size * c]`` dst: columns split
        over the ranks, joined)."""
        self._impl.gather(src, dst, rows)
        return dst

    @property
    def native(self) -> object:
        """The native group (``xllm._C.ShmAllReduce``), for native callers such as the
        decoder stack."""
        return self._impl

    def close(self) -> None:
        """Leaves the group; ranks still waiting for this one fail at once. Idempotent."""
        self._impl.close()

    @property
    def group(self) -> str:
        return self._impl.group

    @property
    def rank(self) -> int:
        return self._impl.rank

    @property
    def world_size(self) -> int:
        return self._impl.world_size

    @property
    def timeout(self) -> float:
        return self._impl.timeout

    @property
    def buffer_bytes(self) -> int:
        return self._impl.buffer_bytes

    @property
    def closed(self) -> bool:
        return self._impl.closed

    @property
    def wait_seconds(self) -> float:
        """Seconds this rank waited at barriers for peers not yet arrived (the skew of the
        ranks' work, and wake-ups), since it joined."""
        return self._impl.wait_seconds

    @staticmethod
    def segment_name(group: str) -> str:
        """The POSIX shm name a group uses ('/xllm_ar_<group>'); ValueError if invalid."""
        from xllm import _C

        if not isinstance(group, str):
            raise ValueError(f"argument 'group' must be a str, got {type(group).__name__}")
        return _C.ShmAllReduce.segment_name_for(group)

    def __enter__(self) -> ShmAllReduce:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (
            f"ShmAllReduce(group={self.group!r}, rank={self.rank}, "
            f"world_size={self.world_size}, {state})"
        )


def allreduce_reference(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """What ShmAllReduce computes from the ranks' inputs, in plain torch.

    ``tensors[r]`` is rank r's input. The sum runs left to right in rank order in
    float32 and is cast back to the input dtype once (round to nearest even), so
    the native result must match it bit for bit.
    """
    if len(tensors) == 0:
        raise ValueError("argument 'tensors' must hold one tensor per rank, got none")
    first = tensors[0]
    for r, t in enumerate(tensors):
        if t.shape != first.shape or t.dtype != first.dtype:
            raise ValueError(
                f"argument 'tensors' must share shape and dtype; tensors[{r}] is "
                f"{tuple(t.shape)} {t.dtype}, tensors[0] is "
                f"{tuple(first.shape)} {first.dtype}"
            )
    acc = first.to(torch.float32, copy=True)
    for t in tensors[1:]:
        acc += t.to(torch.float32)
    return acc.to(first.dtype)
