"""Running one request on llama-server: wait for the engine, stream, relay, retry.

The relay loop (``_relay``) lives here, kept free of awaits other than the next batch;
chunks leave through a ``ChunkStream`` that publishes nothing until the request is known
to be ours (``owned``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson

from orion_llamaccp.bus.envelope import ChatRequestPayload, Envelope, seconds_until_due
from orion_llamaccp.bus.outbox import Outbox, chunk_channel
from orion_llamaccp.bus.replies import ChunkStream, Publisher, Stage
from orion_llamaccp.bus.slots import SlotLease
from orion_llamaccp.engine.client import Sent
from orion_llamaccp.engine.events import ChatStream
from orion_llamaccp.engine.sse import ChunkEvents, merge_tool_calls
from orion_llamaccp.engine.supervisor import OUT_OF_SERVICE, EngineState, Supervisor
from orion_llamaccp.errors import ContextExceeded, EngineUnavailable, UpstreamError
from orion_llamaccp.profiles.models import Profile
from orion_llamaccp.settings import Settings
from orion_llamaccp.worker.jobs import (
    Ahead,
    Failure,
    Job,
    LeavePending,
    by_expiry,
    check_expiry,
    expiry,
)
from orion_llamaccp.worker.llama_request import ChatOptions, body_of, build_body

log = logging.getLogger(__name__)


@dataclass
class Generation:
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # whole, in order
    tokens: int = 0
    first_token_at: float | None = None
    tail: list[Stage] = field(default_factory=list)  # unsent chunks, to go with the result

    def usage_counts(self) -> dict[str, int]:
        """The result's ``usage``: llama-server's, or where an answer cut after its finish
        reason lost it, the tokens relayed (the prompt's count unknown: 0)."""
        usage = self.usage
        prompt = int(usage.get("prompt_tokens", 0))
        completion = int(usage.get("completion_tokens", self.tokens))
        total = int(usage.get("total_tokens", prompt + completion))
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}


