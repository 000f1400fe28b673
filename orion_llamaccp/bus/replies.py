"""Everything we send back to a caller: ordered, coalesced chunks and the one result.

``Publisher`` is the only writer of replies. Each write is idempotent (see ``scripts``),
so it can be retried through a Redis outage without a caller ever seeing a chunk ``seq`` or
a final result twice.

``ChunkStream`` keeps the token loop free of Redis round trips: ``push`` only appends to a
buffer, and one sender task per request publishes, at most once per coalescing window.
The first token goes out at once (no added time-to-first-token); after that, tokens that
arrive faster than the window share one chunk.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from orion_llamaccp.bus import keys
from orion_llamaccp.bus.outbox import ChunkTemplate
from orion_llamaccp.bus.retry import with_retry
from orion_llamaccp.bus.scripts import PUBLISH_IN_ORDER, PUBLISH_ONCE

GUARD_TTL_SEC = 24 * 3600


class Publisher:
    """Publishes replies through guard scripts, retrying through Redis outages."""

    def __init__(self, redis: aioredis.Redis, *, retry_for: float = 120.0) -> None:
        self.redis = redis
        self.retry_for = retry_for
        self._once = redis.register_script(PUBLISH_ONCE)
        self._ordered = redis.register_script(PUBLISH_IN_ORDER)
        self.commands = 0

    async def _retrying(self, what: str, call: Callable[[], Awaitable[Any]]) -> int:
        async def counted() -> Any:
            self.commands += 1
            return await call()

        return int(await with_retry(f"publishing {what}", counted, retry_for=self.retry_for))

    async def chunk(
        self, channel: str, request_id: str, attempt: int, seq: int, message: bytes
    ) -> bool:
        key = keys.chunk_seq(request_id, attempt)
        sent = await self._retrying(
            f"chunk {seq}",
            lambda: self._ordered(keys=[key], args=[channel, seq, message, GUARD_TTL_SEC]),
        )
        return sent >= 0

    async def result_once(self, channel: str, request_id: str, message: bytes) -> bool:
        """Publish the final result unless this request was answered before."""
        key = keys.answered(request_id)
        sent = await self._retrying(
            "result", lambda: self._once(keys=[key], args=[channel, message, GUARD_TTL_SEC])
        )
        return sent >= 0

    async def already_answered(self, request_id: str) -> bool:
        return bool(await self.redis.exists(keys.answered(request_id)))

    async def event(self, channel: str, message: bytes) -> None:
        """A plain PUBLISH for events that tolerate loss (heartbeats, announcements)."""
        self.commands += 1
        await self.redis.publish(channel, message)


class ChunkStream:
    """Ordered, coalesced ``llm.chat.chunk`` messages of one request attempt."""

    def __init__(
        self,
        publisher: Publisher,
        template: ChunkTemplate,
        *,
        channel: str,
        request_id: str,
        attempt: int,
        coalesce_sec: float,
    ) -> None:
        self._publisher = publisher
        self._template = template
        self._channel = channel
        self._request_id = request_id
        self._attempt = attempt
        self._window = coalesce_sec
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._wake = asyncio.Event()
        self._closed = False
        self._aborted = False
        self._last_sent = -1e9
        self._napping: asyncio.Future[None] | None = None
        self.seq = 0
        self.tokens = 0
        self._task = asyncio.create_task(self._send_loop(), name=f"chunks-{request_id}")

    def push(self, delta: str, reasoning: str = "") -> None:
        """Queue a delta; never waits on Redis."""
        if delta:
            self._content.append(delta)
        if reasoning:
            self._reasoning.append(reasoning)
        self.tokens += 1
        self._wake.set()

    async def _send_loop(self) -> None:
        while not self._aborted:
            await self._wake.wait()
            self._wake.clear()
            if self._aborted:
                return
            wait = self._last_sent + self._window - time.monotonic()
            if wait > 0 and not self._closed:
                await self._nap(wait)
            if self._window <= 0:
                await self._send_each()
            elif self._content or self._reasoning:
                await self._send("".join(self._content), "".join(self._reasoning))
            if self._closed and not (self._content or self._reasoning):
                return

    async def _send_each(self) -> None:
        """Coalescing off: one chunk per delta, as a naive relay would."""
        while self._content or self._reasoning:
            delta = self._content.pop(0) if self._content else ""
            reasoning = self._reasoning.pop(0) if self._reasoning else ""
            await self._publish(delta, reasoning)

    async def _send(self, delta: str, reasoning: str) -> None:
        self._content.clear()
        self._reasoning.clear()
        await self._publish(delta, reasoning)

    async def _publish(self, delta: str, reasoning: str) -> None:
        message = self._template.render(self.seq, delta, reasoning, self._attempt)
        await self._publisher.chunk(
            self._channel, self._request_id, self._attempt, self.seq, message
        )
        self.seq += 1
        self._last_sent = time.monotonic()

    async def _nap(self, seconds: float) -> None:
        """Wait out the rest of the coalescing window; ``close()`` cuts it short."""
        loop = asyncio.get_running_loop()
        self._napping = nap = loop.create_future()
        timer = loop.call_later(seconds, _settle, nap)
        try:
            await nap
        finally:
            timer.cancel()
            self._napping = None

    async def close(self) -> None:
        """Send what is buffered now, then stop; the result may be published after this.

        The generation is over, so the last chunk does not wait for its window to end.
        """
        self._closed = True
        self._wake.set()
        if self._napping is not None:
            _settle(self._napping)
        await self._task

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


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
