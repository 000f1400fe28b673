"""Faults in a row while requests keep coming.

The other fault tests break one part at a quiet moment. Here two workers serve a steady
flow of requests while, one after the other, a llama-server is SIGKILLed, a worker is
SIGKILLed and replaced, Redis freezes past every socket timeout, and the other
llama-server is SIGKILLed. Stream requests are durable: each must get exactly one answer,
and a successful one. Pub/sub requests are at most once: none may get two. Every final
attempt's chunks must be whole, in order, and the answer's text.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field

from tests.faults.conftest import (
    REPORTS,
    Fault,
    assert_chunks_whole,
    assert_exactly_once,
    assert_still_serving,
)
from tests.support.procs import pid_alive, subscribers, wait_stream_acked, wait_until_async
from tests.support.workers import WorkerProc

RECLAIM = {"ORION_LLAMACPP_CLAIM_IDLE_MS": "1500"}
INTAKE = "orion:exec:request:LlamaCppHost:tiny"
STREAM, GROUP = "orion:stream:llamacpp:tiny:request", "llamacpp:tiny"


@dataclass
class Load:
    """A steady flow of requests: three stream requests for each pub/sub one, of mixed
    lengths (a few tokens to about a third of a second on the slow model)."""

    fault: Fault
    hi: list
    durable: list[dict] = field(default_factory=list)
    casual: list[tuple[float, dict]] = field(default_factory=list)  # (sent at, envelope)
    paused: asyncio.Event = field(default_factory=asyncio.Event)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, interval: float) -> None:
        rng = random.Random(7)
        for n in itertools.count():
            if self.stop.is_set():
                return
            if not self.paused.is_set():  # nothing can be sent to a frozen Redis
                via = "pubsub" if n % 4 == 3 else "stream"
                options = {"stream": True, "max_tokens": rng.choice([4, 60, 1500])}
                envelope = self.fault.client.request(
                    self.hi, profile="tiny", options={**options, "ignore_eos": True}
                )
                await self.fault.client.send(envelope, profile="tiny", via=via)
                if via == "pubsub":
                    self.casual.append((time.monotonic(), envelope))
                else:
                    self.durable.append(envelope)
            await asyncio.sleep(interval)


async def holding_entries(fault: Fault, worker: WorkerProc) -> None:
    """Until ``worker`` holds a stream entry: a fault that hits it then hits a request
    (on a fast VM the long ones end quickly, and a kill could fall between them)."""

    async def held() -> bool:
        summary = await fault.raw.xpending(STREAM, GROUP)
        mine = [c for c in summary["consumers"] if c["name"] in (worker.name, worker.name.encode())]
        return bool(mine) and int(mine[0]["pending"]) > 0

    await wait_until_async(held, timeout=20, interval=0.01, what=f"{worker.name} holding work")


async def kill_engine(worker: WorkerProc) -> None:
    engine = worker.engine_pid()
    os.kill(engine, signal.SIGKILL)
    await wait_until_async(lambda: not pid_alive(engine), timeout=10, what="llama-server gone")


async def ready(worker: WorkerProc) -> None:
    await wait_until_async(
        lambda: worker.state() == "ready", timeout=60, what=f"{worker.name} ready"
    )


async def test_faults_in_a_row_under_steady_load(fault: Fault, hi: list) -> None:
    a = fault.spawn("a", slow=True, **RECLAIM)
    b = fault.spawn("b", slow=True, **RECLAIM)
    load = Load(fault, hi)
    sending = asyncio.create_task(load.run(interval=0.15))
    try:
        await asyncio.sleep(2)
        await holding_entries(fault, a)
        await kill_engine(a)  # its supervisor restarts it; its stream requests are retried
        await asyncio.sleep(2)
        await holding_entries(fault, b)
        b.kill()  # its stream entries are reclaimed by the others
        b_killed = time.monotonic()
        b2 = fault.spawn("b2", slow=True, ready=False, **RECLAIM)
        await ready(b2)
        await asyncio.sleep(1)
        load.paused.set()
        fault.redis.freeze()
        await asyncio.sleep(4)  # > the socket timeout (2 s) and the pub/sub ping (1.5 s)
        fault.redis.thaw()
        await wait_until_async(
            lambda: _subscribers_at_least(fault, 2), timeout=20, what="both workers back"
        )
        load.paused.clear()
        await asyncio.sleep(2)
        await kill_engine(b2)
        await asyncio.sleep(2)
    finally:
        load.stop.set()
        await sending

    for envelope in load.durable:
        fault.ledger.add(envelope)
    counts = await fault.ledger.settle(timeout=120)
    casual = Counter(len(fault.ledger.answers(e)) for _, e in load.casual)
    lost = [at for at, e in load.casual if not fault.ledger.answers(e)]
    answers = [fault.ledger.answers(e) for e in load.durable]
    outcomes = Counter(a[0]["payload"].get("error", "ok") for a in answers if a)
    attempts = Counter(a[0]["payload"]["meta"]["attempt"] for a in answers if a)
    REPORTS.append(
        f"{'  pub/sub (at most once): answers per request':<58} "
        + "  ".join(f"{k}={v}" for k, v in sorted(casual.items()))
    )
    REPORTS.append(
        f"{'  stream outcomes, attempts':<58} {dict(outcomes)} {dict(sorted(attempts.items()))}"
    )
    assert_exactly_once(counts)
    assert set(outcomes) == {"ok"}, outcomes
    assert max(casual) <= 1, casual
    # Only a worker's death may lose a pub/sub request: llama-server's and Redis's may not.
    assert all(at < b_killed for at in lost), (lost, b_killed)
    assert sum(n for attempt, n in attempts.items() if attempt > 1), "no fault hit a request"
    for envelope, answered in zip(load.durable, answers, strict=True):
        assert_chunks_whole(fault, envelope, answered[0]["payload"])
    for _, envelope in load.casual:
        for answered in fault.ledger.answers(envelope):
            if "error" not in answered["payload"]:
                assert_chunks_whole(fault, envelope, answered["payload"])
    await wait_stream_acked(fault.raw, STREAM, GROUP, timeout=30)
    for _ in range(4):  # a and b2 both serve: the claim spreads requests over them
        await assert_still_serving(fault)
    assert a.proc is not None and a.proc.poll() is None
    assert b2.proc is not None and b2.proc.poll() is None


async def _subscribers_at_least(fault: Fault, n: int) -> bool:
    return await subscribers(fault.raw, INTAKE) >= n
