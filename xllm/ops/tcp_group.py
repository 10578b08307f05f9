"""A tensor-parallel group whose ranks sit on different hosts, over TCP.

``TcpGroup(master, rank, world_size)`` is what ``ShmAllReduce`` is on one host, where shared
memory cannot reach: the same ``allreduce``, ``gather``, ``broadcast`` and ``close``.

- **Rendezvous:** torch.distributed's ``TCPStore``, served by rank 0 at ``master``
  (``HOST:PORT``; torch's store listens on that port on every interface of rank 0's host).
  Rank 0 publishes its step-message address and whatever it puts in the store (the
  engine: the workers' spec); workers connect, retrying until ``timeout``.
- **Sums and gathers:** a gloo process group over TCP (torch.distributed), on the network
  interface that holds this rank's address towards the master. Each element of a sum is
  added once, so every rank gets the same bits; bf16 is summed in fp32 and rounded once,
  as the shared-memory group does.
- **Step messages:** a plain TCP connection from every worker to rank 0 (length-prefixed
  frames). A worker's first ``broadcast(None, wait_forever=True)`` announces it (rank 0's
  first waiting broadcast returns once every worker has: "every rank has loaded"); a
  worker idle between steps waits without a deadline, and a closed connection (rank 0
  gone) fails its wait at once.

Failures raise instead of hanging: a peer that died fails the next message or sum
(``RuntimeError``; gloo notices the closed connection), and every sum and gather is bounded
by ``timeout``. ``alive()`` (rank 0) tells whether every worker's connection is still open.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import select
import socket
import struct
import time

import torch

_FRAME = struct.Struct("<Q")
_SIOCGIFADDR = 0x8915
_MSG_KEY = "xllm/tp/messages"
_SIZE_KEY = "xllm/tp/world_size"


def parse_address(address: str) -> tuple[str, int]:
    """'HOST:PORT' -> (host, port); ValueError naming what is wrong."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT (a port in 1-65535), got {address!r}")
    return host.strip("[]"), int(port)


def interface_of(ip: str) -> str:
    """The name of the network interface holding IPv4 address ``ip`` (gloo's device)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR,
                                  struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address
            if socket.inet_ntoa(raw[20:24]) == ip:
                return name
    raise RuntimeError(f"no network interface of this host holds {ip}")


def _local_ip_towards(host: str, port: int) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))  # no packet: picks the route and its source address
        return s.getsockname()[0]


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
        local = host if rank == 0 else _local_ip_towards(host, port)
        wait = datetime.timedelta(seconds=self.timeout)
        try:
            if rank == 0:
                self._accept_workers(local, store_items or {})
            else:
                self._connect_to_rank0()
            # gloo picks its device from this variable, read as the group is made.
            os.environ["GLOO_SOCKET_IFNAME"] = interface_of(local)
            self._pg = dist.ProcessGroupGloo(self.store, rank, world_size, wait)
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

    def get(self, key: str) -> bytes:
        """A value rank 0 published in the store (``store_items``)."""
        return self.store.get(key)

    # ---- collectives --------------------------------------------------------------------

    def allreduce(self, tensor: torch.Tensor, bf16_sums: bool = False) -> torch.Tensor:
        """Sums a contiguous CPU float32 or bfloat16 tensor over all ranks, in place
        (``bf16_sums``: a float32 one rounded to bf16 first and after, as on shared memory)."""
        if tensor.numel() == 0:
            return tensor
        narrow = tensor.dtype == torch.bfloat16 or bf16_sums
        work = tensor.to(torch.bfloat16).float() if narrow else tensor
        self._wait(self._pg.allreduce([work]))
        if narrow:
            tensor.copy_(work.to(torch.bfloat16))
        return tensor

    def gather(self, src: torch.Tensor, dst: torch.Tensor | None, rows: int = 1
               ) -> torch.Tensor | None:
        """Rank 0's ``dst`` ([world_size, *src.shape] or as many bytes) gets every rank's
        ``src`` in rank order; the other ranks pass None. ``rows``: dst joins src's rows
        row by row, ``[rows, world_size, row]`` (as ShmAllReduce.gather)."""
        import torch.distributed as dist

        opts = dist.GatherOptions()
        opts.rootRank = 0
        if self.rank == 0:
            if dst is None:
                raise ValueError("rank 0 must pass dst")
            world = self.world_size
            into = dst if rows == 1 else torch.empty((world, *src.shape), dtype=src.dtype)
            parts = list(into.view(world, *src.shape).unbind(0))
            self._wait(self._pg.gather([parts], [src.contiguous()], opts))
            if rows > 1:
                dst.view(rows, world, -1).copy_(into.view(world, rows, -1).transpose(0, 1))
            return dst
        self._wait(self._pg.gather([], [src.contiguous()], opts))
        return None

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

    def _wait(self, work) -> None:  # noqa: ANN001 - a torch.distributed Work
        try:
            work.wait()
        except RuntimeError as e:
            raise RuntimeError(f"tensor-parallel sum failed (a rank died or left?): {e}") \
                from None

    # ---- state --------------------------------------------------------------------------

    @property
    def native(self) -> None:
        """No native group: the native decoder stack cannot sum over TCP, so models use their
        module path."""
        return None

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
        for conn in [*self._peers, *([self._master_conn] if self._master_conn else [])]:
            try:
                conn.close()
            except OSError:
                pass
        pg = getattr(self, "_pg", None)
        if pg is not None:
            try:
                pg.shutdown()
            except Exception:  # noqa: BLE001 - best effort: the process may be exiting
                pass
