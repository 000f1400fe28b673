"""The reply writer against a real Redis: the ownership gate, the tail that goes out with
the result in one round trip, and scripts that Redis forgot."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from orion_llamaccp.bus.outbox import ChunkTemplate
from orion_llamaccp.bus.replies import ChunkStream, Publisher, Stage, _tick_after
from tests.support.procs import RedisServer, wait_until_async
from tests.support.workers import BusRecorder

CHANNEL = "orion:test:reply:chunks"
RESULT = "orion:test:reply"


def _stream(
    publisher: Publisher,
    gate: asyncio.Event | None,
    window: float,
    *,
    channel: str = CHANNEL,
    request_id: str = "req-1",
) -> ChunkStream:
    return ChunkStream(
        publisher,
        lambda: ChunkTemplate({"kind": "llm.chat.chunk"}),
        channel=channel,
        request_id=request_id,
        attempt=1,
        coalesce_sec=window,
        gate=gate,
    )


def _seqs_and_text(recorder: BusRecorder) -> tuple[list[int], str]:
    payloads = [m.message["payload"] for m in recorder.on(CHANNEL)]
    return [p["seq"] for p in payloads], "".join(p["delta"] for p in payloads)


async def test_nothing_is_published_before_the_gate_opens(
    redis: aioredis.Redis, recorder: BusRecorder
) -> None:
    gate = asyncio.Event()
    chunks = _stream(Publisher(redis), gate, window=0.0)
    for token in ("a", "b", "c"):
        chunks.push(token)
    await asyncio.sleep(0.3)  # a late chunk would be out by now
    assert recorder.on(CHANNEL) == []
    gate.set()
    await wait_until_async(lambda: len(recorder.on(CHANNEL)) == 3, timeout=5, what="3 chunks")
    assert _seqs_and_text(recorder) == ([0, 1, 2], "abc")
    assert await chunks.finish() == []


async def test_aborted_before_the_gate_publishes_nothing(
    redis: aioredis.Redis, recorder: BusRecorder
) -> None:
    chunks = _stream(Publisher(redis), asyncio.Event(), window=0.01)
    chunks.push("leak")
    await chunks.abort()
    await asyncio.sleep(0.3)  # a late chunk would be out by now
    assert recorder.on(CHANNEL) == []


@pytest.mark.parametrize("window", [0.0, 10.0])
async def test_tail_goes_out_with_the_result_in_order(
    redis: aioredis.Redis, recorder: BusRecorder, window: float
) -> None:
    publisher = Publisher(redis)
    chunks = _stream(publisher, None, window)
    chunks.push("first ")
    await wait_until_async(lambda: recorder.on(CHANNEL), timeout=5, what="first chunk at once")
    for token in ("se", "co", "nd"):
        chunks.push(token)
    tail = await chunks.finish()
    # Coalescing on: the rest waits for its window, so it is all in one tail chunk.
    assert len(tail) == (3 if window == 0 else 1)
    replies = await publisher.commit(
        "result", [*tail, publisher.stage_result(RESULT, "req-1", b'{"done": true}')]
    )
    assert replies[-1] == 1  # one receiver: the recorder
    await wait_until_async(lambda: recorder.on(RESULT), timeout=5, what="result")
    seqs, text = _seqs_and_text(recorder)
    assert text == "first second"
    assert seqs == list(range(len(seqs)))
    order = [m.channel for m in recorder.messages if m.channel in (CHANNEL, RESULT)]
    assert order[-1] == RESULT and order.count(RESULT) == 1


async def test_chunks_of_requests_in_flight_together_share_writes(
    redis: aioredis.Redis, recorder: BusRecorder
) -> None:
    """After its first chunk, a request's chunks leave on a clock that every request
    shares: two requests streaming at different phases send theirs in the same writes."""
    publisher = Publisher(redis)
    channels = [f"{CHANNEL}:{n}" for n in range(2)]
    streams = [
        _stream(publisher, None, 0.05, channel=channel, request_id=f"req-tick-{n}")
        for n, channel in enumerate(channels)
    ]

    async def tokens(chunks: ChunkStream, delay: float) -> None:
        await asyncio.sleep(delay)
        for n in range(30):
            chunks.push(f"{n} ")
            await asyncio.sleep(0.007)

    await asyncio.gather(tokens(streams[0], 0.0), tokens(streams[1], 0.023))
    tails = [await chunks.finish() for chunks in streams]  # not sent: no result follows
    sent = sum(chunks.seq for chunks in streams) - sum(len(tail) for tail in tails)
    await wait_until_async(
        lambda: sum(len(recorder.on(c)) for c in channels) == sent, timeout=5, what="chunks"
    )
    # Each stream's first chunk alone, then both streams' chunks of a tick in one write
    # (with a window per stream, phases 23 ms apart never meet: a write per chunk).
    assert publisher.lane.writes <= sent - 2, (publisher.lane.writes, sent)
    for channel in channels:
        seqs = [m.message["payload"]["seq"] for m in recorder.on(channel)]
        assert seqs == list(range(len(seqs)))


async def test_commit_repeats_nothing_and_survives_a_script_flush(
    redis: aioredis.Redis, recorder: BusRecorder
) -> None:
    publisher = Publisher(redis)
    result = publisher.stage_result(RESULT, "req-2", b'{"n": 1}')
    chunk = publisher.stage_chunk(CHANNEL, "req-2", 1, 0, b'{"payload": {"seq": 0}}')
    await redis.script_flush()  # what a Redis restart does to our scripts
    assert await publisher.commit("result", [chunk, result]) == [1, 1]
    assert await publisher.commit("result", [chunk, result]) == [-2, -1]  # a retry: no-op
    assert len(recorder.on(RESULT)) == 1
    assert len(recorder.on(CHANNEL)) == 1


async def test_a_chunk_sent_again_or_out_of_order_is_not_published(
    redis: aioredis.Redis, recorder: BusRecorder
) -> None:
    """A chunk's commit retried after its reply was lost, or an older ``seq`` after a
    newer one: dropped (-1), never published twice or behind its successor. Only the
    freeze scenario of the fault suite caught a guard that let the same ``seq`` through,
    in 23 s."""
    publisher = Publisher(redis)

    def chunk(seq: int) -> Stage:
        return publisher.stage_chunk(CHANNEL, "req-7", 1, seq, b'{"payload": {"seq": %d}}' % seq)

    assert await publisher.commit("chunk", [chunk(0)]) == [1]
    assert await publisher.commit("chunk", [chunk(0)]) == [-1]  # the same again
    assert await publisher.commit("chunk", [chunk(2), chunk(1)]) == [1, -1]  # 1 after 2
    await wait_until_async(lambda: len(recorder.on(CHANNEL)) == 2, timeout=5, what="chunks")
    assert [m.message["payload"]["seq"] for m in recorder.on(CHANNEL)] == [0, 2]


async def test_no_chunk_goes_out_after_the_result(
    redis: aioredis.Redis, recorder: BusRecorder
) -> None:
    """A sender that outlives its request (a cancel the Redis client swallowed; a worker
    frozen while another answered the request) must not put a chunk after the result,
    whichever attempt it streams."""
    publisher = Publisher(redis)
    first = publisher.stage_chunk(CHANNEL, "req-5", 1, 0, b'{"payload": {"seq": 0}}')
    result = publisher.stage_result(RESULT, "req-5", b'{"n": 5}')
    assert await publisher.commit("result", [first, result]) == [1, 1]
    late = publisher.stage_chunk(CHANNEL, "req-5", 1, 1, b'{"payload": {"seq": 1}}')
    zombie = publisher.stage_chunk(CHANNEL, "req-5", 2, 0, b'{"payload": {"seq": 0}}')
    assert await publisher.commit("chunks", [late, zombie]) == [-2, -2]
    other = publisher.stage_chunk(CHANNEL, "req-6", 1, 0, b'{"payload": {"seq": 0}}')
    assert await publisher.commit("chunk", [other]) == [1]  # another request's still go
    await wait_until_async(lambda: len(recorder.on(CHANNEL)) == 2, timeout=5, what="chunks")
    assert [m.channel for m in recorder.messages] == [CHANNEL, RESULT, CHANNEL]


async def test_a_sender_whose_chunk_is_dropped_as_answered_says_so_and_stops(
    redis: aioredis.Redis, recorder: BusRecorder
) -> None:
    """A worker that woke from a stall after another answered its request: its first
    chunk is dropped by Redis, and the generation is told (``on_answered``) so that it
    stops instead of running to its end for nothing."""
    publisher = Publisher(redis)
    await publisher.commit("result", [publisher.stage_result(RESULT, "req-7", b'{"n": 7}')])
    told: list[str] = []
    chunks = ChunkStream(
        publisher,
        lambda: ChunkTemplate({"kind": "llm.chat.chunk"}),
        channel=CHANNEL,
        request_id="req-7",
        attempt=1,
        coalesce_sec=0.01,
        on_answered=lambda: told.append("answered"),
    )
    chunks.push("stale ")
    await wait_until_async(lambda: told, timeout=5, what="the sender told")
    chunks.push("more ")
    await chunks.abort()
    assert told == ["answered"]
    await asyncio.sleep(0.2)  # a late chunk would be out by now
    assert recorder.on(CHANNEL) == []


async def test_after_a_script_flush_an_ack_never_lands_without_its_result_death_injected(
    redis: aioredis.Redis, recorder: BusRecorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis runs the rest of a command list whose script is missing. The result's list
    ends with plain commands (the stored result, the stream ack; a SET stands in here):
    had its script gone as ``EVALSHA``, a worker that died before loading the scripts
    again would leave the ack done and the result unpublished, an answer lost."""
    publisher = Publisher(redis, retry_for=0)

    async def died_here() -> None:
        raise RedisConnectionError("the worker died before loading the scripts again")

    monkeypatch.setattr(publisher, "_load_scripts", died_here)
    acked = "orion:test:acked-without-result"
    await redis.delete(acked)
    await redis.script_flush()  # what a Redis restart does to our scripts
    chunk = publisher.stage_chunk(CHANNEL, "req-4", 1, 0, b'{"payload": {"seq": 0}}')
    result = publisher.stage_result(RESULT, "req-4", b'{"n": 4}')
    assert await publisher.commit("result", [chunk, result, ("SET", acked, "1")]) == [1, 1, b"OK"]
    await wait_until_async(lambda: recorder.on(RESULT), timeout=5, what="the result")
    assert [m.channel for m in recorder.messages if m.channel in (CHANNEL, RESULT)] == [
        CHANNEL,
        RESULT,
    ]
    await redis.script_flush()
    with pytest.raises(RedisConnectionError):  # chunks alone still go as EVALSHA
        await publisher.commit("chunk", [publisher.stage_chunk(CHANNEL, "req-4", 1, 1, b"{}")])


