"""Round trips below redis-py's client layers, against a real Redis: replies in order,
error replies in their place, and a connection that failed never reused."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from orion_llamaccp.bus.lane import Lane


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


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


async def test_concurrent_callers_each_get_their_own_replies(redis: aioredis.Redis) -> None:
    lane = Lane(redis)
    keys = [f"orion:test:lane:{os.getpid()}:{n}" for n in range(20)]
    await asyncio.gather(*(lane.call("SET", k, k, "EX", 30) for k in keys))
    got = await asyncio.gather(*(lane.call("GET", k) for k in keys))
    assert got == [k.encode() for k in keys]
    await lane.aclose()
