"""A request's expiry (``worker.jobs.expiry``): the earlier of ``created_at`` + ``ttl_ms``
and ``trace.work.expires_at_ms``, as the contract says. Every test of expiry set one of
the two; one that took the later of both survived them all."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from orion_llamaccp.bus.envelope import Envelope, ServiceRef
from orion_llamaccp.worker.jobs import Failure, check_expiry, expiry


def _request(ttl_ms: int | None, expires_in_sec: float | None) -> Envelope:
    work = (
        {} if expires_in_sec is None else {"expires_at_ms": (time.time() + expires_in_sec) * 1000}
    )
    return Envelope(
        kind="llm.chat.request",
        source=ServiceRef(name="caller"),
        created_at=datetime.now(UTC),
        ttl_ms=ttl_ms,
        trace={"work": work},
    )


@pytest.mark.parametrize(
    ("ttl_ms", "expires_in_sec", "said"),
    [
        (600_000, -5.0, "trace.work.expires_at_ms"),  # the deadline passed, the TTL not
        (1, 600.0, "ttl_ms=1"),  # the TTL passed, the deadline not
    ],
)
def test_the_earlier_of_ttl_and_deadline_expires_a_request(
    ttl_ms: int, expires_in_sec: float, said: str
) -> None:
    request = _request(ttl_ms, expires_in_sec)
    ends = expiry(request)
    assert ends is not None and ends[1] == said
    time.sleep(0.01)
    with pytest.raises(Failure, match="expired") as refused:
        check_expiry(request)
    assert refused.value.code == "expired" and said in str(refused.value)


def test_a_request_with_neither_never_expires() -> None:
    assert expiry(_request(None, None)) is None
    check_expiry(_request(None, None))
