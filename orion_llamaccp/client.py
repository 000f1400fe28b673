"""A reference client for Orion callers: ask a chat question over the bus.

It does what Orion's ``rpc_request`` does (subscribe to ``reply_to``, publish, take the
first message there as the answer) and adds what streaming needs: chunks are read where
the worker sends them (``options.stream_channel``, else ``{reply_to}:chunks``: both ask
``outbox.chunk_channel``) and applied in ``seq`` order per attempt, so a duplicate or a
chunk of an abandoned attempt is never shown twice.

    async with BusClient("redis://127.0.0.1:6379/0") as bus:
        result = await bus.chat([{"role": "user", "content": "hi"}], profile="gemma3-270m-cpu",
                                stream=True, on_delta=print)
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import orjson
import redis.asyncio as aioredis

from orion_llamaccp.bus import keys
from orion_llamaccp.bus.codec import decode_envelope
from orion_llamaccp.bus.envelope import CHAT_CANCEL, CHAT_REQUEST, Envelope, ServiceRef, as_utc
from orion_llamaccp.bus.failover import NotAPrimary, follow_failovers, says_replica
from orion_llamaccp.bus.outbox import Outbox, chunk_channel
from orion_llamaccp.errors import DecodeError, NoWorker

if TYPE_CHECKING:
    from redis.asyncio.client import PubSub

Via = Literal["pubsub", "stream"]
# What a request ``chat`` makes lives beyond the caller's timeout: the worker judges its
# expiry by its own clock, which may be ahead of ours.
TTL_MARGIN_SEC = 10.0


@dataclass
class ChatResult:
    envelope: Envelope
    chunks: list[dict[str, Any]] = field(default_factory=list)
    streamed_text: str = ""
    first_chunk_at: float | None = None
    sent_at: float = 0.0
    done_at: float = 0.0

    @property
    def payload(self) -> dict[str, Any]:
        return self.envelope.payload

    @property
    def ok(self) -> bool:
        return "error" not in self.payload

    @property
    def content(self) -> str | None:
        return self.payload.get("content")


class ChunkAssembler:
    """Applies chunks in order: the next ``seq`` of the newest attempt, nothing else."""

    def __init__(self) -> None:
        self.attempt = 0
        self.next_seq = 0
        self.parts: list[str] = []
        self.accepted: list[dict[str, Any]] = []

    def add(self, payload: dict[str, Any]) -> str | None:
        attempt, seq = int(payload.get("attempt", 1)), int(payload.get("seq", -1))
        if attempt > self.attempt:  # a retry started over: drop the old attempt's text
            self.attempt, self.next_seq, self.parts, self.accepted = attempt, 0, [], []
        if attempt < self.attempt or seq != self.next_seq:
            return None
        self.next_seq += 1
        delta = str(payload.get("delta", ""))
        self.parts.append(delta)
        self.accepted.append(payload)
        return delta

    @property
    def text(self) -> str:
        return "".join(self.parts)


class BusClient:
    def __init__(
        self,
        url: str | None = None,
        *,
        redis: aioredis.Redis | None = None,
        name: str = "orion-llamaccp-client",
    ) -> None:
        # Ours follows a failover behind the address (``bus.failover``); a caller's own
        # client is left as it was made.
        self.redis = redis or follow_failovers(
            aioredis.Redis.from_url(url or "redis://127.0.0.1:6379/0")
        )
        self._owns = redis is None
        self.outbox = Outbox(ServiceRef(name=name, instance=uuid.uuid4().hex[:8]))

    async def __aenter__(self) -> BusClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._owns:
            await self.redis.aclose()

    def request(
        self,
        messages: list[dict[str, str]],
        *,
        profile: str | None = None,
        options: dict[str, Any] | None = None,
        reply_to: str | None = None,
        correlation_id: str | None = None,
        trace: dict[str, Any] | None = None,
        ttl_ms: int | None = None,
    ) -> dict[str, Any]:
        """A ``llm.chat.request`` envelope, as a dict. A ``correlation_id`` that is not a
        UUID, or a ``ttl_ms`` that is not a whole number, is refused here: Orion's decoder
        (and the worker's) would reject the message, and the caller wait for nothing."""
        if ttl_ms is not None and (isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int)):
            raise ValueError(f"ttl_ms must be a whole number of milliseconds, not {ttl_ms!r}")
        envelope = self.outbox.envelope(
            CHAT_REQUEST,
            {"messages": messages, "profile": profile, "options": options or {}},
            correlation_id=_a_uuid(correlation_id),
            reply_to=reply_to or f"orion:llamacpp:reply:{uuid.uuid4()}",
        )
        envelope["trace"] = trace or {}
        envelope["ttl_ms"] = ttl_ms
        return envelope

    async def send(
        self,
        envelope: dict[str, Any],
        *,
        profile: str,
        via: Via = "pubsub",
        channel: str | None = None,
        stream: str | None = None,
    ) -> int | None:
        """Publish or ``XADD`` the request; for pub/sub, how many subscribers of the
        channel heard it. Pattern subscribers (a bus monitor on ``orion:*``) are not
        counted: one of them hearing a request no worker serves made ``NoWorker`` never
        fire, and the caller waited out its timeout.

        Heard by none on a replica, it is published once more on new connections: it went
        out on an idle connection to a Redis that a failover behind the address demoted (a
        replica takes a PUBLISH, for its own subscribers). An XADD there is refused
        (``NotAPrimary``, a ``ConnectionError``: every connection of ours is closed, and
        the next call reaches the new primary)."""
        data = orjson.dumps(envelope)
        if via == "stream":
            await self.redis.xadd(stream or keys.intake_stream(profile), work_queue_entry(envelope))
            return None
        channel = channel or keys.intake_channel(profile)
        heard, on_a_replica = await self._publish(channel, data)
        if heard == 0 and on_a_replica:
            await self.redis.connection_pool.disconnect(inuse_connections=False)
            heard, _ = await self._publish(channel, data)
        return heard

    async def _publish(self, channel: str, data: bytes) -> tuple[int, bool]:
        """How many subscribers heard it, and whether the Redis it reached is a replica
        (asked on the same connection; a Redis whose ACL denies ROLE counts as none)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.publish(channel, data).pubsub_numsub(channel).execute_command("ROLE")
            heard, numsub, role = await pipe.execute(raise_on_error=False)
        for reply in (heard, numsub):
            if isinstance(reply, Exception):
                raise reply
        [(_, subscribers)] = numsub
        return min(int(heard), int(subscribers)), says_replica(role)

    async def chat(
        self,
        messages: list[dict[str, str]],
        *,
        profile: str,
        via: Via = "pubsub",
        stream: bool = False,
        options: dict[str, Any] | None = None,
        timeout: float = 300.0,
        on_delta: Callable[[str], None] | None = None,
        on_restart: Callable[[int], None] | None = None,
        channel: str | None = None,
        stream_name: str | None = None,
        envelope: dict[str, Any] | None = None,
        cancel_channel: str = "orion:llamacpp:cancel",
        cancel_on_give_up: bool | None = None,
    ) -> ChatResult:
        """Send one request and wait for its result (and its chunks, when streaming).

        ``timeout`` bounds the whole call, Redis included (a frozen Redis answers nothing).
        A call that ends without its answer once sending began (a timeout, Ctrl-C, a lost
        connection, ``on_delta`` raising: a closed pipe) cancels the request by its
        correlation id, so that the worker does not generate on for no one; by
        default only when this call made the envelope (its correlation id is then the
        request's own: a caller's may be shared by a whole flow, and a cancel reaches
        every request under it).
        A request made here carries ``ttl_ms``: the timeout and ``TTL_MARGIN_SEC``.
        A pub/sub request that no subscriber heard raises ``NoWorker`` at once.
        ``on_restart`` is told of a retry that started the answer over (the worker
        retried after llama-server died): the deltas before it are void.
        """
        opts = {**(options or {}), "stream": stream} if stream else dict(options or {})
        if cancel_on_give_up is None:
            cancel_on_give_up = envelope is None
        # One we make lives as long as we wait for it (``ttl_ms``), and a margin for a
        # worker's clock ahead of ours: a stream entry read after we gave up (no worker
        # then, or a backlog) is answered ``expired``, not generated for no one; the
        # cancel we send on giving up reaches only the workers running then, and they
        # remember it ten minutes.
        ttl_ms = int((timeout + TTL_MARGIN_SEC) * 1000) if math.isfinite(timeout) else None
        envelope = envelope or self.request(messages, profile=profile, options=opts, ttl_ms=ttl_ms)
        channels = [name for name in (envelope["reply_to"], _chunks_of(envelope)) if name]
        pubsub: PubSub | None = None
        sent = False
        try:
            async with asyncio.timeout(timeout):
                for tries_left in (1, 0):
                    pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                    await pubsub.subscribe(*channels)
                    started = time.monotonic()
                    # Sent, as far as a cancel goes, from here: a PUBLISH or XADD whose
                    # reply is late may have reached Redis, and a worker.
                    sent = True
                    try:
                        heard = await self.send(
                            envelope, profile=profile, via=via, channel=channel, stream=stream_name
                        )
                        break
                    except NotAPrimary:  # the XADD was refused, and our pub/sub closed
                        await pubsub.aclose()
                        if not tries_left:
                            raise
                if heard == 0:
                    raise NoWorker(
                        f"no worker heard the request on "
                        f"{channel or keys.intake_channel(profile)}: is profile '{profile}' "
                        "served (ps), on that channel?"
                    )
                return await self._collect(
                    pubsub, envelope, started, _Listeners(on_delta, on_restart)
                )
        except NoWorker:  # heard by no one: nothing to cancel
            raise
        except BaseException:  # given up: a timeout, Ctrl-C, a callback of ours that raised
            if sent and cancel_on_give_up:
                await self._cancel_quietly(envelope, cancel_channel)
            raise
        finally:
            if pubsub is not None:
                await pubsub.aclose()

    async def _cancel_quietly(self, envelope: dict[str, Any], channel: str) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await self.cancel(str(envelope["correlation_id"]), channel=channel)

    async def _collect(
        self, pubsub: Any, request: dict[str, Any], sent: float, listeners: _Listeners
    ) -> ChatResult:
        reply_to, correlation_id = request["reply_to"], _canonical(request["correlation_id"])
        sent_at = _created_at(request)
        assembler = ChunkAssembler()
        first_chunk = None
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if message is None or message["type"] != "message":
                continue
            channel = message["channel"]
            if isinstance(channel, bytes):  # a client of ours; the caller's may decode
                channel = channel.decode()
            if channel != reply_to:
                try:
                    envelope = decode_envelope(message["data"])
                except DecodeError:  # anyone's, on a stream_channel shared with others
                    continue
            else:  # the answer: the first message on reply_to of this request's flow
                envelope = decode_envelope(message["data"])
                # By its correlation id alone: the answer to a request too broken to decode
                # links a request of its own making (``Outbox.result_for_undecodable``).
                if str(envelope.correlation_id) == correlation_id:
                    return _result(envelope, assembler, first_chunk, sent)
                continue  # a late answer to an earlier request of a reused reply_to
            if not _answers(envelope, correlation_id, sent_at):
                continue  # another request's, on a stream_channel they share
            attempt = assembler.attempt
            delta = assembler.add(envelope.payload)
            if attempt and assembler.attempt > attempt:
                first_chunk = None  # the answer's first token is the new attempt's
                if listeners.on_restart is not None:
                    listeners.on_restart(assembler.attempt)
            if delta is not None:
                first_chunk = first_chunk or time.monotonic()
                if listeners.on_delta is not None:
                    listeners.on_delta(delta)

    async def cancel(self, correlation_id: str, *, channel: str = "orion:llamacpp:cancel") -> None:
        correlation_id = _a_uuid(correlation_id)
        message = self.outbox.encode(
            CHAT_CANCEL, {"correlation_id": correlation_id}, correlation_id=correlation_id
        )
        await self.redis.publish(channel, message)


def _created_at(request: dict[str, Any]) -> datetime | None:
    try:
        return as_utc(datetime.fromisoformat(str(request.get("created_at"))))
    except ValueError:
        return None


def _answers(reply: Envelope, correlation_id: str, sent_at: datetime | None) -> bool:
    """Whether the chunk ``reply`` answers the request of ``correlation_id`` created at
    ``sent_at``: the last link of its causality chain is the request. A flow's requests
    may share a correlation id, and on one ``stream_channel`` their chunks were taken for
    each other's. A chunk without a chain (another implementation's), or a request whose
    time cannot be read, is judged by the correlation id alone."""
    if str(reply.correlation_id) != correlation_id:
        return False
    if not reply.causality_chain or sent_at is None:
        return True
    return reply.causality_chain[-1].created_at == sent_at


def _result(
    envelope: Envelope, assembler: ChunkAssembler, first_chunk: float | None, sent: float
) -> ChatResult:
    """The answer, with what was streamed of it: nothing, where the chunks were another
    attempt's than the answer's (``meta.attempt``): attempt 1 streamed part of an answer,
    the worker retried, and attempt 2 answered without a chunk (or a stalled worker's
    attempt 1 answered while attempt 2 streamed). Its text was shown as the answer's."""
    done = time.monotonic()
    meta = envelope.payload.get("meta")
    said = meta.get("attempt") if isinstance(meta, dict) else None
    if isinstance(said, int) and assembler.accepted and said != assembler.attempt:
        return ChatResult(envelope, [], "", None, sent, done)
    return ChatResult(envelope, assembler.accepted, assembler.text, first_chunk, sent, done)


