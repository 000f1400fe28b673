"""Pub/sub claims against a real Redis: what a worker that leaves gives back."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from orion_llamaccp.bus import keys
from orion_llamaccp.bus.claims import ANSWERED_CLAIM_SEC, Claims


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_a_worker_gives_back_only_answered_claims_it_still_holds(
    redis: aioredis.Redis,
) -> None:
    """An answered message's claim is kept ``ANSWERED_CLAIM_SEC`` (a lagging replica must
    find it held); leaving, the worker frees it, but not a claim that lapsed and another
    replica took since, nor one of a request it is still generating."""
    claims = Claims(redis, profile="tiny", dedup_ttl=600)
    mine, retaken, running = (f"sha256:test-{uuid.uuid4().hex}" for _ in range(3))
    try:
        for key in (mine, retaken, running):
            assert await claims.claim_message(key, "a")
        for key in (mine, retaken):
            await redis.execute_command(*claims.stage_answered(key))
        assert 0 < await redis.ttl(keys.claim(mine)) <= ANSWERED_CLAIM_SEC
        assert await redis.ttl(keys.claim(running)) > ANSWERED_CLAIM_SEC
        await redis.set(keys.claim(retaken), "b")  # lapsed, and claimed by another replica
        assert await claims.give_back("a") == 1
        assert await redis.get(keys.claim(mine)) is None
        assert await redis.get(keys.claim(retaken)) == b"b"
        assert await redis.get(keys.claim(running)) == b"a"
        assert await claims.give_back("a") == 0  # given back once
    finally:
        await redis.delete(*(keys.claim(k) for k in (mine, retaken, running)))
