"""A unit of work as the worker sees it, whichever transport it came from."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import orjson

from orion_llamaccp.bus.codec import (
    CONTENT_KEY,
    as_uuid,
    attempt_suffix,
    decode_envelope,
    message_key,
    own_id,
    salvage,
)
from orion_llamaccp.bus.envelope import Envelope
from orion_llamaccp.bus.outbox import Outbox
from orion_llamaccp.bus.slots import SlotLease
from orion_llamaccp.bus.streams import StreamEntry
from orion_llamaccp.engine.client import Sent
from orion_llamaccp.errors import DecodeError

Transport = Literal["pubsub", "stream"]


@dataclass
class Ahead:
    """A request written before its message was validated (``Generator.ahead``)."""

    body: dict[str, Any]
    sent: Sent

    def take(self, body: dict[str, Any]) -> Sent | None:
        """The request on the wire if it is ``body``'s; else it is dropped."""
        if body == self.body:
            return self.sent
        self.sent.drop()
        return None

    def drop(self) -> None:
        self.sent.drop()


@dataclass(eq=False)  # identity: jobs live in sets
class Job:
    raw: bytes
    transport: Transport
    key: str
    envelope: Envelope | None = None
    decode_error: DecodeError | None = None
    entry: StreamEntry | None = None
    received: float = field(default_factory=time.monotonic)
    user_cancelled: bool = False
    task: asyncio.Task[None] | None = None
    salvaged: dict[str, Any] = field(default_factory=dict)
    # Pub/sub, started before the claim came back (a worker alone on its channel): the
    # claim in flight. Nothing may be published for the job unless it resolves to True.
    claim: asyncio.Task[bool] | None = None
    # The slot this job runs in, once it has one: a pub/sub job's is given back when its
    # generation ends, a stream entry's when it is acked.
    lease: SlotLease | None = None
    # Its request, written before the message was validated (Generator.ahead), if it was.
    ahead: Ahead | None = None
    # Redis dropped a chunk of it: another worker answered it (replies.ChunkStream).
    answered_elsewhere: bool = False
    # Its one final answer (a result or an error) is being sent: a cancel now would stop
    # that answer, not the request, and leave the caller none (InFlight.cancel).
    answering: bool = False
    # Pub/sub, a message without an id (a legacy dict, or one that did not decode): its
    # key is its content's hash, which two sends of the same bytes share. This tells the
    # sends apart where each must get its own answer (``delivery_id``).
    occurrence: str = ""
    # This job, apart from another copy of its message (the same envelope published or
    # added to the stream twice): see ``claimant`` and ``record_owner``.
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    # Generated after a twin (another copy of its envelope) gave the request up: the
    # twin's chunks went out under the first attempt's number, so this one takes the next.
    after_twin: bool = False
    # A chunk of it may have gone out (a stage was made for one): its attempt's ``seq``
    # is taken, and a copy that answers it instead must take the next (``ChatHandler.fail``).
    streamed: bool = False
    # The idempotency record it holds while its failure is answered: given up after the
    # answer, so that a copy waiting on it (``Records.own``) finds the request answered.
    record_key: str | None = None

    @property
    def superseded(self) -> bool:
        """Another worker has it now (reclaimed while this one was stalled), or answered
        it: this one stops without a word."""
        return self.answered_elsewhere or (self.entry is not None and self.entry.taken_over)

    async def ours(self) -> bool:
        """False when another replica claimed this message: stay silent about it."""
        return self.claim is None or await asyncio.shield(self.claim)

    @property
    def reply_to(self) -> str | None:
        """Where to answer: the envelope's, or what could be read of a broken message."""
        if self.envelope is not None:
            return self.envelope.reply_to
        return self.salvaged.get("reply_to")

    @property
    def request_id(self) -> str:
        """The message's own id, else its key (its stream entry's id, or its bytes' hash):
        the same for every replica and every redelivery."""
        return own_id(self.envelope) or self.key

    def claimant(self, instance: str) -> str:
        """What this job's pub/sub claim holds: the worker, and for a message with an id
        the job too. A claim retried after its reply was lost finds itself; another copy
        of the same message on this worker (published twice) found this worker's name,
        took the claim for its own, and generated beside the first, their chunks mixed
        under one ``seq``. A message without an id keeps the worker alone: each of its
        sends is a request of its own (``occurrence``)."""
        return instance if self.occurrence else f"{instance}/{self.token}"

    @property
    def record_owner(self) -> str:
        """Who holds the request's idempotency record: the message's id, the same on every
        replica (a replica that lost the claim may write it first, harmlessly), and for a
        stream entry the entry too. Another entry of the same envelope (added twice) took
        the first's running record over as its own and generated beside it; it waits for
        the first's result now. A redelivery of the same entry still takes it over."""
        return f"{self.request_id}@{self.entry.entry_id}" if self.entry else self.request_id

    @property
    def delivery_id(self) -> str:
        """What the exactly-once guards key on: the request and where it is answered.

        Ids are unique per message, but a stream entry that reuses one with another
        reply_to still gets its own answer instead of being taken for a duplicate
        delivery (on pub/sub, the claim is the id's: the second such message is taken for
        a copy of the first, and left to it); and a
        producer's retry, the same envelope with ``trace.work.attempt`` raised, is a
        delivery of its own (a stream's redeliveries keep the entry's attempt: theirs
        are one). The first attempt's keys are those of a message without a hint.
        """
        reply = hashlib.sha1((self.reply_to or "").encode()).hexdigest()[:12]
        return f"{self.request_id}{self.occurrence}:{reply}{attempt_suffix(self.hinted_attempt)}"

    @property
    def hinted_attempt(self) -> int:
        """The producer's ``trace.work.attempt`` (a retry raises it); 1 without one."""
        return self.envelope.hinted_attempt if self.envelope else 1

    @property
    def first_attempt(self) -> int:
        """The attempt number this delivery starts at (producer's hint or redeliveries)."""
        deliveries = self.entry.deliveries if self.entry else 1
        return self.hinted_attempt + deliveries - 1

    @property
    def redelivered(self) -> bool:
        return self.entry is not None and (self.entry.reclaimed or self.entry.deliveries > 1)

    @cached_property  # read on every cancel-registry update; a UUID's str() is not free
    def correlation_id(self) -> str | None:
        if self.envelope is not None:
            return str(self.envelope.correlation_id)
        return self.salvaged.get("correlation_id")


