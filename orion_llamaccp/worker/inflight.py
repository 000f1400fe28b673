"""What the worker has in flight: the tasks a stop must drain, the jobs a cancel can reach.

Every request runs in a task of its own; ``spawn`` keeps it until it ends, so that
``pending`` can drain it at shutdown. Jobs are also filed under their correlation id (one
id may name several deliveries), which is how an ``llm.chat.cancel`` finds them, whether
they run, wait in the local queue, or hold a stream entry.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import defaultdict
from collections.abc import Coroutine
from typing import Any

from orion_llamaccp.worker.jobs import Job

log = logging.getLogger(__name__)


class InFlight:
    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()
        self.jobs: dict[str, set[Job]] = defaultdict(set)

    def spawn(self, coro: Coroutine[Any, Any, None], job: Job | None = None) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        if job is not None:
            self.file(job, task)
        task.add_done_callback(lambda done: self._ended(done, job))
        return task

    def file(self, job: Job, task: asyncio.Task[Any] | None = None) -> None:
        """Make ``job`` reachable by a cancel (``task``: what a cancel stops, once it runs)."""
        if job.correlation_id:
            if task is not None:
                job.task = task
            self.jobs[job.correlation_id].add(job)

    def forget(self, job: Job) -> None:
        jobs = self.jobs.get(job.correlation_id or "")
        if jobs is not None:
            jobs.discard(job)
            if not jobs:
                del self.jobs[job.correlation_id or ""]

    def cancel(self, correlation_id: str) -> list[Job]:
        """A caller's ``llm.chat.cancel``: stop every job of that correlation id.

        A job whose task has not run yet (its request and the cancel came in one read) is
        only marked: cancelled before its first step, the task would never run its own
        code, so it would neither answer nor give back its slot. Marked, it answers
        ``cancelled`` as it starts, as a job still in the queue does. A job already sending
        its answer is left alone: cancelled then, it would send none.

        Returns the jobs it marked that have no task yet: they wait for a slot.
        """
        waiting = []
        for job in list(self.jobs.get(correlation_id, ())):
            if job.answering:  # too late: its answer (or the error it got) is on its way
                continue
            job.user_cancelled = True
            task = job.task
            if task is None:
                waiting.append(job)
            elif not _not_started(task):
                log.info("cancelling request %s (correlation %s)", job.request_id, correlation_id)
                task.cancel()
        return waiting

    def pending(self) -> list[asyncio.Task[None]]:
        return [task for task in self.tasks if not task.done()]

    def _ended(self, task: asyncio.Task[None], job: Job | None) -> None:
        self.tasks.discard(task)
        if job is not None:
            self.forget(job)


def _not_started(task: asyncio.Task[Any]) -> bool:
    coro = task.get_coro()
    return inspect.iscoroutine(coro) and inspect.getcoroutinestate(coro) == inspect.CORO_CREATED