async def test_a_stream_ack_never_lands_while_redis_refuses_the_result_for_memory(
    tmp_path: Path,
) -> None:
    """Redis at its ``maxmemory`` (``noeviction``) refuses the result script's writes but
    not ``XACK``, which takes no memory: the ack after the result landed while the result
    did not, and the entry was gone unanswered. The ack is now the result guard's: it
    lands with a result, sent now or before, and not without one."""
    server = RedisServer(tmp_path).start()
    client = aioredis.Redis.from_url(server.url)
    try:
        await client.xgroup_create("s", "g", id="0", mkstream=True)
        entry = (await client.xadd("s", {"envelope": "{}"})).decode()
        await client.xreadgroup("g", "c", {"s": ">"})
        publisher = Publisher(client, retry_for=0)
        stages = [
            publisher.stage_result(RESULT, "req-9", b'{"n": 9}'),
            publisher.stage_ack_if_answered(("XACK", "s", "g", entry), "req-9"),
        ]
        await publisher.commit("scripts loaded", [stages[1]])  # not answered: not acked
        await client.config_set("maxmemory-policy", "noeviction")
        await client.config_set("maxmemory", 1)
        with pytest.raises(ResponseError, match="maxmemory"):
            await publisher.commit("result", stages)
        assert (await client.xpending("s", "g"))["pending"] == 1  # left for a redelivery
        await client.config_set("maxmemory", 0)
        assert await publisher.commit("result", stages) == [0, 1]  # published, acked
        assert (await client.xpending("s", "g"))["pending"] == 0
        assert await publisher.commit("result", stages) == [-1, 0]  # a repeat: nothing new
    finally:
        await client.aclose()
        server.stop()


