"""The Redis client must let task cancellation through.

redis-py 8.0 and 8.1 swallow ``CancelledError`` raised while a command waits for its
reply: the cancelled task carries on as if nothing happened. Our drain (cancel what did
not finish in time) then waits forever for a chunk sender that never stops. This test
pins the behaviour we rely on, so an upgrade that brings the bug back fails here.
"""

from __future__ import annotations

import asyncio
import random

import redis.asyncio as aioredis


async def test_cancelling_a_task_inside_redis_commands_cancels_it(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    script = client.register_script("return redis.call('PUBLISH', ARGV[1], ARGV[2])")
    rng = random.Random(7)

    async def busy() -> None:
        for _ in range(10_000):
            await client.publish("cancel-test", "x")
            await script(keys=[], args=["cancel-test", "y"])

    swallowed = 0
    try:
        for _ in range(200):
            task = asyncio.create_task(busy())
            await asyncio.sleep(rng.random() * 0.004)
            task.cancel()
            try:
                await task
                swallowed += 1
            except asyncio.CancelledError:
                pass
    finally:
        await client.aclose()
    assert swallowed == 0, f"{swallowed} of 200 cancellations were swallowed by redis-py"
