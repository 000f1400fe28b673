"""A request's ``trace.work.not_before_ms``: waited for before it is generated, its
slot free for others meanwhile.

Orion's work queue delays a retry with it. The wait ends early where the request expires
(answered ``expired``) or llama-server leaves service (the job told so at once); the
count of requests that wait without their slots is bounded. Apart from ``ChatHandler``
so that the wait, its bound and its ways out read in one place.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from orion_llamaccp.bus.envelope import seconds_until_due
from orion_llamaccp.engine.supervisor import OUT_OF_SERVICE
from orion_llamaccp.worker.jobs import expired, expiry

if TYPE_CHECKING:
    from orion_llamaccp.bus.envelope import Envelope
    from orion_llamaccp.settings import Settings
    from orion_llamaccp.worker.generation import Generator
    from orion_llamaccp.worker.jobs import Job


class NotBefore:
    """``wait``: until the request is due, for ``ChatHandler`` before it generates.
    ``delayed`` counts the requests waiting so without a slot."""

    def __init__(self, *, settings: Settings, generator: Generator) -> None:
        self.settings = settings
        self.generator = generator
        self.delayed = 0  # requests waiting for their ``not_before_ms`` without a slot

    async def wait(self, job: Job, envelope: Envelope) -> None:
        """Wait for ``trace.work.not_before_ms`` (Orion's work queue delays a retry with
        it), and then for a slot, no later than the request's expiry: one that expires
        meanwhile is answered ``expired`` then, not generated."""
        wait = min(seconds_until_due(envelope.work), self.settings.request_timeout_sec)
        if wait <= 0:
            return
        ends = expiry(envelope)
        try:
            async with asyncio.timeout(None if ends is None else max(0.0, ends[0] - time.time())):
                await self._wait_until_due(job, wait)
        except TimeoutError:
            assert ends is not None  # no timeout without an expiry
            raise expired(*ends) from None

    async def _wait_until_due(self, job: Job, wait: float) -> None:
        """The job's slot free for others meanwhile: with one slot, a request delayed by a
        minute would hold up every other for that minute. Up to ``local_queue_size``
        requests wait so at once; those beyond wait in their slots, so that a flood of
        delayed requests does not make the worker take them all in (a stream's backlog
        stays in Redis)."""
        lease = job.lease
        if lease is None or self.delayed >= self.settings.local_queue_size:
            await self._sleep_in_service(job, wait)
            return
        lease.step_aside()
        self.delayed += 1
        try:
            await self._sleep_in_service(job, wait)
        finally:
            self.delayed -= 1
        await lease.step_back()  # behind the requests that came meanwhile

    async def _sleep_in_service(self, job: Job, wait: float) -> None:
        """Sleep ``wait`` seconds, unless llama-server leaves service first (the worker
        stops, the engine fails): then the job is told so at once (answered
        ``engine_unavailable``, or a stream entry left pending for another worker). A stop
        waited out its drain timeout for a request that could no longer run here."""
        supervisor = self.generator.supervisor
        out = asyncio.ensure_future(supervisor.wait_for(*OUT_OF_SERVICE))
        try:
            await asyncio.wait({out}, timeout=wait)
        finally:
            out.cancel()
        if supervisor.state in OUT_OF_SERVICE:
            await self.generator.engine_ready(job)  # raises what the job must do
