"""Bounded MPMC queue carrying Python objects between threads.

``MPMCQueue`` is the native lock-free ring (``xllm._C``, Dmitry Vyukov's bounded
MPMC queue with per-cell sequence numbers); ``PyMPMCQueue`` is a pure-Python
twin with the same interface and semantics on ``collections.deque`` +
``threading.Condition``, used by the tests as the reference and by the
benchmark as a baseline. Both raise ``QueueClosed`` (a ``RuntimeError``).

The contract, for both:

- ``Queue(capacity)``: capacity is a power of two >= 2 (and <= 2**30), else
  ValueError. The queue holds a strong reference to each item inside and drops
  the references of items still inside when it is freed.
- ``try_push(item) -> bool``: False when full (the item stays with the caller).
- ``push(item, timeout=None)``: waits while full (GIL released); TimeoutError
  when ``timeout`` seconds pass (``None``: no limit, ``0``: no wait).
- ``try_pop(default=None)``: the oldest item, or ``default`` when empty. Pass a
  sentinel of your own as ``default`` if ``None`` can be an item.
- ``pop(timeout=None)``: waits while empty (GIL released); TimeoutError on
  timeout.
- ``push_many(items) -> int``: pushes a prefix of the sequence ``items`` without
  waiting and returns how many went in; the rest stay with the caller (so
  ``items`` must be a sequence such as a list, not an iterator, str or bytes:
  TypeError otherwise).
- ``pop_many(max_items, timeout=0.0) -> list``: up to ``max_items`` items (never
  more than ``capacity``) in queue order; when empty it waits up to ``timeout``
  for the first item (``None``: no limit) and returns ``[]`` if none came.
- ``close()``: later pushes (``try_push`` and ``push_many`` included) raise
  QueueClosed; waiters wake; items inside can still be popped, and once the
  queue is closed and empty every pop (``try_pop`` and ``pop_many`` included)
  raises QueueClosed. The engine uses this for shutdown. Idempotent.
- ``size`` / ``len(q)``: approximate under concurrency, exact when quiescent
  (so ``bool(q)`` means "not empty" like other containers); ``capacity``;
  ``closed``.

Ordering: items leave in the order their pushes took effect, so each producer's
items come out in the order it pushed them, and any one consumer sees each
producer's items in increasing order. Pushes from different producers that
overlap in time have no defined order between them. Timeouts and negative or
NaN values: ``timeout`` must be None or a non-negative number (ValueError).

Guarantees of the native ring (memory ordering, progress, what ``size`` counts)
are written out in ``csrc/queue/mpmc_queue.h`` and docs/ops.md. The queue does
not take part in cyclic garbage collection: an item that refers back to its
queue keeps both alive until it is popped.
"""

from __future__ import annotations

import math
import operator
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from xllm._C import MPMCQueue, QueueClosed

__all__ = ["MPMCQueue", "PyMPMCQueue", "QueueClosed"]

_MAX_CAPACITY = 1 << 30


def _check_capacity(capacity: int) -> int:
    capacity = operator.index(capacity)  # TypeError for floats, like the native one
    if capacity < 2 or capacity > _MAX_CAPACITY or capacity & (capacity - 1):
        hint = ""
        if 2 < capacity < _MAX_CAPACITY:
            up = 1 << (capacity - 1).bit_length()
            hint = f"; try {up // 2} or {up}"
        raise ValueError(
            f"capacity must be a power of two >= 2 (and <= 2**30), got {capacity}{hint}"
        )
    return capacity


def _check_timeout(timeout: float | None) -> float | None:
    """None (no limit) or seconds; huge values mean no limit, as in the native queue."""
    if timeout is None:
        return None
    seconds = float(timeout)
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(
            f"timeout must be None or a non-negative number of seconds, got {timeout!r}"
        )
    return None if seconds >= min(1e9, threading.TIMEOUT_MAX) else seconds


