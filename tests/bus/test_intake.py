"""Both intakes against a real Redis: what the worker prepares for a message (its request,
written to llama-server) happens as the message is read, before any message's handler runs,
and a preparation that fails loses no message."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis import Redis as SyncRedis

from orion_llamaccp.bus.pubsub import PubSubListener
from orion_llamaccp.bus.slots import Slots
from orion_llamaccp.bus.streams import (
    COPIES_LOOKED_AT,
    COPIES_SKEW_MS,
    StreamConsumer,
    StreamCopies,
    StreamEntry,
)
from orion_llamaccp.settings import Settings
from orion_llamaccp.worker.announce import channels_for
from orion_llamaccp.worker.startup import Intake
from tests.support.procs import RedisServer, wait_until_async

STREAM = "orion:test:consumer"


def _consumer(
    redis: aioredis.Redis,
    events: list[str],
    done: asyncio.Event,
    on_prepare: Callable[[int], None] = lambda n: None,
    slots: int = 3,
    claim_idle_ms: int = 60_000,
) -> StreamConsumer:
    """A consumer that logs each entry's ``prepare`` and handler start; ``done`` is set
    once ``slots`` handlers have started."""

    def prepare(entry: StreamEntry) -> None:
        n = int(entry.fields[b"n"])
        events.append(f"prepare {n}")
        entry.prepared = n
        on_prepare(n)

    async def handler(entry: StreamEntry) -> None:
        events.append(f"handle {entry.prepared}")
        consumer.slots.release()
        if sum(e.startswith("handle") for e in events) == slots:
            done.set()

    async def ready() -> None:
        return None

    consumer = StreamConsumer(
        redis,
        stream=STREAM,
        group="g",
        consumer="c",
        slots=Slots(slots),
        handler=handler,
        ready=ready,
        claim_idle_ms=claim_idle_ms,
        block_ms=100,
        prepare=prepare,
    )
    return consumer


async def _run_until(consumer: StreamConsumer, done: asyncio.Event) -> None:
    stop = asyncio.Event()
    runner = asyncio.create_task(consumer.run(stop))
    try:
        await asyncio.wait_for(done.wait(), 10)
    finally:
        stop.set()
        await asyncio.wait_for(runner, 5)


PREPARED_FIRST = ["prepare 0", "prepare 1", "prepare 2", "handle 0", "handle 1", "handle 2"]


async def test_entries_read_together_are_all_prepared_before_any_handler_runs(
    redis_url: str,
) -> None:
    """The worker writes each entry's request to llama-server in ``prepare``: entries that
    one read brings must all be written before the first of them is validated, so that
    none of them waits behind another's validation to reach llama-server."""
    redis = aioredis.Redis.from_url(redis_url)
    events: list[str] = []
    done = asyncio.Event()
    consumer = _consumer(redis, events, done)
    await consumer.ensure_group()
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(3):
            pipe.xadd(STREAM, {"n": str(n)})
        await pipe.execute()
    try:
        await _run_until(consumer, done)
    finally:
        await redis.aclose()
    assert events == PREPARED_FIRST


async def _from_one_entry(
    redis_url: str, on_prepare: Callable[[StreamConsumer, SyncRedis, int], None], slots: int
) -> list[str]:
    """Entry 0 in the stream; ``on_prepare`` acts as each entry is prepared (a second
    client adds entries meanwhile). The events once ``slots`` handlers have started."""
    redis = aioredis.Redis.from_url(redis_url)
    late = SyncRedis.from_url(redis_url)
    events: list[str] = []
    done = asyncio.Event()
    consumer = _consumer(redis, events, done, lambda n: on_prepare(consumer, late, n), slots)
    await consumer.ensure_group()
    await redis.xadd(STREAM, {"n": "0"})
    try:
        await _run_until(consumer, done)
    finally:
        await redis.aclose()
        late.close()
    return events


async def test_entries_sent_just_after_the_first_are_prepared_before_its_handler_runs(
    redis_url: str,
) -> None:
    """Callers that send together send a little apart: entries that arrive while the first
    is being prepared are read (without blocking) and prepared before its handler runs,
    where they had waited for its handler's first steps before."""

    def send_the_rest(consumer: StreamConsumer, late: SyncRedis, n: int) -> None:
        if n == 0:  # in Redis before the consumer's next read, after its first one
            late.xadd(STREAM, {"n": "1"})
            late.xadd(STREAM, {"n": "2"})

    assert await _from_one_entry(redis_url, send_the_rest, slots=3) == PREPARED_FIRST


async def test_entries_held_start_when_a_pub_sub_request_takes_the_last_slot_meanwhile(
    redis_url: str,
) -> None:
    """An entry read without blocking may find its slot taken by a pub/sub request while
    the read was in flight: the entries already held (their requests written) must start
    then, not wait with it for a slot, which could be theirs to give back."""

    def send_one_more_and_take_a_slot(consumer: StreamConsumer, late: SyncRedis, n: int) -> None:
        def taken_by_pubsub() -> None:
            assert consumer.slots.try_acquire()

        if n == 0:
            late.xadd(STREAM, {"n": "1"})
            # runs once the consumer waits for its next read: the slot it counted is gone
            asyncio.get_running_loop().call_soon(taken_by_pubsub)

    events = await _from_one_entry(redis_url, send_one_more_and_take_a_slot, slots=2)
    assert events == ["prepare 0", "handle 0", "prepare 1", "handle 1"]


