"""A tensor-parallel group whose ranks sit on different hosts, over TCP.

``TcpGroup(master, rank, world_size)`` is what ``ShmAllReduce`` is on one host, where shared
memory cannot reach: the same ``allreduce``, ``gather``, ``broadcast`` and ``close``.

- **Rendezvous:** torch.distributed's ``TCPStore``, served by rank 0 at ``master``
  (``HOST:PORT``; torch's store listens on that port on every interface of rank 0's host).
  Rank 0 publishes its step-message address and whatever it puts in the store (the
  engine: the workers' spec); workers connect, retrying until ``timeout``.
- **Sums and gathers:** native (``xllm._C.TcpCollective``), a star through rank 0 over the
  same connections as the step messages: every worker sends its part, rank 0 sums every
  element once, in rank order, and sends the result back, so every rank gets the same bits;
  bf16 is summed in fp32 and rounded once, as the shared-memory group does. One round trip a
  sum, without the GIL; the native decoder stack sums through it directly. (gloo, which this
  replaced, took 1.2-1.8 ms a sum of 576 floats on loopback here, against ~20 us for a TCP
  round trip.)
- **Step messages:** a plain TCP connection from every worker to rank 0 (length-prefixed
  frames). A worker's first ``broadcast(None, wait_forever=True)`` announces it (rank 0's
  first waiting broadcast returns once every worker has: "every rank has loaded"); a
  worker idle between steps waits without a deadline, and a closed connection (rank 0
  gone) fails its wait at once.

Failures raise instead of hanging: a peer that died fails the next message or sum
(``RuntimeError``: its connection reads as closed), and every sum and gather is bounded by
``timeout``. ``alive()`` (rank 0) tells whether every worker's connection is still open.
"""

from __future__ import annotations

import datetime
import select
import socket
import struct
import time

import torch

from xllm import _C

_FRAME = struct.Struct("<Q")
_MSG_KEY = "xllm/tp/messages"
_SIZE_KEY = "xllm/tp/world_size"


