"""What a generation's result says about its tokens, and how long a try waits for its turn."""

from __future__ import annotations

import asyncio
import time
from functools import partial

import pytest

from orion_llamaccp.worker.generation import Generation, _Turn
from orion_llamaccp.worker.jobs import Failure, by_expiry


def test_usage_is_llama_server_s_or_the_tokens_relayed_when_it_was_lost() -> None:
    """An answer cut after its finish reason may lose the usage event (it comes after):
    the result then counts the tokens relayed, and no prompt tokens it cannot know of."""
    told = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    assert Generation(usage=told, tokens=6).usage_counts() == told
    assert Generation(tokens=6).usage_counts() == {
        "prompt_tokens": 0,
        "completion_tokens": 6,
        "total_tokens": 6,
    }


async def _turn_after(lock: asyncio.Lock, deadline_in: float, expires_in: float) -> Failure:
    """What a request waiting for its turn (``lock`` held by the suspect before it) is
    answered, with its deadline and its expiry that many seconds ahead."""
    ends = (time.time() + expires_in, "ttl_ms=200")
    turn = _Turn(lock, time.monotonic() + deadline_in, None, partial(by_expiry, ends, tried=True))
    with pytest.raises(Failure) as failed:
        async with turn:
            pass
    return failed.value


async def test_a_request_waiting_for_its_turn_after_a_crash_is_answered_when_it_expires() -> None:
    """It used to wait until its deadline (``request_timeout_sec``, 600 s by default) and
    then be answered ``engine_unavailable``, retryable, long past its expiry."""
    lock = asyncio.Lock()
    await lock.acquire()  # the suspect before it, generating
    expired = await _turn_after(lock, deadline_in=60, expires_in=0.2)
    assert expired.code == "expired" and "not tried again" in expired.message
    late = await _turn_after(lock, deadline_in=0.2, expires_in=60)
    assert late.code == "engine_unavailable"
