"""Shutdown must not hang on a task that swallowed its first cancellation."""

from __future__ import annotations

import asyncio
import contextlib

from gateway.app import cancel


async def test_cancel_finishes_a_task_that_swallows_one_cancellation() -> None:
    steps: list[str] = []

    async def stubborn() -> None:
        # What Python 3.11's wait_for does when a cancellation races the awaited result:
        # the CancelledError never reaches the caller, which carries on.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(10)
        steps.append("swallowed")
        await asyncio.sleep(10)
        steps.append("never")

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel([task]), 5)
    assert task.cancelled()
    assert steps == ["swallowed"]


async def test_cancel_of_finished_tasks_returns_at_once() -> None:
    task = asyncio.create_task(asyncio.sleep(0))
    await task
    await asyncio.wait_for(cancel([task]), 1)
