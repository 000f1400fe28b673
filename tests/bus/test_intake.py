"""Both intakes against a real Redis: what the worker prepares for a message (its request,
written to llama-server) happens as the message is read, before any message's handler runs,
and a preparation that fails loses no message."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from orion_llamaccp.bus.intake import Slots, StreamConsumer, StreamEntry
from orion_llamaccp.settings import Settings
from orion_llamaccp.worker.announce import channels_for
from orion_llamaccp.worker.startup import Intake
from tests.support.procs import wait_until_async

STREAM = "orion:test:consumer"


async def test_entries_read_together_are_all_prepared_before_any_handler_runs(
    redis_url: str,
) -> None:
    """The worker writes each entry's request to llama-server in ``prepare``: entries that
    one read brings must all be written before the first of them is validated, so that
    llama-server takes them up in the same batch."""
    redis = aioredis.Redis.from_url(redis_url)
    events: list[str] = []
    handled = asyncio.Event()

    def prepare(entry: StreamEntry) -> None:
        events.append(f"prepare {entry.fields[b'n'].decode()}")
        entry.prepared = entry.fields[b"n"]

    async def handler(entry: StreamEntry) -> None:
        events.append(f"handle {entry.prepared.decode()}")
        await consumer.slots.release()
        if len(events) == 6:
            handled.set()

    async def ready() -> None:
        return None

    consumer = StreamConsumer(
        redis,
        stream=STREAM,
        group="g",
        consumer="c",
        slots=Slots(3),
        handler=handler,
        ready=ready,
        claim_idle_ms=60_000,
        block_ms=100,
        prepare=prepare,
    )
    await consumer.ensure_group()
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(3):
            pipe.xadd(STREAM, {"n": str(n)})
        await pipe.execute()
    stop = asyncio.Event()
    runner = asyncio.create_task(consumer.run(stop))
    try:
        await asyncio.wait_for(handled.wait(), 10)
    finally:
        stop.set()
        await asyncio.wait_for(runner, 5)
        await redis.aclose()
    assert events == [
        "prepare 0",
        "prepare 1",
        "prepare 2",
        "handle 0",
        "handle 1",
        "handle 2",
    ]


async def test_pubsub_messages_are_prepared_as_the_listener_reads_them(redis_url: str) -> None:
    """Two requests published together: both prepared before the worker takes the first
    from the inbox, each result beside its message; one whose preparation raises still
    arrives (with nothing prepared)."""
    redis = aioredis.Redis.from_url(redis_url)
    settings = Settings(ORION_BUS_URL=redis_url, LLM_PROFILE_NAME="tiny")
    channels = channels_for(settings, "tiny")
    intake = Intake(settings, redis, channels)
    prepared: list[bytes] = []

    def prepare(channel: str, data: bytes) -> str:
        if data == b"bad":
            raise ValueError("cannot prepare this one")
        prepared.append(data)
        return f"prepared {data.decode()}"

    intake.prepare = prepare
    intake.start()
    try:
        assert await intake.listening(timeout=5)
        async with redis.pipeline(transaction=False) as pipe:
            for data in (b"one", b"bad", b"two"):
                pipe.publish(channels.intake, data)
            await pipe.execute()
        # Nobody reads the inbox yet: the listener prepares each message as it reads it.
        await wait_until_async(lambda: intake.inbox.qsize() == 3, timeout=5, what="3 queued")
        assert prepared == [b"one", b"two"]
        got = [intake.inbox.get_nowait() for _ in range(3)]
    finally:
        await intake.close()
        await redis.aclose()
    assert got == [
        (channels.intake, b"one", "prepared one"),
        (channels.intake, b"bad", None),
        (channels.intake, b"two", "prepared two"),
    ]
