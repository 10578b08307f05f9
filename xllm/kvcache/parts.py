"""Tensor-parallel ranks' shares of the KV pool, read and written by rank 0 across hosts.

Under tensor parallelism each rank holds its KV heads of every block. On one host rank 0
maps the workers' shares (their memfds) and copies whole blocks itself. A worker on another
host (``EngineConfig.tp_master``) serves its share instead, on a connection of its own beside
the step messages: :class:`PartServer` answers two requests of rank 0's :class:`PartLink`,

- ``PULL ids``: its part of those blocks, region by region (``[region][block][segment]``);
- ``PUSH ids, bytes``: the same layout, written into those blocks;

and rank 0's KV store assembles whole blocks from them in a staging area
(:meth:`KVStore.readable`, :meth:`KVStore.land`), so the tiers, the peer paths and their
checksums see the bytes a one-host instance of the same parts sees.

**Ordering.** Rank 0 asks only for blocks it holds or has reserved for the copy, so none is
freed or reused meanwhile. A reserved block may lie in a page group the worker has not mapped
yet (rank 0 says which groups it maps before each step, synchronously, and reserves blocks
under the scheduler's state, never during that message): a PUSH maps the groups it writes
first, and every memory message after the reservation includes them while the block is
held. A PULL of a block in an unmapped group is refused, never read; a failed request is a
failed copy, whose blocks are recomputed. Each request has a deadline, and a connection
that failed is dropped and made again for the next request.

**Exposure.** The server listens on the worker's address towards rank 0 (the interface its
group connection uses, not every interface) and serves only connections that open with
rank 0's token (``WorkerSpec.part_token``, handed over through the rendezvous store): it
keeps stray connections out, not an attacker who can read that store. Like the group's own
connections, run it on a trusted network.
"""

from __future__ import annotations

import hmac
import logging
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from xllm import _C

if TYPE_CHECKING:
    from xllm.kvcache.memory import KVMemory

logger = logging.getLogger(__name__)

__all__ = ["PartLink", "PartServer", "PartsUnavailable"]

_MAGIC = 0x4B565053  # "SPVK"
_PULL, _PUSH = 1, 2
_REQUEST = struct.Struct("<IIIQ")  # magic, op, blocks, payload bytes (a push's)
_REPLY = struct.Struct("<IQ")  # status (0: done), bytes that follow (a pull's, or the error)
_TOKEN_BYTES = 32  # a connection opens with the token rank 0 gave its workers
MAX_REQUEST_BYTES = 1 << 30  # a larger request is a broken peer: the connection is dropped
TIMEOUT_S = 30.0  # one request's deadline


class PartsUnavailable(OSError):
    """A remote rank's part of some blocks could not be read or written (gone, too slow, or
    the blocks not there): the copy fails and its blocks are recomputed."""


def _token_bytes(token: str) -> bytes:
    """A connection's opening: the token (the worker spec's ``part_token``), padded."""
    data = token.encode()
    if len(data) > _TOKEN_BYTES:
        raise ValueError(f"a part server's token is at most {_TOKEN_BYTES} bytes")
    return data.ljust(_TOKEN_BYTES, b"\0")


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    while view.nbytes:
        got = sock.recv_into(view)
        if not got:
            raise ConnectionError("the connection closed")
        view = view[got:]


def _recv(sock: socket.socket, n: int) -> bytearray:
    data = bytearray(n)
    _recv_into(sock, memoryview(data))
    return data


def staged_regions(base: int, segments: Sequence[int], n: int) -> list[int]:
    """The regions of ``n`` blocks staged region-major at ``base`` (``[region][block]``, each
    region's segments back to back): the native copies' view of a pool of ``n`` blocks,
    block ``k`` of region ``r`` at ``regions[r] + k * segments[r]``."""
    regions, at = [], base
    for seg in segments:
        regions.append(at)
        at += n * seg
    return regions