async def test_a_commit_cut_off_mid_round_trip_leaves_no_reply_for_the_next(
    redis: aioredis.Redis, recorder: BusRecorder
) -> None:
    """``commit`` reads its replies off a connection of its own; one cancelled while a
    reply is still on its way must not hand that reply to the next commit."""
    publisher = Publisher(redis)
    slow = ("BLPOP", "orion:test:never-filled", 1)  # a reply that takes a second
    committing = asyncio.create_task(publisher.commit("slow", [slow]))
    await asyncio.sleep(0.2)
    committing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await committing
    chunk = publisher.stage_chunk(CHANNEL, "req-3", 1, 0, b'{"payload": {"seq": 0}}')
    assert await publisher.commit("chunk", [chunk]) == [1]
    await wait_until_async(lambda: len(recorder.on(CHANNEL)) == 1, timeout=5, what="the chunk")
    await publisher.lane.aclose()


async def test_a_chunk_s_seq_guard_is_kept_for_its_attempt_not_a_day(
    redis: aioredis.Redis,
) -> None:
    """The ``seq`` guard of a streamed attempt serves while it streams (after the result
    the answered guard refuses its chunks); kept a day like the guards a redelivery reads,
    it held about 150 bytes a streamed request in the shared Redis for nothing. An hour,
    or twice the worker's request timeout where that is longer; the answered guard still
    a day."""
    for timeout, kept in [(600.0, 3600), (7200.0, 14400)]:
        publisher = Publisher(redis, request_timeout=timeout)
        request = f"req-seq-{int(timeout)}"
        chunk = publisher.stage_chunk(CHANNEL, request, 1, 0, b'{"payload": {"seq": 0}}')
        result = publisher.stage_result(RESULT, request, b'{"n": 1}')
        await publisher.commit("result", [chunk, result])
        assert kept - 5 <= await redis.ttl(f"orion:llamacpp:seq:{request}:1") <= kept
        assert await redis.ttl(f"orion:llamacpp:answered:{request}") > 23 * 3600


