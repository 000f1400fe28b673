"""Bus tests use the shared fixtures of tests/conftest.py (workers, recorder, client), and
a plain client of the test Redis (``redis``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from tests.conftest import SpawnWorker

__all__ = ["SpawnWorker"]


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()
