"""xllm.service.tasks: background loops stop when told, even where Python 3.11's
asyncio.wait_for drops a cancellation that lands in the same loop turn as its result (the
instance agent's beat loop did: a cluster's shutdown then hung)."""

from __future__ import annotations

import asyncio
import sys

import pytest

from xllm.service.tasks import stop_task, wait_at_most


def _looping(waiter, holder: list[asyncio.Future[int]]):  # noqa: ANN001, ANN202
    """A beat-loop shape: wait (bounded) for a result from elsewhere, forever."""
    async def body() -> None:
        loop = asyncio.get_running_loop()
        while True:
            fut = loop.create_future()
            holder.append(fut)
            await waiter(fut, 5.0)
    return body()


async def _cancel_as_result_lands(waiter):  # noqa: ANN001, ANN202
    """Starts the loop, then completes its pending future and cancels it in one turn."""
    holder: list[asyncio.Future[int]] = []
    task = asyncio.ensure_future(_looping(waiter, holder))
    await asyncio.sleep(0)  # it waits on its first future
    holder[-1].set_result(1)
    task.cancel()
    return task, holder


def test_stop_task_ends_a_loop_whose_wait_for_dropped_the_cancel() -> None:
    async def run() -> None:
        task, holder = await _cancel_as_result_lands(asyncio.wait_for)
        done, _ = await asyncio.wait({task}, timeout=0.3)
        if sys.version_info < (3, 12):  # the bug itself: one cancel was not enough
            assert not done and len(holder) == 2
        await asyncio.wait_for(stop_task(task), 2.0)
        assert task.done()
        await stop_task(task)  # done already: returns at once
        await stop_task(None)

    asyncio.run(run())


def test_wait_at_most_never_drops_a_cancel() -> None:
    async def run() -> None:
        task, holder = await _cancel_as_result_lands(wait_at_most)
        done, _ = await asyncio.wait({task}, timeout=0.3)
        assert done and task.cancelled() and len(holder) == 1

    asyncio.run(run())


def test_wait_at_most_returns_or_times_out_cancelling_the_future() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        loop.call_later(0.01, fut.set_result, 7)
        assert await wait_at_most(fut, 1.0) == 7
        assert await wait_at_most(asyncio.sleep(0.01, result=3), 1.0) == 3  # a coroutine
        slow = loop.create_future()
        with pytest.raises(TimeoutError):
            await wait_at_most(slow, 0.05)
        assert slow.cancelled()
        failing = loop.create_future()
        failing.set_exception(ValueError("bad"))
        with pytest.raises(ValueError, match="bad"):
            await wait_at_most(failing, 1.0)

    asyncio.run(run())