def _check_items(items: Sequence[Any]) -> Sequence[Any]:
    # What PySequence_Check accepts (indexable, not a mapping), minus text and bytes.
    indexable = isinstance(items, Sequence) or (
        hasattr(type(items), "__getitem__")
        and hasattr(type(items), "__len__")
        and not isinstance(items, Mapping)
    )
    if isinstance(items, (str, bytes, bytearray)) or not indexable:
        raise TypeError(
            "items must be a sequence such as a list or tuple (not str/bytes, not an "
            "iterator: the items that do not fit stay with the caller), got "
            f"{type(items).__name__}"
        )
    return items


class PyMPMCQueue:
    """Pure-Python twin of ``MPMCQueue`` (same interface and semantics, one lock)."""

    def __init__(self, capacity: int) -> None:
        self._capacity = _check_capacity(capacity)
        self._items: deque[Any] = deque()
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._closed = False

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def size(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        closed = " closed" if self._closed else ""
        return f"<PyMPMCQueue capacity={self._capacity} size~{len(self._items)}{closed}>"

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()

    def try_push(self, item: Any) -> bool:
        with self._lock:
            if self._closed:
                raise QueueClosed("push to a closed PyMPMCQueue")
            if len(self._items) >= self._capacity:
                return False
            self._items.append(item)
            self._not_empty.notify()
            return True

    def push(self, item: Any, timeout: float | None = None) -> None:
        limit = _check_timeout(timeout)
        with self._lock:
            if not self._wait(self._not_full, self._has_room, limit):
                raise TimeoutError(f"push to a full PyMPMCQueue timed out after {timeout} s")
            if self._closed:
                raise QueueClosed("push to a closed PyMPMCQueue")
            self._items.append(item)
            self._not_empty.notify()

    def try_pop(self, default: Any = None) -> Any:
        with self._lock:
            if self._items:
                return self._take_one()
            if self._closed:
                raise QueueClosed("pop from a closed and empty PyMPMCQueue")
            return default

    def pop(self, timeout: float | None = None) -> Any:
        limit = _check_timeout(timeout)
        with self._lock:
            if not self._wait(self._not_empty, self._has_items, limit):
                raise TimeoutError(f"pop from an empty PyMPMCQueue timed out after {timeout} s")
            if not self._items:
                raise QueueClosed("pop from a closed and empty PyMPMCQueue")
            return self._take_one()

    def push_many(self, items: Sequence[Any]) -> int:
        items = _check_items(items)
        with self._lock:
            if self._closed:
                raise QueueClosed("push to a closed PyMPMCQueue")
            room = self._capacity - len(self._items)
            taken = [items[i] for i in range(min(room, len(items)))]
            self._items.extend(taken)
            if taken:
                self._not_empty.notify(len(taken))
            return len(taken)

    def pop_many(self, max_items: int, timeout: float | None = 0.0) -> list[Any]:
        max_items = operator.index(max_items)
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        limit = _check_timeout(timeout)
        with self._lock:
            if not self._items and limit != 0:
                self._wait(self._not_empty, self._has_items, limit)
            n = min(max_items, self._capacity, len(self._items))
            if n == 0 and self._closed:
                raise QueueClosed("pop from a closed and empty PyMPMCQueue")
            out = [self._items.popleft() for _ in range(n)]
            if out:
                self._not_full.notify(len(out))
            return out

    # -- helpers; all run with self._lock held --

    def _has_items(self) -> bool:
        return bool(self._items) or self._closed

    def _has_room(self) -> bool:
        return len(self._items) < self._capacity or self._closed

    def _take_one(self) -> Any:
        item = self._items.popleft()
        self._not_full.notify()
        return item

    @staticmethod
    def _wait(cond: threading.Condition, ready: Callable[[], bool], limit: float | None) -> bool:
        """Condition.wait_for with timeout 0 meaning "do not wait"; True once ready()."""
        if ready():
            return True
        if limit == 0:
            return False
        deadline = None if limit is None else time.monotonic() + limit
        while not ready():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            cond.wait(remaining)
        return True