async def test_a_request_s_engine_deaths_count_each_death_once_whoever_tells_it(
    redis: aioredis.Redis,
) -> None:
    """Deaths are named (a llama-server of one worker's run, and its life): one told again
    (a command retried after its reply was lost) counts once, and two workers that held
    the same entry at once (one of them stalled) count both of theirs."""
    publisher = Publisher(redis)
    assert await publisher.engine_deaths("req-deaths") == 0
    assert await publisher.engine_deaths("req-deaths", "boot-a:1") == 1
    assert await publisher.engine_deaths("req-deaths", "boot-a:1") == 1
    assert await publisher.engine_deaths("req-deaths", "boot-b:1") == 2
    assert await publisher.engine_deaths("req-deaths") == 2
    assert await redis.ttl("orion:llamacpp:deaths:req-deaths") > 0


@pytest.mark.parametrize("window", [0.004, 0.01, 0.025, 1.0])
def test_the_chunk_after_one_leaves_on_a_shared_tick_half_to_one_and_a_half_windows_later(
    window: float,
) -> None:
    """The bound the guarantees promise: a token that comes just after a chunk left waits
    for the next tick of the shared clock, at least half a window (a timer that fires a
    little early cannot make two chunks in one window) and at most one and a half."""
    for step in range(2000):
        sent = 1000.0 + step * window / 97  # every phase of a window, on a loop's clock
        tick = _tick_after(sent, window)
        assert window / 2 - 1e-9 <= tick - sent <= 1.5 * window + 1e-9, (sent, tick)
        assert abs(tick / window - round(tick / window)) < 1e-6  # on the shared clock
