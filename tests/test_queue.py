"""MPMC queue: the native ring and its pure-Python twin against one contract.

Every behavioural test runs on both implementations; the stress tests prove no
item is lost or duplicated and per-producer order holds under contention, and
the last test builds the C++ stress program with ThreadSanitizer and runs it.
"""

from __future__ import annotations

import gc
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from xllm.ops.queue import MPMCQueue, PyMPMCQueue, QueueClosed

IMPLS = [MPMCQueue, PyMPMCQueue]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=IMPLS, ids=["native", "python"])
def impl(request: pytest.FixtureRequest) -> type:
    return request.param


class Item:
    """A weak-referenceable payload, to see when the queue lets go of it."""

    def __init__(self, value: int) -> None:
        self.value = value


def _run_threads(targets: list[Any], timeout: float) -> None:
    """Starts the targets, joins them within `timeout` s and re-raises their failures."""
    errors: list[BaseException] = []

    def wrap(fn: Any) -> Any:
        def run() -> None:
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported to the test thread
                errors.append(e)

        return run

    threads = [threading.Thread(target=wrap(t), daemon=True) for t in targets]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), f"threads still running after {timeout} s"
    if errors:
        raise errors[0]


# ---------------------------------------------------------------- construction


@pytest.mark.parametrize("capacity", [0, 1, 3, 6, 100, -4, 3 << 20, 1 << 31, 1 << 70, -(1 << 70)])
def test_capacity_must_be_power_of_two(impl: type, capacity: int) -> None:
    with pytest.raises(ValueError, match="capacity must be a power of two"):
        impl(capacity)


def test_capacity_type_and_hint(impl: type) -> None:
    for bad in (64.0, "64", None):
        with pytest.raises(TypeError):
            impl(bad)
    with pytest.raises(ValueError, match="try 64 or 128"):
        impl(100)


@pytest.mark.parametrize("capacity", [2, 4, 64, 1024])
def test_capacity_and_size(impl: type, capacity: int) -> None:
    q = impl(capacity)
    assert q.capacity == capacity and q.size == 0 and len(q) == 0 and not q.closed
    assert q.push_many(list(range(capacity + 3))) == capacity
    assert q.size == capacity == len(q)
    assert f"capacity={capacity}" in repr(q)


# ---------------------------------------------------------------- single thread


def test_fifo_single_thread(impl: type) -> None:
    q = impl(8)
    for i in range(5):
        assert q.try_push(i)
    assert [q.pop() for _ in range(3)] == [0, 1, 2]
    for i in range(5, 11):  # wraps around the ring
        assert q.try_push(i)
    assert q.pop_many(100) == list(range(3, 11))


def test_random_ops_match_a_bounded_deque(impl: type) -> None:
    """Random push/pop/batch sequences against a plain bounded deque model."""
    rng = random.Random(1234)
    for trial in range(30):
        capacity = 1 << rng.randint(1, 6)
        q, model = impl(capacity), deque()
        counter = 0
        for _ in range(300):
            op = rng.random()
            if op < 0.35:
                expected = len(model) < capacity
                assert q.try_push(counter) is expected, (trial, capacity)
                if expected:
                    model.append(counter)
                counter += 1
            elif op < 0.6:
                want = model.popleft() if model else "empty"
                assert q.try_pop("empty") == want
            elif op < 0.8:
                batch = list(range(counter, counter + rng.randint(0, capacity + 2)))
                n = q.push_many(batch)
                assert n == min(len(batch), capacity - len(model))
                model.extend(batch[:n])
                counter += len(batch)
            else:
                k = rng.randint(1, capacity + 3)
                got = q.pop_many(k)
                assert got == [model.popleft() for _ in range(min(k, len(model)))]
            assert len(q) == len(model)


def test_full_and_empty(impl: type) -> None:
    q = impl(2)
    assert q.try_pop() is None
    assert q.try_push("a") and q.try_push("b")
    assert not q.try_push("c")
    with pytest.raises(TimeoutError):
        q.push("c", timeout=0)
    assert q.try_pop() == "a" and q.try_pop() == "b"
    with pytest.raises(TimeoutError):
        q.pop(timeout=0)
    assert q.pop_many(4) == []


def test_try_pop_default_distinguishes_none(impl: type) -> None:
    q = impl(4)
    empty = object()
    q.try_push(None)
    assert q.try_pop(empty) is None  # an item that happens to be None
    assert q.try_pop(empty) is empty
    assert q.try_pop(default=7) == 7


def test_push_many_and_pop_many_partial(impl: type) -> None:
    q = impl(4)
    assert q.push_many([]) == 0
    assert q.push_many((1, 2, 3)) == 3
    assert q.push_many(range(10, 20)) == 1  # any sequence; only the room left goes in
    assert q.push_many([99]) == 0
    assert q.pop_many(3) == [1, 2, 3]
    assert q.pop_many(3) == [10]
    assert q.pop_many(1_000_000) == []  # max_items beyond capacity is fine


