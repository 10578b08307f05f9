"""Stopping and bounding background asyncio work so that it cannot outlive its owner.

Python 3.11's ``asyncio.wait_for`` drops a cancellation that arrives in the same loop turn as
the result it waited for (it returns the result instead; fixed in 3.12). A background loop
cancelled at that moment keeps running, and ``await task`` after ``task.cancel()`` then
never returns: a server's shutdown hangs. :func:`stop_task` cancels until the task has
really ended; :func:`wait_at_most` bounds a wait without ever dropping a cancellation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["stop_task", "wait_at_most"]

T = TypeVar("T")

_RECANCEL_S = 0.05  # how long a cancelled task gets before it is cancelled again


async def stop_task(task: asyncio.Task[object] | None) -> None:
    """Cancels ``task`` and returns once it has ended (its exception, if any, dropped:
    the caller is shutting it down). Cancels again while it runs on, so a cancellation
    swallowed inside the task cannot keep it alive."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=_RECANCEL_S)
    if not task.cancelled():
        task.exception()  # retrieved: no "exception was never retrieved" at collection


async def wait_at_most(aw: Awaitable[T], timeout_s: float) -> T:
    """``aw``'s result (a future, or a coroutine run as a task), or TimeoutError (``aw``
    cancelled) after ``timeout_s``. Unlike 3.11's ``asyncio.wait_for``, a cancellation of
    the caller always propagates."""
    fut = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({fut}, timeout=timeout_s)
    except asyncio.CancelledError:
        fut.cancel()
        raise
    if not done:
        fut.cancel()
        raise TimeoutError(f"not done within {timeout_s:.3g} s")
    return fut.result()