class Generator:
    """Generates one request's answer and streams it as chunks."""

    def __init__(
        self,
        *,
        settings: Settings,
        profile: Profile,
        supervisor: Supervisor,
        outbox: Outbox,
        publisher: Publisher,
    ) -> None:
        self.settings = settings
        self.profile = profile
        self.supervisor = supervisor
        self.outbox = outbox
        self.publisher = publisher
        # Requests that were in a llama-server when it died are tried one at a time, so
        # that a death during one's try is its own (``_Deaths``).
        self.suspects = asyncio.Lock()

    async def engine_ready(self, job: Job, *, since: float | None = None) -> None:
        """Return once llama-server is ready; raise what the job must do if it will not be
        (``LeavePending`` for a stream entry, else ``Failure``). A pub/sub request waits
        up to the engine wait from ``since`` (monotonic; now when None)."""
        supervisor = self.supervisor
        if supervisor.state is EngineState.READY:
            return
        if supervisor.state in OUT_OF_SERVICE:
            if job.transport == "stream":
                raise LeavePending(f"engine is {supervisor.state}")
            failed = supervisor.state is EngineState.FAILED and supervisor.failure is not None
            raise Failure(
                "engine_unavailable",
                f"llama-server is {supervisor.state}"
                + (f": {self.settings.redact(str(supervisor.failure))}" if failed else ""),
                retryable=True,
                details={"engine_state": str(supervisor.state)},
            )
        wait = None
        if job.transport != "stream":
            start = time.monotonic() if since is None else since
            wait = max(0.0, start + self.settings.engine_wait_sec - time.monotonic())
        try:
            state = await supervisor.wait_for(EngineState.READY, *OUT_OF_SERVICE, timeout=wait)
        except TimeoutError:
            raise Failure(
                "engine_unavailable",
                f"llama-server not ready within {self.settings.engine_wait_sec:.0f}s "
                f"({supervisor.state})",
                retryable=True,
                details={"engine_state": str(supervisor.state)},
            ) from None
        if state is not EngineState.READY:
            await self.engine_ready(job, since=since)

    def _waiting_since(self, job: Job, envelope: Envelope) -> float:
        """When a first try's wait for llama-server began (monotonic): its arrival, the
        time it came due (``trace.work.not_before_ms``: it waited for that, not for the
        engine), or llama-server leaving service (a crash while it queued behind long
        generations), whichever came last."""
        since = max(job.received, self.supervisor.unready_since)
        not_before = envelope.work.get("not_before_ms")
        if isinstance(not_before, int | float):
            late = max(0.0, time.time() - not_before / 1000)
            since = max(since, time.monotonic() - late)
        return since

    def ahead(self, data: bytes) -> Ahead | None:
        """Write a chat request to llama-server from the message's raw JSON, before pydantic
        has seen it; None when it cannot be (engine not ready, no connection open ahead, a
        message of another shape).

        The path from a message to its request runs with cold caches (the worker sleeps
        between requests while llama-server, Redis and the caller run): there, the three
        pydantic validations and the dump that ``build_body`` needs cost about 250 µs
        where ``orjson`` and this builder cost about 40 (``python -m bench.coldpath``).
        ``start`` keeps the request only if the validated request makes the same body;
        anything else (invalid, expired, a duplicate) drops it, which closes its
        connection and stops llama-server. One not to start before a time to come
        (``trace.work.not_before_ms``) is left to its handler, which waits for it.
        """
        if self.supervisor.state is not EngineState.READY:
            return None
        try:
            message = orjson.loads(data)
            if _scheduled(message):
                return None
            payload = message["payload"]
            body, _ = body_of(payload["messages"], payload.get("options") or {}, self.profile)
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return None
        sent = self.supervisor.client.send(body)
        return Ahead(body, sent) if sent is not None else None

    def start(
        self,
        job: Job,
        envelope: Envelope,
        chat: ChatRequestPayload,
        options: ChatOptions,
        owned: asyncio.Event,
    ) -> asyncio.Task[tuple[Generation, int]]:
        """The generation as a task, with the request already written to llama-server if it
        can be.

        The generation starts before Redis confirms the request is ours (``owned``): the
        idempotency record (and, for a worker alone on its channel, the pub/sub claim:
        ``Job.claim``) costs round trips, and llama-server reads the prompt meanwhile.
        Nothing is published before ``owned`` is set, and the generation of a duplicate
        or of a message another replica won is cancelled: such a message costs a cut-off
        prompt, every other one round trips less before its first token.

        A task's first step waits its turn behind whatever else is ready to run (the next
        intake read, a claim: each a Redis command, about 0.1 ms here). When llama-server
        is ready and a connection is open ahead, the request is written in the caller's
        own step instead, before it yields to the event loop.
        """
        body, ignored = build_body(chat, options, self.profile)
        if ignored:
            log.debug("options not forwarded to llama-server: %s", ignored)
        ahead, job.ahead = job.ahead, None  # one request per message is written ahead
        sent = ahead.take(body) if ahead is not None else None
        if job.redelivered:  # llama-server may have died on it before: ``_run`` looks first
            if sent is not None:
                sent.drop()
            sent = None
        elif sent is None and self.supervisor.state is EngineState.READY:
            sent = self.supervisor.client.send(body)
        task = asyncio.create_task(
            self._run(job, envelope, options, body, owned, sent), name=f"generate-{job.request_id}"
        )
        if sent is not None:  # cancelled before it read the answer: stop llama-server
            task.add_done_callback(lambda _: sent.drop())
        return task

    async def _run(
        self,
        job: Job,
        envelope: Envelope,
        options: ChatOptions,
        body: dict[str, Any],
        owned: asyncio.Event,
        sent: Sent | None,
    ) -> tuple[Generation, int]:
        """Pub/sub: one try. Streams: a broken upstream is retried up to max deliveries.

        Only a generation that reached llama-server counts as an attempt: llama-server may
        be dead before the supervisor has noticed, and a request that cannot reach it yet
        waits for the restart under the same attempt, as one that arrives during the
        restart does (``engine_ready``): nothing of it was generated or published, so
        even pub/sub's single try may wait, up to ``engine_wait_sec``.
        ``sent``: the first try's request, already written (``start``).

        A request that was in llama-server each time it died, ``request_crash_limit``
        times, is not tried again: it may be what kills it, and retried until the engine's
        own crash limit it would take the worker down with it (``_Deaths``). Those that
        were in one that died take turns, so the others in it are not blamed again. The
        count is kept in Redis: a redelivered entry goes on from the workers' before it.
        """
        deaths = _Deaths(
            self.supervisor,
            self.settings.request_crash_limit,
            self.suspects,
            partial(self.publisher.engine_deaths, job.delivery_id),
        )
        attempt = job.first_attempt
        # A worker before may have retried, or seen llama-server die; a twin streamed
        # under the first attempt's number, unrecorded, which the floor steps over.
        if job.redelivered or job.after_twin:
            attempt, deaths.count = await asyncio.gather(
                self.publisher.next_attempt(job.delivery_id, attempt + job.after_twin),
                self.publisher.engine_deaths(job.delivery_id),
            )
            await deaths.check(attempt)  # at the limit already: not after waiting for the engine
        settings = self.settings
        limit = (
            settings.engine_wait_sec if job.transport == "pubsub" else settings.request_timeout_sec
        )
        deadline = time.monotonic() + limit
        ends = expiry(envelope)
        retry = False
        while True:
            # A first try's wait counts from the last of: the request's arrival, its due
            # time, llama-server leaving service; not from its slot: while llama-server
            # loads, the requests queued behind those holding the slots each waited the
            # whole engine wait again once given one (the fifth of five on one slot, five
            # times over). A retry's, from the death it follows.
            since = None if retry else self._waiting_since(job, envelope)
            if sent is None:
                async with by_expiry(ends, tried=retry):
                    await self.engine_ready(job, since=since)
                await deaths.check(attempt)
            async with deaths.turn(deadline, job.lease, ends, tried=retry):
                if deaths.count:  # the suspect before may have killed it meanwhile
                    async with by_expiry(ends, tried=retry):
                        await self.engine_ready(job, since=since)
                if retry:  # the first try started in time; a retry is a new generation
                    check_expiry(envelope, tried=True)
                elif sent is None:  # not written yet: it may have waited for llama-server
                    check_expiry(envelope)  # (a restart, a suspect's turn) past its expiry
                written, sent = sent, None  # a retry writes its own request
                deaths.trying()
                try:
                    return await self._generate(
                        job, envelope, options, body, attempt, owned, written
                    ), attempt
                except ContextExceeded as exc:
                    raise Failure("context_exceeded", str(exc), retryable=False) from None
                except EngineUnavailable as exc:
                    deaths.failed(reached=exc.reached)
                    if time.monotonic() > deadline:
                        raise Failure(
                            "engine_unavailable",
                            str(exc),
                            retryable=True,
                            details={"engine_state": str(self.supervisor.state)},
                        ) from None
                    await deaths.seen()
                    await asyncio.sleep(0.25)  # the supervisor is about to see the crash
                except UpstreamError as exc:
                    deaths.failed(reached=exc.broken)
                    if not exc.retryable:  # llama-server refused this request: it never will
                        raise Failure(
                            "validation_failed",
                            f"llama-server refused the request: {exc}",
                            retryable=False,
                            details={"upstream_status": exc.status, "attempt": attempt},
                        ) from None
                    if job.transport == "pubsub" or attempt >= self.settings.stream_max_deliveries:
                        raise Failure(
                            "upstream_failed",
                            str(exc),
                            retryable=True,
                            details={"attempt": attempt},
                        ) from None
                    log.warning(
                        "attempt %d of %s failed (%s): retrying", attempt, job.request_id, exc
                    )
                    await deaths.seen()
                    attempt = await self.publisher.next_attempt(job.delivery_id, attempt + 1)
            retry = True

    async def _generate(
        self,
        job: Job,
        envelope: Envelope,
        options: ChatOptions,
        body: dict[str, Any],
        attempt: int,
        owned: asyncio.Event,
        sent: Sent | None,
    ) -> Generation:
        chunks = self._chunk_stream(job, envelope, options, attempt, owned)
        generation = Generation()
        # A caller may ask for less time than the operator's cap, not more.
        timeout = min(options.timeout_sec or math.inf, self.settings.request_timeout_sec)
        try:
            try:
                async with asyncio.timeout(timeout):
                    async with self.supervisor.client.chat_stream(body, sent) as stream:
                        await self._relay(stream, generation, chunks)
            except TimeoutError:
                raise Failure(
                    "upstream_failed",
                    f"generation exceeded {timeout:.0f}s",
                    retryable=True,
                    timed_out=True,
                ) from None
            if job.lease is not None:  # llama-server is done with it: the next may start
                job.lease.generation_ended()
            # Outside the timeout: the last chunks wait for the claim and the record, which
            # a Redis blip may hold up past the caller's timeout_sec once generated in time.
            # ``_serve`` settles the ownership either way (owned, or this task cancelled).
            if chunks is not None:
                generation.tail = await chunks.finish()
        except BaseException:
            if chunks is not None:
                job.streamed |= chunks.seq > 0
                await chunks.abort()
            raise
        return generation

    async def _relay(self, stream: ChatStream, gen: Generation, chunks: ChunkStream | None) -> None:
        """The relay: at most one await per read from llama-server, no step per token.

        The texts of a read that holds nothing but tokens go to ``texts`` straight from
        the connection's read callback, without waking this task (``ChatStream.batches``):
        at a GPU's pace that is nearly every read. Everything else comes in batches.
        """
        push = chunks.push if chunks is not None else None
        push_texts = chunks.push_texts if chunks is not None else None
        content = gen.content

        def texts(read: list[str]) -> None:
            if gen.first_token_at is None:
                gen.first_token_at = time.monotonic()
            content.extend(read)
            gen.tokens += len(read)
            if push_texts is not None:
                push_texts(read)

        async for batch in stream.batches(texts):
            for event in batch:
                if isinstance(event, list):  # the texts of tokens: nearly every event
                    texts(event)
                else:
                    _take(gen, event, push)

    def _chunk_stream(
        self, job: Job, envelope: Envelope, options: ChatOptions, attempt: int, owned: asyncio.Event
    ) -> ChunkStream | None:
        if not options.stream:
            return None
        channel = chunk_channel(envelope.reply_to, options.stream_channel)
        if channel is None:
            return None
        if options.stream_channel and channel != options.stream_channel:
            log.debug(
                "%s: stream_channel is its reply_to, where only the result may go; chunks go to %s",
                job.request_id,
                channel,
            )
        return ChunkStream(
            self.publisher,
            partial(self.outbox.chunks_for, envelope),
            channel=channel,
            request_id=job.delivery_id,
            attempt=attempt,
            coalesce_sec=self.settings.coalesce_ms / 1000,
            gate=owned,
            on_answered=partial(stop_answered_elsewhere, job, asyncio.current_task()),
        )


