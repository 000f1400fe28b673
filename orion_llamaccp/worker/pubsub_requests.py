"""The pub/sub request path: from a message in the inbox to a job dispatched or answered.

A pub/sub message reaches every replica on the channel; a claim in Redis decides which
one answers. Each request's claim leaves as its message is read, side by side with the
others of its burst, and is settled in the order the messages came; a worker alone on
its channel starts the job before its claim is back, its request written to llama-server
as the listener reads it. Requests heard beyond the inbox's bound are claimed and
refused ``overloaded`` as they come, at most ``CLAIMS_IN_FLIGHT`` at once; so are those
beyond the local queue's bound. Apart from ``Worker`` (which starts its tasks and drains
it) so that this path, its counters and its bounds read in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import TYPE_CHECKING, Any

from orion_llamaccp.bus.claims import REPLICA_GRACE_SEC
from orion_llamaccp.bus.codec import as_uuid, loads_object
from orion_llamaccp.bus.envelope import as_utc
from orion_llamaccp.engine.supervisor import EngineState
from orion_llamaccp.errors import DecodeError, describe
from orion_llamaccp.worker.handler import REDIS_AWAY
from orion_llamaccp.worker.jobs import (
    Ahead,
    Failure,
    Job,
    claim_outcome,
    decode_job,
    stopping_failure,
)

if TYPE_CHECKING:
    from orion_llamaccp.bus.claims import Claims
    from orion_llamaccp.bus.slots import Slots
    from orion_llamaccp.engine.supervisor import Supervisor
    from orion_llamaccp.settings import Settings
    from orion_llamaccp.worker.announce import WorkerView
    from orion_llamaccp.worker.handler import ChatHandler
    from orion_llamaccp.worker.inflight import InFlight
    from orion_llamaccp.worker.local_queue import LocalQueue
    from orion_llamaccp.worker.startup import Intake

log = logging.getLogger(__name__)

# Pub/sub claims on their way at once, at most: beyond, messages wait in the inbox (a
# flood must not become as many tasks).
CLAIMS_IN_FLIGHT = 128


class PubSubRequests:
    """The messages of the worker's pub/sub channels, read from ``Intake``'s inbox:
    requests claimed and settled (``run``, ``settle_claims``), those beyond the inbox's
    bound refused (``refuse_overflow``), cancels, discovery requests (``discover``).
    ``stopping``, set by the worker's drain, turns the requests still settled away."""

    def __init__(
        self,
        settings: Settings,
        channel: str,
        intake: Intake,
        slots: Slots,
        claims: Claims,
        supervisor: Supervisor,
        handler: ChatHandler,
        inflight: InFlight,
        local_queue: LocalQueue,
        view: WorkerView,
        discover: Callable[[bytes], Coroutine[Any, Any, None]],
    ) -> None:
        self.settings = settings
        self.channel = channel  # the intake channel (requests)
        self.intake = intake
        self.inbox = intake.inbox
        self.listener = intake.listener
        self.slots = slots
        self.claims = claims
        self.supervisor = supervisor
        self.handler = handler
        self.inflight = inflight
        self.local_queue = local_queue
        self.view = view
        self.discover = discover
        self.aheads_queued = 0  # messages in the inbox whose requests are written already
        self.alone = False  # the only subscriber of the intake channel, last we counted
        # Pub/sub jobs whose claims are on their way, in the order their messages came.
        self.claiming: asyncio.Queue[tuple[Job, asyncio.Task[bool]]] = asyncio.Queue(
            CLAIMS_IN_FLIGHT
        )
        self.unsettled = 0  # claims sent and not yet settled
        # The claims of requests heard beyond the inbox's bound on their way, and the
        # ``overloaded`` answers on theirs, at most: under a flood the rest wait as the
        # messages they are, in the inbox and its overflow (both bounded), not as tasks.
        self.beyond_claims = asyncio.Semaphore(CLAIMS_IN_FLIGHT)
        self.refusing = asyncio.Semaphore(CLAIMS_IN_FLIGHT)
        self.stopping = False

    async def run(self) -> None:
        while True:
            await self._take(*await self.inbox.get())

    def begin_drain(self) -> None:
        """From now on a request settled is refused ("worker is stopping"), none starts
        before its claim."""
        self.stopping = True

    async def settled(self) -> None:
        """Every claim on its way settled, and each request answered or dispatched."""
        await self.claiming.join()

    async def answer_inbox(self) -> None:
        """The messages received before we unsubscribed, and the requests beyond the
        inbox's bound: their answers are waited for with the rest in flight."""
        while not self.inbox.empty():
            await self._take(*self.inbox.get_nowait())  # stopping: none starts early
        while self.intake.overflow:
            await self._refuse_next()

    async def _take(self, channel: str, data: bytes, ahead: Ahead | None) -> None:
        """One message from the inbox, by its channel (here and in the drain)."""
        if ahead is not None:
            self.aheads_queued -= 1
        try:
            if channel == self.settings.cancel_channel:
                self._on_cancel(data)
            elif channel == self.settings.discover_channel:
                self.inflight.spawn(self.discover(data))
            elif (claimed := self._receive(data, ahead)) is not None:
                try:
                    await self.claiming.put(claimed)  # full: the rest wait in the inbox
                except asyncio.CancelledError:  # the drain's end: a claim none would settle
                    claimed[1].cancel()
                    self.unsettled -= 1
                    raise
                # Two turns, the claim's task and then the lane's (which waits one for
                # company): the claim is written before the next message is decoded.
                await asyncio.sleep(0)
                await asyncio.sleep(0)
        except Exception:
            log.exception("pub/sub message on %s could not be handled", channel)
            if ahead is not None:  # else llama-server generates on for nobody
                ahead.drop()

    async def settle_claims(self) -> None:
        """Claims leave for Redis as their messages are read, side by side (a burst's
        share one write, ``bus/lane.py``), and are settled here in the order the messages
        came, so that the local queue keeps that order. One claim after the other, the
        last of a burst of four behind a replica reached llama-server 3.1-3.7 ms after the
        first send, against 2.6-2.7 ms side by side, the first at parity
        (``bench.intake --burst 4 --replica``, ``docs/benchmarks-history.md`` item 65)."""
        while True:
            job, claim = await self.claiming.get()
            try:
                await self._settle_logged(job, claim)
            finally:
                self.claiming.task_done()

    def write_ahead(self, channel: str, data: bytes) -> Ahead | None:
        """A request's message, as the listener reads it (``Intake.prepare``): written to
        llama-server now if it will start before its claim, as far as slots are free.

        In the listener's step the request leaves as soon as its message is parsed, without
        the hop through the inbox into the intake task (read to write 0.14 → 0.07 ms in
        the two-in-flight trace, ``docs/benchmarks-history.md`` item 31).
        """
        if channel != self.channel or self.aheads_queued >= self.slots.free:
            return None
        ahead = self.handler.generator.ahead(data) if self._early(data) else None
        if ahead is not None:
            self.aheads_queued += 1
        return ahead

    def _early(self, data: bytes) -> bool:
        return self._start_before_claim() and len(data) <= self.settings.max_message_bytes

    async def count_replicas(self) -> None:
        # Our own subscription is among those counted: without it (reconnecting, or
        # draining, which leaves the intake channel) a count says nothing, and the one
        # before stands. The first count comes once we are subscribed (``Worker.run``),
        # not a heartbeat interval later.
        if self.listener.subscribed.is_set() and not self.stopping:
            self.alone = await self.claims.subscribers(self.channel) == 1

    def _on_early_claim(self, claim: asyncio.Task[bool]) -> None:
        """A claim lost while starting before it: a replica joined since we counted. Not
        alone any more, so the next messages wait for their claims instead of each costing
        a cut-off generation until the next count."""
        if claim_outcome(claim) is False:
            self.view.claims_lost += 1
            self.alone = False

    def _start_before_claim(self) -> bool:
        """Alone on the channel, with a slot free and nothing waiting: the claim is a round
        trip no other replica contests, so the job starts while it is in flight. A replica
        that joined since we counted costs a cut-off prompt, never a second answer."""
        return (
            self.alone
            and not self.stopping
            and self.local_queue.waiting == 0
            and self.unsettled == 0
            and self.slots.free > 0
            and self.supervisor.state is EngineState.READY
        )

    def _receive(self, data: bytes, ahead: Ahead | None) -> tuple[Job, asyncio.Task[bool]] | None:
        """A request's message: its job started before its claim (None), or its job and
        its claim on the way, to be settled (``_settle``). ``ahead``: its request, already
        written (``write_ahead``); dropped unless the job starts before its claim."""
        early = self._early(data)
        job = decode_job(data, "pubsub", self.settings.max_message_bytes)
        job.ahead = ahead
        self.view.received += 1
        if early and job.decode_error is None:
            # Its first step writes the request: it runs before the claim.
            self.local_queue.dispatch(job)
            key, claimant = job.key, job.claimant(self.settings.instance_id)
            job.claim = asyncio.create_task(self.claims.claim_message(key, claimant))
            job.claim.add_done_callback(self._on_early_claim)
            return None
        if ahead is not None:  # not started before its claim after all
            ahead.drop()
            job.ahead = None
        return job, self._claim(job)

    def _claim(self, job: Job) -> asyncio.Task[bool]:
        """``job``'s claim on its way, to be settled (``_settle``)."""
        key, claimant = job.key, job.claimant(self.settings.instance_id)
        self.unsettled += 1
        if self._defers_to_replicas():
            return asyncio.create_task(self._claim_after_grace(key, claimant))
        return asyncio.create_task(self.claims.claim_message(key, claimant))

    def _defers_to_replicas(self) -> bool:
        """Not able to serve yet (llama-server downloading, loading, restarting), with a
        replica on the channel: in a rolling deploy or a scale-up the newcomer, idle,
        won most claims from the replica serving, and answered each `engine_unavailable`
        after the engine wait while that replica sat idle. Its claim now waits a grace:
        a replica that can serve claims within a few ms."""
        return not self.alone and self.supervisor.state is not EngineState.READY

    async def _claim_after_grace(self, key: str, claimant: str) -> bool:
        await asyncio.sleep(REPLICA_GRACE_SEC)
        return await self.claims.claim_message(key, claimant)

    async def _settle(self, job: Job, claim: asyncio.Task[bool], beyond: bool = False) -> None:
        """Once its claim is back: nothing (another replica's), or an answer now, or the
        job dispatched. ``beyond``: heard beyond the inbox's bound, never dispatched."""
        try:
            won = await claim
        finally:
            self.unsettled -= 1
        if not won:
            self.view.claims_lost += 1
            return  # another replica serves it
        if job.decode_error is not None:
            self.inflight.spawn(self.handler.handle(job), job)
        elif self.inflight.recent.cancels(job):  # heard during its claim: that is its answer
            self.local_queue.answer_cancelled_unstarted(job)
        elif self.stopping:
            self.inflight.spawn(self.handler.refuse(job, stopping_failure()), job)
        elif beyond:
            intake = self.intake
            await self._refuse_overloaded(
                job,
                f"{intake.limit} messages or {intake.byte_limit} bytes waiting in the worker's "
                "inbox",
            )
        elif self.local_queue.waiting - self.slots.free >= self.settings.local_queue_size:
            await self._refuse_overloaded(
                job,
                f"{self.slots.total} slots busy and {self.local_queue.waiting} requests waiting",
            )
        else:
            self.local_queue.dispatch(job)

    async def _settle_logged(
        self, job: Job, claim: asyncio.Task[bool], beyond: bool = False
    ) -> None:
        """``_settle``, what it raises logged: the worker's tasks that settle go on."""
        try:
            await self._settle(job, claim, beyond)
        except REDIS_AWAY as exc:
            _unclaimed(job, exc)
        except Exception:
            what = "refused" if beyond else "handled"
            log.exception("pub/sub request %s could not be %s", job.request_id, what)

    async def refuse_overflow(self) -> None:
        """The requests heard beyond the inbox's bound (``Intake.overflow``), refused as they
        come, their claims side by side, however long the inbox: their callers learn at
        once that this worker will not take them. Before the worker was built they waited."""
        while True:
            await self.intake.overflowing.wait()
            self.intake.overflowing.clear()
            while self.intake.overflow:
                await self._refuse_next()

    async def _refuse_next(self) -> None:
        """The next request of ``Intake.overflow`` on its way to its answer (here and in
        the drain), once fewer than ``CLAIMS_IN_FLIGHT`` are."""
        await self.beyond_claims.acquire()
        if not self.intake.overflow:  # the drain or the overflow task took the last one
            self.beyond_claims.release()
            return
        job = decode_job(self.intake.overflow.popleft(), "pubsub", self.settings.max_message_bytes)
        self.view.received += 1
        self.inflight.spawn(self._refuse_beyond(job, self._claim(job)))

    async def _refuse_beyond(self, job: Job, claim: asyncio.Task[bool]) -> None:
        try:
            await self._settle_logged(job, claim, beyond=True)
        finally:
            self.beyond_claims.release()

    async def _refuse_overloaded(self, job: Job, why: str) -> None:
        """Answer ``job`` ``overloaded`` once fewer than ``CLAIMS_IN_FLIGHT`` such answers
        are on their way (the flood's next messages wait meanwhile)."""
        await self.refusing.acquire()
        refusal = self.inflight.spawn(self.handler.refuse(job, _overloaded(why)), job)
        refusal.add_done_callback(lambda _: self.refusing.release())

    def _on_cancel(self, data: bytes) -> None:
        try:
            message = loads_object(data)
        except DecodeError:
            return
        payload = message.get("payload") if isinstance(message.get("payload"), dict) else {}
        correlation_id = payload.get("correlation_id") or message.get("correlation_id")
        if not correlation_id:
            return
        sent = _sent_at(message.get("created_at") or message.get("ts"))
        uuid = as_uuid(correlation_id)
        # Only a UUID can name a request to come (a job's id always is one); anything else
        # reaches at most a job of a message that failed to decode.
        waiting = self.inflight.cancel(uuid or str(correlation_id), sent, remember=bool(uuid))
        for job in waiting:  # pub/sub jobs queued for a slot: answered now, not once one frees
            self.local_queue.answer_cancelled_unstarted(job)


def _unclaimed(job: Job, exc: BaseException) -> None:
    """A claim Redis did not answer within its retries: the request stays unanswered (an
    answer without the claim could be a second one, a replica's), said in one line, not a
    traceback a request (hundreds of them in a flood with Redis hung)."""
    log.warning(
        "pub/sub request %s not claimed, left unanswered: Redis unavailable (%s)",
        job.request_id,
        describe(exc),
    )


def _overloaded(why: str) -> Failure:
    return Failure("overloaded", f"{why}; try again later", retryable=True)


def _sent_at(value: Any) -> datetime | None:
    """When a cancel was sent: its ``created_at`` (or ``ts``); None if it does not say."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return as_utc(datetime.fromisoformat(value))
    return None
