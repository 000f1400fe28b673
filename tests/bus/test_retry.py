"""``with_retry``: what it repeats, and what it must not."""

from __future__ import annotations

import asyncio
import logging

import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError

from orion_llamaccp.bus.retry import with_retry


async def test_a_task_told_to_stop_does_not_retry_a_call_its_cancel_came_back_as_an_error() -> None:
    """A cancel that reaches a Redis call as its read times out can come back as the
    read's timeout error. Retried, the stopping worker's answer went on for the whole
    ``retry_for`` (a minute and more) with Redis hung, and the process did not exit
    (the real case: ``test_a_stop_with_redis_hung_gives_up_its_goodbyes_within_one_budget``).
    Here the call turns its own cancel into that error, as the read did."""
    calls = 0
    started = asyncio.Event()

    async def read() -> None:
        nonlocal calls
        calls += 1
        if calls > 1:  # Redis still hung
            raise RedisTimeoutError("Timeout reading from redis")
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RedisTimeoutError("Timeout reading from redis") from None

    task = asyncio.create_task(with_retry("publishing result", read, retry_for=5.0))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == 1


async def test_an_outage_is_retried_while_no_one_stops_the_task() -> None:
    """The other side: a timeout with no cancel behind it is an outage, retried."""
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise RedisTimeoutError("Timeout reading from redis")
        return "ok"

    assert await with_retry("publishing result", flaky, retry_for=5.0) == "ok"
    assert calls == 3


async def test_a_retried_error_without_text_is_named_by_its_type(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bound run out (``asyncio.timeout``) raises a TimeoutError without text: the
    warning said "(TimeoutError: )", a colon and nothing after it."""
    calls = 0

    async def bounded() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TimeoutError
        return "ok"

    with caplog.at_level(logging.WARNING, logger="orion_llamaccp.bus.retry"):
        assert await with_retry("publishing result", bounded, retry_for=5.0) == "ok"
    assert [r.getMessage() for r in caplog.records] == [
        "publishing result failed (TimeoutError); retrying in 0.05s"
    ]