class _Deaths:
    """How many llama-servers died with one request in them, seen from its tries: a try
    that reached llama-server and failed, followed by a try on a later llama-server
    (``Supervisor.life``), saw one die. One that died of something else while the request
    was in it counts too: no one can tell the two apart from here."""

    def __init__(
        self,
        supervisor: Supervisor,
        limit: int,
        suspects: asyncio.Lock,
        store: Callable[[str], Awaitable[int]],
    ) -> None:
        self.supervisor = supervisor
        self.limit = limit
        self.suspects = suspects
        self.store = store  # tells Redis of a death, for the workers after this one: the count
        self.count = 0
        self._life = 0
        self._failed_in: int | None = None  # the life a failed try reached

    def turn(
        self,
        deadline: float,
        lease: SlotLease | None,
        ends: tuple[float, str] | None = None,
        *,
        tried: bool = False,
    ) -> AbstractAsyncContextManager[object]:
        """A try of its own once the request was in a llama-server that died: with the
        poison among several such requests, the others are not in the next one it kills.
        (Requests on their first try still run beside it: one of them could be a second
        poison.) Waited for until the request's deadline or its expiry (``ends``), the
        job's slot (``lease``) lent to other requests meanwhile."""
        if not self.count:
            return nullcontext()
        return _Turn(self.suspects, deadline, lease, partial(by_expiry, ends, tried=tried))

    def trying(self) -> None:
        self._life = self.supervisor.life

    def failed(self, *, reached: bool) -> None:
        if reached:
            self._failed_in = self._life

    async def seen(self) -> None:
        """Before a retry of a try that may have been in llama-server when it died: until
        the supervisor has seen that (or 1 s says it did not die), the next try, this
        request's or the next suspect's, is not sent to the dead one. A death seen is
        counted at once: the engine may not come back for the next try."""
        if self._failed_in is not None:
            await self.supervisor.left(self._failed_in, timeout=1.0)
            await self._count_death()

    async def check(self, attempt: int) -> None:
        """Before a try: raise if the request has been in ``limit`` dying llama-servers,
        this worker's and those of the workers that tried it before."""
        await self._count_death()
        if self.count >= self.limit:
            raise Failure(
                "upstream_failed",
                f"llama-server died {self.count} times with this request in it: not tried "
                "again, as it may be what kills it",
                retryable=False,
                details={"engine_deaths": self.count, "attempt": attempt},
            )

    async def _count_death(self) -> None:
        """Whether the llama-server the last try failed in has died, counted in Redis
        (and forgotten here only once it is) if so."""
        failed_in, supervisor = self._failed_in, self.supervisor
        if failed_in is None:
            return
        gone = supervisor.life != failed_in
        if gone or supervisor.state in (EngineState.RESTARTING, EngineState.FAILED):
            self.count = max(self.count, await self.store(f"{supervisor.boot}:{failed_in}"))
            self._failed_in = None