class PartServer:
    """A worker's side: serves its share of the pool (``memory``, set once the worker has
    built it) to rank 0 on ``host`` (the worker's address towards rank 0), a free port.
    ``lock`` guards the memory's mapping: the worker holds it while it follows rank 0's
    memory messages."""

    def __init__(self, host: str, token: str = "") -> None:
        self.lock = threading.Lock()
        self._token = _token_bytes(token)
        self.memory: KVMemory | None = None
        self._listener = socket.create_server((host, 0))
        self.port: int = self._listener.getsockname()[1]
        self._closed = False
        self._conns: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept, name="xllm-kv-parts", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stops serving: the listener and every connection are shut (a request in flight
        fails on rank 0's side)."""
        self._closed = True
        for sock in [self._listener, *self._conns]:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # (wakes a thread blocked on it)
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if self._closed:
                conn.close()
                return
            self._conns.add(conn)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), name="xllm-kv-parts-conn",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = np.empty(0, dtype=np.uint8)
        with conn:
            try:
                conn.settimeout(TIMEOUT_S)
                if not hmac.compare_digest(bytes(_recv(conn, _TOKEN_BYTES)), self._token):
                    raise ValueError("a connection without rank 0's token: dropped")
                conn.settimeout(None)
            except (OSError, ValueError):
                self._conns.discard(conn)
                return
            while True:
                try:
                    magic, op, n, payload = _REQUEST.unpack(_recv(conn, _REQUEST.size))
                    if magic != _MAGIC or op not in (_PULL, _PUSH) or payload > MAX_REQUEST_BYTES \
                            or n > MAX_REQUEST_BYTES // 4:
                        raise ValueError("not rank 0 speaking this protocol: dropped")
                    ids = np.frombuffer(_recv(conn, 4 * n), dtype=np.int32)
                    if op == _PUSH:
                        if buf.size < payload:
                            buf = np.empty(payload, dtype=np.uint8)
                        _recv_into(conn, memoryview(buf)[:payload])
                    else:
                        memory = self.memory
                        need = 0 if memory is None else (
                            len(ids) * memory.segment_bytes * memory.num_regions)
                        if buf.size < need:
                            buf = np.empty(need, dtype=np.uint8)
                    error, nbytes = self._copy(op, ids, payload, buf)
                    if error is not None:
                        text = error.encode()
                        conn.sendall(_REPLY.pack(1, len(text)) + text)
                        continue
                    conn.sendall(_REPLY.pack(0, nbytes if op == _PULL else 0))
                    if op == _PULL and nbytes:
                        conn.sendall(memoryview(buf)[:nbytes])
                except (OSError, ValueError):
                    self._conns.discard(conn)
                    return  # rank 0 gone, or it gave up on this connection

    def _copy(self, op: int, ids: np.ndarray, payload: int, buf: np.ndarray
              ) -> tuple[str | None, int]:
        """A request's copy (under the lock): (error or None, bytes of the pull's answer)."""
        with self.lock:
            memory = self.memory
            if memory is None:
                return "this rank has no KV memory yet", 0
            n = len(ids)
            nbytes = n * memory.segment_bytes * memory.num_regions
            if n and (int(ids.min()) < 0 or int(ids.max()) >= memory.num_blocks):
                return f"block ids outside 0..{memory.num_blocks - 1}", 0
            if op == _PUSH and payload != nbytes:
                return f"{payload} bytes for {n} blocks of {nbytes // max(n, 1)}", 0
            if op == _PULL and buf.size < nbytes:
                return "the KV memory changed under the request", 0
            groups = np.unique(ids // memory.blocks_per_group).tolist()
            unmapped = [g for g in groups if not memory.is_mapped(g)]
            if op == _PULL and unmapped:
                return f"page groups {unmapped[:4]} are not mapped here", 0
            for g in unmapped:  # (a push into blocks rank 0 just reserved)
                memory.map_group(g)
            if n:
                staged = staged_regions(buf.ctypes.data,
                                        [memory.segment_bytes] * memory.num_regions, n)
                block_ids, order = ids.tolist(), list(range(n))
                if op == _PULL:
                    _C.kv_copy_blocks(memory.regions, block_ids, staged, order,
                                      memory.segment_bytes)
                else:
                    _C.kv_copy_blocks(staged, order, memory.regions, block_ids,
                                      memory.segment_bytes)
            return None, nbytes


class PartLink:
    """Rank 0's side: the remote ranks' part servers, in rank order (``(host, port)`` and the
    bytes of one block of its part, each). One request at a time (a lock), to every rank at
    once; failures raise :class:`PartsUnavailable`."""

    def __init__(self, ranks: Sequence[tuple[str, int]], part_bytes: Sequence[int],
                 timeout: float = TIMEOUT_S, token: str = "") -> None:
        if len(ranks) != len(part_bytes):
            raise ValueError("a part size for each rank")
        self._token = _token_bytes(token)
        self.ranks = list(ranks)
        self.part_bytes = list(part_bytes)
        self.timeout = timeout
        self._socks: list[socket.socket | None] = [None] * len(self.ranks)
        self._lock = threading.Lock()
        self._closed = False

    def pull(self, blocks: Sequence[int], regions: Sequence[Sequence[memoryview]],
             meanwhile: Callable[[], object] | None = None) -> None:
        """Each rank's part of ``blocks`` into its regions' views (one list a rank, in
        order; a region's view takes its segments of the blocks back to back);
        ``meanwhile`` runs once the requests are out, while the ranks copy and send."""
        self._request(_PULL, blocks, regions, meanwhile)

    def push(self, blocks: Sequence[int], regions: Sequence[Sequence[memoryview]],
             meanwhile: Callable[[], object] | None = None) -> None:
        """Writes each rank's part of ``blocks`` from its regions' views (as ``pull``);
        ``meanwhile`` runs while the bytes go out (they are sent from another thread)."""
        self._request(_PUSH, blocks, regions, meanwhile)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop()

    def _drop(self) -> None:
        for i, sock in enumerate(self._socks):
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
            self._socks[i] = None

    def _conn(self, i: int) -> socket.socket:
        sock = self._socks[i]
        if sock is None:
            sock = socket.create_connection(self.ranks[i], timeout=self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(self._token)
            self._socks[i] = sock
        return sock

    def _request(self, op: int, blocks: Sequence[int], data: Sequence,
                 meanwhile: Callable[[], object] | None) -> None:
        ids = np.asarray(blocks, dtype=np.int32)
        n = len(ids)
        if n == 0:
            if meanwhile is not None:
                meanwhile()
            return
        with self._lock:
            if self._closed:
                raise PartsUnavailable("the KV part link is closed")
            try:
                socks = [self._conn(i) for i in range(len(self.ranks))]
                heads = [_REQUEST.pack(_MAGIC, op, n, n * self.part_bytes[i] if op == _PUSH
                                       else 0) + ids.tobytes() for i in range(len(socks))]
                if op == _PULL:  # every request first: the ranks copy at once
                    for sock, head in zip(socks, heads, strict=True):
                        sock.sendall(head)
                    if meanwhile is not None:
                        meanwhile()
                else:
                    self._send_pushes(socks, heads, data, meanwhile)
                for i in range(len(self.ranks)):
                    sock = self._conn(i)
                    status, nbytes = _REPLY.unpack(_recv(sock, _REPLY.size))
                    if status:
                        raise PartsUnavailable(f"rank {i + 1}: "
                                               f"{_recv(sock, nbytes).decode(errors='replace')}")
                    if op == _PULL:
                        want = sum(region.nbytes for region in data[i])
                        if nbytes != want:
                            raise PartsUnavailable(f"rank {i + 1} answered {nbytes} bytes for "
                                                   f"{want}")
                        for region in data[i]:
                            _recv_into(sock, region)
            except PartsUnavailable:
                self._drop()  # (the other ranks' answers may still be on their way)
                raise
            except (OSError, ValueError, struct.error) as e:
                self._drop()
                raise PartsUnavailable(f"a remote rank's KV part: {e}") from None
            except BaseException:
                self._drop()  # (``meanwhile`` failed: the ranks' answers are not read)
                raise

    @staticmethod
    def _send_pushes(socks: list[socket.socket], heads: list[bytes], data: Sequence,
                     meanwhile: Callable[[], object] | None) -> None:
        """Sends every rank its push; on another thread when there is work to overlap."""
        failed: list[BaseException] = []

        def send() -> None:
            try:
                for sock, head, regions in zip(socks, heads, data, strict=True):
                    sock.sendall(head)
                    for region in regions:
                        sock.sendall(region)
            except BaseException as e:  # noqa: BLE001 - raised on the calling thread
                failed.append(e)

        if meanwhile is None:
            send()
        else:
            sender = threading.Thread(target=send, name="xllm-kv-parts-push", daemon=True)
            sender.start()
            try:
                meanwhile()
            finally:
                sender.join()
        if failed:
            raise failed[0]