def decode_job(
    data: bytes, transport: Transport, max_bytes: int, entry: StreamEntry | None = None
) -> Job:
    """A job from a message's bytes; one that cannot be decoded still becomes a job, which
    answers with a precise error (``decode_error``) wherever it can be told apart."""
    envelope, error = None, None
    if len(data) > max_bytes:
        error = DecodeError(
            f"message of {len(data)} bytes exceeds the limit of {max_bytes} "
            f"(ORION_LLAMACPP_MAX_MESSAGE_BYTES)"
        )
    else:
        try:
            envelope = decode_envelope(data)
        except DecodeError as exc:
            error = exc
    # A stream entry's id names it for good (redeliveries included); a pub/sub message's
    # key is what every replica computes alike, for the claim.
    key = entry.entry_id if entry is not None else message_key(data, envelope)
    return Job(
        raw=data,
        transport=transport,
        key=key,
        envelope=envelope,
        decode_error=error,
        entry=entry,
        salvaged=_salvaged(data, entry) if envelope is None else {},
        occurrence=f":{uuid.uuid4().hex[:12]}" if key.startswith(CONTENT_KEY) else "",
    )


def _salvaged(data: bytes, entry: StreamEntry | None) -> dict[str, Any]:
    """What a message that failed to decode says of itself; where it cannot say where to
    answer, what its stream entry's own fields say (``entry_said``)."""
    said = salvage(data)
    if entry is not None:
        for key, value in entry_said(entry).items():
            if said.get(key) is None:
                said[key] = value
    return _with_a_correlation_id(said)


def _with_a_correlation_id(said: dict[str, Any]) -> dict[str, Any]:
    """``said``, its correlation id made up where none could be read: once, for the
    answer and the error report alike (each made up its own, and the two could not be
    matched)."""
    if said.get("correlation_id") is None:
        said["correlation_id"] = str(uuid.uuid4())
    return said


def entry_said(entry: StreamEntry) -> dict[str, str]:
    """The ``reply_to`` and ``correlation_id`` Orion's work queue writes in each entry
    beside the envelope (the contract's section 4): where to answer an entry whose
    envelope cannot be read, or is missing, rather than leave its caller waiting."""
    fields = {_name(k): v for k, v in entry.fields.items()}
    reply_to, correlation_id = (fields.get(name) for name in ("reply_to", "correlation_id"))
    said: dict[str, str] = {}
    if reply_to:
        said["reply_to"] = _name(reply_to)
    if correlation_id and (canonical := as_uuid(_name(correlation_id))):
        said["correlation_id"] = canonical
    return said


def entry_bytes(entry: StreamEntry) -> bytes | None:
    """The message a stream entry carries: its envelope field (Orion's), else a plain one."""
    fields = {_name(k): v for k, v in entry.fields.items()}
    for name in ("envelope", "data", "message", "payload"):
        if name in fields:
            value = fields[name]
            return value if isinstance(value, bytes) else str(value).encode()
    return None


def _name(field: bytes | str) -> str:
    """A field's name as text; bytes that are not UTF-8 (anyone may XADD anything) must
    not stop the entry from being answered and acked."""
    return field.decode(errors="replace") if isinstance(field, bytes) else field


def entry_job(entry: StreamEntry, raw: bytes | None, max_bytes: int) -> Job:
    """A job from a stream entry and the message it carries (``entry_bytes``, which the
    worker reads first to write the request ahead), or an error naming the fields seen."""
    if raw is not None:
        return decode_job(raw, "stream", max_bytes, entry)
    names = sorted(_name(k) for k in entry.fields)
    return Job(
        raw=orjson.dumps({"fields": names}),
        transport="stream",
        key=entry.entry_id,
        entry=entry,
        decode_error=DecodeError(f"stream entry has no 'envelope' field (fields: {names})"),
        salvaged=_with_a_correlation_id(dict(entry_said(entry))),
    )