class _Turn:
    """The suspects' lock, waited for no later than the request's deadline.

    A suspect steps aside from its slot while it waits: with ``--parallel N`` and N
    suspects, N-1 of llama-server's slots would otherwise sit idle while each has its
    turn, and new requests wait for them or are told ``overloaded``. When its turn
    comes it takes its slot back at once, over the count if the requests beside it took
    every one (llama-server queues it until one of its own frees): had it waited for a
    slot holding the lock, a request waiting on a suspect behind it (its duplicate, in
    ``Records.own``) could hold the last slot, and neither would move. It steps aside
    even when the lock looks free: a lock just released is not taken by its next waiter
    until that one runs.
    """

    def __init__(
        self,
        lock: asyncio.Lock,
        deadline: float,
        lease: SlotLease | None,
        expiry: Callable[[], AbstractAsyncContextManager[object]] = nullcontext,
    ) -> None:
        self.lock = lock
        self.deadline = deadline
        self.lease = lease
        self.expiry = expiry

    async def __aenter__(self) -> None:
        lease = self.lease
        if lease is not None:
            lease.step_aside()
        try:
            async with self.expiry(), asyncio.timeout(max(0.0, self.deadline - time.monotonic())):
                await self.lock.acquire()
        except TimeoutError:
            raise Failure(
                "engine_unavailable",
                "llama-server died with this request in it, and the others in it took "
                "their turns past the request's deadline",
                retryable=True,
            ) from None
        if lease is not None:
            lease.take_back()

    async def __aexit__(self, *exc: object) -> None:
        self.lock.release()


