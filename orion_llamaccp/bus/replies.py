"""Everything we send back to a caller: ordered, coalesced chunks and the one result.

``Publisher`` is the only writer of replies. Each write is idempotent (see ``scripts``),
so it can be retried through a Redis outage without a caller ever seeing a chunk ``seq`` or
a final result twice.

``ChunkStream`` keeps the token loop free of Redis round trips: ``push`` only appends to a
buffer, and one sender task per request publishes, about once per coalescing window.
The first token goes out at once (no added time-to-first-token); after that, tokens that
arrive faster than the window share one chunk, sent on a clock that every request of the
worker shares (a tick every window), so that the chunks of requests in flight together
leave in one write to Redis (``Lane``) instead of one write each.

The end of a request is one round trip: the last chunk, the stored result, the result and
the stream ack go out as ``Stage``s of one write (``Publisher.commit``), in that order on
one connection, instead of four calls one after the other.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from orion_llamaccp.bus import keys
from orion_llamaccp.bus.lane import Command, Lane
from orion_llamaccp.bus.outbox import ChunkTemplate
from orion_llamaccp.bus.retry import with_retry
from orion_llamaccp.bus.scripts import (
    ACK_IF_ANSWERED,
    ANSWERED,
    DEAD_LETTER_ONCE,
    DEATHS,
    NEXT_ATTEMPT,
    PUBLISH_IN_ORDER,
    PUBLISH_ONCE,
)

GUARD_TTL_SEC = 24 * 3600
# A chunk's ``seq`` guard is of use while its attempt streams: after the result the answered
# guard refuses every chunk. Kept a day, like the guards a redelivery reads, it held about
# 150 bytes a streamed request in the shared Redis for nothing (0.26 GB a day at 20 a
# second). An hour, or twice the worker's request timeout where that is longer.
SEQ_TTL_SEC = 3600

Stage = Command
"""One Redis command, as its arguments; ``Publisher.commit`` sends a list of them at once."""

Stored = tuple[str, bytes, int]
"""A value to store under a key, with its TTL in seconds."""


class Publisher:
    """Publishes replies through guard scripts, retrying through Redis outages.

    ``commit`` goes through a ``Lane``, not a redis-py pipeline: every chunk would pay
    the pipeline's layers before its token reaches the caller (see ``bus.lane``).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        retry_for: float = 120.0,
        lane: Lane | None = None,
        request_timeout: float = 0.0,
    ) -> None:
        self.redis = redis
        self.retry_for = retry_for
        self.seq_ttl = max(SEQ_TTL_SEC, int(2 * request_timeout))
        self._once = redis.register_script(PUBLISH_ONCE)
        self._ordered = redis.register_script(PUBLISH_IN_ORDER)
        self._acked = redis.register_script(ACK_IF_ANSWERED)
        self._guards = (self._once, self._ordered, self._acked)  # what stages run (EVALSHA)
        self._sources = {script.sha: script.script for script in self._guards}
        self._next_attempt = redis.register_script(NEXT_ATTEMPT)
        self._deaths = redis.register_script(DEATHS)
        self._dead_letter = redis.register_script(DEAD_LETTER_ONCE)
        self.lane = lane or Lane(redis)
        self.commands = 0

    def stage_chunk(
        self, channel: str, request_id: str, attempt: int, seq: int, message: bytes
    ) -> Stage:
        seq_key, answered = keys.chunk_seq(request_id, attempt), keys.answered(request_id)
        return (
            "EVALSHA",
            self._ordered.sha,
            2,
            seq_key,
            answered,
            channel,
            seq,
            message,
            self.seq_ttl,
        )

    def stage_result(
        self, channel: str, request_id: str, message: bytes, record: Stored | None = None
    ) -> Stage:
        """The final result, published unless this request was answered before; with it,
        in the same step, ``record`` (the stored result for duplicates)."""
        key = keys.answered(request_id)
        if record is None:
            return ("EVALSHA", self._once.sha, 1, key, channel, message, GUARD_TTL_SEC)
        record_key, value, ttl = record
        return (
            "EVALSHA",
            self._once.sha,
            2,
            key,
            record_key,
            channel,
            message,
            GUARD_TTL_SEC,
            value,
            ttl,
        )

    def stage_ack_if_answered(self, ack: Stage, request_id: str) -> Stage:
        """A stream entry's ``XACK`` stage made to land only with the request's result
        (``ACK_IF_ANSWERED``): to follow ``stage_result`` in the same round trip."""
        command, stream, group, entry_id = ack
        assert command == "XACK", ack
        answered = keys.answered(request_id)
        return ("EVALSHA", self._acked.sha, 2, stream, answered, group, entry_id)

    async def commit(self, what: str, stages: Sequence[Stage]) -> list[Any]:
        """Run ``stages`` in order in one round trip; every stage must be safe to repeat.

        A Redis restart forgets our scripts: on ``NOSCRIPT`` they are loaded again and the
        whole list is repeated, which the guards make harmless. Redis runs the rest of a
        list whose script failed, though, so a list with a plain command after a script
        (the stored result, the stream ack) sends its scripts whole (``EVAL``): an ack
        must never land while the result before it did not (``_whole``).
        """
        stages = _whole(stages, self._sources)

        async def once() -> list[Any]:
            replies = await self._execute(stages)
            if any(isinstance(reply, NoScriptError) for reply in replies):
                await self._load_scripts()
                replies = await self._execute(stages)
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            return replies

        return await with_retry(f"publishing {what}", once, retry_for=self.retry_for)

    async def _execute(self, stages: Sequence[Stage]) -> list[Any]:
        self.commands += len(stages)
        return await self.lane.run(stages)

    async def _load_scripts(self) -> None:
        for script in self._guards:
            await self.redis.script_load(script.script)

    async def next_attempt(self, request_id: str, floor: int) -> int:
        """The number of a retry or a redelivery: above every attempt of the request before
        (at least ``floor``).

        Chunks are guarded per attempt (``stage_chunk``): a second generation under a
        number already used would have its first chunks dropped as repeats, and the
        caller, seeing no higher ``attempt``, would splice two generations' text. A count
        of deliveries cannot tell: a worker may retry within one delivery (llama-server
        died) and then die itself. The first attempt of a first delivery is not recorded
        (no round trip in front of every request); the floor keeps it from being reused.
        """
        key = keys.attempts(request_id)
        return await self._number("numbering an attempt", self._next_attempt, key, floor)

    async def engine_deaths(self, request_id: str, death: str = "") -> int:
        """How many llama-servers died with a request in them, counted by every worker
        that tried it, ``death`` (a name for one: told twice, it counts once) included."""
        key = keys.deaths(request_id)
        return await self._number("counting a request's engine deaths", self._deaths, key, death)

    async def _number(self, what: str, script: AsyncScript, key: str, arg: int | str) -> int:
        """A script's number for a request's key, kept ``GUARD_TTL_SEC``; safe to retry."""
        return int(
            await with_retry(
                what,
                lambda: script(keys=[key], args=[arg, GUARD_TTL_SEC]),
                retry_for=self.retry_for,
            )
        )

    async def dead_letter(
        self, stream: str, entry_id: str, fields: dict[str, str | bytes], maxlen: int
    ) -> bool:
        """Add a stream entry's dead letter to ``stream`` (at most ``maxlen`` long, 0: no
        cap) unless it has one; safe to retry. False when it had."""
        flat = [part for pair in fields.items() for part in pair]
        added = await with_retry(
            "dead-lettering a stream entry",
            lambda: self._dead_letter(
                keys=[stream, keys.dead_lettered(stream, entry_id)],
                args=[GUARD_TTL_SEC, maxlen, *flat],
            ),
            retry_for=self.retry_for,
        )
        return added is not None

    async def already_answered(self, request_id: str) -> bool:
        return bool(await self.redis.exists(keys.answered(request_id)))

    async def event(self, channel: str, message: bytes) -> None:
        """A plain PUBLISH for events that tolerate loss (heartbeats, announcements)."""
        self.commands += 1
        await self.redis.publish(channel, message)


