"""The life of one chat request, from decoded envelope to exactly one final result.

Whatever happens (bad input, expiry, a dead llama-server, a cancel, a duplicate) the
request ends in exactly one of three ways:

- answered: one ``llm.chat.result`` on ``reply_to`` (success, or ``payload.error``), and a
  stream entry acked (dead-lettered too when it can never succeed);
- left pending (streams only): the worker is stopping or its engine is gone, so the entry
  stays in Redis for another worker; no result is sent, because the next attempt sends it;
- reported: every failure goes to ``orion:system:error`` as well; one with nothing to
  reply to goes there only, and, a stream entry, to the dead-letter stream too (unless
  ``trace.work.reply_optional``) before it is acked.

The handler says what happens when; two of its steps live apart, each in its own module:
the idempotency record it owns, renews and gives up (``Records``, records.py), and the
wait for ``trace.work.not_before_ms`` (``NotBefore``, not_before.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.exceptions import OutOfMemoryError

from orion_llamaccp.bus.claims import Claims, idempotency_key
from orion_llamaccp.bus.codec import decode_chat
from orion_llamaccp.bus.envelope import CHAT_REQUEST, ChatRequestPayload, Envelope
from orion_llamaccp.bus.outbox import Outbox
from orion_llamaccp.bus.replies import Publisher, Stage, Stored
from orion_llamaccp.bus.retry import TRANSIENT
from orion_llamaccp.bus.streams import StreamCopies
from orion_llamaccp.engine.supervisor import Supervisor
from orion_llamaccp.errors import DecodeError
from orion_llamaccp.profiles.models import Profile
from orion_llamaccp.settings import Settings
from orion_llamaccp.worker.generation import Generation, Generator
from orion_llamaccp.worker.jobs import (
    ClaimedElsewhere,
    Failure,
    Job,
    LeavePending,
    cancelled_unstarted,
    check_expiry,
    result_message,
)
from orion_llamaccp.worker.llama_request import ChatOptions, parse_options
from orion_llamaccp.worker.not_before import NotBefore
from orion_llamaccp.worker.records import Records
from orion_llamaccp.worker.stats import Stats

log = logging.getLogger(__name__)
T = TypeVar("T")
# Redis away longer than our retries, or at its ``maxmemory`` (``noeviction``) refusing
# writes: not a bug of the request's (no traceback, no ``internal_error``).
REDIS_AWAY = (*TRANSIENT, OutOfMemoryError)

StreamOp = Callable[[Job], Awaitable[None]]
StageAck = Callable[[Job], Stage | None]
DeadLetter = Callable[[Job, str, str], Awaitable[None]]


class ChatHandler:
    def __init__(
        self,
        *,
        settings: Settings,
        profile: Profile,
        supervisor: Supervisor,
        outbox: Outbox,
        publisher: Publisher,
        claims: Claims,
        stats: Stats,
        ack: StreamOp,
        stage_ack: StageAck,
        dead_letter: DeadLetter,
        copies: StreamCopies | None = None,
    ) -> None:
        self.settings = settings
        self.profile = profile
        self.outbox = outbox
        self.publisher = publisher
        self.generator = Generator(
            settings=settings,
            profile=profile,
            supervisor=supervisor,
            outbox=outbox,
            publisher=publisher,
        )
        self.claims = claims
        self.records = Records(settings=settings, claims=claims, publisher=publisher, copies=copies)
        self.not_before = NotBefore(settings=settings, generator=self.generator)
        self.stats = stats
        self._ack = ack
        self._stage_ack = stage_ack
        self._dead_letter = dead_letter
        self.observers: list[Callable[[str, float | None, float], None]] = []

    # ------------------------------------------------------------------ entry point

    async def handle(self, job: Job) -> None:
        """Serve one job; never raises (except cancellation at shutdown). Counted once it
        is answered here: not a message another replica won, nor a stream entry left
        pending (another delivery answers it, and counts it), nor an answer that could
        not go out. Those counted as failures, twice across a fleet for some."""
        self.stats.in_flight += 1
        outcome: str | None = None
        tokens, ttft = 0, None
        unanswered = False  # a stream entry left pending: its next delivery answers it
        try:
            if (served := await self._serve(job)) is not None:
                outcome, (tokens, ttft) = "ok", served
        except ClaimedElsewhere:
            log.info(
                "message %s went to another replica after this worker had started on it "
                "(a replica joined the channel): dropped",
                job.request_id,
            )
        except Failure as failure:
            await self._answer_failure(job, failure)
        except LeavePending as why:
            unanswered = True
            log.warning(
                "leaving stream entry %s pending: %s", job.entry.entry_id if job.entry else "?", why
            )
        except asyncio.CancelledError:
            if job.superseded:  # another worker's, as ClaimedElsewhere
                if job.answered_elsewhere:
                    await self._ack_answered(job)
                raise
            await self._interrupted(job)
            unanswered = job.entry is not None and not job.user_cancelled
            if not job.user_cancelled:
                raise
        except REDIS_AWAY as exc:  # away longer than our retries, or refusing writes
            log.error("request %s: Redis unavailable (%s)", job.request_id, exc)
            unanswered = job.entry is not None
            if job.entry is None:  # a stream entry stays pending, and is answered later
                failure = Failure("engine_unavailable", "bus unavailable", retryable=True)
                await self._answer_failure(job, failure)
        except Exception as exc:  # a bug must not take the worker down, nor lose the answer
            log.exception("request %s failed unexpectedly", job.request_id)
            failure = Failure("internal_error", f"{type(exc).__name__}: {exc}", retryable=True)
            await self._answer_failure(job, failure)
        finally:
            if job.ahead is not None:  # a no-op unless its generation never took it
                job.ahead.drop()
            self.stats.in_flight -= 1
            if outcome is not None:
                self._finished(job, outcome, tokens, ttft)
            if job.record_key is not None:  # after the answer: see ``_serve``
                await self.records.release(job, job.record_key, unanswered=unanswered)

    async def _answer_failure(self, job: Job, failure: Failure) -> None:
        """Answer ``failure`` to its end even if cancelled meanwhile (``_to_its_end``), and
        count it once sent, the cancellation that comes after included."""
        answering = asyncio.ensure_future(self._fail_or_log(job, failure))

        def count(done: asyncio.Future[bool]) -> None:
            if not done.cancelled() and done.exception() is None and done.result():
                self._finished(job, failure.code, 0, None)

        answering.add_done_callback(count)
        await _to_its_end(answering)

    async def _fail_or_log(self, job: Job, failure: Failure) -> bool:
        """``fail``, whose answer can fail too (Redis refusing writes at its ``maxmemory``,
        or away past the retries): said in the log with the request, not raised out of
        ``handle`` (asyncio reported it only as a task's exception never retrieved). A
        stream entry stays pending, and its redelivery is answered."""
        try:
            return await self.fail(job, failure)
        except Exception as exc:
            log.error(
                "request %s: its answer (%s) could not be sent: %s",
                job.request_id,
                failure.code,
                self.settings.redact(f"{type(exc).__name__}: {exc}"),
            )
            return False

    async def refuse(self, job: Job, failure: Failure) -> None:
        """Answer a job that is not served (overloaded, the worker stopping, cancelled or
        expired before it had a slot, delivered too often), counted as every answer is:
        in the heartbeat's counters and ``/metrics``, where these used to be missing.

        Shielded, as ``_interrupted``'s answer is: the drain's deadline (or a second
        SIGTERM) cancels what is left, and a refusal cut off there answered no one."""
        await asyncio.shield(self._refuse(job, failure))

    async def _refuse(self, job: Job, failure: Failure) -> None:
        if await self._fail_or_log(job, failure):
            self._finished(job, failure.code, 0, None)

    def _finished(self, job: Job, outcome: str, tokens: int, ttft: float | None) -> None:
        self.stats.finished(outcome, tokens)
        for observe in self.observers:
            observe(outcome, ttft, time.monotonic() - job.received)

    # ------------------------------------------------------------------ the happy path

    async def _serve(self, job: Job) -> tuple[int, float | None] | None:
        """Answer ``job``: the tokens generated and the time to the first; None when it was
        answered before (its worker died between the answer and the ack)."""
        envelope, chat, options = self._validate(job)
        # First: answered already, it gets no second word (a cancel or expiry since).
        if job.redelivered and await self.publisher.already_answered(job.delivery_id):
            log.info(
                "stream entry %s was answered before its worker died: ack only",
                job.entry.entry_id if job.entry else "?",
            )
            await self._ack(job)
            return None
        if job.user_cancelled:
            raise cancelled_unstarted()
        check_expiry(envelope)
        await self.not_before.wait(job, envelope)
        owned = asyncio.Event()
        # The request is on its way to llama-server (``start``) before any Redis command:
        # a lane holds the first command of a step back a turn of the loop, and the record
        # below joins the pub/sub claim sent beside this handler (one write, not two).
        generating = self.generator.start(job, envelope, chat, options, owned)
        key = idempotency_key(envelope, chat)
        try:
            stored, twin = await self.records.own(job, key, generating)
            if stored is not None:
                await _cancel(generating)
                self.stats.duplicates += 1
                meta = {**stored.get("meta", {}), "duplicate_of_key": key}
                await self._answer(job, {**stored, "meta": meta})
                return 0, None
            if twin:  # ours was cancelled for a twin that then gave the request up
                await _cancel(generating)
                if await self.publisher.already_answered(job.delivery_id):
                    await self._twin_answered(job, key)  # with a failure: the only answer
                    return None
                job.after_twin = True
                generating = self.generator.start(job, envelope, chat, options, owned)
        except BaseException:
            # A cancel may land after our SET NX ran, or while ours restarts after a twin.
            await _cancel(generating)
            await self.records.release(job, key)
            raise
        owned.set()
        renew = asyncio.create_task(self.records.renew(job, key, generating))
        try:
            generation, attempt = await generating
        except BaseException:
            # Given up once the request is answered (``handle``): a copy of it waiting on
            # it that took it over now would generate again, beside the answer; or handed
            # over to its stream copy (``Records.hand_over``), which a release let in under this
            # one's attempt.
            job.record_key = key
            raise
        finally:
            renew.cancel()
        payload = self._success_payload(generation, attempt, job)
        record = self.claims.finished(key, job.record_owner, payload)
        await self._answer(job, payload, before=generation.tail, record=record)
        ttft = (generation.first_token_at - job.received) if generation.first_token_at else None
        tokens = int(generation.usage.get("completion_tokens", generation.tokens))
        return tokens, ttft

    async def _twin_answered(self, job: Job, key: str) -> None:
        """A copy of the request (its envelope sent twice) ran while this one waited, and
        answered it with a failure: that is its one answer. This one took the record over
        from it; it gives it back (a failure is not stored) and only acks its entry. It
        used to generate the request again (its chunks dropped as those of an answered
        request, its entry left pending for another delivery), or to be dead-lettered
        beside the first."""
        log.info(
            "request %s: answered by its copy (the same envelope sent twice) while this "
            "one waited for it: %s",
            job.request_id,
            "ack only" if job.entry is not None else "nothing to send",
        )
        await self.records.release(job, key)
        if job.entry is not None:
            await self._ack(job)

    async def _ack_answered(self, job: Job) -> None:
        """A stream entry whose request Redis says is answered (a chunk dropped as one of
        an answered request, or the lease renewal found it so): acked if it is (a script),
        as its redelivery would, instead of left pending until then (the claim idle time,
        10 minutes by default): a stream copy added after its pub/sub copy's answer, or
        a worker stalled while another took its entry over and answered it."""
        stage = self._stage_ack(job)
        if stage is None:
            return
        try:
            ack = self.publisher.stage_ack_if_answered(stage, job.delivery_id)
            await self.publisher.commit("ack", [ack])
        except Exception as exc:  # left pending: its redelivery acks it
            log.warning("request %s: its answered entry not acked: %s", job.request_id, exc)

    def _validate(self, job: Job) -> tuple[Envelope, ChatRequestPayload, ChatOptions]:
        if job.decode_error is not None or job.envelope is None:
            error = job.decode_error or DecodeError("message could not be decoded")
            raise Failure("validation_failed", str(error), details={"errors": error.errors})
        envelope = job.envelope
        if envelope.kind != CHAT_REQUEST:
            raise Failure(
                "unsupported_kind",
                f"kind '{envelope.kind}' is not served here; send {CHAT_REQUEST}",
                details={"kind": envelope.kind},
            )
        try:
            chat = decode_chat(envelope)
            options = parse_options(chat)
        except DecodeError as exc:
            raise Failure("validation_failed", str(exc), details={"errors": exc.errors}) from None
        if not envelope.reply_to and not envelope.work.get("reply_optional"):
            raise Failure(
                "validation_failed",
                "request has no reply_to: nowhere to answer",
                details={"errors": [{"loc": "reply_to", "msg": "required"}]},
            )
        return envelope, chat, options

    def _success_payload(self, gen: Generation, attempt: int, job: Job) -> dict[str, Any]:
        reasoning = "".join(gen.reasoning)
        meta: dict[str, Any] = {
            "served_by": self.settings.service_name,
            "profile": self.profile.name,
            "instance": self.settings.instance_id,
            "finish_reason": gen.finish_reason,
            "timings": gen.timings,
            "attempt": attempt,
            "transport": job.transport,
        }
        if not gen.usage:  # the answer was cut after its finish reason (``usage_counts``)
            meta["usage_estimated"] = True
        # Images by sha256 reference: the contract names no store to fetch them from, so
        # the answer is the text's alone, and says so (a vision profile's caller would
        # otherwise take it for an answer about the images).
        if attachments := (job.envelope.payload.get("attachments") if job.envelope else None):
            meta["attachments_ignored"] = len(attachments)
        return {
            "content": "".join(gen.content),
            "reasoning_content": reasoning or None,
            "model_used": self.profile.model_id or self.profile.name,
            "usage": gen.usage_counts(),
            "meta": meta,
            "raw": {"tool_calls": gen.tool_calls} if gen.tool_calls else {},
        }

    # ------------------------------------------------------------------ answering

    async def _answer(
        self,
        job: Job,
        payload: dict[str, Any],
        *,
        before: list[Stage] | None = None,
        record: Stored | None = None,
    ) -> None:
        """Publish the one final result (if there is a reply_to) and ack the entry.

        One round trip, in this order: ``before`` (the last chunks), the result with the
        stored ``record`` for duplicates (both or neither: a result dropped as a repeat
        stores nothing), the ack. A worker that dies before it leaves the entry pending,
        and its redelivery finds the request answered (or not) by the guards.
        """
        job.answering = True
        stages = list(before or ())
        if job.occurrence:  # a pub/sub message without an id: see Claims.stage_answered
            claimant = job.claimant(self.settings.instance_id)
            stages.insert(0, self.claims.stage_answered(job.key, claimant))
        reply_to = job.reply_to
        if reply_to:
            message = result_message(self.outbox, job, payload)
            stages.append(self.publisher.stage_result(reply_to, job.delivery_id, message, record))
        elif record is not None:  # nowhere to answer: stored for duplicates all the same
            stages.append(self.claims.stage(record))
        ack = self._stage_ack(job)
        if ack is not None and reply_to:  # lands only if the result did (Redis out of memory)
            ack = self.publisher.stage_ack_if_answered(ack, job.delivery_id)
        if ack is not None:
            stages.append(ack)
        if stages:
            await self.publisher.commit("result", stages)

    async def fail(self, job: Job, failure: Failure) -> bool:
        """Answer ``failure``; False if the message is another replica's (nothing sent)."""
        job.answering = True  # from here a cancel could only take the answer away
        if job.ahead is not None:  # written before it was refused: llama-server stops on it
            job.ahead.drop()
        if not await job.ours():
            return False
        if (
            failure.retryable
            and not failure.timed_out
            and await self.records.answered_by_its_stream_copy(job)
        ):
            log.info(
                "request %s: its copy in the stream answers it%s; this pub/sub copy's "
                "retryable %s is not its answer",
                job.request_id,
                " under the next attempt (chunks of this one went out)" if job.streamed else "",
                failure.code,
            )
            return False
        failure = failure.redacted(self.settings.redact)
        log.info("request %s failed: %s: %s", job.request_id, failure.code, failure.message)
        details = failure.payload_details()
        reply_to = job.reply_to
        await self._system_error(job, failure.code, details)
        optional = job.envelope is not None and job.envelope.work.get("reply_optional")
        unheard = reply_to is None and not optional  # a failure no one would ever learn of
        if job.entry is not None and (unheard or failure.code in _DEAD_LETTER_CODES):
            await self._dead_letter(job, failure.code, failure.message)
        if reply_to:
            payload = failure.payload(
                job,
                served_by=self.settings.service_name,
                profile=self.profile.name,
                instance=self.settings.instance_id,
            )
            await self._answer(job, payload)
        elif job.entry is not None:
            await self._ack(job)
        return True

    async def _system_error(self, job: Job, code: str, details: dict[str, Any]) -> None:
        try:
            message = self.outbox.system_error(
                code,
                {
                    **details,
                    "request_id": job.request_id,
                    "transport": job.transport,
                    "profile": self.profile.name,
                },
                request=job.envelope if job.envelope else None,
                correlation_id=job.correlation_id,
            )
            await self.publisher.event(self.settings.error_channel, message)
        except Exception as exc:  # the error report must not hide the error itself
            log.warning("could not publish system.error: %s", exc)

    async def _interrupted(self, job: Job) -> None:
        """Cancelled: by the caller (answer ``cancelled``) or by shutdown (a pub/sub request
        is answered ``engine_unavailable``; a stream entry stays pending for another
        delivery)."""
        job.answering = True  # a second cancel must not cut this answer off
        if job.user_cancelled:
            failure = Failure("cancelled", "cancelled by an llm.chat.cancel request")
        elif job.transport == "pubsub" and job.envelope and job.envelope.reply_to:
            failure = Failure(
                "engine_unavailable", "worker stopped before finishing the request", retryable=True
            )
        else:
            return
        await self._answer_failure(job, failure)


# Codes after which a stream entry can never succeed: keep a copy in the dead-letter stream.
_DEAD_LETTER_CODES = frozenset(
    {"validation_failed", "unsupported_kind", "upstream_failed", "internal_error"}
)


async def _to_its_end(answer: Awaitable[T]) -> T:
    """Await a failure's answer to its end even when cancelled meanwhile, then let the
    cancellation through. The drain's deadline (or a second SIGTERM) cancels what is
    left and waits a few seconds more for it: an answer on its way is a Redis round trip
    from sent, and cut off there it answered no one (the heartbeat counted it all the
    same). A second cancellation still ends the wait."""
    task = asyncio.ensure_future(answer)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation is what goes on from here
        raise


async def _cancel(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait for it to end; what it raised no longer matters."""
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()
