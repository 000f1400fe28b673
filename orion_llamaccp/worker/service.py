"""The worker: wires settings, model, engine and bus together, and stops cleanly.

Start-up order matters to callers: we subscribe first (a request sent while the model
loads waits instead of vanishing), then fetch the model and start llama-server, then take
stream work. Stop order (SIGTERM): stop taking work (leave the intake channel, keep the
cancel channel), announce ``draining``, let in-flight requests finish within the drain
timeout, leave unfinished stream entries pending for another worker, stop llama-server,
say goodbye on the bus.

The pub/sub request path (claims, refusals, cancels) is ``PubSubRequests``
(pubsub_requests.py), the jobs it accepted that wait for a slot ``LocalQueue``
(local_queue.py); the worker builds them, starts their tasks and drains them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import redis.asyncio as aioredis

from orion_llamaccp.bus.claims import ANSWERED_CLAIM_SEC, Claims
from orion_llamaccp.bus.codec import decode_envelope
from orion_llamaccp.bus.lane import Lane
from orion_llamaccp.bus.outbox import Outbox
from orion_llamaccp.bus.presence import Presence, every
from orion_llamaccp.bus.replies import Publisher, Stage
from orion_llamaccp.bus.retry import with_retry
from orion_llamaccp.bus.server import warn_if_unfit
from orion_llamaccp.bus.slots import SlotLease, Slots
from orion_llamaccp.bus.streams import StreamConsumer, StreamCopies, StreamEntry
from orion_llamaccp.engine.plan import ServicePlan
from orion_llamaccp.engine.runtime import make_supervisor, prepare_model
from orion_llamaccp.engine.supervisor import EngineEvent, EngineState
from orion_llamaccp.errors import ConfigError, DecodeError, OrionLlamaError, describe
from orion_llamaccp.settings import Settings
from orion_llamaccp.stopping import GOODBYES_SEC, Budget, not_started, unless_stopped
from orion_llamaccp.worker.announce import WorkerView, transports
from orion_llamaccp.worker.handler import ChatHandler
from orion_llamaccp.worker.inflight import InFlight, RecentCancels
from orion_llamaccp.worker.jobs import (
    Failure,
    Job,
    entry_bytes,
    entry_job,
)
from orion_llamaccp.worker.local_queue import LocalQueue
from orion_llamaccp.worker.metrics import Metrics
from orion_llamaccp.worker.pubsub_requests import PubSubRequests
from orion_llamaccp.worker.startup import Intake
from orion_llamaccp.worker.stats import Stats

log = logging.getLogger(__name__)

T = TypeVar("T")


class Worker:
    """One profile served on the bus. ``run(stop)`` returns the process exit code."""

    def __init__(
        self,
        settings: Settings,
        plan: ServicePlan,
        redis: aioredis.Redis,
        intake: Intake | None = None,
    ) -> None:
        self.settings = settings
        self.plan = plan
        self.profile = plan.profile
        self.redis = redis
        self.stats = Stats()
        self.outbox = Outbox.of(settings)
        # One set of connections below redis-py's client layers for every round trip that
        # stands before a caller's answer (bus/lane.py), closed once at the end.
        self.lane = Lane(redis)
        self.publisher = Publisher(
            redis,
            lane=self.lane,
            retry_for=settings.redis_retry_sec,
            request_timeout=settings.request_timeout_sec,
        )
        self.claims = Claims(
            redis, profile=self.profile.name, dedup_ttl=settings.dedup_ttl_sec, lane=self.lane
        )
        self.view = WorkerView(self)
        self.supervisor = make_supervisor(
            plan,
            progress=self.view.on_progress,
            in_use=lambda: self.slots.busy > 0,
            refetched=self.view.model_ready,
        )
        self.supervisor.add_listener(self._on_engine_event)
        # As launched (an override included), until llama-server says (``_start_engine``).
        self.slots = Slots(settings.overrides.parallel or self.profile.llamacpp.parallel or 1)
        # The stop's round trips to Redis, all of them together (``Budget``).
        self.goodbyes = Budget(GOODBYES_SEC)
        self.metrics: Metrics | None = None
        self.hurry = asyncio.Event()  # the drain's deadline, brought forward to now
        self._said_hurry = False
        self.inflight = InFlight(RecentCancels(settings.cancel_memory_sec))
        self.channels = self.view.channels
        # ``serve`` listens before building us (see startup.py): its intake, if given.
        self.intake = intake or Intake(settings, redis, self.channels)
        self.inbox = self.intake.inbox
        self.listener = self.intake.listener
        self.handler = ChatHandler(
            settings=settings,
            profile=self.profile,
            supervisor=self.supervisor,
            outbox=self.outbox,
            publisher=self.publisher,
            claims=self.claims,
            stats=self.stats,
            ack=self._ack,
            stage_ack=self._stage_ack,
            dead_letter=self._dead_letter,
            copies=StreamCopies(redis, stream=self.channels.stream, group=self.channels.group),
        )
        self.local_queue = LocalQueue(self.slots, self.inflight, self.handler)
        self.pubsub = PubSubRequests(
            settings,
            channel=self.channels.intake,
            intake=self.intake,
            slots=self.slots,
            claims=self.claims,
            supervisor=self.supervisor,
            handler=self.handler,
            inflight=self.inflight,
            local_queue=self.local_queue,
            view=self.view,
            discover=self._on_discover,
        )
        self.intake.prepare = self.pubsub.write_ahead
        self.consumer = (
            StreamConsumer(
                redis,
                stream=self.channels.stream,
                group=self.channels.group,
                consumer=settings.instance_id,
                slots=self.slots,
                handler=self._on_entry,
                ready=self._engine_ready,
                claim_idle_ms=settings.stream_claim_idle_ms,
                # A blocking read must end well before the socket timeout would cut it.
                block_ms=int(min(1000, settings.redis_socket_timeout_sec * 500)),
                lane=self.lane,
                prepare=self._prepare_entry,
                defer_own=lambda: self.presence.predecessor_draining(),
            )
            if "stream" in transports(settings)
            else None
        )
        self.presence = Presence(
            redis=redis,
            outbox=self.outbox,
            interval=settings.heartbeat_interval_sec,
            announce_interval=settings.announce_interval_sec,
            health_channel=settings.health_channel,
            announce_channel=settings.announce_channel,
            profile=self.profile.name,
            snapshot=self.view.details,
            announcement=self.view.announcement,
            on_twin=self._twin_found,
        )
        # Ends serving as ``run``'s stop does, for a reason of our own (a twin found): a
        # signal then is still the operator's first, not the second that cuts a drain.
        self._stop_serving = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    def _start_metrics(self) -> None:
        """``/metrics``, where ``METRICS_PORT`` asks for it. A port it cannot have fails
        the worker as a failed start does, said on the bus (it was a traceback, and the
        fleet heard nothing of a worker restarting for ever)."""
        if self.settings.metrics_port is None:
            return
        metrics = Metrics(self)
        try:
            self.view.metrics_port = metrics.serve(self.settings.metrics_port)
        except OSError as exc:
            raise ConfigError(
                f"METRICS_PORT={self.settings.metrics_port} cannot be served ({exc}): "
                "choose a free port, or leave it blank for no /metrics"
            ) from None
        self.metrics = metrics
        self.handler.observers.append(metrics.observe)
        log.info("metrics on :%d/metrics", self.view.metrics_port)

    async def run(self, stop: asyncio.Event, hurry: asyncio.Event | None = None) -> int:
        """Serve until ``stop``, then drain: in-flight requests are waited for up to the
        drain timeout, or until ``hurry`` (a second SIGTERM or Ctrl-C: an operator who
        will not wait), when they are cut short and answered as at the deadline."""
        if hurry is not None:
            self.hurry = hurry
        relay = asyncio.create_task(_follow(stop, self._stop_serving), name="stop")
        stop = self._stop_serving
        # Stream reads and pub/sub requests end where the drain begins; the listener runs
        # on to the drain's end, for the cancels of the requests it waits for.
        intake_stop, presence_stop = asyncio.Event(), asyncio.Event()
        # From here a request waits for the engine instead of being told it is stopped,
        # those heard while ``serve`` built us included.
        self.supervisor.expect_start()
        background = [
            self.intake.start(),
            asyncio.create_task(self.pubsub.run(), name="pubsub-intake"),
            asyncio.create_task(self.pubsub.settle_claims(), name="pubsub-claims"),
            asyncio.create_task(self.pubsub.refuse_overflow(), name="pubsub-overflow"),
        ]
        presence = asyncio.create_task(self.presence.run(presence_stop), name="presence")
        background.append(presence)
        if self.consumer is not None:  # to the drain's end: the entries it waits for run on
            refresh = every(
                self.settings.stream_claim_idle_ms / 3000,
                self.consumer.keep_claims_fresh,
                presence_stop,
                "stream claim refresh",
            )
            background.append(asyncio.create_task(refresh, name="claims"))
        code = 0
        try:
            # Subscribed before the model check starts: its thread holds the GIL for long
            # stretches, and a request sent meanwhile should wait, not go unheard. A stop
            # (Redis down, the operator gives up) ends the wait.
            await unless_stopped(stop, self.intake.listening(5.0))
            if self.listener.subscribed.is_set():
                log.info("listening on %s", ", ".join(self.listener.channels))
            # Said, not refused: a fork may number its versions otherwise, and an operator
            # may accept the risk; ``doctor`` fails on it.
            background.append(asyncio.create_task(warn_if_unfit(self.redis), name="redis-check"))
            if "pubsub" in transports(self.settings):  # only pub/sub messages are claimed
                counting = every(
                    self.settings.heartbeat_interval_sec,
                    self.pubsub.count_replicas,
                    presence_stop,
                    "counting replicas",
                )
                background.append(asyncio.create_task(counting, name="replicas"))
            code = await self._serve(stop, intake_stop)
            if self.presence.gave_way is not None and self.view.error is None:
                code = await self._fatal(ConfigError(self.presence.gave_way))
        finally:
            intake_stop.set()
            await self._drain()
            await self._hand_back()
            self.intake.stop.set()
            presence_stop.set()
            # Ended, not only told to: a beat on its way (a slow Redis) that landed after
            # the farewell set the liveness key again, the worker shown alive and draining.
            presence.cancel()
            await asyncio.gather(presence, return_exceptions=True)
            # A worker that gave up keeps its last beat (``failed``, with the reason) for
            # three intervals, for ``ps`` and ``health``, as one that could not be built.
            await self.presence.farewell(
                keep_liveness=self.view.error is not None, budget=self.goodbyes
            )
            self._say_given_up()
            await self.lane.aclose()
            for task in (*background, relay):
                task.cancel()
            await asyncio.gather(*background, relay, return_exceptions=True)
            if self.metrics is not None:
                self.metrics.close()
        return code

    async def _serve(self, stop: asyncio.Event, intake_stop: asyncio.Event) -> int:
        workers = [asyncio.create_task(self.local_queue.run(), name="dispatch")]
        try:
            self._start_metrics()
            if not await self._start_engine(stop):
                return 0
            settle_gc()
            if self.consumer is not None:
                workers += self._stream_tasks(self.consumer, intake_stop)
            await unless_stopped(stop, self.supervisor.wait_for(EngineState.FAILED))
        except OrionLlamaError as exc:
            return await self._fatal(exc)
        except Exception as exc:  # a bug or an error no layer translated: still a failure,
            log.exception("the engine could not be started")  # never a clean stop
            return await self._fatal(
                OrionLlamaError(f"internal error: {type(exc).__name__}: {exc}")
            )
        finally:
            intake_stop.set()
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        if self.supervisor.state is EngineState.FAILED:
            return await self._fatal(self.supervisor.failure or OrionLlamaError("engine failed"))
        return 0

    async def _start_engine(self, stop: asyncio.Event) -> bool:
        """Fetch the model and start llama-server; False if asked to stop meanwhile."""
        self.view.state = "downloading"
        self.presence.announce_soon()

        async def start() -> None:
            resolved = await prepare_model(self.plan, self.view.on_progress)
            self.view.model_ready(resolved)
            await self.supervisor.start()

        if not await unless_stopped(stop, start()):
            return False
        props = self.supervisor.props
        self.slots.resize(props.total_slots if props else self.slots.total)
        return True

    def _stream_tasks(self, consumer: StreamConsumer, stop: asyncio.Event) -> list[asyncio.Task]:
        tasks = [asyncio.create_task(consumer.run(stop), name="stream")]
        if self.settings.stream_trim_sec > 0:
            trim = every(self.settings.stream_trim_sec, self._trim, stop, "stream trim")
            tasks.append(asyncio.create_task(trim, name="trim"))
        return tasks

    async def _hand_back(self) -> None:
        """The stream entries this worker leaves unanswered, to another worker now. Not
        where a twin was seen (another worker under our instance id): the entries under
        our consumer name may be its, in flight."""
        if self.consumer is None or self.presence.twin_seen:
            return
        try:
            handing = self.consumer.hand_back()
            if left := await self.goodbyes.spend("handing back the stream entries", handing):
                log.info("left %d stream entries to another worker, to take at once", left)
        except Exception as exc:  # Redis away: they are taken after the claim idle time
            log.warning("could not hand back the stream entries left: %s", exc)

    def _say_given_up(self) -> None:
        """Which goodbyes Redis took too long for: what the fleet may not have heard (a
        stale ``draining`` beat, entries taken only after the claim idle time)."""
        if given_up := self.goodbyes.given_up:
            log.warning(
                "Redis did not answer the stop's steps within %.0f s: gave up %d (%s)",
                self.goodbyes.seconds,
                len(given_up),
                ", ".join(given_up),
            )

    async def _trim(self) -> None:
        """Keep the stream and its group from growing for good (acked entries, consumers
        of workers gone)."""
        if self.consumer is None:
            return
        if trimmed := await self.consumer.trim_acked():
            log.debug("deleted %d acked entries from %s", trimmed, self.channels.stream)
        if gone := await self.consumer.forget_gone_consumers():
            log.info("forgot %d consumer(s) of workers gone, with nothing pending", gone)

    def _twin_found(self, reason: str) -> None:
        """Another worker serves under our instance id and started first: we stop."""
        self._stop_serving.set()

    async def _fatal(self, exc: BaseException) -> int:
        message = self.settings.redact(str(exc))
        log.error("cannot serve profile %s: %s", self.profile.name, message)
        self.view.state = "failed"
        self.view.error = message
        self.supervisor.give_up(OrionLlamaError(message))  # those waiting hear why
        said = self.outbox.system_error(
            "engine_unavailable",
            {"message": message, "profile": self.profile.name, "retryable": False},
        )
        with contextlib.suppress(Exception):
            published = self.publisher.event(self.settings.error_channel, said)
            await self.goodbyes.spend("telling the fleet the worker failed", published)
        return 1

    async def _drain(self) -> None:
        # One deadline for all of it: a platform that kills at the drain timeout (a
        # container's stop grace period) must not find the worker still answering.
        deadline = time.monotonic() + self.settings.drain_timeout_sec
        self.pubsub.begin_drain()
        self.supervisor.begin_drain()
        # Said at once, not at the next beat: a replacement under our id that starts now
        # must find us draining, or it takes the entries we still generate for leftovers
        # of its own (``Presence.predecessor_draining``); dashboards see it at once too.
        # These first steps run on the drain's time, then the goodbyes' (``_drain_step``).
        with contextlib.suppress(Exception):
            await self._drain_step(self.presence.heartbeat(), deadline, "the draining beat")
        # Other replicas take new requests from here; the cancel channel stays, so that a
        # caller can still stop a request the drain waits for. Not subscribed again after
        # a reconnect, whether or not Redis answers the UNSUBSCRIBE.
        leaving = (self.channels.intake, self.settings.discover_channel)
        self.listener.drop(*leaving)
        with contextlib.suppress(TimeoutError):
            leave = self.listener.leave(*leaving)
            await self._drain_step(leave, deadline, "leaving the intake channel")
        await self._give_back_claims(deadline)  # a resend now goes to a replica that stays
        # With Redis hung, each claim waits out its timeouts: a full inbox and overflow took
        # minutes past the deadline. Those left when it comes go unanswered, as the bus
        # answers nothing anyway.
        try:
            await self._drain_step(self.pubsub.answer_inbox(), deadline)
        except TimeoutError:
            if (unread := self.inbox.qsize()) or self.intake.overflow:
                log.warning(
                    "the drain's time is up: %d pub/sub messages left unanswered in the "
                    "inbox and %d in its overflow",
                    unread,
                    len(self.intake.overflow),
                )
        await self._until_deadline(self.pubsub.settled(), deadline)
        self.local_queue.refuse_all()
        await self._wait_in_flight(deadline)
        await self.supervisor.stop()

    async def _give_back_claims(self, deadline: float) -> None:
        """Answered messages without an id stay claimed a while (``Claims.stage_answered``);
        a worker out of the channel frees them, and those it answers from now on, so that
        a resend finds a replica that stays."""
        if self.presence.gave_way is not None:  # its twin holds claims under the same name
            return
        self.claims.leaving = True  # those answered from now on, whether or not Redis answers
        try:
            giving = self.claims.give_back(self.settings.instance_id)
            await self._drain_step(giving, deadline, "giving back the answered claims")
        except Exception as exc:  # the drain goes on: at worst they lapse
            log.warning(
                "answered claims not given back (they lapse in %d s): %s",
                ANSWERED_CLAIM_SEC,
                self.settings.redact(describe(exc)),
            )

    def _pending(self) -> list[asyncio.Task[None]]:
        pending = self.inflight.pending()
        if self.consumer is not None:
            pending += [t for t in self.consumer.tasks if not t.done()]
        return pending

    async def _wait_in_flight(self, deadline: float) -> None:
        """Until every request is answered, or the ``deadline``. What starts meanwhile
        counts too (a cancel's answer)."""
        if pending := self._pending():
            log.info(
                "draining %d in-flight requests (up to %.0fs)",
                len(pending),
                max(0.0, deadline - time.monotonic()),
            )
        while (pending := self._pending()) and deadline > time.monotonic():
            await self._until_deadline(asyncio.wait(pending), deadline)
            if self._hurried():
                break
        if late := self._pending():
            log.warning("the drain's time is up: cutting off %d requests", len(late))
            if any(not_started(task) for task in late):
                # Cancelled before its first step, a task runs none of its code: its
                # request would get no answer. One turn of the loop starts it.
                await asyncio.sleep(0)
            for task in late:
                task.cancel()
            # Bounded: a cancel swallowed somewhere must not hang the stop. Stopping
            # llama-server below ends any request that is still running anyway. Their
            # answers and released records are round trips to Redis: the goodbyes' time.
            ending = asyncio.wait(late, timeout=5.0)
            budget_spent = False
            try:
                await self.goodbyes.spend("the answers of the requests cut off", ending)
            except TimeoutError:  # Redis, not the requests: they wait on their answers
                budget_spent = True
            if (stuck := [task for task in late if not task.done()]) and not budget_spent:
                log.warning("%d requests did not stop when cancelled", len(stuck))

    async def _until_deadline(self, step: Coroutine[Any, Any, Any], deadline: float) -> None:
        """Await ``step`` until it is done, the ``deadline`` passes or ``hurry`` is set."""
        with contextlib.suppress(TimeoutError):
            await self._drain_step(step, deadline)

    async def _drain_step(
        self, step: Coroutine[Any, Any, T], deadline: float, goodbye: str | None = None
    ) -> T:
        """``step``'s result, awaited until the drain's ``deadline`` or ``hurry``, whichever
        comes first (TimeoutError then): the one place that says how long a step of the
        drain may run. A ``goodbye`` (a round trip the fleet should hear: the draining
        beat, say) may run on past the deadline on the goodbyes' budget (``Budget.spend``).
        A second signal cut the requests short but not these: with Redis hung, each
        waited out its own bound (about 16 s for the first three with the defaults)
        before the worker went on."""
        if self._hurried():
            step.close()  # never started
            raise TimeoutError("told to stop again")
        if goodbye is None:
            timed = asyncio.wait_for(step, max(0.0, deadline - time.monotonic()))
        else:
            timed = self.goodbyes.spend(goodbye, step, free_until=deadline)
        running = asyncio.ensure_future(timed)
        if not await unless_stopped(self.hurry, running):
            self._hurried()
            raise TimeoutError("told to stop again")
        return running.result()

    def _hurried(self) -> bool:
        """Told to stop again (``hurry``), said once: by the step of the drain it cuts."""
        if self.hurry.is_set() and not self._said_hurry:
            self._said_hurry = True
            log.warning("told to stop again: cutting the drain short")
        return self.hurry.is_set()

    @property
    def waiting(self) -> int:
        """Pub/sub jobs accepted that wait for a slot (``LocalQueue``)."""
        return self.local_queue.waiting

    # ------------------------------------------------------------------ engine and slots

    def _on_engine_event(self, event: EngineEvent) -> None:
        if self.view.error is not None:  # the worker gave up (``_fatal``): it stays failed,
            return  # not "draining" and then "stopped" as the stop that follows goes
        self.view.state = str(event.state)
        self.view.engine_reason = event.reason
        self.presence.announce_soon()

    async def _engine_ready(self) -> None:
        await self.supervisor.wait_for(EngineState.READY)

    # ------------------------------------------------------------------ discovery

    async def _on_discover(self, data: bytes) -> None:
        """A discovery request (``PubSubRequests`` hands it over): our announcement."""
        try:
            request = decode_envelope(data)
        except DecodeError:
            request = None
        await self.presence.announce(request)

    # ------------------------------------------------------------------ stream intake

    def _prepare_entry(self, entry: StreamEntry) -> None:
        """A first delivery's request, written to llama-server before any entry of the same
        read is validated (``StreamConsumer.prepare``; as ``PubSubRequests.write_ahead`` for
        pub/sub)."""
        raw = entry_bytes(entry)
        fresh = entry.deliveries == 1 and not entry.reclaimed
        ahead = self.handler.generator.ahead(raw) if raw is not None and fresh else None
        entry.prepared = (raw, ahead)

    async def _on_entry(self, entry: StreamEntry) -> None:
        """Called with a slot held for the entry, given back when its job ends (acked or
        left pending): a worker holds no more entries than slots (but for those that wait
        for their turn after a crash or for their time: ``SlotLease``), the backlog waits
        in Redis."""
        lease = SlotLease(self.slots)
        try:
            if entry.taken_over:  # by another worker, before this handler ran: it answers
                if entry.prepared is not None and entry.prepared[1] is not None:
                    entry.prepared[1].drop()
                return
            if entry.prepared is None:
                self._prepare_entry(entry)
            raw, ahead = entry.prepared
            job = entry_job(entry, raw, self.settings.max_message_bytes)
            job.ahead, job.lease = ahead, lease
            self.view.received += 1
            if entry.deliveries > self.settings.stream_max_deliveries:
                answered = await with_retry(
                    "checking a stream entry's answer",
                    lambda: self.publisher.already_answered(job.delivery_id),
                    retry_for=self.settings.redis_retry_sec,
                )
                if answered:
                    await self._ack(job)  # its worker died between the result and the ack
                    return
                await self.handler.refuse(
                    job,
                    Failure(
                        "upstream_failed",
                        f"delivered {entry.deliveries} times without an answer "
                        f"(limit {self.settings.stream_max_deliveries})",
                        retryable=False,
                    ),
                )
                return
            self.inflight.file(job, asyncio.current_task())
            try:
                await self.handler.handle(job)
            finally:
                self.inflight.forget(job)
        finally:
            lease.release()

    async def _ack(self, job: Job) -> None:
        if job.entry is not None and self.consumer is not None:
            entry_id = job.entry.entry_id
            await with_retry(
                "acking a stream entry",
                lambda: self.consumer.ack(entry_id),
                retry_for=self.settings.redis_retry_sec,
            )

    def _stage_ack(self, job: Job) -> Stage | None:
        if job.entry is None or self.consumer is None:
            return None
        return self.consumer.stage_ack(job.entry.entry_id)

    async def _dead_letter(self, job: Job, reason: str, error: str) -> None:
        if job.entry is None:
            return
        fields = {
            "original_stream": self.channels.stream,
            "original_message_id": job.entry.entry_id,
            "error": error[:2000],  # redacted with the failure (``Failure.redacted``)
            "reason": reason,
            "attempt": str(job.first_attempt),
            "failed_at_ms": str(int(time.time() * 1000)),
            "envelope": job.raw[: self.settings.max_message_bytes],
        }
        # The cap is exact: a dead letter is rare, the cap is the cap.
        added = await self.publisher.dead_letter(
            self.channels.dlq, job.entry.entry_id, fields, self.settings.dlq_maxlen or 0
        )
        if not added:
            log.info("stream entry %s was dead-lettered before", job.entry.entry_id)


GC_YOUNG_THRESHOLD = 10_000


def settle_gc() -> None:
    """Start-up is over: what it built (modules, pydantic schemas, clients, the profile)
    lives as long as the process, so the garbage collector need not scan it again.

    ``gc.freeze`` moves those objects out of every later collection, and a young
    generation of 10,000 objects instead of 700 makes collections rarer; a request's own
    objects are freed by reference counting either way. In the capacity benchmark the
    collector had taken about a tenth of the worker's CPU (a full collection 15-26 ms,
    every hundred or so requests) and this took CPU per request from 325-340 to 294-306
    µs in an A/B (docs/benchmarks-history.md, item 55).
    ``orion_llamacpp_gc_frozen_objects`` shows it.
    """
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


async def _follow(stop: asyncio.Event, then: asyncio.Event) -> None:
    """Set ``then`` once ``stop`` is."""
    await stop.wait()
    then.set()


__all__ = ["Worker"]
