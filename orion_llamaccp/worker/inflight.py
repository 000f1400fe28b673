"""What the worker has in flight: the tasks a stop must drain, the jobs a cancel can reach.

Every request runs in a task of its own; ``spawn`` keeps it until it ends, so that
``pending`` can drain it at shutdown. Jobs are also filed under their correlation id (one
id may name several deliveries), which is how an ``llm.chat.cancel`` finds them, whether
they run, wait in the local queue, or hold a stream entry. A cancel is also kept for a
while (``RecentCancels``), for a request that reaches the worker after it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import Coroutine
from datetime import datetime
from typing import Any

from orion_llamaccp.bus.envelope import utcnow
from orion_llamaccp.stopping import not_started
from orion_llamaccp.worker.jobs import Job

log = logging.getLogger(__name__)


class RecentCancels:
    """Cancels heard in the last ``keep_sec`` seconds (at most ``limit`` of them), for the
    requests that reach the worker after their cancel: a stream entry still waiting in
    the backlog, or sent in the same pipeline as its cancel.

    Such a request is cancelled if it was created no later than its cancel. An Orion flow
    may send a later request under the same correlation id: created after the cancel, it
    runs. Both times are the callers' (``created_at``), as a rule from one clock. A legacy
    dict has no ``created_at`` of its own (it reads as the moment it was decoded): for it
    the worker's clock draws the line, and only a cancel heard after it arrived reaches it
    (one read with its request, or during its claim).
    """

    def __init__(self, keep_sec: float, limit: int = 10_000) -> None:
        self.keep_sec = keep_sec
        self.limit = limit
        # correlation id -> (latest cancel's created_at, forgotten at, last heard at)
        self._heard: OrderedDict[str, tuple[datetime, float, float]] = OrderedDict()

    def add(self, correlation_id: str, created_at: datetime) -> None:
        if self.keep_sec <= 0:
            return
        now = time.monotonic()
        known = self._heard.pop(correlation_id, None)
        latest = max(created_at, known[0]) if known else created_at
        self._heard[correlation_id] = (latest, now + self.keep_sec, now)
        while self._heard and (
            len(self._heard) > self.limit or next(iter(self._heard.values()))[1] < now
        ):
            self._heard.popitem(last=False)

    def cancels(self, job: Job) -> bool:
        heard = self._heard.get(job.correlation_id or "")
        if heard is None or job.envelope is None:
            return False
        created_at, expires, heard_at = heard
        if time.monotonic() > expires:
            return False
        if job.envelope.source.name == "legacy":
            return heard_at >= job.received
        return not _created_after(job, created_at)

    def __len__(self) -> int:
        return len(self._heard)


class InFlight:
    def __init__(self, recent: RecentCancels | None = None) -> None:
        self.tasks: set[asyncio.Task[None]] = set()
        self.jobs: dict[str, set[Job]] = defaultdict(set)
        self.recent = recent if recent is not None else RecentCancels(keep_sec=0)

    def spawn(self, coro: Coroutine[Any, Any, None], job: Job | None = None) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        if job is not None:
            self.file(job, task)
        task.add_done_callback(lambda done: self._ended(done, job))
        return task

    def file(self, job: Job, task: asyncio.Task[Any] | None = None) -> None:
        """Make ``job`` reachable by a cancel (``task``: what a cancel stops, once it runs).
        A job whose cancel came first is marked: it answers ``cancelled`` as it starts."""
        if job.correlation_id:
            if task is not None:
                job.task = task
            self.jobs[job.correlation_id].add(job)
            if not job.answering and self.recent.cancels(job):
                job.user_cancelled = True

    def forget(self, job: Job) -> None:
        jobs = self.jobs.get(job.correlation_id or "")
        if jobs is not None:
            jobs.discard(job)
            if not jobs:
                del self.jobs[job.correlation_id or ""]

    def cancel(
        self, correlation_id: str, created_at: datetime | None, remember: bool = True
    ) -> list[Job]:
        """A caller's ``llm.chat.cancel`` (sent at ``created_at``, None if it does not
        say): stop the jobs of that correlation id created no later than it, and
        (``remember``) those filed later that were. A later request of the same flow, read
        before its cancel, runs on. An undated cancel reaches every job here (a running
        job's own ``created_at`` against our clock would let a skew decide), and is
        remembered as sent when heard.

        A job whose task has not run yet (its request and the cancel came in one read) is
        only marked: cancelled before its first step, the task would never run its own
        code, so it would neither answer nor give back its slot. Marked, it answers
        ``cancelled`` as it starts, as a job still in the queue does. A job already sending
        its answer is left alone: cancelled then, it would send none.

        Returns the jobs it marked that have no task yet: they wait for a slot.
        """
        if remember:
            self.recent.add(correlation_id, created_at or utcnow())
        waiting = []
        for job in list(self.jobs.get(correlation_id, ())):
            if job.answering:  # too late: its answer (or the error it got) is on its way
                continue
            if created_at is not None and _created_after(job, created_at):
                continue
            job.user_cancelled = True
            task = job.task
            if task is None:
                waiting.append(job)
            elif not not_started(task):
                log.info("cancelling request %s (correlation %s)", job.request_id, correlation_id)
                task.cancel()
        return waiting

    def pending(self) -> list[asyncio.Task[None]]:
        return [task for task in self.tasks if not task.done()]

    def _ended(self, task: asyncio.Task[None], job: Job | None) -> None:
        self.tasks.discard(task)
        if job is not None:
            self.forget(job)


def _created_after(job: Job, moment: datetime) -> bool:
    """Sent after ``moment``, by its envelope (a legacy dict's says nothing: it is not)."""
    envelope = job.envelope
    return (
        envelope is not None and envelope.source.name != "legacy" and envelope.created_at > moment
    )