class ChunkStream:
    """Ordered, coalesced ``llm.chat.chunk`` messages of one request attempt.

    ``gate``: nothing is published before it is set. The worker starts llama-server on a
    request while Redis still records it as ours, and a duplicate must never leak a chunk.
    ``template`` makes the envelope's fixed part; the sender calls it first thing, so it is
    built while llama-server reads the prompt, not in front of the request.
    ``on_answered`` is called, and the sender stops, when Redis drops a chunk because the
    request already has its result: another worker answered it while this one was stalled,
    and the rest of this generation would only be dropped too.
    """

    def __init__(
        self,
        publisher: Publisher,
        template: Callable[[], ChunkTemplate],
        *,
        channel: str,
        request_id: str,
        attempt: int,
        coalesce_sec: float,
        gate: asyncio.Event | None = None,
        on_answered: Callable[[], None] | None = None,
    ) -> None:
        self._publisher = publisher
        self._on_answered = on_answered
        self._make_template = template
        self._made: ChunkTemplate | None = None
        self._channel = channel
        self._request_id = request_id
        self._attempt = attempt
        self._window = coalesce_sec
        self._gate = gate
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._wake = asyncio.Event()
        self._closed = False
        self._aborted = False
        self._clock = asyncio.get_running_loop().time  # the clock timers run on
        self._last_sent = -1e9
        self._napping: asyncio.Future[None] | None = None
        self.seq = 0
        self._task = asyncio.create_task(self._send_loop(), name=f"chunks-{request_id}")

    def push(self, delta: str, reasoning: str = "") -> None:
        """Queue a delta; never waits on Redis."""
        if delta:
            self._content.append(delta)
        if reasoning:
            self._reasoning.append(reasoning)
        self._wake.set()

    def push_texts(self, texts: list[str]) -> None:
        """Queue the texts of consecutive tokens (non-empty), as ``push`` each would."""
        self._content += texts
        self._wake.set()

    def _template(self) -> ChunkTemplate:
        if self._made is None:
            self._made = self._make_template()
        return self._made

    async def _send_loop(self) -> None:
        self._template()  # made now, while llama-server reads the prompt
        if self._gate is not None:
            await self._gate.wait()
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._closed or self._aborted:
                return  # what is left goes out with the result (``finish``)
            if self._clock() - self._last_sent < self._window:
                await self._nap_until(_tick_after(self._last_sent, self._window))
                if self._closed or self._aborted:
                    return
            if self._window <= 0:
                await self._send_each()
            elif self._content or self._reasoning:
                await self._send("".join(self._content), "".join(self._reasoning))

    async def _send_each(self) -> None:
        """Coalescing off: one chunk per delta. Deltas that queued up while the previous
        chunk was on its way go out together, one command each, in one round trip."""
        stages = [self._stage(*self._pop_one()) for _ in range(self._pending())]
        if stages:
            self._check(await self._publisher.commit("chunks", stages))
            self._last_sent = self._clock()

    def _pending(self) -> int:
        return max(len(self._content), len(self._reasoning))

    def _pop_one(self) -> tuple[str, str]:
        delta = self._content.pop(0) if self._content else ""
        reasoning = self._reasoning.pop(0) if self._reasoning else ""
        return delta, reasoning

    async def _send(self, delta: str, reasoning: str) -> None:
        self._content.clear()
        self._reasoning.clear()
        self._check(
            await self._publisher.commit(f"chunk {self.seq}", [self._stage(delta, reasoning)])
        )
        self._last_sent = self._clock()

    def _check(self, replies: list[Any]) -> None:
        if ANSWERED in replies:
            self._aborted = True  # the send loop ends at its next check
            if self._on_answered is not None:
                self._on_answered()

    async def _nap_until(self, when: float) -> None:
        """Wait for the tick ``when`` (the loop's clock); ``finish()`` cuts it short."""
        loop = asyncio.get_running_loop()
        self._napping = nap = loop.create_future()
        timer = loop.call_at(when, _settle, nap)
        try:
            await nap
        finally:
            timer.cancel()
            self._napping = None

    async def finish(self) -> list[Stage]:
        """Stop the sender and hand back what is still buffered, as stages for the result's commit.

        The generation is over: the last chunk does not wait for its window to end, and it
        travels in the same round trip as the result that must follow it.
        """
        self._closed = True
        self._wake.set()
        if self._napping is not None:
            _settle(self._napping)
        await self._task
        if self._window <= 0:
            parts = [self._pop_one() for _ in range(self._pending())]
        elif self._content or self._reasoning:
            parts = [("".join(self._content), "".join(self._reasoning))]
        else:
            parts = []
        self._content.clear()
        self._reasoning.clear()
        return [self._stage(delta, reasoning) for delta, reasoning in parts]

    def _stage(self, delta: str, reasoning: str) -> Stage:
        message = self._template().render(self.seq, delta, reasoning, self._attempt)
        stage = self._publisher.stage_chunk(
            self._channel, self._request_id, self._attempt, self.seq, message
        )
        self.seq += 1
        return stage

    async def abort(self) -> None:
        """Stop without sending what is buffered (the request is being cut off).

        Does not rely on cancellation alone: a Redis client can swallow a cancel that lands
        inside a command (see tests/bus/test_redis_client.py), so the loop also checks a
        flag, and we wait a bounded time for it.
        """
        self._aborted = True
        self._wake.set()
        self._task.cancel()
        await asyncio.wait({self._task}, timeout=2.0)


