"""``unless_stopped``: a stop ends a long step at once, and the step is ended, not left."""

from __future__ import annotations

import asyncio

import pytest

from orion_llamaccp.stopping import unless_stopped


async def test_a_stop_cancels_the_step_and_waits_for_its_cleanup() -> None:
    stop, started = asyncio.Event(), asyncio.Event()
    cleaned: list[str] = []

    async def step() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0)  # cleanup that itself awaits (a lock released, say)
            cleaned.append("released")

    waiting = asyncio.create_task(unless_stopped(stop, step()))
    await started.wait()
    stop.set()
    assert await waiting is False
    assert cleaned == ["released"]  # ended before unless_stopped returned


async def test_a_finished_step_is_true_and_a_failed_one_raises() -> None:
    stop = asyncio.Event()
    assert await unless_stopped(stop, asyncio.sleep(0)) is True

    async def fails() -> None:
        raise RuntimeError("the download failed")

    with pytest.raises(RuntimeError, match="the download failed"):
        await unless_stopped(stop, fails())


async def test_a_step_that_finished_as_the_stop_came_counts_as_finished() -> None:
    stop = asyncio.Event()
    stop.set()
    done = asyncio.get_running_loop().create_future()
    done.set_result("model verified")
    assert await unless_stopped(stop, done) is True


async def test_cancelling_the_caller_ends_the_step_too() -> None:
    stop, started = asyncio.Event(), asyncio.Event()
    ended = asyncio.Event()

    async def step() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        finally:
            ended.set()

    waiting = asyncio.create_task(unless_stopped(stop, step()))
    await started.wait()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert ended.is_set()
