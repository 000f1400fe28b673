"""Delivery guarantees with several real workers: one answer per request, shared load,
reclaim after a SIGKILL, duplicates generated once, backpressure in Redis."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter

import redis.asyncio as aioredis

from orion_llamaccp.bus import keys
from orion_llamaccp.client import BusClient
from tests.bus.conftest import SpawnWorker
from tests.support.procs import pid_alive, wait_stream_acked, wait_until_async
from tests.support.workers import BusRecorder

HI = [{"role": "user", "content": "hello there"}]
STREAM = "orion:stream:llamacpp:tiny:request"
GROUP = "llamacpp:tiny"


async def _results(recorder: BusRecorder, envelopes: list[dict], timeout: float = 60) -> list:
    await wait_until_async(
        lambda: all(recorder.on(e["reply_to"]) for e in envelopes),
        timeout=timeout,
        what="every request answered",
    )
    await asyncio.sleep(0.5)  # a second answer would arrive now
    return [recorder.on(e["reply_to"]) for e in envelopes]


async def test_two_replicas_on_one_channel_answer_each_request_once(
    spawn_worker: SpawnWorker, bus: BusClient, recorder: BusRecorder
) -> None:
    spawn_worker("r1")
    spawn_worker("r2")
    envelopes = [bus.request(HI, profile="tiny", options={"max_tokens": 4}) for _ in range(12)]
    for envelope in envelopes:
        await bus.send(envelope, profile="tiny")
    answers = await _results(recorder, envelopes)
    assert [len(a) for a in answers] == [1] * 12
    assert all("content" in a[0].message["payload"] for a in answers)


async def test_two_workers_on_one_stream_share_the_load(
    spawn_worker: SpawnWorker, bus: BusClient, recorder: BusRecorder
) -> None:
    spawn_worker("s1", slow=True, parallel=1)
    spawn_worker("s2", slow=True, parallel=1)
    envelopes = [bus.request(HI, profile="tiny", options={"max_tokens": 150}) for _ in range(8)]
    for envelope in envelopes:
        await bus.send(envelope, profile="tiny", via="stream")
    answers = await _results(recorder, envelopes, timeout=90)
    assert [len(a) for a in answers] == [1] * 8
    served_by = Counter(a[0].message["payload"]["meta"]["instance"] for a in answers)
    assert set(served_by) == {"s1", "s2"}, served_by


async def test_sigkilled_worker_entry_is_completed_by_another(
    spawn_worker: SpawnWorker, bus: BusClient, recorder: BusRecorder
) -> None:
    fast_reclaim = {"ORION_LLAMACPP_CLAIM_IDLE_MS": "1500"}
    victim = spawn_worker("victim", slow=True, parallel=1, **fast_reclaim)
    envelope = bus.request(HI, profile="tiny", options={"stream": True, "max_tokens": 3000})
    chat = asyncio.create_task(
        bus.chat(HI, profile="tiny", via="stream", envelope=envelope, timeout=90)
    )
    await wait_until_async(
        lambda: recorder.on(envelope["reply_to"] + ":chunks"),
        timeout=30,
        what="first chunk from the victim",
    )
    engine = victim.engine_pid()
    victim.signal(signal.SIGKILL)
    victim.proc.wait(10)  # type: ignore[union-attr]
    await wait_until_async(
        lambda: not pid_alive(engine),
        timeout=10,
        what="victim's llama-server gone with it (parent-death signal)",
    )
    spawn_worker("rescuer", slow=True, parallel=1, **fast_reclaim)
    result = await chat
    assert result.ok, result.payload
    assert result.payload["meta"]["instance"] == "rescuer"
    assert result.payload["meta"]["attempt"] == 2
    await asyncio.sleep(0.5)
    assert len(recorder.on(envelope["reply_to"])) == 1
    chunks = [m.message["payload"] for m in recorder.on(envelope["reply_to"] + ":chunks")]
    second = [c for c in chunks if c["attempt"] == 2]
    assert [c["seq"] for c in second] == list(range(len(second)))
    assert "".join(c["delta"] for c in second) == result.payload["content"]
    assert result.streamed_text == result.payload["content"]


async def test_duplicate_request_generates_once(
    spawn_worker: SpawnWorker, bus: BusClient, recorder: BusRecorder
) -> None:
    worker = spawn_worker()
    streamed = {"max_tokens": 16, "seed": 7, "stream": True}
    # Unseeded, the tiny model (512 tokens) ends early about once in 150 answers: no EOS,
    # so that every answer counted below is 16 tokens long.
    unseeded = {"max_tokens": 16, "ignore_eos": True}
    first = bus.request(HI, profile="tiny", options=streamed)
    resend = {
        **bus.request(HI, profile="tiny", options=streamed),
        "correlation_id": first["correlation_id"],
    }
    other_question = {
        **bus.request([{"role": "user", "content": "different"}], profile="tiny", options=unseeded),
        "correlation_id": first["correlation_id"],
    }
    keyed = [
        bus.request(
            HI,
            profile="tiny",
            options=unseeded,
            trace={"work": {"idempotency_key": "job-42"}},
        )
        for _ in range(2)
    ]
    for envelope in (first, resend, other_question, *keyed):
        await bus.send(envelope, profile="tiny")
    answers = await _results(recorder, [first, resend, other_question, *keyed])
    payloads = [a[0].message["payload"] for a in answers]
    assert [len(a) for a in answers] == [1] * 5
    assert payloads[1]["content"] == payloads[0]["content"]
    # Either twin may reach Redis first (both start at once); the other is the duplicate.
    twins = [(first, payloads[0]), (resend, payloads[1])]
    (original, _), (duplicate, _) = sorted(twins, key=lambda t: "duplicate_of_key" in t[1]["meta"])
    assert ["duplicate_of_key" in p["meta"] for _, p in twins].count(True) == 1
    # The duplicate's own generation starts before Redis says it is one (to save a round
    # trip): it must be cut off without one chunk reaching its caller.
    assert recorder.on(original["reply_to"] + ":chunks")
    assert recorder.on(duplicate["reply_to"] + ":chunks") == []
    assert "duplicate_of_key" not in payloads[2]["meta"]  # same flow, different question
    assert payloads[4]["content"] == payloads[3]["content"]
    assert ["duplicate_of_key" in p["meta"] for p in payloads[3:]].count(True) == 1
    await asyncio.sleep(1.2)
    beats = [
        m.message["payload"]["details"]
        for m in recorder.kinds("system.health.v1")
        if m.message["payload"]["instance"] == worker.name
    ]
    assert beats[-1]["tokens_generated"] == 16 * 3  # one of each pair, other_question


async def test_backlog_beyond_slots_waits_in_the_stream(
    spawn_worker: SpawnWorker, bus: BusClient, recorder: BusRecorder, redis_url: str
) -> None:
    spawn_worker(slow=True, parallel=1)
    envelopes = [bus.request(HI, profile="tiny", options={"max_tokens": 600}) for _ in range(4)]
    for envelope in envelopes:
        await bus.send(envelope, profile="tiny", via="stream")
    client = aioredis.Redis.from_url(redis_url)
    samples = []
    try:
        while not all(recorder.on(e["reply_to"]) for e in envelopes):
            pending = (await client.xpending(STREAM, GROUP))["pending"]
            samples.append(pending)
            assert pending <= 1, f"{pending} entries delivered to a worker with 1 slot"
            await asyncio.sleep(0.02)
        await wait_stream_acked(client, STREAM, GROUP)
    finally:
        await client.aclose()
    assert max(samples) == 1 and len(samples) > 10


async def test_alone_on_its_channel_it_starts_before_the_claim_and_is_silent_if_it_loses(
    spawn_worker: SpawnWorker, bus: BusClient, recorder: BusRecorder, redis_url: str
) -> None:
    """A worker alone on its channel sends the request to llama-server while its claim is in
    flight. If a replica that joined meanwhile won the claim, not one chunk or result of
    ours may go out, and the worker goes on serving."""
    worker = spawn_worker(parallel=1)
    await asyncio.sleep(2.5)  # it counts the channel's subscribers once per heartbeat (1 s)
    taken = bus.request(HI, profile="tiny", options={"max_tokens": 200, "stream": True})
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.set(keys.claim(taken["id"]), "a-replica-that-just-joined")
    finally:
        await client.aclose()
    await bus.send(taken, profile="tiny")
    await wait_until_async(
        lambda: "went to another replica" in worker.log(),
        timeout=15,
        what="the worker started on the message, then dropped it",
    )
    after = await bus.chat(HI, profile="tiny", options={"max_tokens": 4}, timeout=30)
    assert after.ok, after.payload
    assert recorder.on(taken["reply_to"]) == []
    assert recorder.on(taken["reply_to"] + ":chunks") == []
