"""``unless_stopped``: a stop ends a long step at once, and the step is ended, not left;
``Budget``: the steps of a stop bounded together."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import uvloop

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


def test_a_step_cut_off_leaves_nothing_for_the_next_on_uvloop_s_clock() -> None:
    """The worker's loop (uvloop) reads its clock in whole milliseconds: a step cut off
    at the budget's end was counted up to a millisecond short of it, and the next step
    started with that sliver left. On Python 3.11 a cancel that lands as a write to Redis
    completes is lost (``asyncio.wait_for`` in redis-py), and such a step ran on its own
    bound: leaving the intake channel then held a stop with Redis hung 8 s past the
    budget, one run in three. Cut off, a step has spent all that was left: the next is not
    started. Each try begins late in a millisecond, on a busy loop (the drain's), where
    the sliver came almost every time."""

    async def busy() -> None:  # a loop with other work (the drain's): it never sleeps
        while True:
            await asyncio.sleep(0)

    async def tries() -> list[int]:
        started: list[int] = []
        spinning = asyncio.create_task(busy())
        for n in range(20):
            budget = Budget(0.003)
            while time.monotonic() * 1000 % 1 < 0.9:  # late in a millisecond of its clock
                pass
            with pytest.raises(TimeoutError, match="cut off"):
                await budget.spend("the draining beat", asyncio.Event().wait())
            with contextlib.suppress(TimeoutError):
                await budget.spend("leaving the intake channel", asyncio.sleep(0, n))
                started.append(n)
        spinning.cancel()
        return started

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(tries()) == []