def parse_address(address: str) -> tuple[str, int]:
    """'HOST:PORT' -> (host, port); ValueError naming what is wrong."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT (a port in 1-65535), got {address!r}")
    return host.strip("[]"), int(port)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(min(n - len(data), 1 << 20))
        if not chunk:
            raise RuntimeError("the connection to the other rank closed (it exited or died)")
        data += chunk
    return bytes(data)


class TcpGroup:
    """One rank of a tensor-parallel group across hosts (see the module doc).

    Construction blocks until every rank has joined, at most ``join_timeout`` seconds
    (default ``timeout``, which bounds every later wait). A worker may pass world_size None
    to take rank 0's. ``store_items`` (rank 0): extra ``{key: bytes}`` published in the
    store for the workers, read with ``get``.
    """

    def __init__(self, master: str, rank: int, world_size: int | None, timeout: float = 60.0,
                 store_items: dict[str, bytes] | None = None,
                 join_timeout: float | None = None) -> None:
        import torch.distributed as dist

        host, port = parse_address(master)
        host = socket.gethostbyname(host)
        if rank == 0 and world_size is None:
            raise ValueError("rank 0 must give world_size")
        self.rank, self.timeout = rank, float(timeout)
        self.join_timeout = float(join_timeout or timeout)
        self.closed = False
        self._peers: list[socket.socket] = []  # rank 0: one per worker, in rank order
        self._master_conn: socket.socket | None = None  # a worker's connection to rank 0
        self._announced = False
        self.store = dist.TCPStore(host, port, world_size, is_master=rank == 0,
                                   timeout=datetime.timedelta(seconds=self.join_timeout),
                                   wait_for_workers=False)
        if rank == 0:
            self.store.set(_SIZE_KEY, str(world_size))
        else:
            self.store.wait([_SIZE_KEY])
            world_size = world_size or int(self.store.get(_SIZE_KEY))
        if world_size < 2 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of world_size {world_size}: need world_size >= 2 "
                             "and 0 <= rank < world_size")
        self.world_size = world_size
        try:
            if rank == 0:
                self._accept_workers(host, store_items or {})
            else:
                self._connect_to_rank0()
            conns = self._peers if rank == 0 else [self._master_conn]
            self._native = _C.TcpCollective(rank, world_size, [c.fileno() for c in conns],
                                            self.timeout)
        except BaseException:
            self.close()
            raise

    # ---- joining -----------------------------------------------------------------------

    def _accept_workers(self, local: str, items: dict[str, bytes]) -> None:
        listener = socket.create_server((local, 0))
        try:
            for key, value in items.items():
                self.store.set(key, value)
            self.store.set(_MSG_KEY, f"{local}:{listener.getsockname()[1]}")
            deadline = time.monotonic() + self.join_timeout
            peers: dict[int, socket.socket] = {}
            while len(peers) < self.world_size - 1:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([listener], [], [], left)[0]:
                    raise TimeoutError(
                        f"{len(peers)} of {self.world_size - 1} tensor-parallel workers joined "
                        f"within {self.join_timeout:.0f} s (start each with python -m "
                        "xllm.runtime.worker --master HOST:PORT --rank R)")
                conn, _ = listener.accept()
                conn.settimeout(self.timeout)
                (r,) = struct.unpack("<I", _recv_exact(conn, 4))
                if not 0 < r < self.world_size or r in peers:
                    conn.close()
                    raise RuntimeError(f"a worker joined as rank {r}: ranks must be 1.."
                                       f"{self.world_size - 1}, each once")
                conn.settimeout(None)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peers[r] = conn
            self._peers = [peers[r] for r in range(1, self.world_size)]
        finally:
            listener.close()

    def _connect_to_rank0(self) -> None:
        self.store.wait([_MSG_KEY])
        host, port = parse_address(self.store.get(_MSG_KEY).decode())
        conn = socket.create_connection((host, port), timeout=self.join_timeout)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(struct.pack("<I", self.rank))
        conn.settimeout(None)
        self._master_conn = conn

    def local_host(self) -> str:
        """A worker's address on its path to rank 0 (where it serves rank 0 more)."""
        assert self._master_conn is not None
        return self._master_conn.getsockname()[0]

    def peer_host(self, rank: int) -> str:
        """Rank 0: worker ``rank``'s address, as its connection comes from."""
        return self._peers[rank - 1].getpeername()[0]

    def get(self, key: str) -> bytes:
        """A value rank 0 published in the store (``store_items``)."""
        return self.store.get(key)

    # ---- collectives --------------------------------------------------------------------

    def allreduce(self, tensor: torch.Tensor, bf16_sums: bool = False) -> torch.Tensor:
        """Sums a contiguous CPU float32 or bfloat16 tensor over all ranks, in place
        (``bf16_sums``: a float32 one rounded to bf16 first and after, as on shared memory)."""
        return self._native.allreduce(tensor, bf16_sums)

    def gather(self, src: torch.Tensor, dst: torch.Tensor | None, rows: int = 1
               ) -> torch.Tensor | None:
        """Rank 0's ``dst`` ([world_size, *src.shape] or as many bytes) gets every rank's
        ``src`` in rank order; the other ranks pass None. ``rows``: dst joins src's rows
        row by row, ``[rows, world_size, row]`` (as ShmAllReduce.gather)."""
        if self.rank == 0 and dst is None:
            raise ValueError("rank 0 must pass dst")
        self._native.gather(src.contiguous(), dst if self.rank == 0 else None, rows)
        return dst if self.rank == 0 else None

    def broadcast(self, message: bytes | None, wait_forever: bool = False) -> bytes:
        """Rank 0 sends ``message`` to every worker and gets it back; a worker passes None
        and gets it. ``wait_forever``: a worker waits without a deadline (idle between
        steps); rank 0's first such call first waits for every worker's announcement."""
        if self.closed:
            raise RuntimeError("the tensor-parallel group is closed")
        if self.rank == 0:
            if message is None:
                raise ValueError("rank 0 must pass the message")
            if wait_forever and not self._announced:
                for r, conn in enumerate(self._peers, start=1):
                    if _recv_exact(conn, 1) != b"R":
                        raise RuntimeError(f"rank {r} sent something else than its announcement")
                self._announced = True
            frame = _FRAME.pack(len(message)) + message
            for r, conn in enumerate(self._peers, start=1):
                try:
                    conn.sendall(frame)
                except OSError as e:
                    raise RuntimeError(f"rank {r} is gone: {e}") from None
            return message
        conn = self._master_conn
        assert conn is not None
        if wait_forever and not self._announced:
            conn.sendall(b"R")
            self._announced = True
        conn.settimeout(None if wait_forever else self.timeout)
        try:
            (n,) = _FRAME.unpack(_recv_exact(conn, _FRAME.size))
            return _recv_exact(conn, n)
        except TimeoutError:
            raise TimeoutError(f"no step message from rank 0 within {self.timeout:.0f} s") \
                from None

    # ---- state --------------------------------------------------------------------------

    @property
    def native(self) -> object:
        """The native group (``xllm._C.TcpCollective``), for native callers such as the
        decoder stack."""
        return self._native

    @property
    def wait_seconds(self) -> float:
        """Seconds this rank waited for its peers' bytes in sums and gathers."""
        return self._native.wait_seconds

    def alive(self) -> bool:
        """Rank 0: whether every worker's connection is still open (a closed one reads as
        end of file)."""
        for conn in self._peers:
            if select.select([conn], [], [], 0)[0]:
                try:
                    if conn.recv(1, socket.MSG_PEEK) == b"":
                        return False
                except OSError:
                    return False
        return not self.closed

    def close(self) -> None:
        """Leaves the group: the other ranks' next wait fails. Idempotent."""
        if self.closed:
            return
        self.closed = True
        native = getattr(self, "_native", None)
        if native is not None:
            native.close()  # a sum waiting on another thread fails now
        for conn in [*self._peers, *([self._master_conn] if self._master_conn else [])]:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes a wait on it; the peers read EOF
            except OSError:
                pass
            try:
                conn.close()
            except OSError:
                pass