def claim_outcome(claim: asyncio.Task[bool]) -> bool | None:
    """A pub/sub claim's outcome once it has one: won (True) or lost (False); None while it
    is in flight, or if it was cancelled or failed."""
    if not claim.done() or claim.cancelled() or claim.exception() is not None:
        return None
    return claim.result()


class ClaimedElsewhere(Exception):
    """Another replica won the message this worker had started on: drop it silently."""


class LeavePending(Exception):
    """Stop working on a stream entry without answering: another attempt will."""


class Failure(Exception):
    """A request that ends with an error result; ``code`` is the contract's error code."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retryable: bool = False,
        details: dict[str, Any] | None = None,
        timed_out: bool = False,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.details = details or {}
        # A generation past its time limit: another copy of the request, given the same
        # limit, would run as long (``ChatHandler.fail`` does not leave it to one).
        self.timed_out = timed_out

    def redacted(self, redact: Callable[[str], str]) -> Failure:
        """This failure with ``redact`` applied to every text in it: each copy of it
        (the answer, ``system.error``, the dead letter) goes out as this one."""
        details = _redacted(self.details, redact)
        return Failure(
            self.code,
            redact(self.message),
            retryable=self.retryable,
            details=details,
            timed_out=self.timed_out,
        )

    def payload_details(self) -> dict[str, Any]:
        return {"message": self.message, "retryable": self.retryable, **self.details}

    def payload(self, job: Job, *, served_by: str, profile: str, instance: str) -> dict[str, Any]:
        """The result payload that answers ``job`` with this failure, and who answered."""
        meta = {
            "served_by": served_by,
            "profile": profile,
            "instance": instance,
            "transport": job.transport,
        }
        return {"error": self.code, "details": self.payload_details(), "meta": meta}


def cancelled_unstarted() -> Failure:
    """The answer to a request its caller cancelled (``llm.chat.cancel``) before it began."""
    return Failure("cancelled", "cancelled by an llm.chat.cancel request before it started")


def stopping_failure() -> Failure:
    """The answer to a request the worker accepted and will not start: it is stopping.
    Retryable: another replica, or this one's replacement, serves it."""
    return Failure("engine_unavailable", "worker is stopping", retryable=True)


def _redacted(value: Any, redact: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: _redacted(item, redact) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(item, redact) for item in value]
    return value


def result_message(outbox: Outbox, job: Job, payload: dict[str, Any]) -> bytes:
    """``job``'s ``llm.chat.result``: a reply to its envelope, or, for a message too broken
    to decode, linked to what could be read of it."""
    if job.envelope is not None:
        return outbox.result(job.envelope, payload)
    return outbox.result_for_undecodable(job.salvaged, payload)


def expiry(envelope: Envelope) -> tuple[float, str] | None:
    """When a request stops being worth an answer (seconds since the epoch), and what
    said so: the earlier of ``created_at`` + ``ttl_ms`` and ``trace.work.expires_at_ms``.
    None when neither is set."""
    ends: list[tuple[float, str]] = []
    if envelope.ttl_ms is not None:
        ttl = f"ttl_ms={envelope.ttl_ms}"
        ends.append((envelope.created_at.timestamp() + envelope.ttl_ms / 1000, ttl))
    expires = envelope.work.get("expires_at_ms")
    if isinstance(expires, int | float):
        ends.append((expires / 1000, "trace.work.expires_at_ms"))
    return min(ends) if ends else None


def expired(at: float, why: str, *, tried: bool = False) -> Failure:
    """The answer to a request whose expiry (``at``, seconds since the epoch) has come;
    ``tried``: after a try that failed (its chunks may have gone out)."""
    late_ms = max(0.0, (time.time() - at) * 1000)
    then = "not tried again" if tried else "not generated"
    return Failure("expired", f"request expired {late_ms:.0f} ms ago ({why}); {then}")


@contextlib.asynccontextmanager
async def by_expiry(ends: tuple[float, str] | None, *, tried: bool = False) -> AsyncIterator[None]:
    """A wait (for llama-server to come back, for a turn after it died) that ends at the
    request's expiry (``ends``, from ``expiry``), answered ``expired`` then: not once the
    wait is over (minutes, a large model's restart), nor ``engine_unavailable`` with
    ``retryable`` for a request that no retry can serve any more."""
    if ends is None:
        yield
        return
    try:
        async with asyncio.timeout(max(0.0, ends[0] - time.time())) as scope:
            yield
    except TimeoutError:
        if scope.expired():
            raise expired(*ends, tried=tried) from None
        raise


def check_expiry(envelope: Envelope, *, tried: bool = False) -> None:
    """Raise ``expired`` for a request past its expiry: it is not generated (again)."""
    ends = expiry(envelope)
    if ends is not None and time.time() > ends[0]:
        raise expired(*ends, tried=tried)