async def test_an_entry_waiting_for_a_slot_is_kept_fresh_and_then_handled(
    redis_url: str,
) -> None:
    """A pub/sub request takes the last slot while the consumer's blocking read is out:
    the entry that read brings waits for a slot, pending under this consumer. The refresh
    must keep it, as it keeps entries in flight: an idle worker reclaimed it once it had
    waited the claim idle time, and generated it as well."""
    redis = aioredis.Redis.from_url(redis_url)
    events: list[str] = []
    done = asyncio.Event()
    consumer = _consumer(redis, events, done, slots=1)
    await consumer.ensure_group()
    stop = asyncio.Event()
    runner = asyncio.create_task(consumer.run(stop))
    try:
        await asyncio.wait_for(consumer.started.wait(), 5)
        await wait_until_async(  # its blocking read is out, counting one free slot
            lambda: _blocked_in_xreadgroup(redis), timeout=5, what="the blocking read out"
        )
        assert consumer.slots.try_acquire()  # ... which a pub/sub request takes
        await redis.xadd(STREAM, {"n": "0"})

        async def read() -> bool:
            return (await redis.xpending(STREAM, "g"))["pending"] == 1

        await wait_until_async(read, timeout=5, what="the entry read")
        await asyncio.sleep(0.3)
        await consumer.keep_claims_fresh()
        reclaimed = await redis.xautoclaim(STREAM, "g", "idle", min_idle_time=250)
        assert reclaimed[1] == []  # fresh: nobody takes it
        assert events == []
        consumer.slots.release()  # the pub/sub request ends
        await asyncio.wait_for(done.wait(), 5)
    finally:
        stop.set()
        await asyncio.wait_for(runner, 5)
        await redis.aclose()
    assert events == ["prepare 0", "handle 0"]


async def test_an_entry_taken_over_before_its_handler_ran_still_gives_its_slot_back(
    redis_url: str,
) -> None:
    """The refresh can learn that another worker took an entry over (this one was stalled)
    between the entry's task being created and its first step. Cancelled then, the task
    would close without running its handler, and the slot the entry held would never be
    given back: the handler must run (the worker's finds the entry taken over and only
    gives its slot back)."""
    redis = aioredis.Redis.from_url(redis_url)
    events: list[str] = []
    consumer = _consumer(redis, events, asyncio.Event(), slots=1)
    try:
        await consumer.slots.acquire()  # the entry's slot, taken as it was read
        entry = StreamEntry("1-0", {b"n": b"0"}, 1)
        consumer._spawn(entry)
        consumer._give_up(entry, consumer.in_flight[entry.entry_id][1])  # before it ran
        await asyncio.gather(*consumer._tasks, return_exceptions=True)
    finally:
        await redis.aclose()
    assert entry.taken_over and events == ["handle None"]
    assert consumer.slots.free == 1 and consumer.in_flight == {}


async def test_an_entry_read_just_before_redis_goes_away_is_still_handled(
    tmp_path: Path,
) -> None:
    """Entries are taken (slot, request written) read by read and handled after the last
    read: when a later read fails, the entries already taken must still reach their
    handlers, not wait in the group's pending list for a reclaim."""
    server = RedisServer(tmp_path / "redis").start()
    redis = aioredis.Redis.from_url(server.url, socket_timeout=2.0)
    events: list[str] = []
    done = asyncio.Event()

    def kill_redis(n: int) -> None:
        server.kill()  # the read that follows fails

    consumer = _consumer(redis, events, done, kill_redis)
    await consumer.ensure_group()
    await redis.xadd(STREAM, {"n": "0"})
    stop = asyncio.Event()
    runner = asyncio.create_task(consumer.run(stop))
    try:
        await wait_until_async(lambda: "handle 0" in events, timeout=10, what="entry 0 handled")
    finally:
        stop.set()
        await asyncio.wait_for(runner, 10)
        await redis.aclose()
        server.stop()
    assert events == ["prepare 0", "handle 0"]
    assert consumer.slots.free == 3


@contextlib.asynccontextmanager
async def _holding(
    redis_url: str, *, claim_idle_ms: int
) -> AsyncIterator[tuple[aioredis.Redis, StreamConsumer, list[StreamEntry]]]:
    """A consumer, "stalled", running with three slots, whose handler holds each entry
    until it is cancelled (its refresh is the test's to run): a client, the consumer, and
    the entries it started, in order. Stopped, its tasks cancelled, on the way out."""
    redis = aioredis.Redis.from_url(redis_url)
    held: list[StreamEntry] = []

    async def hold(entry: StreamEntry) -> None:
        held.append(entry)
        await asyncio.Event().wait()

    async def ready() -> None:
        return None

    consumer = StreamConsumer(
        redis, stream=STREAM, group="g", consumer="stalled", slots=Slots(3), handler=hold,
        ready=ready, claim_idle_ms=claim_idle_ms, block_ms=100,
    )  # fmt: skip
    await consumer.ensure_group()
    stop = asyncio.Event()
    runner = asyncio.create_task(consumer.run(stop))
    try:
        yield redis, consumer, held
    finally:
        stop.set()
        await asyncio.wait_for(runner, 5)
        for task in consumer.tasks:
            task.cancel()
        await redis.aclose()


async def test_a_refresh_gives_up_only_the_entries_another_consumer_took_over(
    redis_url: str,
) -> None:
    """A worker stalled past the claim idle time (frozen, paused) finds at its next
    refresh that another one reclaimed an entry: it stops working on it (the other one
    answers it) instead of taking it back, which left two workers generating the same
    request and taking it from each other. Entries still its own stay its own; one pending
    nowhere (a restarted Redis lost it) is worked on still: its answer is the only one."""
    async with _holding(redis_url, claim_idle_ms=60_000) as (redis, consumer, held):
        ids = [(await redis.xadd(STREAM, {"n": str(n)})).decode() for n in range(3)]
        await wait_until_async(lambda: len(held) == 3, timeout=10, what="3 entries held")
        started = {int(entry.fields[b"n"]): entry for entry in held}
        await redis.xclaim(STREAM, "g", "rescuer", 0, [ids[0]])  # taken over
        await redis.xack(STREAM, "g", ids[1])  # pending nowhere
        await consumer.keep_claims_fresh()
        await wait_until_async(
            lambda: ids[0] not in consumer.in_flight, timeout=5, what="entry 0 given up"
        )
        assert [started[n].taken_over for n in range(3)] == [True, False, False]
        assert sorted(consumer.in_flight) == ids[1:]
        pending = await redis.xpending_range(STREAM, "g", min="-", max="+", count=10)
        assert {p["message_id"].decode(): p["consumer"].decode() for p in pending} == {
            ids[0]: "rescuer",
            ids[2]: "stalled",
        }


