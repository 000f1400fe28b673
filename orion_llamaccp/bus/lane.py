"""Round trips on redis-py connections of our own, below the client and pipeline layers.

Every request costs the worker a handful of Redis round trips (the claim, the idempotency
record, the chunks, the result), and most of them stand between a caller and its first
token. redis-py's client and pipeline layers (pool locks, command stacks, retry
wrappers, reply callbacks) cost about 110 µs per round trip on the 2-vCPU machine of
``docs/benchmarks.md``, next to the 120 µs of the round trip itself (send to subscriber:
pipeline 238 µs, a bare connection 128 µs). A ``Lane`` keeps connections made by redis-py,
so connecting, auth, TLS, timeouts and reply parsing stay the library's, and talks to
them with ``send_packed_command`` / ``read_response``.

Replies are as the server sent them (``SET`` gives ``b"OK"``, not ``True``). Callers retry
through outages themselves (``bus.retry``); a connection that failed is never reused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError

Command = tuple[Any, ...]
"""One Redis command, as its arguments."""


class Lane:
    """Sends commands in one write and reads their replies, one connection per caller at a
    time (an idle one is reused, else another is made)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._pool = redis.connection_pool
        self._idle: list[AbstractConnection] = []

    async def call(self, *command: Any) -> Any:
        """One command's reply; an error reply is raised."""
        (reply,) = await self.run([command])
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def run(self, commands: Sequence[Command]) -> list[Any]:
        """One write, then one reply per command (an error reply in its place)."""
        conn = self._idle.pop() if self._idle else self._pool.make_connection()
        try:
            await conn.send_packed_command(conn.pack_commands(commands))
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as exc:
                    replies.append(exc)
        except BaseException:
            await conn.disconnect(nowait=True)  # replies may be on their way: never reuse it
            raise
        self._idle.append(conn)
        return replies

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.disconnect()
