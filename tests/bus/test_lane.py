"""Round trips below redis-py's client layers, against a real Redis: replies in order,
error replies in their place, a connection that failed never reused, and the commands of
one loop step sharing one write."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from orion_llamaccp.bus.lane import Lane
from orion_llamaccp.bus.retry import with_retry
from tests.support.procs import RedisServer


async def test_replies_come_back_in_order_with_errors_in_their_place(
    redis: aioredis.Redis,
) -> None:
    lane = Lane(redis)
    key = f"orion:test:lane:{os.getpid()}"
    replies = await lane.run(
        [("SET", key, "v", "EX", 30), ("INCR", key), ("GET", key), ("SET", key, "w", "NX")]
    )
    assert replies[0] == b"OK"
    assert isinstance(replies[1], ResponseError)  # not an integer: an error, not a raise
    assert replies[2:] == [b"v", None]
    with pytest.raises(ResponseError):
        await lane.call("INCR", key)
    assert await lane.call("GET", key) == b"v"  # the connection is still in step
    await lane.aclose()


async def test_arguments_of_every_kind_reach_redis_as_redis_py_would_send_them(
    redis: aioredis.Redis,
) -> None:
    """The lane packs with hiredis, the client with redis-py: both must store the same."""
    lane = Lane(redis)
    base = f"orion:test:lane:{os.getpid()}:kinds"
    values: list[str | bytes | int | float] = ["ключ ü", b"\x00\xffraw", -3, 2**70, 0.1, 1e20]
    for n, value in enumerate(values):
        await lane.call("SET", f"{base}:{n}:ключ", value, "EX", 30)
        await redis.set(f"{base}:{n}:client", value, ex=30)
    for n in range(len(values)):
        got = await lane.call("GET", f"{base}:{n}:ключ")
        assert got == await redis.get(f"{base}:{n}:client")
    with pytest.raises(TypeError):  # not sent at all: a caller's bug, raised before a write
        await lane.call("SET", f"{base}:none", None)
    assert await lane.call("GET", f"{base}:0:ключ") == "ключ ü".encode()  # still in step
    await lane.aclose()


async def test_concurrent_callers_each_get_their_own_replies(redis: aioredis.Redis) -> None:
    lane = Lane(redis)
    keys = [f"orion:test:lane:{os.getpid()}:{n}" for n in range(20)]
    await asyncio.gather(*(lane.call("SET", k, k, "EX", 30) for k in keys))
    got = await asyncio.gather(*(lane.call("GET", k) for k in keys))
    assert got == [k.encode() for k in keys]
    await lane.aclose()


async def test_commands_of_one_loop_step_share_one_write(redis: aioredis.Redis) -> None:
    lane = Lane(redis)
    keys = [f"orion:test:lane:{os.getpid()}:batch:{n}" for n in range(16)]
    got = await asyncio.gather(
        *(lane.run([("SET", k, k, "EX", 30), ("GET", k)]) for k in keys),
        lane.call("INCR", keys[0]),  # an error reply stays its own caller's
        return_exceptions=True,
    )
    assert lane.writes == 1
    assert got[:-1] == [[b"OK", k.encode()] for k in keys]
    assert isinstance(got[-1], ResponseError)
    await lane.aclose()


async def test_a_blocking_command_alone_holds_up_no_one(redis: aioredis.Redis) -> None:
    lane = Lane(redis)
    key = f"orion:test:lane:{os.getpid()}:blocked"
    blocked = asyncio.create_task(lane.call("BLPOP", key, "2", alone=True))
    await asyncio.sleep(0.05)
    assert await lane.call("SET", key + ":other", "v", "EX", 30) == b"OK"
    assert not blocked.done()  # the quick command did not wait for it
    await lane.call("RPUSH", key, "x")
    assert await blocked == [key.encode(), b"x"]
    await lane.call("DEL", key)
    await lane.aclose()


async def test_callers_sharing_a_cut_off_round_trip_get_a_retryable_error(
    redis: aioredis.Redis,
) -> None:
    """The first caller of a batch cancelled while its replies were due: the others must
    not wait forever for replies that will never be read; they get a connection error,
    which ``bus.retry`` retries (everything sent through a lane is safe to repeat)."""
    lane = Lane(redis)
    key = f"orion:test:lane:{os.getpid()}:cut"
    first = asyncio.create_task(lane.call("BLPOP", key, "2"))  # holds the shared exchange
    rider = asyncio.create_task(lane.call("SET", key + ":rider", "v", "EX", 30))
    await asyncio.sleep(0.05)
    first.cancel()
    with pytest.raises(RedisConnectionError):
        await asyncio.wait_for(rider, 1.0)
    assert await lane.call("SET", key + ":rider", "w", "EX", 30) == b"OK"  # the retry
    await lane.aclose()


async def test_a_rider_cut_off_by_its_sender_s_cancel_is_repeated_quietly(
    redis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A request cancelled (by its caller, a timeout, a failure) while it had sent a
    round trip that other requests' chunks and results shared: each of those logged a
    WARNING as for a Redis outage and waited 50 ms before its repeat. Redis is fine:
    the repeat goes at once, said at DEBUG only."""
    lane = Lane(redis)
    key = f"orion:test:lane:{os.getpid()}:quiet"
    first = asyncio.create_task(lane.call("BLPOP", key, "2"))  # holds the shared exchange
    calls = 0

    async def rider() -> bytes:
        nonlocal calls
        calls += 1
        return await lane.call("SET", key + ":rider", calls, "EX", 30)

    riding = asyncio.create_task(with_retry("a chunk", rider, retry_for=5.0))
    await asyncio.sleep(0.05)
    with caplog.at_level(logging.DEBUG, logger="orion_llamaccp.bus.retry"):
        first.cancel()
        assert await asyncio.wait_for(riding, 5.0) == b"OK"
    assert calls == 2 and await redis.get(key + ":rider") == b"2"
    retried = [r for r in caplog.records if r.name == "orion_llamaccp.bus.retry"]
    assert [r.levelno for r in retried] == [logging.DEBUG], [r.getMessage() for r in retried]
    await lane.aclose()


async def test_a_write_that_cannot_leave_times_out_and_its_connection_is_dropped(
    tmp_path: Path,
) -> None:
    """The lane writes below redis-py's ``send_packed_command``; a write the socket cannot
    take (a frozen Redis, its buffers full) must still end in the client's socket timeout
    as a retryable error, and the lane must not hand that connection out again."""
    server = RedisServer(tmp_path / "redis").start()
    client = aioredis.Redis.from_url(server.url, socket_timeout=1.0)
    lane = Lane(client)
    try:
        assert await lane.call("PING") == b"PONG"
        server.freeze()
        with pytest.raises(RedisTimeoutError, match="writing"):
            await lane.call("SET", "big", b"x" * (64 << 20))
        server.thaw()
        assert await lane.call("PING") == b"PONG"
        assert lane.writes == 3
        assert len(lane._idle) == 1  # the timed-out connection was not put back
    finally:
        server.thaw()
        await lane.aclose()
        await client.aclose()
        server.stop()
