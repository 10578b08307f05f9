"""MPMC queue hand-off between two threads: the native ring against queue.Queue.

Each timed call builds a fresh queue, starts a producer thread that pushes N
items and a consumer thread that pops all N, and joins both. Both sides of a
comparison do exactly that, with the same N, the same capacity and the same
item objects, so thread start/join costs fall on both alike. The target row
uses the one-item blocking calls (``push``/``pop`` vs ``put``/``get``); extra
rows show batch hand-off (``push_many``/``pop_many``) and the pure-Python twin.
"""

from __future__ import annotations

import queue as stdlib_queue
import threading
from collections.abc import Callable

from bench.ops.common import Row, compare
from xllm.ops.queue import MPMCQueue, PyMPMCQueue

CAPACITY = 1024
BATCH = 256


def _two_threads(producer: Callable[[], None], consumer: Callable[[], None]) -> None:
    threads = [threading.Thread(target=consumer), threading.Thread(target=producer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _handoff_native(items: list[object], make: Callable[[int], object]) -> Callable[[], None]:
    n = len(items)

    def run() -> None:
        q = make(CAPACITY)

        def producer() -> None:
            push = q.push
            for item in items:
                push(item)

        def consumer() -> None:
            pop = q.pop
            for _ in range(n):
                pop()

        _two_threads(producer, consumer)

    return run


def _handoff_batched(items: list[object]) -> Callable[[], None]:
    n = len(items)

    def run() -> None:
        q = MPMCQueue(CAPACITY)

        def producer() -> None:
            done = 0
            while done < n:
                pushed = q.push_many(items[done : done + BATCH])
                done += pushed
                if pushed == 0:  # full: wait (GIL released) for room, one item at a time
                    q.push(items[done])
                    done += 1

        def consumer() -> None:
            got = 0
            while got < n:
                got += len(q.pop_many(BATCH, timeout=None))

        _two_threads(producer, consumer)

    return run


def _handoff_stdlib(items: list[object]) -> Callable[[], None]:
    n = len(items)

    def run() -> None:
        q: stdlib_queue.Queue[object] = stdlib_queue.Queue(maxsize=CAPACITY)

        def producer() -> None:
            put = q.put
            for item in items:
                put(item)

        def consumer() -> None:
            get = q.get
            for _ in range(n):
                get()

        _two_threads(producer, consumer)

    return run


def run(quick: bool) -> list[Row]:
    n = 20_000 if quick else 100_000
    items = [object() for _ in range(n)]  # the same objects for every contender
    shape = f"N={n} cap={CAPACITY}"
    timer = {"min_time": 0.2, "repeat": 3, "warmup": 1}
    stdlib = "queue.Queue put/get, 2 threads"
    rows = [
        compare(
            "queue handoff push/pop",
            shape,
            _handoff_native(items, MPMCQueue),
            _handoff_stdlib(items),
            stdlib,
            min_ratio=3,
            note="per call: new queue, start+join producer and consumer threads",
            **timer,
        ),
        compare(
            "queue handoff push_many/pop_many",
            f"{shape} batch={BATCH}",
            _handoff_batched(items),
            _handoff_stdlib(items),
            stdlib + " (one at a time)",
            note="native batch calls; no target",
            **timer,
        ),
        compare(
            "queue handoff vs PyMPMCQueue",
            shape,
            _handoff_native(items, MPMCQueue),
            _handoff_native(items, PyMPMCQueue),
            "PyMPMCQueue push/pop (deque + Condition twin)",
            note="no target",
            **timer,
        ),
    ]
    return rows