def test_bad_arguments(impl: type) -> None:
    q = impl(4)
    for bad in (iter([1, 2]), "abc", b"abc", {1: 2}, 5, (x for x in [1])):
        with pytest.raises(TypeError, match="items must be a sequence"):
            q.push_many(bad)
    for bad in (0, -1, -(1 << 70)):
        with pytest.raises(ValueError, match="max_items must be >= 1"):
            q.pop_many(bad)
    with pytest.raises(TypeError):
        q.pop_many(1.5)
    assert q.pop_many(1 << 70) == []
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="timeout must be None or a non-negative"):
            q.pop(timeout=bad)
        with pytest.raises(ValueError, match="timeout must be None or a non-negative"):
            q.push(1, timeout=bad)
        with pytest.raises(ValueError, match="timeout must be None or a non-negative"):
            q.pop_many(1, timeout=bad)
    assert len(q) == 0


# ---------------------------------------------------------------- timeouts and blocking


def test_timeouts_are_bounded(impl: type) -> None:
    q = impl(2)
    for call in (lambda: q.pop(timeout=0.05), lambda: q.pop_many(4, timeout=0.05)):
        start = time.monotonic()
        try:
            assert call() == []  # pop_many returns [] on timeout
        except TimeoutError:
            pass
        elapsed = time.monotonic() - start
        assert 0.045 <= elapsed < 1.0
    q.push_many([1, 2])
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="timed out"):
        q.push(3, timeout=0.05)
    assert 0.045 <= time.monotonic() - start < 1.0
    assert q.pop_many(4) == [1, 2]


def test_blocking_pop_and_push_hand_over(impl: type) -> None:
    q = impl(2)
    got: list[int] = []

    def consumer() -> None:
        got.extend(q.pop(timeout=5) for _ in range(50))

    def producer() -> None:
        for i in range(50):
            q.push(i, timeout=5)

    _run_threads([consumer, producer], timeout=10)
    assert got == list(range(50))


@pytest.mark.parametrize("side", ["pop", "push"])
def test_blocking_call_releases_the_gil(impl: type, side: str) -> None:
    """While one thread waits in pop (or push), this thread keeps running Python code."""
    q = impl(2)
    if side == "push":
        q.push_many([0, 0])
    entered, done = threading.Event(), threading.Event()

    def waiter() -> None:
        entered.set()
        if side == "pop":
            assert q.pop(timeout=5) == "x"
        else:
            q.push("x", timeout=5)
        done.set()

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    assert entered.wait(2)
    time.sleep(0.02)  # let it reach the wait
    # If the wait held the GIL this loop could only run after it timed out (5 s).
    start, spins = time.monotonic(), 0
    while time.monotonic() - start < 0.1:
        spins += 1
    assert spins > 1000
    assert t.is_alive() and not done.is_set(), "the waiter should still be waiting"
    if side == "pop":
        q.push("x")
    else:
        assert q.pop() == 0
    assert done.wait(1.0), "the waiter was not woken by the hand-off"
    t.join(1.0)


_PUSHES = {
    "try_push": lambda q: q.try_push("x"),
    "push": lambda q: q.push("x"),
    "push_many": lambda q: q.push_many(["x", "y"]),
}
_POPS = {
    "try_pop": lambda q: q.try_pop(),
    "pop": lambda q: q.pop(),
    "pop_many": lambda q: q.pop_many(2),
}


@pytest.mark.parametrize("waiter", ["pop", "pop_many"])
@pytest.mark.parametrize("waker", sorted(_PUSHES))
def test_every_push_wakes_a_sleeping_consumer(impl: type, waiter: str, waker: str) -> None:
    """No lost wake-up: the sleeper returns promptly, long before its own 5 s timeout."""
    q = impl(4)
    woke = threading.Event()

    def sleeper() -> None:
        got = q.pop(timeout=5) if waiter == "pop" else q.pop_many(4, timeout=5)
        if got == "x" or (isinstance(got, list) and got[:1] == ["x"]):
            woke.set()

    t = threading.Thread(target=sleeper, daemon=True)
    t.start()
    time.sleep(0.05)  # long enough to finish spinning and go to sleep
    _PUSHES[waker](q)
    assert woke.wait(1.0), f"{waker} did not wake a consumer sleeping in {waiter}"
    t.join(1.0)