def _whole(stages: Sequence[Stage], sources: dict[str, str]) -> Sequence[Stage]:
    """``stages`` with every ``EVALSHA`` sent as ``EVAL`` when a plain command follows one.

    A worker that died between the round trip that met ``NOSCRIPT`` and its repeat
    would otherwise leave the entry acked and its result unpublished: an answer lost.
    Chunks alone keep ``EVALSHA``, whose repeat after ``NOSCRIPT`` loses nothing.
    """
    first = next((i for i, stage in enumerate(stages) if stage[0] == "EVALSHA"), None)
    if first is None or all(stage[0] == "EVALSHA" for stage in stages[first:]):
        return stages
    return [
        ("EVAL", sources[stage[1]], *stage[2:]) if stage[0] == "EVALSHA" else stage
        for stage in stages
    ]


def _tick_after(sent: float, window: float) -> float:
    """When the chunk after one sent at ``sent`` goes: the first tick of the shared clock
    (a tick every ``window`` seconds of the loop's time) at least half a window later.

    Every request's chunks after its first leave on the same ticks, so at a GPU's pace
    (a token per read, each request at its own phase) those of all requests in flight
    share a loop step and so one write to Redis, and one read of the replies. Half a
    window at least, not a whole one: a chunk every window on average, as when each
    request kept its own window, and a timer that fires a little early cannot make two.
    (A/B, docs/benchmarks-history.md item 60: at 16 in flight, writes per request
    9.7-12.5 -> 3.5-3.7 and worker CPU per token 15-19 % less.)
    """
    return math.ceil((sent + window / 2) / window) * window


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