def _a_uuid(correlation_id: str | None) -> str | None:
    """The caller's correlation id, checked: the contract rejects any but a UUID."""
    if correlation_id is None:
        return None
    try:
        return str(uuid.UUID(str(correlation_id)))
    except ValueError:
        raise ValueError(
            f"correlation_id must be a UUID (Orion rejects any other), not {correlation_id!r}"
        ) from None


def _canonical(correlation_id: Any) -> str:
    """As the worker echoes it: a UUID's canonical spelling."""
    try:
        return str(uuid.UUID(str(correlation_id)))
    except ValueError:
        return str(correlation_id)


@dataclass(frozen=True)
class _Listeners:
    on_delta: Callable[[str], None] | None
    on_restart: Callable[[int], None] | None


def _chunks_of(envelope: dict[str, Any]) -> str | None:
    """The channel the worker streams this request's chunks to."""
    payload = envelope.get("payload")
    options = payload.get("options") if isinstance(payload, dict) else None
    requested = options.get("stream_channel") if isinstance(options, dict) else None
    return chunk_channel(
        envelope.get("reply_to"), requested if isinstance(requested, str) else None
    )


def work_queue_entry(envelope: dict[str, Any]) -> dict[str, Any]:
    """An Orion work-queue stream entry (``work_queue.entry.v1``) carrying ``envelope``."""
    return {
        "schema_version": "work_queue.entry.v1",
        "envelope": orjson.dumps(envelope),
        "enqueued_at_ms": str(int(time.time() * 1000)),
        "kind": str(envelope.get("kind") or ""),  # every stream field is a string
        "correlation_id": str(envelope.get("correlation_id", "")),
        "reply_to": str(envelope.get("reply_to") or ""),
        "source": orjson.dumps(envelope.get("source", {})),
    }
