"""Await one step unless a stop comes first: how every layer obeys a stop mid-step.

A download, a model check, a re-fetch or llama-server's load can take minutes, and a
SIGTERM must not wait for them. The step is cancelled and waited for, not abandoned:
what it holds (a lock file, a half-started process) is released before the caller
goes on with its own shutdown. ``Budget`` bounds the steps of the stop itself. Two
helpers for tasks of any layer: a pause a stop cuts short (``sleep_unless_stopped``), and
whether a task has run yet (``not_started``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import time
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# The worker's goodbyes on the bus as it stops, all together (``Budget``): a few ms each
# where Redis answers; after the drain and llama-server's stop, within a container's stop
# grace period (docs/deployment.md).
GOODBYES_SEC = 5.0


async def unless_stopped(stop: asyncio.Event, step: Awaitable[object]) -> bool:
    """Await ``step``: True once it finished (what it raised is raised), False when
    ``stop`` was set first, ``step`` then cancelled and ended. A step that finished just
    as the stop came counts as finished."""
    task = asyncio.ensure_future(step)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return False
    task.result()
    return True


class Budget:
    """One bound on the time of several steps together, each run within what the steps
    before it left; one that finds nothing left is not started.

    The worker's goodbyes on the bus (its draining beat, the entries handed back, its
    last beat) were bounded one by one: a Redis that hangs (alive, answering nothing)
    cost each its bound in turn, after the drain (10 s measured with 2 s socket
    timeouts, up to 21 s with the defaults), and more with each step added. Bounded
    together, a hung Redis costs the budget once; a healthy one answers each step in a
    millisecond, and every step runs. ``given_up`` names the steps cut off or never
    started, in order.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.spent = 0.0
        self.given_up: list[str] = []

    @property
    def left(self) -> float:
        return self.seconds - self.spent

    async def spend(
        self, what: str, step: Coroutine[Any, Any, T], *, free_until: float = -math.inf
    ) -> T:
        """``step``'s result; TimeoutError where it was cut off, or not started.

        The time before ``free_until`` (monotonic) is not counted: a step at the drain's
        start runs on the drain's time. Counted, a Redis that hung there for the budget
        and answered again right after cost every step that came after the drain: the
        requests its deadline cut off were not waited for, nor the entries left handed
        back, with Redis answering each in a millisecond."""
        left = self.left + max(0.0, free_until - time.monotonic())
        if left <= 0:
            step.close()  # never started: nothing of it ran
            self.given_up.append(what)
            raise TimeoutError(f"not tried, the {self.seconds:g} s for it spent")
        began = time.monotonic()
        bound = asyncio.timeout(left)
        try:
            async with bound:
                return await step
        except TimeoutError:
            if not bound.expired():  # the step's own
                raise
            self.given_up.append(what)
            raise TimeoutError(f"cut off, the {self.seconds:g} s for it spent") from None
        finally:
            self.spent += max(0.0, time.monotonic() - max(began, free_until))
            # Cut off (or run past its bound), a step spent all that was left, whatever the
            # clocks say: the loop's (uvloop's, in whole milliseconds) fired up to one short
            # of ours, and the next step started with that sliver, where a cancel may be
            # lost (Python 3.11's ``wait_for`` in redis-py): it ran on its own bound.
            if bound.expired():
                self.spent = max(self.spent, self.seconds)


async def sleep_unless_stopped(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less where ``stop`` comes first (a pause between tries)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def not_started(task: asyncio.Task[Any]) -> bool:
    """Created and not yet run: a cancel now closes its coroutine before any of its code,
    ``finally`` clauses included, has run."""
    coro = task.get_coro()
    return inspect.iscoroutine(coro) and inspect.getcoroutinestate(coro) == inspect.CORO_CREATED