@pytest.mark.parametrize("waker", sorted(_POPS))
def test_every_pop_wakes_a_sleeping_producer(impl: type, waker: str) -> None:
    q = impl(2)
    q.push_many([0, 0])
    woke = threading.Event()

    def sleeper() -> None:
        q.push("z", timeout=5)
        woke.set()

    t = threading.Thread(target=sleeper, daemon=True)
    t.start()
    time.sleep(0.05)
    _POPS[waker](q)
    assert woke.wait(1.0), f"{waker} did not wake a producer sleeping in push"
    t.join(1.0)


def test_signal_handler_interrupts_a_wait_on_the_main_thread(impl: type) -> None:
    """Ctrl-C works during pop(): the handler runs and its exception propagates."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(
        signal, "setitimer"
    ):
        pytest.skip("needs the main thread and setitimer")

    class Interrupted(Exception):
        pass

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        start = time.monotonic()
        with pytest.raises(Interrupted):
            impl(2).pop(timeout=5)
        assert time.monotonic() - start < 1.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


_DAEMON_EXIT_SCRIPT = """
import threading, time
from xllm.ops.queue import {impl} as Queue
empty, full = Queue(4), Queue(2)
full.push_many([0, 0])

def pop_loop():
    while True:
        try:
            empty.pop(timeout=0.001)
        except TimeoutError:
            pass

def push_loop():
    while True:
        try:
            full.push(1, timeout=0.001)
        except TimeoutError:
            pass

for target in (pop_loop, pop_loop, push_loop, push_loop):
    threading.Thread(target=target, daemon=True).start()
