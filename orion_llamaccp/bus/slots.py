"""The engine's free slots, which both intakes share: how much work may be in flight.

A pub/sub request and a stream entry each hold a slot while they are served; a job gives
its slot back exactly once (``SlotLease``), and steps aside while it waits for its turn.
"""

from __future__ import annotations

import asyncio
from typing import Literal


class Slots:
    """The engine's free slots: how much work may be in flight right now.

    Giving slots back (``release``) and taking one without waiting are plain code, never
    a point where a cancel can land: a slot given back from a ``finally`` of a cancelled
    task is given back (with an ``asyncio.Condition``, a release waited for its lock, and
    a cancel there lost the slot for the life of the worker).
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self._free = total
        self._waiters: list[asyncio.Future[None]] = []  # in acquire() or wait_free()

    @property
    def free(self) -> int:
        return self._free

    @property
    def busy(self) -> int:
        return self.total - self._free

    async def wait_free(self) -> None:
        while self._free <= 0:
            await self._wait()

    async def acquire(self) -> None:
        await self.wait_free()
        self._free -= 1

    def try_acquire(self) -> bool:
        """Take a slot without waiting, if one is free and no one is queued for one."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        return False

    def take(self) -> None:
        """Take a slot at once, over the count if none is free (``SlotLease.take_back``)."""
        self._free -= 1

    def release(self, count: int = 1) -> None:
        self._free += count
        self._wake()

    def resize(self, total: int) -> None:
        self._free += total - self.total
        self.total = total
        self._wake()

    async def _wait(self) -> None:
        """Until slots were given back; every waiter wakes, the first to run takes one."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            self._waiters.remove(waiter)

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)


class SlotLease:
    """One taken slot, given back once: a pub/sub job's when its generation ends
    (``early``: llama-server's slot is free from then on, while the result still travels
    to Redis), else when its job ends.

    Held until the result was committed, a pub/sub job's slot stayed busy for a Redis round
    trip after llama-server had let it go: a queued request started that much later, and a
    caller that sends its next request as soon as it has an answer could find every slot
    busy and be told ``overloaded``. A stream entry keeps its slot until it is acked, so
    that a worker holds no more entries than slots, but for those that wait: for their
    turn after a llama-server died with them in it, or for their ``not_before_ms``. Such a
    job steps aside (``step_aside``), so that llama-server's slots do not sit idle
    meanwhile, and takes a slot again when it goes on (``take_back``, ``step_back``). Its
    entry stays this worker's, kept fresh like any entry in flight.
    """

    __slots__ = ("_slots", "_state", "early")

    def __init__(self, slots: Slots, *, early: bool = False) -> None:
        self._slots = slots
        self._state: Literal["held", "aside", "given back"] = "held"
        self.early = early

    @property
    def held(self) -> bool:
        return self._state == "held"

    def release(self) -> None:
        """Give the slot back for good, unless it was."""
        if self._state == "held":
            self._slots.release()
        self._state = "given back"

    def generation_ended(self) -> None:
        """llama-server is done with the job's request: an ``early`` lease is given back."""
        if self.early:
            self.release()

    def step_aside(self) -> None:
        """Free the slot for others while the job waits, to take one again later."""
        if self._state == "held":
            self._slots.release()
            self._state = "aside"

    def take_back(self) -> None:
        """Take a slot again after ``step_aside`` at once, over the count if the others
        took every one meanwhile (llama-server queues a request beyond its slots until
        one frees): for a job that must not wait for the requests beside it."""
        if self._state == "aside":
            self._slots.take()
            self._state = "held"

    async def step_back(self) -> None:
        """Take a slot again after ``step_aside``, waiting for one to be free. A cancel
        while it waits leaves none taken."""
        if self._state == "aside":
            await self._slots.acquire()
            self._state = "held"
