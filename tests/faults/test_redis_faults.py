"""Redis misbehaves: killed and restarted, frozen, refusing writes (its writes paused, or at
its maxmemory), and a caller that never reads."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from orion_llamaccp.bus import keys
from orion_llamaccp.client import BusClient
from tests.faults.conftest import (
    Fault,
    assert_chunks_whole,
    assert_exactly_once,
    assert_still_serving,
    chunks_of,
)
from tests.support.procs import (
    RedisServer,
    free_port,
    replica_of,
    subscribers,
    wait_stream_acked,
    wait_until_async,
)
from tests.support.proxy import HoldingProxy
from tests.support.workers import WorkerProc, worker_gauge

INTAKE = "orion:exec:request:LlamaCppHost:tiny"
STREAM = "orion:stream:llamacpp:tiny:request"
GROUP = "llamacpp:tiny"


def beats_of(fault: Fault, instance: str) -> list:
    return [
        m
        for m in fault.recorder.on("orion:system:health")
        if m.message["payload"]["instance"] == instance
    ]


async def send_batch(
    fault: Fault, hi: list, *, streams: int, pubsubs: int, max_tokens: int = 8
) -> list[dict]:
    sent = []
    for i in range(streams + pubsubs):
        envelope = fault.ledger.add(
            fault.client.request(hi, profile="tiny", options={"max_tokens": max_tokens})
        )
        await fault.client.send(envelope, profile="tiny", via="stream" if i < streams else "pubsub")
        sent.append(envelope)
    return sent


async def subscribed(fault: Fault, channel: str) -> bool:
    return await subscribers(fault.raw, channel) >= 1


async def back_on_the_bus(fault: Fault, since: float, timeout: float = 30) -> None:
    """A heartbeat recorded after ``since``, and the worker subscribed to its intake again.
    ``timeout`` is only how long to wait for them, not a property under test."""
    await wait_until_async(
        lambda: [m for m in beats_of(fault, "w") if m.at > since],
        timeout=timeout,
        what="a heartbeat after the restart",
    )
    await wait_until_async(
        lambda: subscribed(fault, INTAKE), timeout=timeout, what="the worker subscribed again"
    )


async def group_state(fault: Fault) -> tuple[int, int, int]:
    """(entries in the stream, pending in the worker's group, never read by the group)."""
    groups = await fault.raw.xinfo_groups(STREAM)
    mine = [g for g in groups if g["name"] in (GROUP, GROUP.encode())]
    assert mine, groups
    return await fault.raw.xlen(STREAM), mine[0]["pending"], mine[0]["lag"]


@pytest.mark.parametrize("fault_appendonly", [False, True], ids=["no-persistence", "aof"])
async def test_redis_killed_and_restarted(fault: Fault, hi: list, fault_appendonly: bool) -> None:
    """Redis is SIGKILLed while one stream entry is being generated (pending) and three wait
    unread behind it (one slot). With AOF (appendonly yes, appendfsync everysec, the
    default: a killed process loses nothing it acknowledged, the kernel has it) all four
    are answered exactly once, successfully. Without persistence the three unread ones
    are gone with Redis and never answered, and the one in hand is still answered, once.
    Either way the worker comes back by itself and serves both intakes."""
    # A frozen llama-server is noticed after three /health polls of 5 s here, far beyond
    # the outage below; this test is not about that.
    worker = fault.spawn("w", slow=True, parallel=1, ORION_LLAMACPP_HEALTH_TIMEOUT_SEC="5")
    engine = worker.engine_pid()
    generating = fault.ledger.add(
        fault.client.request(
            hi, profile="tiny", options={"stream": True, "max_tokens": 1000, "ignore_eos": True}
        )
    )
    await fault.client.send(generating, profile="tiny", via="stream")
    await wait_until_async(
        lambda: fault.recorder.on(generating["reply_to"] + ":chunks"), what="first chunk"
    )
    # Still generating when Redis and the recorder are back, so that the recorder hears
    # its answer, on any machine: llama-server is frozen through the outage. (A length
    # did it before: 8,000 tokens outlasted the outage on a fast VM, where 3,000 did not,
    # and ran past the 120 s wait below on a VM three times slower.)
    os.kill(engine, signal.SIGSTOP)
    waiting = [
        fault.client.request(
            hi, profile="tiny", options={"stream": True, "max_tokens": 200, "ignore_eos": True}
        )
        for _ in range(3)
    ]
    for envelope in waiting:
        if fault_appendonly:  # without persistence they are lost: not counted as sent
            fault.ledger.add(envelope)
        await fault.client.send(envelope, profile="tiny", via="stream")
    # The scenario itself: one entry pending, three never read, nothing answered yet.
    assert await group_state(fault) == (4, 1, 3)
    assert fault.ledger.answers(generating) == []
    fault.redis.kill()
    await asyncio.sleep(1.5)  # the worker's calls fail meanwhile
    fault.redis.start()
    restarted = time.monotonic()
    try:
        await wait_until_async(fault.recorder.subscribed.is_set, what="recorder back")
    finally:
        os.kill(engine, signal.SIGCONT)
    await back_on_the_bus(fault, restarted)
    assert_exactly_once(await fault.ledger.settle(timeout=120))
    for envelope in [generating, *waiting] if fault_appendonly else [generating]:
        answer = fault.ledger.answers(envelope)[0]["payload"]
        assert "error" not in answer, answer
        wanted = envelope["payload"]["options"]["max_tokens"]
        assert answer["usage"]["completion_tokens"] == wanted, answer
    if fault_appendonly:
        for envelope in waiting:  # generated after the restart: every chunk was heard
            assert_chunks_whole(fault, envelope, fault.ledger.answers(envelope)[0]["payload"])
    else:
        assert (await fault.raw.xlen(STREAM)) == 0  # Redis really lost every entry
    # Chunks of the entry in hand during the outage may have gone out before the recorder
    # was back; none may go out twice.
    keys = [(c["attempt"], c["seq"]) for c in chunks_of(fault, generating)]
    assert len(keys) == len(set(keys)), keys
    await send_batch(fault, hi, streams=5, pubsubs=3)
    assert_exactly_once(await fault.ledger.settle(timeout=60))
    await wait_stream_acked(fault.raw, STREAM, GROUP)
    if not fault_appendonly:
        # The worker has served eight requests since: the lost ones are not merely late.
        assert [fault.ledger.answers(e) for e in waiting] == [[], [], []]


async def test_redis_frozen_longer_than_socket_timeouts(fault: Fault, hi: list) -> None:
    worker = fault.spawn("w", slow=True)
    streaming = [
        fault.ledger.add(
            fault.client.request(hi, profile="tiny", options={"stream": True, "max_tokens": 3000})
        )
        for _ in range(2)
    ]
    await fault.client.send(streaming[0], profile="tiny")
    await fault.client.send(streaming[1], profile="tiny", via="stream")
    for envelope in streaming:
        await wait_until_async(
            lambda e=envelope: fault.recorder.on(e["reply_to"] + ":chunks"),
            timeout=30,
            what="first chunk",
        )
    fault.redis.freeze()
    await asyncio.sleep(5)  # > socket timeout (2 s) and > pub/sub ping timeout (1.5 s)
    fault.redis.thaw()
    thawed = time.monotonic()
    # Pub/sub is at-most-once while Redis is unreachable: a caller publishing before the
    # worker's new SUBSCRIBE is processed would not be heard, so wait for it (and a beat).
    await back_on_the_bus(fault, thawed)
    await send_batch(fault, hi, streams=2, pubsubs=2)
    assert_exactly_once(await fault.ledger.settle(timeout=90))
    for envelope in streaming:
        assert_chunks_whole(fault, envelope, fault.ledger.answers(envelope)[0]["payload"])
    assert "no answer to PING on the pub/sub connection" in worker.log()


@pytest.mark.parametrize(
    "fault_redis_args", [("--client-output-buffer-limit", "pubsub 64kb 32kb 2")]
)
async def test_slow_caller_that_never_reads_its_chunks(fault: Fault, hi: list) -> None:
    worker = fault.spawn("w", ORION_LLAMACPP_COALESCE_MS="0")
    # A subscriber to every chunk channel that never reads: a tiny receive buffer, so
    # Redis's pub/sub output buffer limit (64 kB here) is what fills up.
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", fault.redis.port))
    pattern = "orion:llamacpp:reply:*:chunks"
    slow.sendall(
        b"*3\r\n$6\r\nCLIENT\r\n$7\r\nSETNAME\r\n$8\r\nslowpoke\r\n"
        + f"*2\r\n$10\r\nPSUBSCRIBE\r\n${len(pattern)}\r\n{pattern}\r\n".encode()
    )

    async def slowpoke_connected() -> bool:
        return any(c.get("name") == "slowpoke" for c in await fault.raw.client_list())

    try:
        await wait_until_async(slowpoke_connected, what="slow subscriber")
        results = await asyncio.gather(
            *(
                fault.client.chat(
                    hi,
                    profile="tiny",
                    envelope=fault.ledger.add(
                        fault.client.request(
                            hi,
                            profile="tiny",
                            options={"stream": True, "max_tokens": 4000, "ignore_eos": True},
                        )
                    ),
                    timeout=120,
                )
                for _ in range(4)
            )
        )
        assert all(r.ok for r in results), [r.payload for r in results]
        await wait_until_async(
            lambda: _not(slowpoke_connected), timeout=10, what="Redis to drop the slow subscriber"
        )
        for _ in range(3):  # the worker keeps serving
            await send_batch(fault, hi, streams=1, pubsubs=1)
        assert_exactly_once(await fault.ledger.settle(timeout=60))
        assert worker.proc is not None and worker.proc.poll() is None
    finally:
        slow.close()


async def _not(check) -> bool:
    return not await check()


def slots_busy(port: int) -> float:
    return worker_gauge(port, "orion_llamacpp_slots_busy")


SLOT_TOKENS = 3000  # about 2 s on the slow model


async def test_a_slot_is_free_while_its_result_waits_on_redis(fault: Fault, hi: list) -> None:
    """Redis takes no writes (``CLIENT PAUSE ... WRITE``) when a generation ends: its slot
    is free at once, since llama-server is done with it, while the result waits to be
    published; once Redis takes writes again the result goes out, once."""
    port = free_port()
    worker = fault.spawn("w", slow=True, parallel=1, METRICS_PORT=str(port))
    envelope = fault.ledger.add(
        fault.client.request(
            hi,
            profile="tiny",
            options={"stream": True, "max_tokens": SLOT_TOKENS, "ignore_eos": True},
        )
    )
    # llama-server held still until Redis takes no writes, so that the generation ends
    # after the pause however fast this machine runs it (held for milliseconds: well
    # under the supervisor's silence watchdog)
    engine = worker.engine_pid()
    os.kill(engine, signal.SIGSTOP)
    try:
        await fault.client.send(envelope, profile="tiny")
        owned = keys.dedup("tiny", "*")  # the running marker: claimed, about to generate
        await wait_until_async(lambda: fault.raw.keys(owned), what="the request owned")
        await fault.raw.client_pause(60_000, all=False)  # writes (PUBLISH, EVALSHA) wait
        assert slots_busy(port) == 1
    finally:
        os.kill(engine, signal.SIGCONT)
    try:
        await wait_until_async(
            lambda: slots_busy(port) == 0, timeout=45, what="the slot given back"
        )
        assert fault.ledger.answers(envelope) == []  # the result is still waiting on Redis
    finally:
        await fault.raw.client_unpause()
    assert_exactly_once(await fault.ledger.settle(timeout=30))
    assert fault.ledger.answers(envelope)[0]["payload"]["usage"]["completion_tokens"] == SLOT_TOKENS


@pytest.mark.parametrize("request_kind", ["served", "malformed"])
async def test_a_request_redis_refuses_to_record_is_logged_and_answered_at_redelivery(
    fault: Fault, hi: list, request_kind: str
) -> None:
    """Redis at its ``maxmemory`` (``noeviction``) refuses writes while the worker serves a
    stream request it has read. A valid one: the refused idempotency record was taken for
    a bug (a traceback, an ``internal_error``). A malformed one: its failure's answer was
    refused too, and ``fail`` raised out of ``handle``, reported by asyncio only as a task
    exception never retrieved, the request not named. The log names the request now,
    without a traceback; the entry stays pending, and once Redis takes writes again its
    redelivery is answered, once."""
    worker = fault.spawn("w", ORION_LLAMACPP_CLAIM_IDLE_MS="1500")
    if request_kind == "served":  # read, and then Redis refuses writes, before it is served
        due = time.time() + 5.0
        trace = {"work": {"not_before_ms": int(due * 1000)}}
        request = fault.client.request(hi, profile="tiny", options={"max_tokens": 4}, trace=trace)
    else:  # refused as it is read: read only once Redis refuses writes (XREADGROUP is let be)
        request = fault.client.request(hi, profile="tiny", options={"max_tokens": "lots"})
        os.kill(worker.pid, signal.SIGSTOP)
    envelope = fault.ledger.add(request)
    try:
        await fault.client.send(envelope, profile="tiny", via="stream")
        if request_kind == "served":
            await wait_until_async(
                lambda: _pending_is(fault, 1), timeout=10, what="the entry read by the worker"
            )
        await _refuse_writes(fault)
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    said = "Redis unavailable" if request_kind == "served" else "could not be sent"
    await _refused_then_lifted(fault, worker, said, envelope, timeout=30)
    assert_exactly_once(await fault.ledger.settle(timeout=30))
    [answer] = fault.ledger.answers(envelope)
    if request_kind == "served":
        assert "content" in answer["payload"], answer
    else:
        assert answer["payload"]["error"] == "validation_failed", answer
        assert await fault.raw.xlen(f"{STREAM}:dlq") == 1
    # Each delivery refused says so (a loaded VM may reclaim the entry before the limit is
    # lifted), naming the request.
    lines = [x for x in worker.log().splitlines() if said in x]
    assert lines and all(envelope["id"] in x for x in lines), lines
    log = worker.log()
    assert "Traceback" not in log and "never retrieved" not in log, log[-3000:]
    await wait_stream_acked(fault.raw, STREAM, GROUP)


async def test_a_result_redis_refuses_leaves_its_stream_entry_pending(
    fault: Fault, hi: list
) -> None:
    """Redis reaches its ``maxmemory`` (``noeviction``) while a stream request generates:
    its result is refused, and the entry must stay pending, to be answered at its
    redelivery. An XACK is no write Redis refuses at its limit: sent beside the result
    unconditionally, it would drop the entry unanswered (the ack goes only where the
    result's guard says it went out, ``ACK_IF_ANSWERED``; no test held the worker to it)."""
    port = free_port()
    worker = fault.spawn(
        "w", slow=True, parallel=1, METRICS_PORT=str(port), ORION_LLAMACPP_CLAIM_IDLE_MS="1500"
    )
    options = {"max_tokens": SLOT_TOKENS, "ignore_eos": True}  # no chunks: the result alone
    envelope = fault.ledger.add(fault.client.request(hi, profile="tiny", options=options))
    engine = worker.engine_pid()
    os.kill(engine, signal.SIGSTOP)  # the generation ends after the limit, however fast
    try:
        await fault.client.send(envelope, profile="tiny", via="stream")
        owned = keys.dedup("tiny", "*")  # the running marker: claimed, about to generate
        await wait_until_async(lambda: fault.raw.keys(owned), what="the request owned")
        await _refuse_writes(fault)
    finally:
        os.kill(engine, signal.SIGCONT)
    await _refused_then_lifted(fault, worker, "Redis unavailable", envelope, timeout=45)
    assert_exactly_once(await fault.ledger.settle(timeout=45))
    [answer] = fault.ledger.answers(envelope)
    assert answer["payload"]["usage"]["completion_tokens"] == SLOT_TOKENS, answer
    await wait_stream_acked(fault.raw, STREAM, GROUP)


async def _pending_is(fault: Fault, count: int) -> bool:
    return (await group_state(fault))[1] == count


async def _refuse_writes(fault: Fault) -> None:
    """Redis at its ``maxmemory`` (``noeviction``): it refuses every write from now on."""
    await fault.raw.config_set("maxmemory-policy", "noeviction")
    await fault.raw.config_set("maxmemory", 1)


async def _refused_then_lifted(
    fault: Fault, worker: WorkerProc, said: str, envelope: dict, *, timeout: float
) -> None:
    """Once the worker logs ``said`` (the refusal), ``envelope`` is unanswered and its
    entry pending; then Redis takes writes again, whatever the checks found."""
    try:
        await wait_until_async(
            lambda: said in worker.log(), timeout=timeout, what="the refusal logged"
        )
        assert fault.ledger.answers(envelope) == []
        assert await _pending_is(fault, 1)
    finally:
        await fault.raw.config_set("maxmemory", 0)


async def test_a_failover_behind_the_bus_address_is_followed(
    fault: Fault, hi: list, tmp_path: Path
) -> None:
    """A managed Redis's failover: the replica is promoted and the address moves to it,
    while the connections already open stay with the old primary, a replica now. Every
    write on them was refused (READONLY), and redis-py kept using them: claims, results
    and stream reads failed for good, and nothing was answered until a restart. The
    address moves a little after the demotion here: the pub/sub connection, made again
    meanwhile, reached the old primary, where it heard requests through the replica while
    callers' PUBLISH on the new one counted no subscriber."""
    standby = RedisServer(tmp_path / "standby").start()
    proxy = HoldingProxy(fault.redis.port).start()  # the address: new connections follow it
    old, new = fault.raw, aioredis.Redis.from_url(standby.url)
    options = {"max_tokens": 2}
    try:
        await replica_of(new, fault.redis)
        worker = fault.spawn("w", ORION_BUS_URL=proxy.url)
        for via in ("stream", "pubsub"):
            before = await fault.client.chat(hi, profile="tiny", via=via, options=options)
            assert before.ok, before.payload

        await new.replicaof("NO", "ONE")
        await replica_of(old, standby)
        await wait_until_async(  # its next beat met the demoted primary
            lambda: "was replaced (a failover)" in worker.log(), timeout=30, what="READONLY"
        )
        # The address moves a second later: the pub/sub connection made again meanwhile
        # reached the old primary (with the fix, it tries again until a primary answers).
        await asyncio.sleep(1.0)
        proxy.upstream_port = standby.port

        async def on_the_new_primary() -> bool:
            return await subscribers(new, INTAKE) >= 1

        await wait_until_async(on_the_new_primary, timeout=30, what="subscribed there")

        async with BusClient(proxy.url) as caller:  # the callers follow the address too
            for via in ("stream", "pubsub"):
                after = await caller.chat(hi, profile="tiny", via=via, options=options, timeout=60)
                assert after.ok, (via, after.payload)
    finally:
        proxy.close()
        await new.aclose()
        standby.stop()


@pytest.mark.parametrize("fault_appendonly", [True], ids=["aof"])
@pytest.mark.parametrize("back", [False, True], ids=["redis-away", "redis-back-in-the-drain"])
async def test_a_sigterm_while_the_listener_reconnects_stops_in_time_and_loses_no_entry(
    fault: Fault, hi: list, fault_appendonly: bool, back: bool
) -> None:
    """Redis goes away (killed) with a stream entry and a pub/sub request generating, and
    the worker is told to stop while its listener tries to reconnect. It drains within
    its drain timeout and the bounded steps after it, and exits 0, without a traceback.
    The stream entry is left pending, not lost: with Redis back in the drain, handed back
    (another worker takes it at once, the claim idle time being 10 minutes), else taken
    by the next worker under its name as it starts. The pub/sub request may go
    unanswered (Redis was away), never answered twice. Back in the drain, the listener
    subscribes to the cancel channel again, not to the intake the drain has left."""
    drain = 4
    worker = fault.spawn("w", slow=True, parallel=2, ORION_LLAMACPP_DRAIN_TIMEOUT_SEC=str(drain))
    options = {"stream": True, "max_tokens": 12000, "ignore_eos": True}
    entry = fault.ledger.add(fault.client.request(hi, profile="tiny", options=options))
    heard = fault.client.request(hi, profile="tiny", options=options)
    await fault.client.send(entry, profile="tiny", via="stream")
    assert await fault.client.send(heard, profile="tiny", via="pubsub") == 1
    for envelope in (entry, heard):
        await wait_until_async(lambda e=envelope: chunks_of(fault, e), what="a chunk of each")
    fault.redis.kill()
    await wait_until_async(
        lambda: "pub/sub connection lost" in worker.log(), timeout=15, what="the listener away"
    )
    worker.signal(signal.SIGTERM)
    if back:
        await asyncio.sleep(1.0)
        fault.redis.start()
    assert worker.proc is not None
    # Stopped by the drain's deadline, not by the end of the requests (12,000 tokens
    # each, some 17 s at the slow model's pace); the wait's bound is a safety net only.
    code = await asyncio.to_thread(worker.proc.wait, 60)
    log = worker.log()
    assert code == 0, log[-3000:]
    assert "the drain's time is up: cutting off 2 requests" in log, log[-3000:]
    assert "Traceback" not in log, log
    if back:
        resubscribed = [line for line in log.splitlines() if "subscribed to" in line][-1]
        assert INTAKE not in resubscribed and "orion:llamacpp:cancel" in resubscribed, log
        assert "left 1 stream entries to another worker" in log, log
    else:
        fault.redis.start()
    await wait_until_async(fault.recorder.subscribed.is_set, what="the recorder back")
    fault.spawn("w2" if back else "w", slow=True, parallel=2)
    assert_exactly_once(await fault.ledger.settle(timeout=180))
    answer = fault.ledger.answers(entry)[0]["payload"]
    assert "error" not in answer, answer
    assert len(fault.ledger.answers(heard)) <= 1
    await wait_stream_acked(fault.raw, STREAM, GROUP)


async def test_a_stop_with_redis_hung_gives_up_its_goodbyes_within_one_budget(
    fault: Fault, hi: list
) -> None:
    """Redis frozen (alive, answering nothing) as the worker stops with a stream entry in
    flight. Each of the stop's round trips to Redis (the draining beat, the hand-back,
    the last beat and announcement, the liveness key) waited out its own bound in turn:
    10 s more than the drain here, up to 21 s with the defaults. Bounded together now, the
    stop gives up what the budget does not cover, and its log says which. Nothing is
    lost: the entry, not handed back, stays pending under the worker's name and another
    worker takes it after the claim idle time. A stop on a healthy Redis gives up none.
    A pub/sub request cut off beside it: its answer, cut off too, is not said to be a
    request that ignored its cancel, and does not hold the exit (its publish retried as
    long as an outage is, since the cancel came back as the read's timeout)."""
    worker = fault.spawn("w", slow=True, ORION_LLAMACPP_DRAIN_TIMEOUT_SEC="2")
    options = {"stream": True, "max_tokens": 6000, "ignore_eos": True}
    entry = fault.ledger.add(fault.client.request(hi, profile="tiny", options=options))
    await fault.client.send(entry, profile="tiny", via="stream")
    # Beside it, one whose cut-off answer is a round trip the budget cannot cover.
    heard = fault.client.request(hi, profile="tiny", options=options)
    assert await fault.client.send(heard, profile="tiny", via="pubsub") == 1
    for envelope in (entry, heard):
        await wait_until_async(lambda e=envelope: chunks_of(fault, e), what="a chunk of each")
    fault.redis.freeze()
    worker.signal(signal.SIGTERM)
    assert worker.proc is not None
    code = await asyncio.to_thread(worker.proc.wait, 60)  # a safety net, not under test
    fault.redis.thaw()
    log = worker.log()
    assert code == 0, log[-3000:]
    assert "Traceback" not in log, log
    gave_up = [line for line in log.splitlines() if "Redis did not answer the stop's" in line]
    assert len(gave_up) == 1, log[-3000:]
    # The last of them, whatever Redis took the budget on before it.
    assert gave_up[0].endswith("removing the liveness key)"), gave_up
    # Their answers waited on Redis, not on requests that ignored their cancel.
    assert "the answers of the requests cut off" in gave_up[0], gave_up
    assert "did not stop when cancelled" not in log, log[-3000:]
    pending = await fault.raw.xpending(STREAM, GROUP)
    assert pending["pending"] == 1 and pending["consumers"][0]["name"] == b"w", pending
    other = fault.spawn("w2", slow=True, ORION_LLAMACPP_CLAIM_IDLE_MS="1500")
    assert_exactly_once(await fault.ledger.settle(timeout=120))
    assert "error" not in fault.ledger.answers(entry)[0]["payload"]
    await wait_stream_acked(fault.raw, STREAM, GROUP)
    assert other.terminate() == 0
    assert "Redis did not answer the stop's" not in other.log(), other.log()[-3000:]
    assert not await fault.raw.exists(keys.liveness("orion-llamaccp", "w2"))  # its farewell


async def test_redis_hung_as_the_drain_begins_and_back_before_its_deadline_costs_no_goodbye(
    fault: Fault, hi: list
) -> None:
    """Redis frozen as the worker is told to stop, for longer than the stop's goodbyes'
    5 s, and back well before the drain's deadline. The draining beat waited on it at the
    drain's start, on the drain's own time: it used to spend the whole budget there, and
    everything after was given up with Redis answering again: the requests the deadline
    cut off were not waited for (said "did not stop when cancelled"), and the stream
    entry, not handed back, waited out the claim idle time (10 minutes) for another
    worker. Now the drain's time is the drain's: the budget is for what comes past it."""
    drain = 10
    worker = fault.spawn(
        "w",
        slow=True,
        parallel=2,
        ORION_LLAMACPP_DRAIN_TIMEOUT_SEC=str(drain),
        # Above the budget: the beat waits on the frozen Redis until the budget, not its
        # socket, gives up (the default, 5 s, is the budget's to the millisecond).
        ORION_LLAMACPP_REDIS_SOCKET_TIMEOUT_SEC="8",
    )
    options = {"stream": True, "max_tokens": 12000, "ignore_eos": True}
    entry = fault.ledger.add(fault.client.request(hi, profile="tiny", options=options))
    heard = fault.ledger.add(fault.client.request(hi, profile="tiny", options=options))
    await fault.client.send(entry, profile="tiny", via="stream")
    assert await fault.client.send(heard, profile="tiny", via="pubsub") == 1
    for envelope in (entry, heard):
        await wait_until_async(lambda e=envelope: chunks_of(fault, e), what="a chunk of each")
    fault.redis.freeze()
    worker.signal(signal.SIGTERM)
    await asyncio.sleep(6.5)  # past the 5 s budget, well before the drain's deadline
    fault.redis.thaw()
    assert worker.proc is not None
    code = await asyncio.to_thread(worker.proc.wait, 60)  # a safety net, not under test
    log = worker.log()
    assert code == 0, log[-3000:]
    assert "the drain's time is up: cutting off 2 requests" in log, log[-3000:]
    assert "did not stop when cancelled" not in log, log[-3000:]
    assert "Redis did not answer the stop's" not in log, log[-3000:]
    assert "left 1 stream entries to another worker" in log, log[-3000:]
    fault.spawn("w2", slow=True, parallel=2)  # the claim idle time: 10 minutes
    assert_exactly_once(await fault.ledger.settle(timeout=120))
    assert "error" not in fault.ledger.answers(entry)[0]["payload"]
    assert fault.ledger.answers(heard)[0]["payload"]["error"] == "engine_unavailable"
    await wait_stream_acked(fault.raw, STREAM, GROUP)


async def written_to_subscribers(fault: Fault) -> bool:
    """Every pub/sub message Redis took is on its subscribers' sockets, none in its own
    output buffers (where a frozen Redis would keep it)."""
    clients = await fault.raw.client_list(_type="pubsub")
    return all(int(client["omem"]) == 0 for client in clients)


async def test_a_stop_with_redis_hung_cuts_off_a_full_inbox_at_the_drain_s_deadline(
    fault: Fault, hi: list
) -> None:
    """Redis frozen as a worker stops with hundreds of pub/sub requests in its inbox and
    its overflow. The drain went through all of them whatever its deadline, each claim
    waiting out its socket timeout and retries on the hung Redis, 128 at a time: minutes
    past the deadline with a full inbox (a platform's grace period is sized for the
    deadline). They are cut off at the deadline now, unanswered (the bus answers nothing
    anyway), and the log says how many."""
    worker = fault.spawn(
        "w",
        ORION_LLAMACPP_DRAIN_TIMEOUT_SEC="2",
        # Over the 128 claims on their way at once, where the drain's loop waits.
        ORION_LLAMACPP_INBOX_SIZE="200",
        # Claims hung on Redis until the worker is gone: the inbox is not emptied by
        # claims failing one round after the other before the drain gets to it.
        ORION_LLAMACPP_REDIS_SOCKET_TIMEOUT_SEC="30",
        # Stopped a while, it reads on where a PING timeout would have dropped the
        # connection and the messages waiting on it.
        ORION_LLAMACPP_PUBSUB_PING_SEC="5",
    )
    assert worker.proc is not None
    os.kill(worker.pid, signal.SIGSTOP)  # the requests wait on its socket, unread
    try:
        # 200 for the inbox, the rest for its overflow: about 400 kB that wait on the
        # socket of a stopped worker (1.9 MB fitted on the VMs here).
        for _ in range(600):
            envelope = fault.client.request(hi, profile="tiny", options={"max_tokens": 1})
            assert await fault.client.send(envelope, profile="tiny") == 1
        await wait_until_async(lambda: written_to_subscribers(fault), what="all on its socket")
        fault.redis.freeze()
        worker.signal(signal.SIGTERM)
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    try:
        code = await asyncio.to_thread(worker.proc.wait, 60)  # a safety net, not under test
    finally:
        fault.redis.thaw()
    log = worker.log()
    assert code == 0, log[-3000:]
    cut = re.findall(
        r"the drain's time is up: (\d+) pub/sub messages left unanswered in the inbox "
        r"and (\d+) in its overflow",
        log,
    )
    assert len(cut) == 1, log[-3000:]
    unread, overflow = map(int, cut[0])
    assert unread > 0 and overflow > 0, cut


async def test_a_second_sigterm_cuts_the_drain_s_goodbyes_short_with_redis_hung(
    fault: Fault, hi: list
) -> None:
    """Redis frozen as a worker is told to stop, then told again while its draining beat
    waits on Redis. The second signal cut short the requests the drain waited for, not
    the drain's first round trips to Redis (the draining beat, leaving the intake channel,
    giving back the answered claims): each waited out its own bound before the worker
    went on, here the beat's socket timeout, two minutes. They are cut off at once now;
    the stop's goodbyes after the drain keep their budget."""
    worker = fault.spawn(
        "w",
        ORION_LLAMACPP_DRAIN_TIMEOUT_SEC="600",
        ORION_LLAMACPP_REDIS_SOCKET_TIMEOUT_SEC="120",  # the beat's own bound
    )
    assert worker.proc is not None
    fault.redis.freeze()
    try:
        worker.signal(signal.SIGTERM)
        # Logged by the drain in the step that sends its draining beat.
        await wait_until_async(
            lambda: "-> draining" in worker.log(), timeout=30, what="the drain begun"
        )
        worker.signal(signal.SIGTERM)
        code = await asyncio.to_thread(worker.proc.wait, 60)  # a safety net, not under test
    finally:
        fault.redis.thaw()
    log = worker.log()
    assert code == 0, log[-3000:]
    lines = log.splitlines()

    def first(text: str) -> int:
        return next(i for i, line in enumerate(lines) if text in line)

    assert log.count("told to stop again: cutting the drain short") == 1, log[-3000:]
    cut, not_given = first("cutting the drain short"), first("answered claims not given back")
    assert first("-> draining") < cut < not_given, log[-3000:]
    assert lines[not_given].endswith("told to stop again"), lines[not_given]
    # Cut by the operator, not given up on Redis: the log does not blame it.
    assert "the draining beat" not in log and "leaving the intake" not in log, log[-3000:]


async def test_a_claim_redis_never_answers_is_one_warning_and_the_worker_serves_on(
    fault: Fault, hi: list
) -> None:
    """A pub/sub request read while Redis hangs: its claim gives up after its retries and
    the request stays unanswered (an answer without the claim could be a replica's
    second). That was logged as a traceback a request, hundreds in a flood; now one
    line that says why, and the worker serves on once Redis is back. The first request
    takes the one slot before its claim (alone on the channel); the second waits for its
    claim, the path under test."""
    worker = fault.spawn("w", parallel=1)
    assert worker.proc is not None
    os.kill(worker.pid, signal.SIGSTOP)  # the requests wait on its socket, unread
    try:
        sent = [fault.client.request(hi, profile="tiny", options={"max_tokens": 1}) for _ in "ab"]
        for envelope in sent:
            assert await fault.client.send(envelope, profile="tiny") == 1
        await wait_until_async(lambda: written_to_subscribers(fault), what="on its socket")
        fault.redis.freeze()
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    try:
        await wait_until_async(
            lambda: "not claimed" in worker.log() or "could not be handled" in worker.log(),
            timeout=60,
            what="the claim given up",
        )
    finally:
        thawed = time.monotonic()
        fault.redis.thaw()
    await back_on_the_bus(fault, thawed)
    await assert_still_serving(fault)
    log = worker.log()
    said = "not claimed, left unanswered: Redis unavailable (TimeoutError: Timeout reading"
    assert log.count(said) == 1, log[-3000:]
    assert f"pub/sub request {sent[1]['id']} {said}" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert fault.ledger.answers(sent[1]) == []