def _scheduled(message: dict[str, Any]) -> bool:
    """Whether a raw message's ``trace.work.not_before_ms`` is still to come."""
    work = (message.get("trace") or {}).get("work")
    return isinstance(work, dict) and seconds_until_due(work) > 0


def stop_answered_elsewhere(job: Job, generation: asyncio.Task[Any] | None) -> None:
    """The request has its result, from another worker that took it over while this one was
    stalled (Redis dropped a chunk, or the lease renewal found the request answered). The
    rest would be dropped too: stop llama-server."""
    log.warning(
        "request %s was answered by another worker while this one was stalled: "
        "stopping its generation",
        job.request_id,
    )
    job.answered_elsewhere = True
    if generation is not None:
        generation.cancel()


def _take(gen: Generation, event: ChunkEvents, push: Callable[[str, str], None] | None) -> None:
    """Any event other than a plain token: role, reasoning, tool calls, finish, usage."""
    if event.content or event.reasoning:
        if gen.first_token_at is None:
            gen.first_token_at = time.monotonic()
        gen.content.append(event.content)
        gen.reasoning.append(event.reasoning)
        gen.tokens += 1
        if push is not None:
            push(event.content, event.reasoning)
    if event.finish_reason:
        gen.finish_reason = event.finish_reason
    if event.usage:
        gen.usage = event.usage
    if event.timings:
        gen.timings = event.timings
    if event.tool_calls:
        merge_tool_calls(gen.tool_calls, event.tool_calls)
