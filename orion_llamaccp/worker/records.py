"""The idempotency record of a request: owned, renewed while generating, released or
handed over once the request ends.

One record per request (``Claims``, keyed by ``idempotency_key``) answers a duplicate
with the stored result, makes a copy of the request wait while another runs it, and,
handed over, has the next copy generate under the next attempt's number. Apart from
``ChatHandler`` so that taking the record, keeping it and giving it up read in one place;
the handler says when (``own`` while its speculative generation starts, ``renew`` while
it generates, ``release`` once a failure or a cancel ends it) and stores the result in
the record with the answer itself (``ChatHandler._answer``, one round trip).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson

from orion_llamaccp.bus.codec import own_id
from orion_llamaccp.worker.generation import stop_answered_elsewhere
from orion_llamaccp.worker.jobs import (
    ClaimedElsewhere,
    Failure,
    Job,
    check_expiry,
    claim_outcome,
    decode_job,
)

if TYPE_CHECKING:
    from orion_llamaccp.bus.claims import Claims
    from orion_llamaccp.bus.replies import Publisher
    from orion_llamaccp.bus.streams import StreamCopies
    from orion_llamaccp.settings import Settings

log = logging.getLogger(__name__)


class Records:
    """A request's idempotency record for ``ChatHandler``: ``own`` (with the pub/sub
    claim), ``renew``, ``release``, ``hand_over``, and ``answered_by_its_stream_copy``,
    which hands it over to the stream copy of a pub/sub request that answers it."""

    def __init__(
        self,
        *,
        settings: Settings,
        claims: Claims,
        publisher: Publisher,
        copies: StreamCopies | None = None,
    ) -> None:
        self.settings = settings
        self.claims = claims
        self.publisher = publisher
        # The intake stream's entries, for a pub/sub copy's (``ChatHandler.fail``).
        self.copies = copies

    async def own(
        self, job: Job, key: str, speculation: asyncio.Task[Any]
    ) -> tuple[dict[str, Any] | None, bool]:
        """The pub/sub claim and the idempotency record: both ours, or ``ClaimedElsewhere``.

        A claim still in flight (a worker alone on its channel) and the record go to Redis
        side by side, not one after the other. A replica that loses the claim may have
        written the record too, harmlessly: the record's owner is the message's request id,
        the same on every replica, so the winner finds it its own.
        """
        if job.claim is None or job.claim.done():
            if not await job.ours():
                raise ClaimedElsewhere
            return await self._claim_or_wait(job, key, speculation)
        recording = asyncio.create_task(self._claim_or_wait(job, key, speculation))
        try:
            if not await job.ours():
                raise ClaimedElsewhere
            return await recording
        finally:
            recording.cancel()  # a no-op once it is done; awaiting it collects its error
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await recording

    async def _claim_or_wait(
        self, job: Job, key: str, speculation: asyncio.Task[Any]
    ) -> tuple[dict[str, Any] | None, bool]:
        """Own the idempotency record, or get the stored result of a twin.

        Returns (stored result or None when we own the record, whether a twin was seen).
        While a twin runs, ours must not: the speculative generation is cancelled.
        """
        deadline = time.monotonic() + self.settings.request_timeout_sec
        delay, twin = 0.05, False
        while True:
            record = await self.claims.begin(key, job.record_owner)
            if record.state == "new":  # handed over by a copy that streamed: as a twin's,
                # but for a redelivery, which numbers its attempt above those before anyway
                handed = record.handed_by == job.delivery_id and not job.redelivered
                return None, twin or handed
            if not twin:
                twin = True
                speculation.cancel()
            if record.state == "done" and record.payload is not None:
                return record.payload, twin
            if time.monotonic() > deadline:
                raise Failure(
                    "upstream_failed",
                    "a duplicate of this request is still running",
                    retryable=True,
                )
            if job.envelope is not None:  # its caller's patience ends before the twin's run
                check_expiry(job.envelope)
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    async def release(self, job: Job, key: str, *, unanswered: bool = False) -> None:
        """Give up our running record (the request failed, or was cancelled), so that a
        resend runs at once instead of waiting out the lease. Shielded: a second cancel
        must not leave it behind. ``unanswered``: a stream entry left pending."""
        with contextlib.suppress(Exception):
            await asyncio.shield(self._release_if_ours(job, key, unanswered))

    async def _release_if_ours(self, job: Job, key: str, unanswered: bool = False) -> None:
        """Not when a pub/sub claim is lost: the record (its owner is the message's id, the
        same on every replica) is then the winning replica's. One still in flight (a worker
        alone on its channel sends the record beside it) is waited for: kept, the record
        outlived the request by its lease. Nor once superseded: a stream entry's owner is
        the entry, the same for the worker that reclaimed it, whose record it is now."""
        if job.claim is not None and not job.claim.done():
            await asyncio.wait({job.claim}, timeout=_CLAIM_SETTLING_SEC)
        if job.superseded or (job.claim is not None and claim_outcome(job.claim) is not True):
            return
        if unanswered and (job.streamed or job.after_twin or job.redelivered):
            # Left unanswered after an attempt of it streamed (this one's, a copy's that
            # handed it over, or, a redelivery, one on the worker it came from: it cannot
            # tell): handed on, as a pub/sub copy's is (``hand_over``). Released, a copy
            # of the envelope read only now (an XADD retried) began afresh under the
            # first attempt's number: its first chunks dropped as repeats, the rest
            # spliced onto the text that streamed. The entry's own redelivery numbers its
            # attempt above those before anyway.
            await self.hand_over(job)
            return
        await self.claims.release(key, job.record_owner)

    async def renew(self, job: Job, key: str, generating: asyncio.Task[Any]) -> None:
        """Keep the record's lease while generating.

        A stream entry's worker that finds its lease gone may have been stalled (SIGSTOP, a
        paused container) while another worker reclaimed the entry and answered it. Without
        a chunk for Redis to drop (``ChunkStream``'s ``on_answered``), this is where it
        learns so: it stops instead of generating to the end and then overwriting the
        stored result with its own.
        """
        while True:
            await asyncio.sleep(self.claims.lease_sec / 3)
            with contextlib.suppress(Exception):
                if (
                    not await self.claims.renew(key, job.record_owner)
                    and job.entry is not None
                    and await self.publisher.already_answered(job.delivery_id)
                ):
                    stop_answered_elsewhere(job, generating)
                    return

    async def answered_by_its_stream_copy(self, job: Job) -> bool:
        """A pub/sub copy of a request that was added to the stream too (one envelope on
        both intakes: one request, one ``delivery_id``, one answer), whose stream copy
        the group has not acked: unread in the backlog, or pending (served, or waiting
        for another delivery). A retryable failure of this copy ("worker is stopping",
        ``overloaded``, llama-server gone) was the durable request's one answer, and its
        entry was generated for nothing later (or cut off, when the stream copy held the
        record). The stream copy answers it, from the start; where chunks of this copy
        went out (llama-server died mid-way, the worker stopped), under the next attempt
        (``hand_over``). Not a generation past its time limit (``Failure.timed_out``):
        the stream copy's would run as long, and a stream entry's is not tried again.

        One round trip (``StreamCopies``), two where chunks went out, on the way to a
        retryable error only. A copy added to the stream after this one's answer gets
        that answer (its own generation is dropped, and the entry acked)."""
        envelope = job.envelope
        if self.copies is None or job.entry is not None or envelope is None:
            return False
        if own_id(envelope) is None:  # without an id, each send is a request of its own
            return False
        texts = {job.request_id}  # the id as it is spelled in the message, too
        with contextlib.suppress(Exception):
            if isinstance(said := orjson.loads(job.raw).get("id"), str):
                texts.add(said)
        try:
            since = int(envelope.created_at.timestamp() * 1000)
            found = await self.copies.unacked(sorted(texts), since)
        except Exception as exc:  # Redis away: answered as before
            log.debug("request %s: its stream copies not looked for: %s", job.request_id, exc)
            return False
        limit, delivery = self.settings.max_message_bytes, job.delivery_id
        if not any(decode_job(raw, "stream", limit).delivery_id == delivery for raw in found):
            return False
        return not job.streamed or await self.hand_over(job)

    async def hand_over(self, job: Job) -> bool:
        """This copy streamed under its attempt's number: its record is handed over, not
        released, and the stream copy that takes it generates under the next attempt
        (``Record.handed_by``), whose chunks tell the caller to drop this one's. Released,
        a stream copy that came to it afterwards (unread until then, or waiting for a
        slot) generated under this one's number: its first chunks dropped as repeats, the
        rest continuing this one's text. False where the record is not this copy's (it
        never held it, or its lease ran out): it answers then."""
        if job.record_key is None:
            return False
        try:
            return await self.claims.hand_over(
                job.record_key, job.record_owner, job.delivery_id, self.publisher.seq_ttl
            )
        except Exception as exc:  # Redis away: answered as before
            log.debug("request %s: not handed over to its stream copy: %s", job.request_id, exc)
            return False


# Seconds a release waits for a claim still in flight: a claim is retried for 5 s through a
# Redis blip, and its outcome decides whose the record is.
_CLAIM_SETTLING_SEC = 10.0
