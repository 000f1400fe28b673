"""The local queue: the pub/sub jobs the worker accepted that hold no slot yet.

A stream entry waits for a slot in Redis, unread; a pub/sub message, once claimed, has
nowhere else to wait. Its job waits here, in the order its message came, bounded by the
worker (``Settings.local_queue_size``: beyond it a job is answered ``overloaded``). One
cancelled or expired while it waits is answered at once, not once a slot frees, and its
place goes to the next; one still waiting when the worker stops is told so. Apart from
``Worker`` so that the queue's bookkeeping (the jobs, their expiry timers, the one held
for a slot) reads in one place.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from orion_llamaccp.bus.slots import SlotLease
from orion_llamaccp.worker.jobs import (
    Failure,
    Job,
    cancelled_unstarted,
    expired,
    expiry,
    stopping_failure,
)

if TYPE_CHECKING:
    from orion_llamaccp.bus.slots import Slots
    from orion_llamaccp.worker.handler import ChatHandler
    from orion_llamaccp.worker.inflight import InFlight


class LocalQueue:
    """Pub/sub jobs on their way to a slot: ``dispatch`` starts one or queues it, ``run``
    (a task of the worker's) starts the queued ones as slots free, in their order."""

    def __init__(self, slots: Slots, inflight: InFlight, handler: ChatHandler) -> None:
        self.slots = slots
        self.inflight = inflight
        self.handler = handler
        self.local: asyncio.Queue[Job] = asyncio.Queue()
        # Accepted pub/sub jobs that do not hold a slot yet and are not answered, with the
        # timer of their expiry: one cancelled or expired while queued leaves at once,
        # though it stays in ``local`` until its turn.
        self.queued: dict[Job, asyncio.TimerHandle | None] = {}
        self.held: Job | None = None

    @property
    def waiting(self) -> int:
        return len(self.queued)

    async def _with_slot(self, job: Job) -> None:
        """Called with a slot taken for ``job``; it is given back by the time the job ends."""
        job.lease = lease = SlotLease(self.slots, early=True)
        try:
            await self.handler.handle(job)
        finally:
            lease.release()

    def dispatch(self, job: Job) -> None:
        """Straight to its handler when a slot is free and nothing waits (no queue hop
        before the request reaches llama-server), else into the local queue."""
        if self.waiting == 0 and self.slots.try_acquire():
            self.inflight.spawn(self._with_slot(job), job)
        else:
            self._queue(job)

    def _queue(self, job: Job) -> None:
        self.inflight.file(job)
        if job.user_cancelled:  # its cancel came first (RecentCancels): no place in the queue
            self.answer_cancelled_unstarted(job)
            return
        self.local.put_nowait(job)
        self.queued[job] = self._expire_when_due(job)

    def _expire_when_due(self, job: Job) -> asyncio.TimerHandle | None:
        """A queued job whose expiry comes before its slot is answered ``expired`` then,
        not once a slot frees: its caller learns it at once, and its place in the queue
        goes to a request still worth serving instead of an ``overloaded``."""
        ends = expiry(job.envelope) if job.envelope is not None else None
        if ends is None:
            return None
        at, why = ends
        loop = asyncio.get_running_loop()
        return loop.call_later(max(0.0, at - time.time()), self._expire_queued, job, at, why)

    def _expire_queued(self, job: Job, at: float, why: str) -> None:
        if job in self.queued and not job.answering:
            self._answer_unstarted(job, expired(at, why))

    def _unqueue(self, job: Job) -> None:
        timer = self.queued.pop(job, None)
        if timer is not None:
            timer.cancel()

    async def run(self) -> None:
        while True:
            job = await self.local.get()
            if not job.answering:  # else cancelled while queued, and answered at once
                self.held = job  # waiting for a slot: not in the queue, not running
                await self.slots.acquire()
                self.held = None
                if job.answering:  # ... or while it waited for the slot
                    self.slots.release()
            self._unqueue(job)
            if not job.answering:
                self.inflight.spawn(self._with_slot(job), job)

    def refuse_all(self) -> None:
        """The drain, once ``run`` has ended: every job still waiting (the one it held for
        a slot included) is answered that the worker is stopping."""
        unstarted = [self.local.get_nowait() for _ in range(self.local.qsize())]
        if self.held is not None:
            unstarted.append(self.held)
            self.held = None
        for job in unstarted:
            self._unqueue(job)
            if job.answering:  # cancelled while queued: answered already
                continue
            self.inflight.spawn(self.handler.refuse(job, stopping_failure()), job)

    def answer_cancelled_unstarted(self, job: Job) -> None:
        self._answer_unstarted(job, cancelled_unstarted())

    def _answer_unstarted(self, job: Job, failure: Failure) -> None:
        """Answer a job that holds no slot (queued, or on its way to the queue) now."""
        job.answering = True
        self._unqueue(job)  # its place is free for the next request
        if job.ahead is not None:  # else llama-server generates on for nobody
            job.ahead.drop()
            job.ahead = None
        self.inflight.spawn(self.handler.refuse(job, failure), job)
