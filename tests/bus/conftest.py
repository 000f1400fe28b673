"""Bus tests use the shared fixtures of tests/conftest.py (workers, recorder, client), and
a plain client of the test Redis (``redis``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.conftest import SpawnWorker
from tests.engine.conftest import PRELUDE
from tests.support.workers import WorkerProc

__all__ = ["SpawnWorker"]


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def loading_worker(
    spawn_worker: SpawnWorker,
    llama_server_bin: Path,
    *,
    seconds: int,
    name: str = "w1",
    parallel: int = 2,
    **env: str,
) -> WorkerProc:
    """A worker whose llama-server takes ``seconds`` to load (a progress line each 0.1 s
    first), returned once it says ``loading``; ``env``: settings without their
    ``ORION_LLAMACPP_`` prefix."""
    worker = spawn_worker(
        name,
        ready=False,
        parallel=parallel,
        LLAMA_SERVER_BIN=str(PRELUDE),
        REAL_LLAMA_SERVER=str(llama_server_bin),
        PRELUDE_LINES=str(seconds * 10),
        PRELUDE_DELAY="0.1",
        PRELUDE_HELP_AT_ONCE="1",
        **{f"ORION_LLAMACPP_{key}": value for key, value in env.items()},
    )
    worker.wait_state("loading")
    return worker
