"""``unless_stopped``: a stop ends a long step at once, and the step is ended, not left;
``Budget``: the steps of a stop bounded together."""

from __future__ import annotations

import asyncio
import time

import pytest

from orion_llamaccp.stopping import Budget, unless_stopped


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


async def test_a_budget_cuts_off_the_step_that_outlasts_it_and_starts_none_after() -> None:
    """Steps bounded together: a healthy one runs whole, the one that outlasts what is
    left is cut off, and those after it are not started at all (nothing of them runs)."""
    budget = Budget(0.2)
    ran: list[str] = []

    async def step(name: str, hangs: bool = False) -> str:
        ran.append(name)
        if hangs:
            await asyncio.Event().wait()  # a Redis that never answers
        return name

    assert await budget.spend("the draining beat", step("beat")) == "beat"
    with pytest.raises(TimeoutError, match="cut off"):
        await budget.spend("handing back", step("hand back", hangs=True))
    with pytest.raises(TimeoutError, match="not tried"):
        await budget.spend("the last beat", step("last beat"))
    assert ran == ["beat", "hand back"]
    assert budget.given_up == ["handing back", "the last beat"]


async def test_a_budget_leaves_a_steps_own_timeout_its_own() -> None:
    budget = Budget(3600)

    async def times_out() -> None:
        raise TimeoutError("its own bound")

    with pytest.raises(TimeoutError, match="its own bound"):
        await budget.spend("leaving the intake channel", times_out())
    assert budget.given_up == []


async def test_a_budget_does_not_count_a_step_s_time_before_its_free_until() -> None:
    """A step at the drain's start runs on the drain's time: a Redis that hung there for
    longer than the budget, then answered again, left nothing for the steps after the
    drain, and they were given up with Redis answering."""
    budget = Budget(0.1)
    deadline = time.monotonic() + 3600

    async def hangs_a_while() -> str:
        await asyncio.sleep(0.2)  # longer than the budget, well within the drain
        return "beat"

    assert await budget.spend("the draining beat", hangs_a_while(), free_until=deadline) == "beat"
    assert await budget.spend("handing back", asyncio.sleep(0, "handed")) == "handed"
    assert budget.given_up == []
