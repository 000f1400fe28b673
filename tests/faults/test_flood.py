"""A flood: ten times more durable requests than slots, two workers."""

from __future__ import annotations

import asyncio

import psutil

from tests.faults.conftest import Fault, assert_exactly_once

STREAM = "orion:stream:llamacpp:tiny:request"
GROUP = "llamacpp:tiny"


async def test_flood_of_stream_requests(fault: Fault, hi: list) -> None:
    workers = [fault.spawn(name, slow=True, parallel=1) for name in ("a", "b")]
    slots = 2
    warm = [
        fault.ledger.add(fault.client.request(hi, profile="tiny", options={"max_tokens": 20}))
        for _ in range(2)
    ]
    for envelope in warm:
        await fault.client.send(envelope, profile="tiny", via="stream")
    await fault.ledger.settle(grace=0.1)
    rss_before = [psutil.Process(w.pid).memory_info().rss for w in workers]

    flood = [
        fault.ledger.add(
            fault.client.request(hi, profile="tiny", options={"max_tokens": 60, "ignore_eos": True})
        )
        for _ in range(10 * slots)
    ]
    for envelope in flood:
        await fault.client.send(envelope, profile="tiny", via="stream")
    most_pending = 0
    while any(not fault.ledger.answers(e) for e in flood):
        pending = (await fault.raw.xpending(STREAM, GROUP))["pending"]
        most_pending = max(most_pending, pending)
        await asyncio.sleep(0.01)
    rss_after = [psutil.Process(w.pid).memory_info().rss for w in workers]

    assert_exactly_once(await fault.ledger.settle())
    assert most_pending <= slots, f"{most_pending} entries held by workers with {slots} slots"
    served = [fault.ledger.answers(e)[0]["payload"]["meta"] for e in flood]
    assert {m["attempt"] for m in served} == {1}, "an entry was reclaimed from a live worker"
    assert {m["instance"] for m in served} == {"a", "b"}
    for before, after in zip(rss_before, rss_after, strict=True):
        assert after - before < 10 * 1024 * 1024, (before, after)