time.sleep(0.05)
print("main done")
"""


def test_interpreter_exits_cleanly_with_daemon_threads_waiting(impl: type) -> None:
    """Daemon threads still waking from waits while Python shuts down must not abort it."""
    import xllm

    env = dict(os.environ, PYTHONPATH=str(Path(xllm.__file__).resolve().parents[1]))
    script = _DAEMON_EXIT_SCRIPT.format(impl=impl.__name__)
    for _ in range(2):
        run = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, env=env
        )
        assert run.returncode == 0 and "main done" in run.stdout, run.stdout + run.stderr
        assert "terminate" not in run.stderr, run.stderr


# ---------------------------------------------------------------- close


def test_close_wakes_waiters_and_drains(impl: type) -> None:
    q = impl(2)
    outcomes: list[str] = []

    def pop_waiter() -> None:
        try:
            q.pop(timeout=5)
            outcomes.append("item")
        except QueueClosed:
            outcomes.append("closed")

    def many_waiter() -> None:
        with pytest.raises(QueueClosed):
            q.pop_many(4, timeout=None)
        outcomes.append("closed")

    threads = [threading.Thread(target=f, daemon=True) for f in (pop_waiter,) * 3 + (many_waiter,)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    start = time.monotonic()
    q.close()
    for t in threads:
        t.join(2)
    assert time.monotonic() - start < 1.0
    assert outcomes == ["closed"] * 4
    assert q.closed
    q.close()  # idempotent


def test_close_wakes_a_blocked_push(impl: type) -> None:
    q = impl(2)
    q.push_many(["a", "b"])
    raised = threading.Event()

    def pusher() -> None:
        with pytest.raises(QueueClosed, match="closed"):
            q.push("c", timeout=5)
        raised.set()

    t = threading.Thread(target=pusher, daemon=True)
    t.start()
    time.sleep(0.05)
    q.close()
    t.join(2)
    assert raised.is_set()
    # Pushes are refused, what was inside still drains, then pops raise.
    with pytest.raises(QueueClosed):
        q.try_push("d")
    with pytest.raises(QueueClosed):
        q.push_many(["d"])
    assert q.try_pop() == "a"
    assert q.pop_many(4) == ["b"]
    for pop in (q.try_pop, q.pop, lambda: q.pop(timeout=0), lambda: q.pop_many(2, timeout=1)):
        with pytest.raises(QueueClosed):
            pop()


# ---------------------------------------------------------------- references


def test_reference_counts_are_exact(impl: type) -> None:
    q = impl(4)
    obj = object()
    base = sys.getrefcount(obj)
    assert q.try_push(obj) and sys.getrefcount(obj) == base + 1
    q.push(obj)
    assert sys.getrefcount(obj) == base + 2
    assert q.pop() is obj
    assert sys.getrefcount(obj) == base + 1
    assert q.try_pop() is obj
    assert sys.getrefcount(obj) == base

    batch = [obj] * 6
    base = sys.getrefcount(obj)
    assert q.push_many(batch) == 4
    assert sys.getrefcount(obj) == base + 4  # only the pushed prefix is held
    assert not q.try_push(obj)
    with pytest.raises(TimeoutError):
        q.push(obj, timeout=0.01)
    assert sys.getrefcount(obj) == base + 4  # failed pushes leave nothing behind
    popped = q.pop_many(3)
    assert sys.getrefcount(obj) == base + 4  # moved into the list, not copied
    del popped
    assert sys.getrefcount(obj) == base + 1
    q.close()
    with pytest.raises(QueueClosed):
        q.try_push(obj)
    assert sys.getrefcount(obj) == base + 1
    assert q.try_pop() is obj
    assert sys.getrefcount(obj) == base


def test_dropping_the_queue_frees_its_items(impl: type) -> None:
    q = impl(8)
    items = [Item(i) for i in range(5)]
    refs = [weakref.ref(x) for x in items]
    assert q.push_many(items) == 5
    assert q.pop().value == 0  # popped and dropped at once
    del items
    assert refs[0]() is None
    assert all(r() is not None for r in refs[1:])  # the queue keeps the rest alive
    del q
    gc.collect()
    assert all(r() is None for r in refs)


# ---------------------------------------------------------------- contention


def _stress(impl: type, producers: int, consumers: int, per_producer: int) -> None:
    q = impl(64)
    seen: list[list[tuple[int, int]]] = [[] for _ in range(consumers)]

    def produce(pid: int) -> None:
        seq = 0
        while seq < per_producer:
            mode = seq % 3
            if mode == 0:
                q.push((pid, seq), timeout=10)
                seq += 1
            elif mode == 1:
                while not q.try_push((pid, seq)):
                    time.sleep(0)
                seq += 1
            else:
                batch = [(pid, s) for s in range(seq, min(seq + 8, per_producer))]
                done = 0
                while done < len(batch):
                    done += q.push_many(batch[done:])
                    if done < len(batch):
                        time.sleep(0)
                seq += len(batch)

    def consume(cid: int) -> None:
        out = seen[cid]
        try:
            while True:
                if cid % 2:
                    out.extend(q.pop_many(16, timeout=10))
                else:
                    out.append(q.pop(timeout=10))
        except QueueClosed:
            return

    consumer_threads = [threading.Thread(target=consume, args=(c,)) for c in range(consumers)]
    for t in consumer_threads:
        t.start()
    try:
        _run_threads([lambda p=p: produce(p) for p in range(producers)], timeout=40)
    finally:
        q.close()  # consumers drain the rest, then see QueueClosed
        for t in consumer_threads:
            t.join(10)
    assert not any(t.is_alive() for t in consumer_threads)

    everything = sorted(x for out in seen for x in out)
    assert everything == sorted((p, s) for p in range(producers) for s in range(per_producer))
    for cid, out in enumerate(seen):  # each consumer sees each producer's items in order
        for p in range(producers):
            mine = [s for (pp, s) in out if pp == p]
            assert mine == sorted(mine), f"consumer {cid} saw producer {p} out of order"


def test_stress_many_producers_many_consumers(impl: type) -> None:
    per_producer = 25_000 if impl is MPMCQueue else 5_000
    _stress(impl, producers=4, consumers=4, per_producer=per_producer)


def test_stress_single_consumer_sees_fifo_per_producer(impl: type) -> None:
    _stress(impl, producers=4, consumers=1, per_producer=3_000)


# ---------------------------------------------------------------- ThreadSanitizer


def _tool(name: str) -> str | None:
    return shutil.which(name)


def test_tsan_stress_program(tmp_path: Path) -> None:
    """Builds csrc/queue/queue_stress.cpp with -fsanitize=thread and runs it."""
    if _tool("cmake") is None or (_tool("g++") is None and _tool("c++") is None):
        pytest.skip("cmake and a C++ compiler are needed to build the TSAN stress program")
    try:
        import pybind11
    except ImportError:
        pytest.skip("pybind11 (its CMake config) is needed to configure the project")
    build = tmp_path / "tsan"
    configure = [
        "cmake", "-S", str(REPO), "-B", str(build), "-DXLLM_TSAN_STRESS=ON",
        f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        "-DCMAKE_BUILD_TYPE=Release",
    ]  # fmt: skip
    for cmd in (configure, ["cmake", "--build", str(build), "--target", "queue_stress"]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    program = [str(build / "queue_stress"), "100000"]
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1")
    run = subprocess.run(program, capture_output=True, text=True, timeout=120, env=env)
    output = run.stdout + run.stderr
    if "unexpected memory mapping" in output or "FATAL: ThreadSanitizer" in output:
        # Older TSAN runtimes cannot map their shadow memory with the high mmap
        # randomisation of newer kernels; running without ASLR works around it.
        if _tool("setarch") is None:
            pytest.skip(f"TSAN cannot start on this kernel and setarch is missing: {output[-500:]}")
        program = ["setarch", platform.machine(), "-R", *program]
        run = subprocess.run(program, capture_output=True, text=True, timeout=120, env=env)
        output = run.stdout + run.stderr
    assert "WARNING: ThreadSanitizer" not in output, output[-5000:]
    assert run.returncode == 0, output[-5000:]
    assert "all checks passed" in output
