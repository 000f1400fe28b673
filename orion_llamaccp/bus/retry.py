"""Retrying Redis calls through an outage, for calls that are safe to repeat.

Only idempotent operations go through here (guarded publishes, SET NX claims, XACK, ...):
a call that timed out may still have happened, and a repeat must change nothing.

Both intakes reconnect through an outage too, pausing between tries (``Backoff``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from orion_llamaccp.bus.lane import CutOffByAnother
from orion_llamaccp.errors import describe

log = logging.getLogger(__name__)
T = TypeVar("T")
TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError)


async def with_retry(what: str, call: Callable[[], Awaitable[T]], *, retry_for: float) -> T:
    """``await call()``, retried with backoff on connection errors for up to ``retry_for`` s."""
    deadline = time.monotonic() + retry_for
    delay = 0.05
    while True:
        try:
            return await call()
        except CutOffByAnother as exc:  # another request's cancel, not an outage: at once
            _unless_cancelled(exc)
            if time.monotonic() > deadline:
                raise
            log.debug("%s: %s; repeating it", what, exc)
        except TRANSIENT as exc:
            _unless_cancelled(exc)
            if time.monotonic() > deadline:
                raise
            log.warning("%s failed (%s); retrying in %.2fs", what, describe(exc), delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


def _unless_cancelled(exc: BaseException) -> None:
    """Raise CancelledError where this task was told to stop (cancelled) and the call
    raised an error instead: a cancel that reaches a Redis read as its timeout runs out
    comes back as the timeout's error. Retried, a worker stopping with Redis hung went
    on answering a request its drain cut off until the retries ran out (a minute and
    more after its goodbyes), and did not exit meanwhile. A task that caught a cancel
    and goes on stops retrying too: its Redis calls are given up at the first error."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from exc


class Backoff:
    """The pause before reconnecting: doubling while Redis stays away, back to the first
    once a session got going. Otherwise the ceiling that one outage reached would stand
    for every blip after it, for the life of the process (pub/sub messages sent during
    that pause are not heard)."""

    def __init__(self, first: float = 0.1, ceiling: float = 5.0) -> None:
        self.first = first
        self.ceiling = ceiling
        self.next = first

    def reset(self) -> None:
        self.next = self.first

    def take(self) -> float:
        pause, self.next = self.next, min(self.next * 2, self.ceiling)
        return pause
