"""The tests' own bus recorder: what every bus test reads its answers and chunks from."""

from __future__ import annotations

import redis

from tests.support.workers import BusRecorder


def test_a_read_holds_everything_published_before_it(recorder: BusRecorder, redis_url: str) -> None:
    """The recorder reads on a thread of its own: a test that read at once after its client
    held the result found the last chunks missing (a CI run failed on it). Every read
    catches up with Redis first, and its own markers are never recorded."""
    client = redis.Redis.from_url(redis_url)
    try:
        for seq in range(2000):
            client.publish("test:recorder:burst", b'{"seq": %d}' % seq)
    finally:
        client.close()
    assert [m.message["seq"] for m in recorder.on("test:recorder:burst")] == list(range(2000))
    assert not [m for m in recorder.messages if m.channel.startswith("test:recorder:caught-up")]