async def test_a_stall_past_the_claim_idle_time_does_not_make_the_worker_take_its_own_entry(
    redis_url: str,
) -> None:
    """A worker stalled past the claim idle time (frozen, paused) whose reclaim comes round
    before its refresh: ``XAUTOCLAIM`` hands it back its own entry, still being handled.
    Taken as one another consumer left, it was handled a second time (a second generation
    of the same request, beside the first) and again at each reclaim after it."""
    async with _holding(redis_url, claim_idle_ms=100) as (redis, consumer, held):
        entry_id = (await redis.xadd(STREAM, {"n": "0"})).decode()

        async def reclaimed_twice() -> bool:  # the reclaim after the one that took it back
            info = await redis.xpending_range(STREAM, "g", min=entry_id, max=entry_id, count=1)
            return bool(info) and int(info[0]["times_delivered"]) >= 3

        # No refresh runs (the worker's timer does it): every reclaim finds the entry idle.
        await wait_until_async(reclaimed_twice, timeout=10, what="two reclaims")
        assert [entry.entry_id for entry in held] == [entry_id]
        assert list(consumer.in_flight) == [entry_id]


async def test_entries_read_together_are_kept_fresh_behind_one_waiting_for_a_slot(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three entries read at once, two slots taken by pub/sub requests while the read was
    out: the first entry takes the last slot, the second waits for one, kept fresh; the
    third, behind it, was not, and an idle worker reclaimed it after the claim idle time
    (and generated it beside this one)."""
    read = StreamConsumer._read_new

    async def read_then_pubsub_takes_two(
        self: StreamConsumer, count: int, block: bool = True
    ) -> list[StreamEntry]:
        got = await read(self, count, block)
        if len(got) == 3:  # the two pub/sub requests came while it was out
            assert self.slots.try_acquire() and self.slots.try_acquire()
        return got

    monkeypatch.setattr(StreamConsumer, "_read_new", read_then_pubsub_takes_two)
    async with _holding(redis_url, claim_idle_ms=1000) as (redis, consumer, held):
        async with redis.pipeline(transaction=True) as pipe:  # one step: read together
            for n in range(3):
                pipe.xadd(STREAM, {"n": str(n)})
            ids = [i.decode() for i in await pipe.execute()]
        await wait_until_async(lambda: held, timeout=5, what="the first one started")
        assert [entry.entry_id for entry in held] == ids[:1]
        assert sorted(consumer.awaiting_slot) == ids[1:]
        await asyncio.sleep(1.1)  # past the claim idle time
        await consumer.keep_claims_fresh()
        reclaimed = await redis.xautoclaim(STREAM, "g", "idle", min_idle_time=1000)
        assert reclaimed[1] == []  # all fresh: nobody takes one
        consumer.slots.release()  # a pub/sub request ends: the second one starts
        await wait_until_async(lambda: len(held) == 2, timeout=5, what="the second one")
        assert sorted(consumer.awaiting_slot) == ids[2:]
        consumer.slots.release()  # the other one too: the third starts (and the read ends)
        await wait_until_async(lambda: len(held) == 3, timeout=5, what="the third one")
        assert not consumer.awaiting_slot


async def test_an_entry_behind_many_live_ones_is_reclaimed(redis_url: str) -> None:
    """``XAUTOCLAIM`` looks at ten pending entries per one asked for. Each reclaim looked
    from the start of the pending list, so a dead worker's entry behind more live ones
    (long generations, requests waiting for their time) than that was never reached, for
    as long as they lasted. The reclaims go on from where the last one stopped."""
    redis = aioredis.Redis.from_url(redis_url)
    await redis.xgroup_create(STREAM, "g", id="0", mkstream=True)
    live = [await redis.xadd(STREAM, {"n": str(n)}) for n in range(40)]
    await redis.xreadgroup("g", "live", {STREAM: ">"}, count=40)
    dead = (await redis.xadd(STREAM, {"n": "40"})).decode()
    await redis.xreadgroup("g", "dead", {STREAM: ">"}, count=1)

    async def keep_live_fresh() -> None:  # the live worker's refresh
        while True:
            await redis.xclaim(STREAM, "g", "live", 0, live, justid=True)
            await asyncio.sleep(0.02)

    fresh = asyncio.create_task(keep_live_fresh())
    try:
        await asyncio.sleep(1.1)  # the dead entry idle past the claim idle time
        async with _holding(redis_url, claim_idle_ms=1000) as (_, _consumer, held):
            await wait_until_async(lambda: held, timeout=10, what="an entry reclaimed")
            assert [entry.entry_id for entry in held] == [dead]
    finally:
        fresh.cancel()
        await redis.aclose()


async def test_reconnects_do_not_count_deliveries_of_entries_in_flight(redis_url: str) -> None:
    """After each lost connection the consumer reads its own pending entries again, for a
    restart's leftovers, with ``XREADGROUP ... 0``: every read counted one more delivery
    of the entries it was still generating. A long generation through a few Redis blips
    was then over the delivery limit at its next redelivery (its worker dying), and was
    answered ``upstream_failed`` without a try."""
    async with _holding(redis_url, claim_idle_ms=60_000) as (redis, _consumer, held):
        ids = [(await redis.xadd(STREAM, {"n": str(n)})).decode() for n in range(2)]
        await wait_until_async(lambda: len(held) == 2, timeout=5, what="both in flight")
        for _ in range(3):  # three blips: the blocking read's connection cut each time
            readers = await wait_until_async(
                lambda: _blocked_readers(redis), timeout=5, what="the read out again"
            )
            for reader in readers:
                await redis.client_kill_filter(_id=reader)
        await wait_until_async(lambda: _blocked_in_xreadgroup(redis), timeout=5, what="reconnected")
        pending = await redis.xpending_range(STREAM, "g", min="-", max="+", count=10)
        assert {p["message_id"].decode(): p["times_delivered"] for p in pending} == {
            ids[0]: 1,
            ids[1]: 1,
        }
        assert [entry.entry_id for entry in held] == ids  # not started a second time


@pytest.mark.parametrize("bus", ["redis_url", "oldest_redis_url"], ids=["redis-7", "redis-6.2"])
@pytest.mark.parametrize("holder", ["dead", "stalled"], ids=["reclaimed", "own-leftover"])
async def test_an_entry_deleted_while_pending_is_said_and_dropped(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture, holder: str, bus: str
) -> None:
    """An entry that the producer's ``MAXLEN`` deleted while it was pending: its envelope
    is gone, so no one can be answered. A dead worker's (reclaimed) was acked without a
    word, and the caller's timeout was all anyone saw; one of the worker's own, left from
    before its restart (taken again as it starts), is dropped and said too. Redis 6.2's
    XAUTOCLAIM claims such an entry with no fields and leaves it pending: it stayed
    pending for good there, reclaimed again and again."""
    redis_url = request.getfixturevalue(bus)
    redis = aioredis.Redis.from_url(redis_url)
    await redis.xgroup_create(STREAM, "g", id="0", mkstream=True)
    gone = (await redis.xadd(STREAM, {"n": "0"})).decode()
    await redis.xreadgroup("g", holder, {STREAM: ">"}, count=1)
    await redis.xdel(STREAM, gone)
    await redis.aclose()
    await asyncio.sleep(1.1)  # idle past the claim idle time
    with caplog.at_level(logging.WARNING, logger="orion_llamaccp.bus.streams"):
        async with _holding(redis_url, claim_idle_ms=1000) as (client, _consumer, held):

            async def dropped() -> bool:
                return (await client.xpending(STREAM, "g"))["pending"] == 0

            await wait_until_async(dropped, timeout=5, what="the deleted entry dropped")
            assert held == []
    said = [r.getMessage() for r in caplog.records if gone in r.getMessage()]
    assert said and "deleted while pending" in said[0], said
    # Said once, by its id, and not through a failure of the intake (6.2's nil entry
    # failed XACK, and only the intake's restart took the entry up again).
    assert len(said) == 1, said
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == said


@pytest.mark.parametrize("bus", ["redis_url", "oldest_redis_url"], ids=["redis-7", "redis-6.2"])
async def test_copies_of_a_message_are_found_while_the_group_has_not_acked_them(
    request: pytest.FixtureRequest, bus: str
) -> None:
    """``StreamCopies``: the entries carrying a text (a request's id) that the group has
    not acked, unread or pending; not one acked, nor one added before the lowest id
    looked at (``since_ms`` less the skew), nor one beyond the newest looked at, nor any
    while the stream has no such group (no worker reads it: none would answer it)."""
    redis = aioredis.Redis.from_url(request.getfixturevalue(bus))
    copies = StreamCopies(redis, stream=STREAM, group="g")
    try:
        assert await copies.unacked(["x"], 0) == []  # no stream yet
        old = await redis.xadd(STREAM, {"envelope": "id-old"})
        old_ms = int(old.decode().split("-")[0])
        assert await copies.unacked(["id-old"], 0) == []  # no group: no worker reads it
        await redis.xgroup_create(STREAM, "g", id="0")
        acked = await redis.xadd(STREAM, {"envelope": "id-a"})
        await redis.xadd(STREAM, {"envelope": "id-p"})  # read, and left pending
        await redis.xreadgroup("g", "c", {STREAM: ">"})
        await redis.xack(STREAM, "g", old, acked)
        await redis.xadd(STREAM, {"kind": "k", "envelope": "{id-unread}"})
        assert await copies.unacked(["id-a"], 0) == []
        assert await copies.unacked(["id-p"], 0) == [b"id-p"]
        assert await copies.unacked(["nope", "id-unread"], 0) == [b"{id-unread}"]
        assert await copies.unacked(["id-"], 0) == [b"{id-unread}", b"id-p"]  # newest first
        # Added before ``since_ms`` by more than the skew: not looked at.
        await redis.xgroup_setid(STREAM, "g", "0")  # every entry unread again
        far = old_ms + COPIES_SKEW_MS + 1_000
        assert b"id-old" in await copies.unacked(["id-old"], old_ms + COPIES_SKEW_MS)
        assert await copies.unacked(["id-old"], far) == []
        for n in range(COPIES_LOOKED_AT):
            await redis.xadd(STREAM, {"envelope": f"filler {n}"})
        assert await copies.unacked(["id-p"], 0) == []  # beyond the newest looked at
    finally:
        await redis.aclose()


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


async def test_requests_beyond_the_inbox_wait_apart_and_beyond_its_overflow_are_dropped(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Nobody takes the inbox (the worker being built): ``ORION_LLAMACPP_INBOX_SIZE`` (3)
    messages wait there, the next 30 requests in ``overflow`` (for their ``overloaded``
    answer), and the rest are dropped and counted, said in the log once a flood, however
    often a refusal makes room for one more. A cancel still reaches the inbox, over the
    bound. The inbox had no bound: a flood filled memory."""
    redis = aioredis.Redis.from_url(redis_url)
    settings = Settings(
        ORION_BUS_URL=redis_url, LLM_PROFILE_NAME="tiny", ORION_LLAMACPP_INBOX_SIZE=3
    )
    channels = channels_for(settings, "tiny")
    intake = Intake(settings, redis, channels)
    intake.start()

    async def publish(*messages: tuple[str, bytes]) -> None:
        async with redis.pipeline(transaction=False) as pipe:
            for channel, data in messages:
                pipe.publish(channel, data)
            await pipe.execute()

    try:
        assert await intake.listening(timeout=5)
        flood = [(channels.intake, f"request {n}".encode()) for n in range(36)]
        await publish(*flood, (settings.cancel_channel, b"a cancel"))
        await wait_until_async(lambda: intake.inbox.qsize() == 4, timeout=5, what="4 queued")
        await wait_until_async(lambda: intake.dropped == 3, timeout=5, what="3 dropped")
        intake.overflow.popleft()  # one refused: room for one more
        await publish((channels.intake, b"request 36"), (channels.intake, b"request 37"))
        await wait_until_async(lambda: intake.dropped == 4, timeout=5, what="4 dropped")
        inbox = [intake.inbox.get_nowait()[1] for _ in range(4)]
    finally:
        await intake.close()
        await redis.aclose()
    assert inbox == [b"request 0", b"request 1", b"request 2", b"a cancel"]
    assert list(intake.overflow) == [f"request {n}".encode() for n in (*range(4, 33), 36)]
    assert intake.overflowing.is_set()
    said = [r for r in caplog.records if "dropped unanswered" in r.getMessage()]
    assert len(said) == 1, said


def _sized(n: int, size: int = 1000) -> bytes:
    """Request ``n``'s message, ``size`` bytes long."""
    return f"request {n} ".encode().ljust(size, b".")


async def test_requests_beyond_the_inbox_bytes_wait_apart_and_beyond_its_overflow_bytes_are_dropped(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The inbox was bounded by count only, and each message may be 8 MiB: a flood of
    large requests held gigabytes. Now ``ORION_LLAMACPP_INBOX_BYTES`` (4,096) bounds its
    bytes too: of requests of 1,000 bytes, well within ``ORION_LLAMACPP_INBOX_SIZE``
    (1,000), 4 wait in the inbox, the next 4 in ``overflow`` (as many bytes), and the rest
    are dropped and counted, said in the log once, naming the setting. A cancel still
    reaches the inbox, over the bytes."""
    redis = aioredis.Redis.from_url(redis_url)
    settings = Settings(
        ORION_BUS_URL=redis_url, LLM_PROFILE_NAME="tiny", ORION_LLAMACPP_INBOX_BYTES=4096
    )
    channels = channels_for(settings, "tiny")
    intake = Intake(settings, redis, channels)
    intake.start()
    try:
        assert await intake.listening(timeout=5)
        async with redis.pipeline(transaction=False) as pipe:
            for n in range(11):
                pipe.publish(channels.intake, _sized(n))
            pipe.publish(settings.cancel_channel, _sized(99))
            await pipe.execute()
        await wait_until_async(lambda: intake.inbox.qsize() == 5, timeout=5, what="5 queued")
        await wait_until_async(lambda: intake.dropped == 3, timeout=5, what="3 dropped")
        assert (intake.inbox.nbytes, intake.overflow.nbytes) == (5000, 4000)
        inbox = [intake.inbox.get_nowait()[1] for _ in range(5)]
    finally:
        await intake.close()
        await redis.aclose()
    assert inbox == [_sized(n) for n in (0, 1, 2, 3, 99)]
    assert list(intake.overflow) == [_sized(n) for n in range(4, 8)]
    said = [r.getMessage() for r in caplog.records if "dropped unanswered" in r.getMessage()]
    assert len(said) == 1 and "ORION_LLAMACPP_INBOX_BYTES" in said[0], said


async def test_the_inbox_bytes_return_to_zero_as_its_messages_are_taken(redis_url: str) -> None:
    """The bytes counted leave with each message, however it is taken (the worker's
    ``get``, the drain's ``get_nowait``, a refusal's ``popleft``): a second burst as large
    as the first, once that is taken, waits as the first did (4 in the inbox, 2 in
    ``overflow``) instead of finding them full of what left. And a request larger than
    ``ORION_LLAMACPP_INBOX_BYTES`` still waits, alone, in an empty inbox."""
    redis = aioredis.Redis.from_url(redis_url)
    settings = Settings(
        ORION_BUS_URL=redis_url, LLM_PROFILE_NAME="tiny", ORION_LLAMACPP_INBOX_BYTES=4096
    )
    channels = channels_for(settings, "tiny")
    intake = Intake(settings, redis, channels)
    intake.start()

    async def burst(*messages: bytes) -> None:
        async with redis.pipeline(transaction=False) as pipe:
            for data in messages:
                pipe.publish(channels.intake, data)
            await pipe.execute()
        await wait_until_async(
            lambda: intake.inbox.qsize() + len(intake.overflow) == len(messages),
            timeout=5,
            what=f"{len(messages)} heard",
        )

    try:
        assert await intake.listening(timeout=5)
        for first in (0, 6):
            await burst(*(_sized(n) for n in range(first, first + 6)))
            assert (intake.inbox.qsize(), len(intake.overflow)) == (4, 2), first
            taken = [(await intake.inbox.get())[1] for _ in range(2)]
            taken += [intake.inbox.get_nowait()[1] for _ in range(2)]
            taken += [intake.overflow.popleft() for _ in range(2)]
            assert taken == [_sized(n) for n in range(first, first + 6)]
            assert (intake.inbox.nbytes, intake.overflow.nbytes) == (0, 0)
        await burst(_sized(12, 10_000), _sized(13))
        assert (intake.inbox.qsize(), len(intake.overflow)) == (1, 1)
    finally:
        await intake.close()
        await redis.aclose()
    assert intake.dropped == 0


@contextlib.asynccontextmanager
async def _trimming(
    redis_url: str, stream: str
) -> AsyncIterator[tuple[aioredis.Redis, StreamConsumer]]:
    """A consumer of group ``g`` on ``stream`` (empty), for its trim; the stream goes after."""
    redis = aioredis.Redis.from_url(redis_url)
    await redis.delete(stream)
    consumer = _consumer(redis, [], asyncio.Event())
    consumer.stream = stream
    try:
        yield redis, consumer
    finally:
        await redis.delete(stream)
        await redis.aclose()


async def test_trimming_after_an_id_past_a_doubles_integers_keeps_it(redis_url: str) -> None:
    """Lua's numbers are doubles: the id just above a sequence number past 2^53 cannot be
    computed exactly, so the trim keeps that last read entry rather than guess."""
    stream = "orion:test:trim-big-seq"
    async with _trimming(redis_url, stream) as (redis, consumer):
        first = await redis.xadd(stream, {"n": 0}, id="5-1")
        last = await redis.xadd(stream, {"n": 1}, id="5-18446744073709551615")
        await consumer.ensure_group()
        await redis.xreadgroup("g", "c", {stream: ">"}, count=2)
        await redis.xack(stream, "g", first, last)
        assert await consumer.trim_acked() == 1
        assert [entry_id for entry_id, _ in await redis.xrange(stream)] == [last]


async def test_trimming_deletes_only_what_every_group_has_acked(redis_url: str) -> None:
    """An ack leaves the entry, the request's whole envelope, in the stream for good:
    trimming deletes those below every group's oldest pending entry and up to its last
    read one (that one stayed, the last request kept in an idle stream), never an entry
    still pending, nor one a group has yet to read."""
    stream = "orion:test:trim"
    async with _trimming(redis_url, stream) as (redis, consumer):
        ids = [await redis.xadd(stream, {"n": n}) for n in range(6)]
        await consumer.ensure_group()
        await redis.xgroup_create(stream, "slow-reader", id="0")
        assert await consumer.trim_acked() == 0  # nobody has read anything
        await redis.xreadgroup("g", "c", {stream: ">"}, count=4)  # 0-3 pending in g
        await redis.xreadgroup("slow-reader", "s", {stream: ">"}, count=5)  # 0-4 here
        await redis.xack(stream, "slow-reader", *ids[:5])
        await redis.xack(stream, "g", ids[0], ids[2])  # 1 and 3 still pending in g
        assert await consumer.trim_acked() == 1  # 0: acked by both, below g's oldest (1)
        await redis.xack(stream, "g", ids[1], ids[3])
        # g: nothing pending, read up to 3; slow-reader: up to 4. Up to 3 go (1, 2, 3: the
        # last g read too); 4 and 5 were never read by g.
        assert await consumer.trim_acked() == 3
        left = [entry_id for entry_id, _ in await redis.xrange(stream)]
        assert left == ids[4:]
        # A replay: g reads 4 and 5, acks 4 (5 still pending), and is set back to read
        # from the start. Bounded by its oldest pending entry alone (5), the trim deleted
        # 4, which g has to read again.
        await redis.xreadgroup("slow-reader", "s", {stream: ">"}, count=1)
        await redis.xack(stream, "slow-reader", ids[5])
        await redis.xreadgroup("g", "c", {stream: ">"}, count=2)
        await redis.xack(stream, "g", ids[4])
        await redis.xgroup_setid(stream, "g", "0")
        assert await consumer.trim_acked() == 0
        assert [entry_id for entry_id, _ in await redis.xrange(stream)] == ids[4:]


async def test_consumers_of_workers_gone_are_forgotten_unless_they_hold_entries(
    redis_url: str,
) -> None:
    """Each worker re-created under a new name (a container's hostname) left a consumer in
    the group for good: those with nothing pending, idle past the claim idle time, go."""
    redis = aioredis.Redis.from_url(redis_url)
    consumer = _consumer(redis, [], asyncio.Event())
    consumer.claim_idle_ms = 1000
    await redis.delete(STREAM)
    try:
        await consumer.ensure_group()
        ids = [await redis.xadd(STREAM, {"n": n}) for n in range(4)]
        # A consumer comes to be with its first read of an entry: each reads one.
        for name in ("gone-idle", "gone-holding", "c"):  # c: ourselves, kept
            await redis.xreadgroup("g", name, {STREAM: ">"}, count=1)
        await asyncio.sleep(1.1)  # past the claim idle time
        await redis.xreadgroup("g", "just-read", {STREAM: ">"}, count=1)  # lively: kept
        entry_id = ids[1]  # gone-holding's, still pending
        await redis.xack(STREAM, "g", ids[0], ids[2], ids[3])
        assert await consumer.forget_gone_consumers() == 1
        names = {c["name"].decode() for c in await redis.xinfo_consumers(STREAM, "g")}
        assert names == {"gone-holding", "c", "just-read"}
        pending = await redis.xpending_range(STREAM, "g", "-", "+", 10)
        assert [p["message_id"] for p in pending] == [entry_id]
    finally:
        await redis.delete(STREAM)
        await redis.aclose()


@contextlib.asynccontextmanager
async def _blips(tmp_path: Path) -> AsyncIterator[tuple[aioredis.Redis, SyncRedis, asyncio.Event]]:
    """A Redis of our own, to kill clients of at will (``admin``); ``stop`` is set, and
    everything closed, however the test ends."""
    server = RedisServer(tmp_path / "redis").start()
    redis, admin = aioredis.Redis.from_url(server.url), SyncRedis.from_url(server.url)
    stop = asyncio.Event()
    try:
        yield redis, admin, stop
    finally:
        stop.set()
        await redis.aclose()
        admin.close()
        server.stop()


async def _blip(listener: PubSubListener, admin: SyncRedis) -> None:
    """Cut the listener's connection; back once it has subscribed again."""
    admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    await wait_until_async(
        lambda: not listener.subscribed.is_set(), timeout=10, what="the blip seen"
    )
    await asyncio.wait_for(listener.subscribed.wait(), 10)


def _pauses(caplog: pytest.LogCaptureFixture, says: str) -> list[str]:
    return [r.getMessage().rsplit(" in ", 1)[1] for r in caplog.records if says in r.getMessage()]


async def test_pubsub_reconnects_start_again_from_the_shortest_pause(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each blip after a session got going waits the first pause again; before, the pause
    doubled over the life of the process, up to 5 s for every blip after the sixth (and a
    pub/sub message sent in that pause is not heard)."""
    async with _blips(tmp_path) as (redis, admin, stop):
        listener = PubSubListener(redis, ["orion:test:blips"], lambda channel, data: None)
        runner = asyncio.create_task(listener.run(stop))
        await asyncio.wait_for(listener.subscribed.wait(), 10)
        for _ in range(4):
            await _blip(listener, admin)
        stop.set()
        await asyncio.wait_for(runner, 10)
    assert _pauses(caplog, "pub/sub connection lost") == ["0.1s"] * 4


async def test_stream_reconnects_start_again_from_the_shortest_pause(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with _blips(tmp_path) as (redis, admin, stop):
        consumer = _consumer(redis, [], asyncio.Event())
        runner = asyncio.create_task(consumer.run(stop))

        def reading() -> bool:  # the consumer's XREADGROUP, blocked on the stream
            return any(c.get("cmd") == "xreadgroup" for c in admin.client_list())

        for _ in range(4):
            await wait_until_async(reading, timeout=10, what="the consumer reading")
            admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            await wait_until_async(lambda: not reading(), timeout=10, what="the blip seen")
        await wait_until_async(reading, timeout=10, what="the consumer reading again")
        stop.set()
        await asyncio.wait_for(runner, 10)
    assert _pauses(caplog, "stream intake on") == ["0.1s"] * 4


async def test_the_consumer_looks_for_a_free_slot_again_when_it_was_taken_first(
    redis_url: str,
) -> None:
    """A slot seen free may be taken before the consumer's task runs, and a suspect's turn
    can take one over the count (``SlotLease.take_back``): a count below zero used to
    reach the reads (``COUNT -1``: redis-py refuses it, and the stream intake stopped)."""
    redis = aioredis.Redis.from_url(redis_url)
    consumer = _consumer(redis, [], asyncio.Event(), slots=1)
    stop = asyncio.Event()
    try:
        await consumer.slots.acquire()
        looking = asyncio.create_task(consumer._free_slots(stop))
        await asyncio.sleep(0.01)
        consumer.slots.release()
        await asyncio.sleep(0)  # its wait ends here; the consumer runs a step later
        consumer.slots.take()
        consumer.slots.take()
        await asyncio.sleep(0.01)
        assert not looking.done(), looking.result()
        consumer.slots.release()
        consumer.slots.release()
        assert await asyncio.wait_for(looking, 1) == 1
    finally:
        await redis.aclose()


async def test_a_channel_left_is_not_heard_again_and_the_others_stay_after_a_reconnect(
    tmp_path: Path,
) -> None:
    """``leave`` (a draining worker leaving its intake, keeping its cancel channel): Redis
    counts no subscriber on the channel left while the session goes on; messages on it are
    not heard, on the others they are, and a reconnect subscribes the others only."""
    heard: list[tuple[str, bytes]] = []
    async with _blips(tmp_path) as (redis, admin, stop):
        listener = PubSubListener(
            redis, ["orion:test:intake", "orion:test:cancel"], lambda c, d: heard.append((c, d))
        )
        runner = asyncio.create_task(listener.run(stop))
        await asyncio.wait_for(listener.subscribed.wait(), 10)
        await listener.leave("orion:test:intake")
        counts = [(b"orion:test:intake", 0), (b"orion:test:cancel", 1)]
        await wait_until_async(  # the UNSUBSCRIBE is out; Redis reads it in a moment
            lambda: admin.pubsub_numsub("orion:test:intake", "orion:test:cancel") == counts,
            timeout=2,
            what="the intake channel left",
        )
        for round_ in (b"1", b"2"):
            admin.publish("orion:test:intake", round_)
            admin.publish("orion:test:cancel", round_)
            await wait_until_async(
                lambda r=round_: ("orion:test:cancel", r) in heard, timeout=10, what="the cancel"
            )
            await _blip(listener, admin)
        stop.set()
        await asyncio.wait_for(runner, 10)
    assert heard == [("orion:test:cancel", b"1"), ("orion:test:cancel", b"2")]


async def test_a_channel_left_while_the_subscription_is_on_its_way_is_left_too(
    tmp_path: Path,
) -> None:
    """``leave`` called while a session is still subscribing (a drain that begins during a
    reconnect): Redis is frozen, so the session hangs in its connection's handshake with
    the old list of channels. Once Redis is back, the channel left must not stay
    subscribed for the rest of the drain (it did: ``leave`` saw no subscription to edit)."""
    async with _blips(tmp_path) as (redis, admin, stop):
        server_pid = int(admin.info("server")["process_id"])
        listener = PubSubListener(
            redis, ["orion:test:intake", "orion:test:cancel"], lambda c, d: None
        )
        os.kill(server_pid, signal.SIGSTOP)
        try:
            runner = asyncio.create_task(listener.run(stop))
            await wait_until_async(
                lambda: listener._pubsub is not None, timeout=5, what="a session started"
            )
            await asyncio.sleep(0.1)  # in the handshake, which Redis cannot answer
            assert not listener.subscribed.is_set()
            # It waits for the session, which waits for Redis.
            leaving = asyncio.create_task(listener.leave("orion:test:intake"))
            await asyncio.sleep(0)
        finally:
            os.kill(server_pid, signal.SIGCONT)
        await asyncio.wait_for(leaving, 10)
        await asyncio.wait_for(listener.subscribed.wait(), 10)
        counts = [(b"orion:test:intake", 0), (b"orion:test:cancel", 1)]
        await wait_until_async(
            lambda: admin.pubsub_numsub("orion:test:intake", "orion:test:cancel") == counts,
            timeout=2,
            what="only the cancel channel subscribed",
        )
        stop.set()
        await asyncio.wait_for(runner, 10)


class _HeldAtItsFirstReply(PubSubListener):
    """A listener whose session stops after its SUBSCRIBE's first reply (Redis has it
    subscribed), before it looks for channels left meanwhile: a drain that begins there."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.held = asyncio.Event()
        self.go_on = asyncio.Event()

    async def _first_reply(self, pubsub: Any) -> dict:
        first = await super()._first_reply(pubsub)
        self.held.set()
        await self.go_on.wait()
        return first


async def test_leaving_while_the_subscription_is_on_its_way_waits_for_what_was_sent_before(
    redis_url: str,
) -> None:
    """``leave`` while a session subscribes (a drain that begins during a reconnect): a
    request Redis sent on the channel before the session's UNSUBSCRIBE is handed over
    before ``leave`` returns, as while subscribed. ``leave`` returned at once: the drain
    went on past its inbox and could end before such a request was read, claimed by this
    worker and never answered."""
    heard: list[tuple[str, bytes]] = []
    redis = aioredis.Redis.from_url(redis_url)
    stop = asyncio.Event()
    listener = _HeldAtItsFirstReply(
        redis, ["orion:test:intake", "orion:test:cancel"], lambda c, d: heard.append((c, d))
    )
    runner = asyncio.create_task(listener.run(stop))
    try:
        await asyncio.wait_for(listener.held.wait(), 10)
        assert await redis.publish("orion:test:intake", b"on the wire") == 1

        async def leave() -> list[tuple[str, bytes]]:
            await listener.leave("orion:test:intake")
            return list(heard)  # what was handed over by the time it returned

        leaving = asyncio.create_task(leave())
        await asyncio.sleep(0)  # ``leave`` as far as it goes before the session goes on
        listener.go_on.set()
        assert await asyncio.wait_for(leaving, 10) == [("orion:test:intake", b"on the wire")]
        assert await redis.publish("orion:test:intake", b"after") == 0
        assert await redis.publish("orion:test:cancel", b"kept") == 1
    finally:
        stop.set()
        await asyncio.wait_for(runner, 10)
        await redis.aclose()


async def _blocked_in_xreadgroup(redis: aioredis.Redis) -> bool:
    return bool(await _blocked_readers(redis))


async def _blocked_readers(redis: aioredis.Redis) -> list[str]:
    """The ids of the connections blocked in ``XREADGROUP``."""
    return [
        c["id"]
        for c in await redis.client_list()
        if c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "")
    ]


async def test_a_subscribe_redis_refuses_is_said_and_tried_again_until_it_is_allowed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis refuses the SUBSCRIBE (an ACL user without the intake channel). The listener
    used to end there, without a word, and the worker beat "ready" on, deaf to pub/sub
    for good. Now it says why, at ERROR, and once the ACL lets it, it listens."""
    server = RedisServer(tmp_path / "redis").start()
    admin = SyncRedis.from_url(server.url)
    admin.acl_setuser("worker", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all"])
    admin.execute_command("ACL", "SETUSER", "worker", "resetchannels", "&orion:test:cancel")
    redis = aioredis.Redis.from_url(f"redis://worker:pw@127.0.0.1:{server.port}/0")
    heard: list[bytes] = []
    listener = PubSubListener(
        redis, ["orion:test:intake", "orion:test:cancel"], lambda c, data: heard.append(data)
    )
    stop = asyncio.Event()
    runner = asyncio.create_task(listener.run(stop))
    try:

        def refusals() -> list[str]:
            return [
                r.getMessage()
                for r in caplog.records
                if r.levelno == logging.ERROR and "pub/sub listening failed" in r.getMessage()
            ]

        await wait_until_async(lambda: len(refusals()) >= 2, timeout=10, what="two refusals")
        assert "NoPermissionError" in refusals()[0], refusals()
        assert not runner.done()
        admin.execute_command("ACL", "SETUSER", "worker", "allchannels")
        await wait_until_async(
            lambda: admin.pubsub_numsub("orion:test:intake")[0][1] == 1,
            timeout=10,
            what="the intake subscribed",
        )
        admin.publish("orion:test:intake", b"hello")
        await wait_until_async(lambda: heard == [b"hello"], timeout=5, what="the message heard")
    finally:
        stop.set()
        await asyncio.wait_for(runner, 10)
        await redis.aclose()
        admin.close()
        server.stop()


async def test_a_subscribe_redis_refuses_backs_off_and_is_not_said_to_be_subscribed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The SUBSCRIBE's refusal arrives as its reply, after the session had counted as
    going: "subscribed to ..." was logged and the pause reset to 0.1 s, so a worker whose
    ACL lacks a channel tried ten times a second for good, two log lines each (186 ERROR
    lines in 20 s). The pause now doubles as for any other failure, and no line says it
    subscribed."""
    caplog.set_level(logging.DEBUG, logger="orion_llamaccp.bus.pubsub")
    server = RedisServer(tmp_path / "redis").start()
    admin = SyncRedis.from_url(server.url)
    admin.acl_setuser("worker", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all"])
    admin.execute_command("ACL", "SETUSER", "worker", "resetchannels")
    redis = aioredis.Redis.from_url(f"redis://worker:pw@127.0.0.1:{server.port}/0")
    listener = PubSubListener(redis, ["orion:test:intake"], lambda c, data: None)
    stop = asyncio.Event()
    runner = asyncio.create_task(listener.run(stop))
    try:
        await asyncio.sleep(2.0)
        assert not listener.subscribed.is_set()
    finally:
        stop.set()
        await asyncio.wait_for(runner, 10)
        await redis.aclose()
        admin.close()
        server.stop()
    assert _pauses(caplog, "pub/sub listening failed")[:4] == ["0.1s", "0.2s", "0.4s", "0.8s"]
    assert not [r for r in caplog.records if "subscribed to" in r.getMessage()]


async def test_the_stream_consumer_outlives_an_error_nobody_foresaw(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """What the consumer waits on fails once with an error that is no Redis error (a bug
    in the worker's engine wait, say). The consumer used to end there, the worker beating
    on; it says so and goes on, and the entry is handled."""
    redis = aioredis.Redis.from_url(redis_url)
    events: list[str] = []
    done = asyncio.Event()
    consumer = _consumer(redis, events, done, slots=1)
    failures = [RuntimeError("the engine's state is one nobody expected")]

    async def ready() -> None:
        if failures:
            raise failures.pop()

    consumer.ready = ready
    await consumer.ensure_group()
    await redis.xadd(STREAM, {"n": "0"})
    try:
        await _run_until(consumer, done)
    finally:
        await redis.aclose()
    assert events == ["prepare 0", "handle 0"]
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(said) == 1 and "RuntimeError: the engine's state" in said[0], said
