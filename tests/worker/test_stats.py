"""The figures heartbeats carry about what the worker has done."""

from __future__ import annotations

import time

from orion_llamaccp.worker.stats import Stats


def test_recent_tokens_per_sec_is_over_the_last_minute_not_since_the_first_finish() -> None:
    """One 1,650-token answer that ran 55 s, finished after an idle spell, was shown as
    1,650 tok/s (its tokens over a second) in heartbeats, ``ps`` and ``watch``."""
    stats = Stats(started_at=time.monotonic() - 600)

    stats.finished("ok", 1650)

    assert stats.recent_tokens_per_sec() == 27.5


def test_recent_tokens_per_sec_just_after_the_start_is_over_the_uptime() -> None:
    started = time.monotonic() - 10
    stats = Stats(started_at=started)

    stats.finished("ok", 300)
    rate = stats.recent_tokens_per_sec()

    assert round(300 / (time.monotonic() - started), 1) <= rate <= 30.0
