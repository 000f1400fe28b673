"""Round trips on redis-py connections of our own, below the client and pipeline layers.

Every request costs the worker a handful of Redis round trips (the claim, the idempotency
record, the chunks, the result), and most of them stand between a caller and its first
token. redis-py's client and pipeline layers (pool locks, command stacks, retry
wrappers, reply callbacks) cost about 110 µs per round trip on the 2-vCPU machine of
``docs/benchmarks-history.md``, next to the 120 µs of the round trip itself (send to subscriber:
pipeline 238 µs, a bare connection 128 µs). A ``Lane`` keeps connections made by redis-py,
so connecting, auth, TLS, health checks, timeouts and reply parsing stay the library's;
it packs with hiredis (``pack_command``, in C: the same bytes as redis-py's asyncio
packer, which is Python, at a sixth of its CPU), writes to the connection's stream itself
(``_send``) and reads with ``read_response``.

Commands that callers send in the same step of the event loop share one write and one
read (auto-pipelining, as ioredis and node-redis do): with many requests in flight, the
write to Redis was a quarter of the worker's CPU, one system call per command list. One
caller alone pays a single extra turn of the loop (about 2 µs) for the chance to share.

Replies are as the server sent them (``SET`` gives ``b"OK"``, not ``True``). Callers retry
through outages themselves (``bus.retry``); a connection that failed is never reused.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

Command = tuple[Any, ...]
"""One Redis command, as its arguments (str, bytes, int or float)."""


class CutOffByAnother(RedisConnectionError):
    """The caller that sent a shared round trip was cancelled (a request cancelled, timed
    out or failed) before its replies were read: Redis is fine, and the commands of the
    others who shared it are repeated at once (``bus.retry``), with no warning."""


class _Batch:
    """The command lists of one loop step: the first caller's, then those that joined."""

    __slots__ = ("commands", "own", "riders")

    def __init__(self, commands: Sequence[Command]) -> None:
        self.commands = list(commands)
        self.own = len(self.commands)
        self.riders: list[tuple[int, int, asyncio.Future[list[Any]]]] = []

    def join(self, commands: Sequence[Command]) -> asyncio.Future[list[Any]]:
        start = len(self.commands)
        self.commands.extend(commands)
        rider = asyncio.get_running_loop().create_future()
        self.riders.append((start, len(self.commands), rider))
        return rider

    def settle(self, replies: list[Any]) -> list[Any]:
        """Hand each rider its replies; return the first caller's."""
        for start, stop, rider in self.riders:
            if not rider.done():  # a rider cancelled meanwhile no longer listens
                rider.set_result(replies[start:stop])
        return replies[: self.own] if self.riders else replies

    def fail(self, exc: BaseException) -> None:
        """The shared round trip broke: every rider retries (its commands are safe to repeat)."""
        if isinstance(exc, asyncio.CancelledError):  # the first caller's own cancellation
            exc = CutOffByAnother("a shared round trip was cut off by its sender's cancel")
        for _, _, rider in self.riders:
            if not rider.done():
                rider.set_exception(exc)


class Lane:
    """Sends commands in one write and reads their replies; the commands of one loop step
    share a connection (an idle one is reused, else another is made)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._pool = redis.connection_pool
        self._idle: list[AbstractConnection] = []
        self._forming: _Batch | None = None
        self.writes = 0  # command lists written: what sharing a write saves shows here

    async def call(self, *command: Any, alone: bool = False) -> Any:
        """One command's reply; an error reply is raised.

        ``alone``: a blocking command (``XREADGROUP ... BLOCK``) takes a connection of its
        own, since it would hold up the replies of whatever shared its write.
        """
        (reply,) = await self.run([command], alone=alone)
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def run(self, commands: Sequence[Command], *, alone: bool = False) -> list[Any]:
        """One write, then one reply per command (an error reply in its place)."""
        if alone:
            return await self._exchange(commands)
        forming = self._forming
        if forming is not None:
            return await forming.join(commands)
        self._forming = batch = _Batch(commands)
        try:
            await asyncio.sleep(0)  # callers later in this step join the batch
            self._forming = None
            replies = await self._exchange(batch.commands)
        except BaseException as exc:
            if self._forming is batch:
                self._forming = None
            batch.fail(exc)
            raise
        return batch.settle(replies)

    async def _exchange(self, commands: Sequence[Command]) -> list[Any]:
        packed = [hiredis.pack_command(command) for command in commands]
        conn = self._idle.pop() if self._idle else self._pool.make_connection()
        try:
            self.writes += 1
            await _send(conn, packed)
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


async def _send(conn: AbstractConnection, packed: list[bytes]) -> None:
    """Write in the caller's own step.

    redis-py's ``send_packed_command`` puts the write in a task of its own whenever the
    client has a socket timeout (``asyncio.wait_for`` on Python 3.11): a task and a loop
    turn before the bytes leave, 7 µs of a 30 µs round trip here. A write to a socket
    that has room does not wait, so only a full buffer is waited on, under the timeout.
    """
    if not conn.is_connected:
        await conn.connect()
    await conn.check_health()  # a PING when the connection sat idle past the interval
    writer = conn._writer  # the stream redis-py connected: below its layers, as the rest
    try:
        writer.writelines(packed)
        if writer.transport.get_write_buffer_size():
            async with asyncio.timeout(conn.socket_timeout):
                await writer.drain()
    except TimeoutError:
        raise RedisTimeoutError("timeout writing to Redis") from None
    except OSError as exc:
        raise RedisConnectionError(f"error writing to Redis: {exc}") from exc
