"""Redis misbehaves: killed and restarted, frozen, refusing writes, and a caller that never
reads."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest

from tests.faults.conftest import Fault, assert_chunks_whole, assert_exactly_once
from tests.support.procs import free_port, subscribers, wait_stream_acked, wait_until_async

INTAKE = "orion:exec:request:LlamaCppHost:tiny"


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


async def back_on_the_bus(fault: Fault, since: float, beat_within: float) -> None:
    """A heartbeat after ``since``, and the worker subscribed to its intake again."""
    await wait_until_async(
        lambda: [m for m in beats_of(fault, "w") if m.at > since],
        timeout=beat_within,
        what=f"a heartbeat within {beat_within}s",
    )
    await wait_until_async(
        lambda: subscribed(fault, INTAKE), timeout=10, what="the worker subscribed again"
    )


@pytest.mark.parametrize("fault_appendonly", [False, True], ids=["no-persistence", "aof"])
async def test_redis_killed_and_restarted(fault: Fault, hi: list, fault_appendonly: bool) -> None:
    fault.spawn("w")
    await send_batch(fault, hi, streams=2, pubsubs=1)
    assert_exactly_once(await fault.ledger.settle(grace=0.2))
    fault.redis.kill()
    await asyncio.sleep(1.5)  # the worker's calls fail meanwhile
    fault.redis.start()
    restarted = time.monotonic()
    await wait_until_async(fault.recorder.subscribed.is_set, what="recorder back")
    # Heartbeats resume within two intervals (1 s each here).
    await back_on_the_bus(fault, restarted, beat_within=2.5)
    await send_batch(fault, hi, streams=5, pubsubs=3)
    assert_exactly_once(await fault.ledger.settle(timeout=60))
    await wait_stream_acked(fault.raw, "orion:stream:llamacpp:tiny:request", "llamacpp:tiny")


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
    await back_on_the_bus(fault, thawed, beat_within=10)
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
    """The worker's ``orion_llamacpp_slots_busy`` gauge, from its /metrics endpoint (served
    from a thread of its own, so it answers while the event loop waits on Redis)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    line = next(x for x in text.splitlines() if x.startswith("orion_llamacpp_slots_busy{"))
    return float(line.rsplit(" ", 1)[1])


async def test_a_slot_is_free_while_its_result_waits_on_redis(fault: Fault, hi: list) -> None:
    """Redis takes no writes (``CLIENT PAUSE ... WRITE``) when a generation ends: its slot
    is free at once, since llama-server is done with it, while the result waits to be
    published; once Redis takes writes again the result goes out, once."""
    port = free_port()
    fault.spawn("w", slow=True, parallel=1, METRICS_PORT=str(port))
    envelope = fault.ledger.add(
        fault.client.request(
            hi, profile="tiny", options={"stream": True, "max_tokens": 800, "ignore_eos": True}
        )
    )
    await fault.client.send(envelope, profile="tiny")
    await wait_until_async(
        lambda: fault.recorder.on(envelope["reply_to"] + ":chunks"), what="first chunk"
    )
    await fault.raw.client_pause(8000, all=False)  # writes (PUBLISH, EVALSHA) wait
    try:
        assert slots_busy(port) == 1  # about half a second of generation still to go
        await wait_until_async(lambda: slots_busy(port) == 0, timeout=5, what="the slot given back")
        assert fault.ledger.answers(envelope) == []  # the result is still waiting on Redis
    finally:
        await fault.raw.client_unpause()
    assert_exactly_once(await fault.ledger.settle(timeout=30))
    assert fault.ledger.answers(envelope)[0]["payload"]["usage"]["completion_tokens"] == 800
