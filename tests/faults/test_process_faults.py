"""Processes die or hang: the worker (SIGKILL, SIGTERM) and llama-server (SIGKILL, SIGSTOP)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from datetime import datetime

import httpx
import orjson
import psutil
import pytest

from orion_llamaccp.bus import keys
from tests.faults.conftest import (
    Fault,
    assert_chunks_whole,
    assert_exactly_once,
    assert_still_serving,
    chunks_of,
)
from tests.support.freeze import FrozenThread
from tests.support.procs import (
    llama_servers_under,
    pid_alive,
    wait_stream_acked,
    wait_until,
    wait_until_async,
)
from tests.support.workers import EngineProbe, WorkerProc

RECLAIM = {"ORION_LLAMACPP_CLAIM_IDLE_MS": "1500"}


async def first_chunk(fault: Fault, envelope: dict) -> None:
    await wait_until_async(lambda: chunks_of(fault, envelope), timeout=30, what="a first chunk")


async def a_long_stream_request(fault: Fault, hi: list) -> tuple[WorkerProc, dict]:
    """A worker alone on the slow model, streaming a long stream request (its first
    chunk out): the one a fault then hits."""
    victim = fault.spawn("victim", slow=True, parallel=1, **RECLAIM)
    doomed = fault.ledger.add(
        fault.client.request(hi, profile="tiny", options={"stream": True, "max_tokens": 4000})
    )
    await fault.client.send(doomed, profile="tiny", via="stream")
    await first_chunk(fault, doomed)
    return victim, doomed


def assert_answered_by(fault: Fault, envelope: dict, instance: str, attempt: int) -> None:
    """One answer, from ``instance`` under ``attempt``, with its chunks whole."""
    answer = fault.ledger.answers(envelope)[0]["payload"]
    assert answer["meta"]["instance"] == instance and answer["meta"]["attempt"] == attempt
    assert_chunks_whole(fault, envelope, answer)


async def test_worker_sigkill_mid_generation_stream(fault: Fault, hi: list) -> None:
    victim, doomed = await a_long_stream_request(fault, hi)
    engine = victim.engine_pid()
    victim.kill()
    await wait_until_async(lambda: not pid_alive(engine), timeout=10, what="engine gone too")
    fault.spawn("rescuer", slow=True, parallel=1, **RECLAIM)
    for _ in range(3):
        await fault.client.send(
            fault.ledger.add(fault.client.request(hi, profile="tiny", options={"max_tokens": 20})),
            profile="tiny",
            via="stream",
        )
    assert_exactly_once(await fault.ledger.settle(timeout=90))
    assert_answered_by(fault, doomed, "rescuer", attempt=2)


async def test_a_worker_restarted_under_its_name_resumes_its_own_entries_at_once(
    fault: Fault, hi: list
) -> None:
    """A worker's consumer name is its ``INSTANCE_ID``, stable across restarts. Restarted
    after a SIGKILL (a container's restart policy), it reads its own unfinished entries
    first: no other worker could take them before the claim idle time (10 min by default,
    left so here) and the caller would wait that long."""
    victim = fault.spawn("w", slow=True, parallel=1)
    doomed = fault.ledger.add(
        fault.client.request(hi, profile="tiny", options={"stream": True, "max_tokens": 4000})
    )
    await fault.client.send(doomed, profile="tiny", via="stream")
    await first_chunk(fault, doomed)
    engine = victim.engine_pid()
    victim.kill()
    await wait_until_async(lambda: not pid_alive(engine), timeout=10, what="engine gone too")
    fault.spawn("w", slow=True, parallel=1)
    assert_exactly_once(await fault.ledger.settle(timeout=60))
    assert_answered_by(fault, doomed, "w", attempt=2)


async def test_a_redelivery_after_a_retry_generates_under_a_new_attempt(
    fault: Fault, hi: list
) -> None:
    """The worker retries a stream request (its llama-server died) and then dies itself:
    the rescuer's generation must carry an attempt above the retry's, or its first
    chunks are dropped as repeats of the retry's and the caller splices two texts."""
    victim, doomed = await a_long_stream_request(fault, hi)
    os.kill(victim.engine_pid(), signal.SIGKILL)  # attempt 1 breaks; the victim retries (2)

    def retried() -> bool:
        return any(c["attempt"] == 2 and c["seq"] >= 3 for c in chunks_of(fault, doomed))

    await wait_until_async(retried, timeout=30, what="attempt 2 streaming")
    victim.kill()
    fault.spawn("rescuer", slow=True, parallel=1, **RECLAIM)
    assert_exactly_once(await fault.ledger.settle(timeout=90))
    assert_answered_by(fault, doomed, "rescuer", attempt=3)


@pytest.mark.parametrize("wakes", ["while_rescued", "after_the_answer"])
async def test_a_worker_stalled_past_the_claim_idle_time_gives_its_entry_up(
    fault: Fault, hi: list, wakes: str
) -> None:
    """A worker frozen with its llama-server (SIGSTOP to both: a paused container, a
    stalled VM) past the claim idle time wakes after another one reclaimed its stream
    entry: it stops, and the other one answers. Woken while the other generates, it sees
    at its claim refresh that the entry is the other's (taking it back left both
    generating it, each taking it from the other at every refresh); woken after the
    answer, Redis drops its first chunk as one of an answered request, which stops its
    generation (before, it ran to its end for nothing). With its llama-server running on
    through the pause, the whole answer could be waiting in the socket at the wake, and
    end with no chunk to drop (the late-result test covers that)."""
    victim, doomed = await a_long_stream_request(fault, hi)
    paused = [victim.engine_pid(), victim.pid]
    for pid in paused:
        os.kill(pid, signal.SIGSTOP)
    try:
        rescuer = fault.spawn("rescuer", slow=True, parallel=1, **RECLAIM)

        def rescued() -> bool:
            if wakes == "after_the_answer":
                return bool(fault.ledger.answers(doomed))
            return any(c["attempt"] == 2 for c in chunks_of(fault, doomed))

        await wait_until_async(rescued, timeout=60, what=f"the rescuer, for waking {wakes}")
    finally:
        woke = len(fault.recorder.messages)
        for pid in paused:
            os.kill(pid, signal.SIGCONT)
    said = {
        "while_rescued": "was taken over by another worker",
        "after_the_answer": "was answered by another worker while this one was stalled",
    }
    await wait_until_async(
        lambda: said[wakes] in victim.log(), timeout=10, what="the woken worker giving up"
    )
    if wakes == "while_rescued":
        # Its give-up released the request's record, whose owner (the entry) the rescuer
        # shares: a resend then ran beside the rescuer instead of waiting for its answer.
        assert not fault.ledger.answers(doomed), "answered before the check: a longer one"
        [record] = [k async for k in fault.raw.scan_iter(match=keys.dedup("tiny", "*"))]
        assert orjson.loads(await fault.raw.get(record))["state"] == "running"
    assert_exactly_once(await fault.ledger.settle(timeout=90))
    assert_answered_by(fault, doomed, "rescuer", attempt=2)
    stale = [
        m.message["payload"]
        for m in fault.recorder.messages[woke:]
        if m.channel == doomed["reply_to"] + ":chunks" and m.message["payload"]["attempt"] == 1
    ]
    # One or two leave before the refresh's reply is back (a chunk per 10 ms window);
    # a worker that kept its entry streams on for the rest of its generation. After the
    # answer, none at all: Redis drops a chunk of an answered request.
    assert len(stale) <= (10 if wakes == "while_rescued" else 0), len(stale)
    rescuer.kill()
    await assert_still_serving(fault)  # the victim alone, on its one slot: given back


async def test_a_paused_worker_woken_after_its_answer_stops_a_request_without_chunks(
    fault: Fault, hi: list
) -> None:
    """A worker paused with its llama-server (SIGSTOP to both: a paused container) past
    the claim idle time, while another worker reclaims its stream entry and answers it,
    wakes generating a request that streams nothing. No chunk of it is there for Redis to
    drop (which stops one that streams); its lease renewal finds the record finished and
    the answer out, and stops llama-server. Before, it generated to the end for nothing
    and then overwrote the stored result with its own, under a lease-long TTL."""
    victim = fault.spawn("victim", slow=True, parallel=1, **RECLAIM)
    budget = 12_000  # about 9 s of the slow model: still generating when it wakes
    key = keys.dedup("tiny", "key:paused-victim")
    doomed = fault.ledger.add(
        fault.client.request(
            hi,
            profile="tiny",
            options={"max_tokens": budget, "ignore_eos": True},
            trace={"work": {"idempotency_key": "paused-victim"}},
        )
    )
    async with EngineProbe(victim.announcement()["engine_url"]) as engine:

        async def generating() -> bool:
            return any(s.get("is_processing") for s in await engine.slots())

        await fault.client.send(doomed, profile="tiny", via="stream")
        started = time.monotonic()
        await wait_until_async(generating, timeout=30, what="the victim generating")
        # It generates before its record's SET has answered: paused before it read that
        # answer, it wakes to a record already done and stops on that path, not this one.
        await wait_until_async(lambda: fault.raw.exists(key), timeout=10, what="its record")
        await asyncio.sleep(0.3)  # for the victim to read the answer: no sign of it outside
        paused = [victim.engine_pid(), victim.pid]
        for pid in paused:
            os.kill(pid, signal.SIGSTOP)
        try:
            fault.spawn("rescuer", parallel=1, **RECLAIM)  # the tiny model: done sooner
            await wait_until_async(
                lambda: fault.ledger.answers(doomed), timeout=90, what="the rescuer's answer"
            )
            # The victim renews its lease every 10 s: due at once when it wakes.
            await asyncio.sleep(max(0.0, 10.5 - (time.monotonic() - started)))
        finally:
            for pid in paused:
                os.kill(pid, signal.SIGCONT)
        await wait_until_async(
            lambda: "was answered by another worker while this one was stalled" in victim.log(),
            timeout=30,
            what="the woken worker giving up",
        )
        # Generous: a generation that was not stopped (minutes) must fail on the count.
        generated = await engine.settled(timeout=300, what="the victim's generation stopped")
    assert generated < budget // 2, generated
    assert_exactly_once(await fault.ledger.settle(timeout=90))
    meta = fault.ledger.answers(doomed)[0]["payload"]["meta"]
    assert (meta["instance"], meta["attempt"]) == ("rescuer", 2)
    stored = orjson.loads(await fault.raw.get(key))
    assert (stored["state"], stored["payload"]["meta"]["instance"]) == ("done", "rescuer")
    assert await fault.raw.ttl(key) > 60  # the result's TTL, not a renewed lease (30 s)


async def test_a_stalled_worker_s_late_result_leaves_the_stored_one_alone(
    fault: Fault, hi: list
) -> None:
    """A worker paused (SIGSTOP, not its llama-server) while llama-server finishes its
    answer: the whole answer waits in the socket. Another worker reclaims the entry,
    answers it and stores its result for duplicates. The first one wakes, reads its answer
    at once and commits it: the result is dropped as a repeat, and the stored result must
    stay the other worker's, the one its caller got. It was replaced with the late one's,
    for every duplicate to come."""
    victim = fault.spawn("victim", slow=True, parallel=1, **RECLAIM)
    key = keys.dedup("tiny", "key:stalled-finisher")
    envelope = fault.ledger.add(
        fault.client.request(
            hi,
            profile="tiny",
            options={"max_tokens": 400, "ignore_eos": True},
            trace={"work": {"idempotency_key": "stalled-finisher"}},
        )
    )

    def served(name: str) -> int:
        beats = [
            m.message["payload"]
            for m in fault.recorder.kinds("system.health.v1")
            if m.message["payload"]["instance"] == name
        ]
        return max((b["details"]["requests_served"] for b in beats), default=0)

    async with EngineProbe(victim.announcement()["engine_url"]) as engine:

        async def generating() -> bool:
            return any(s.get("is_processing") for s in await engine.slots())

        await fault.client.send(envelope, profile="tiny", via="stream")
        await wait_until_async(generating, timeout=30, what="the victim generating")
        os.kill(victim.pid, signal.SIGSTOP)
        try:
            await engine.settled(timeout=30, what="the victim's llama-server done")
            fault.spawn("rescuer", parallel=1, **RECLAIM)
            await wait_until_async(
                lambda: fault.ledger.answers(envelope), timeout=60, what="the rescuer's answer"
            )
        finally:
            os.kill(victim.pid, signal.SIGCONT)
    await wait_until_async(lambda: served("victim") >= 1, timeout=30, what="the victim done")
    assert_exactly_once(await fault.ledger.settle(timeout=30))
    assert fault.ledger.answers(envelope)[0]["payload"]["meta"]["instance"] == "rescuer"
    stored = orjson.loads(await fault.raw.get(key))
    assert (stored["state"], stored["payload"]["meta"]["instance"]) == ("done", "rescuer")


async def test_worker_sigterm_with_requests_in_flight(fault: Fault, hi: list) -> None:
    first = fault.spawn(
        "first",
        slow=True,
        parallel=2,
        ORION_LLAMACPP_DRAIN_TIMEOUT_SEC="2",
        # Its llama-server is frozen for the rest of its life (below): not a wedge to
        # restart, for this test (three /health polls of 5 s).
        ORION_LLAMACPP_HEALTH_TIMEOUT_SEC="5",
        **RECLAIM,
    )
    long = [
        fault.ledger.add(
            fault.client.request(hi, profile="tiny", options={"stream": True, "max_tokens": 1500})
        )
        for _ in range(2)
    ]
    short = [
        fault.ledger.add(fault.client.request(hi, profile="tiny", options={"max_tokens": 10}))
        for _ in range(3)
    ]
    for envelope in long:
        await fault.client.send(envelope, profile="tiny", via="stream")
    for envelope in long:
        await first_chunk(fault, envelope)
    # llama-server frozen from here on: the long ones hold both slots, and are still
    # running when the drain ends, however fast the machine (the worker's stop then wakes
    # it with its SIGTERM). Frozen only before the SIGTERM, 6,000 tokens each had to
    # outlast the steps below on a fast VM, and the second worker, which generates them
    # again, ran past the 120 s wait on a VM three times slower.
    os.kill(first.engine_pid(), signal.SIGSTOP)
    for envelope in short:  # wait in the stream: both slots are busy
        await fault.client.send(envelope, profile="tiny", via="stream")
    pubsub = fault.ledger.add(fault.client.request(hi, profile="tiny", options={"max_tokens": 5}))
    await fault.client.send(pubsub, profile="tiny")

    def queued() -> bool:  # heard and waiting for a slot: pub/sub promises nothing before
        return any(
            b["payload"]["instance"] == "first" and b["payload"]["details"]["queue_local"] >= 1
            for b in (m.message for m in fault.recorder.kinds("system.health.v1"))
        )

    def settled() -> object:  # answered before the drain: a failure that says how
        return queued() or fault.ledger.answers(pubsub)

    await wait_until_async(settled, timeout=30, what="the pub/sub request queued")
    assert not fault.ledger.answers(pubsub), fault.ledger.answers(pubsub)[0]["payload"]
    first.signal(signal.SIGTERM)
    assert first.proc is not None and first.proc.wait(30) == 0
    states = [
        m.message["payload"]["state"]
        for m in fault.recorder.on("orion:llm:profile:announce")
        if m.message["payload"]["instance"] == "first"
    ]
    assert "draining" in states
    pending = await fault.raw.xpending("orion:stream:llamacpp:tiny:request", "llamacpp:tiny")
    assert pending["pending"] == 2  # the long ones, left for another worker
    # Its last beat counts what it answered: the pub/sub request, refused. The two it
    # left pending are answered (and counted) by the next worker; they were counted
    # here too, as failures.
    beats = [m.message["payload"] for m in fault.recorder.kinds("system.health.v1")]
    last = [b for b in beats if b["instance"] == "first"][-1]["details"]
    assert (last["requests_served"], last["requests_failed"]) == (0, 1), last
    fault.spawn("second", slow=True, parallel=2, **RECLAIM)
    assert_exactly_once(await fault.ledger.settle(timeout=120))
    for envelope in long:
        meta = fault.ledger.answers(envelope)[0]["payload"]["meta"]
        assert (meta["instance"], meta["attempt"]) == ("second", 2)
    # Both slots stay busy past the drain timeout: the queued request never ran.
    assert fault.ledger.answers(pubsub)[0]["payload"]["error"] == "engine_unavailable"


async def streaming_on_both_intakes(
    fault: Fault, hi: list, pubsub_tokens: int, stream_tokens: int
) -> tuple[dict, dict]:
    """One streamed request through each intake, both generating once this returns."""
    sent = []
    for via, tokens in (("pubsub", pubsub_tokens), ("stream", stream_tokens)):
        envelope = fault.ledger.add(
            fault.client.request(hi, profile="tiny", options={"stream": True, "max_tokens": tokens})
        )
        await fault.client.send(envelope, profile="tiny", via=via)
        sent.append(envelope)
    for envelope in sent:
        await first_chunk(fault, envelope)
    return sent[0], sent[1]


def wait_engine_replaced(worker: WorkerProc, old: int) -> None:
    """Ready again on a new llama-server (just after a kill, the last announcement still
    says ready, with the old pid)."""

    def replaced() -> bool:
        found = worker.announcement() or {}
        return found.get("state") == "ready" and found.get("engine_pid") not in (None, old)

    wait_until(replaced, timeout=60, what=f"worker {worker.name} ready on a new llama-server")


def assert_cut_off_chunks_unique(fault: Fault, envelope: dict) -> None:
    """A request told ``upstream_failed`` holds partial chunks: none of them twice."""
    keys = [(c["attempt"], c["seq"]) for c in chunks_of(fault, envelope)]
    assert keys and len(keys) == len(set(keys)), keys


async def test_requests_in_flight_at_sigterm_finish_within_the_drain(
    fault: Fault, hi: list
) -> None:
    """What a rolling update does: SIGTERM while a request of each intake generates. The
    drain lets both finish here, answered by this worker under their first attempt, the
    stream entry acked, and the worker exits cleanly."""
    worker = fault.spawn("w", slow=True, parallel=2, ORION_LLAMACPP_DRAIN_TIMEOUT_SEC="60")
    via_pubsub, via_stream = await streaming_on_both_intakes(fault, hi, 2000, 2000)
    worker.signal(signal.SIGTERM)
    assert worker.proc is not None and worker.proc.wait(90) == 0
    assert_exactly_once(await fault.ledger.settle(timeout=10))
    for envelope in (via_pubsub, via_stream):
        answer = fault.ledger.answers(envelope)[0]["payload"]
        assert answer["meta"]["attempt"] == 1, answer
        assert answer["meta"]["finish_reason"] in ("length", "stop"), answer
        assert_chunks_whole(fault, envelope, answer)
    pending = await fault.raw.xpending("orion:stream:llamacpp:tiny:request", "llamacpp:tiny")
    assert pending["pending"] == 0
    states = [
        m.message["payload"]["state"]
        for m in fault.recorder.on("orion:llm:profile:announce")
        if m.message["payload"]["instance"] == "w"
    ]
    assert "draining" in states
    # Unsubscribed while it drains: the replica count waits for no subscription (it
    # did, timing out at every heartbeat with a warning).
    assert "counting replicas failed" not in worker.log()


async def test_a_cancel_during_the_drain_stops_the_request_it_waits_for(
    fault: Fault, hi: list
) -> None:
    """SIGTERM with a long request of each intake generating, then the caller gives up on
    both. The draining worker has left its intake channel but still hears cancels: each
    request is answered ``cancelled`` (its stream entry acked), and the worker exits
    without waiting out the drain. It used to unsubscribe from everything: the cancels
    went unheard, and the requests ran on to the drain timeout."""
    worker = fault.spawn("w", slow=True, parallel=2, ORION_LLAMACPP_DRAIN_TIMEOUT_SEC="30")
    via_pubsub, via_stream = await streaming_on_both_intakes(fault, hi, 4000, 4000)
    worker.signal(signal.SIGTERM)
    await wait_until_async(
        lambda: any(
            m.message["payload"]["state"] == "draining"
            for m in fault.recorder.on("orion:llm:profile:announce")
        ),
        timeout=30,
        what="draining",
    )
    for envelope in (via_pubsub, via_stream):
        await fault.client.cancel(envelope["correlation_id"])
    assert_exactly_once(await fault.ledger.settle(timeout=20))
    for envelope in (via_pubsub, via_stream):
        assert fault.ledger.answers(envelope)[0]["payload"]["error"] == "cancelled"
    assert worker.proc is not None and worker.proc.wait(30) == 0
    pending = await fault.raw.xpending("orion:stream:llamacpp:tiny:request", "llamacpp:tiny")
    assert pending["pending"] == 0


async def test_llama_server_dying_during_the_drain_leaves_the_worker_draining(
    fault: Fault, hi: list
) -> None:
    """SIGTERM, then llama-server dies while the drain waits for a request of each
    intake. The worker neither restarts llama-server nor announces itself ready again (it
    did once, its reload setting ``ready``): pub/sub's request is told it failed, the
    stream's entry is left pending and another worker answers it, and the worker exits.
    (test_supervisor.py checks the supervisor alone; this, what the bus sees.)"""
    worker = fault.spawn("w", slow=True, parallel=2, ORION_LLAMACPP_DRAIN_TIMEOUT_SEC="60")
    via_pubsub, via_stream = await streaming_on_both_intakes(fault, hi, 4000, 4000)
    engine = worker.engine_pid()

    def announced() -> list[str]:
        return [
            m.message["payload"]["state"]
            for m in fault.recorder.on("orion:llm:profile:announce")
            if m.message["payload"]["instance"] == "w"
        ]

    worker.signal(signal.SIGTERM)
    await wait_until_async(lambda: "draining" in announced(), timeout=30, what="draining")
    os.kill(engine, signal.SIGKILL)
    spawned: set[int] = set()  # llama-servers started after the kill: a restart
    assert worker.proc is not None
    while worker.proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            children = psutil.Process(worker.pid).children(recursive=True)
            spawned |= {c.pid for c in children} - {engine}
        await asyncio.sleep(0.05)
    assert worker.proc.returncode == 0 and not spawned, (worker.proc.returncode, spawned)
    states = announced()
    assert "ready" not in states[states.index("draining") :], states
    assert fault.ledger.answers(via_pubsub)[0]["payload"]["error"] == "upstream_failed"
    pending = await fault.raw.xpending("orion:stream:llamacpp:tiny:request", "llamacpp:tiny")
    assert pending["pending"] == 1 and fault.ledger.answers(via_stream) == []
    fault.spawn("second", slow=True, parallel=2, **RECLAIM)
    assert_exactly_once(await fault.ledger.settle(timeout=90))
    answer = fault.ledger.answers(via_stream)[0]["payload"]
    # Above attempt 1, whose chunks the caller holds: 3 here, as the draining worker took
    # 2 for its retry before finding no engine to retry on.
    assert answer["meta"]["instance"] == "second" and answer["meta"]["attempt"] > 1
    assert_chunks_whole(fault, via_stream, answer)


async def test_llama_server_sigkill_mid_stream(fault: Fault, hi: list) -> None:
    worker = fault.spawn("w", slow=True, parallel=2)
    via_pubsub, via_stream = await streaming_on_both_intakes(fault, hi, 4000, 4000)
    killed = worker.engine_pid()
    os.kill(killed, signal.SIGKILL)
    wait_engine_replaced(worker, killed)
    after = fault.ledger.add(fault.client.request(hi, profile="tiny", options={"max_tokens": 8}))
    await fault.client.send(after, profile="tiny")
    assert_exactly_once(await fault.ledger.settle(timeout=90))
    # Pub/sub is at-most-once and the caller already holds partial chunks: it is told.
    assert fault.ledger.answers(via_pubsub)[0]["payload"]["error"] == "upstream_failed"
    assert_cut_off_chunks_unique(fault, via_pubsub)
    # A durable request is retried once the engine is back, under a new attempt number.
    retried = fault.ledger.answers(via_stream)[0]["payload"]
    assert retried["meta"]["attempt"] == 2 and retried["meta"]["finish_reason"] in (
        "length",
        "stop",
    )
    assert_chunks_whole(fault, via_stream, retried)
    assert "content" in fault.ledger.answers(after)[0]["payload"]


async def test_a_request_past_its_expiry_when_llama_server_dies_is_not_tried_again(
    fault: Fault, hi: list
) -> None:
    """A stream request started in time and still generating past its ``ttl_ms`` (it
    runs to its end) is in llama-server when it is killed: it is answered ``expired``,
    and acked, not generated again. Retries used to ignore its expiry."""
    worker = fault.spawn("w", slow=True, parallel=1)
    doomed = fault.ledger.add(
        fault.client.request(
            hi,
            profile="tiny",
            ttl_ms=1500,
            options={"stream": True, "max_tokens": 12000, "ignore_eos": True},
        )
    )
    await fault.client.send(doomed, profile="tiny", via="stream")
    await first_chunk(fault, doomed)
    created = datetime.fromisoformat(doomed["created_at"]).timestamp()
    await asyncio.sleep(max(0.0, created + 1.7 - time.time()))
    assert fault.ledger.answers(doomed) == []  # past its expiry, still generating
    killed = worker.engine_pid()
    os.kill(killed, signal.SIGKILL)
    assert_exactly_once(await fault.ledger.settle(timeout=60))
    answer = fault.ledger.answers(doomed)[0]["payload"]
    assert answer["error"] == "expired", answer
    assert "not tried again" in answer["details"]["message"], answer
    assert {c["attempt"] for c in chunks_of(fault, doomed)} == {1}
    await wait_stream_acked(fault.raw, "orion:stream:llamacpp:tiny:request", "llamacpp:tiny")
    await assert_still_serving(fault)


async def test_llama_server_wedged(fault: Fault, hi: list) -> None:
    worker = fault.spawn("w", slow=True, parallel=2)
    via_pubsub, via_stream = await streaming_on_both_intakes(fault, hi, 6000, 3000)
    wedged = worker.engine_pid()
    os.kill(wedged, signal.SIGSTOP)
    # Detected by /health (3 checks of 0.5 s + 1 s timeout), killed, restarted.
    await wait_until_async(
        lambda: fault.ledger.answers(via_pubsub),
        timeout=30,
        what="the pub/sub caller told within the detection bound",
    )
    assert fault.ledger.answers(via_pubsub)[0]["payload"]["error"] == "upstream_failed"
    assert_cut_off_chunks_unique(fault, via_pubsub)
    assert not pid_alive(wedged)
    wait_engine_replaced(worker, wedged)
    after = fault.ledger.add(fault.client.request(hi, profile="tiny", options={"max_tokens": 8}))
    await fault.client.send(after, profile="tiny")
    assert_exactly_once(await fault.ledger.settle(timeout=90))
    retried = fault.ledger.answers(via_stream)[0]["payload"]
    assert retried["meta"]["attempt"] == 2
    assert_chunks_whole(fault, via_stream, retried)
    assert "content" in fault.ledger.answers(after)[0]["payload"]
    assert "stopped answering /health" in worker.log()


async def test_llama_server_inference_loop_stuck_behind_a_healthy_health(
    fault: Fault, hi: list
) -> None:
    """Its main thread stopped (ptrace), its HTTP threads still answering: /health says
    200 throughout, and only the progress watch (``ORION_LLAMACPP_PROGRESS_TIMEOUT_SEC``)
    sees it. Without it, both callers would wait out the request timeout."""
    worker = fault.spawn("w", slow=True, parallel=2, ORION_LLAMACPP_PROGRESS_TIMEOUT_SEC="2")
    via_pubsub, via_stream = await streaming_on_both_intakes(fault, hi, 6000, 3000)
    stuck = worker.engine_pid()
    async with EngineProbe(worker.announcement()["engine_url"]) as engine:
        with FrozenThread(stuck) as frozen:
            assert (await engine.http.get("/health")).status_code == 200
            await wait_until_async(
                lambda: fault.ledger.answers(via_pubsub),
                timeout=30,
                what="the pub/sub caller told within the detection bound",
            )
    assert frozen.exited and not pid_alive(stuck)
    assert fault.ledger.answers(via_pubsub)[0]["payload"]["error"] == "upstream_failed"
    assert_cut_off_chunks_unique(fault, via_pubsub)
    wait_engine_replaced(worker, stuck)
    assert_exactly_once(await fault.ledger.settle(timeout=90))
    retried = fault.ledger.answers(via_stream)[0]["payload"]
    assert retried["meta"]["attempt"] == 2
    assert_chunks_whole(fault, via_stream, retried)
    log = worker.log()
    assert "stopped answering /health" not in log
    assert "wedged" in log and ("no progress" in log or "did not answer /slots" in log)


POISON_TOKENS = 4321  # what marks the request that llama-server "dies on"


async def poison_slots(engine: EngineProbe) -> list[dict]:
    """The slots of llama-server busy with the ``POISON_TOKENS`` request; none while it
    restarts."""
    try:
        slots = await engine.slots()
    except (httpx.HTTPError, ValueError):  # restarting
        return []
    return [
        s
        for s in slots
        if s.get("is_processing") and (s.get("params") or {}).get("max_tokens") == POISON_TOKENS
    ]


async def kill_while_busy(
    worker: WorkerProc, *, decoding: bool, most: int, until: Callable[[], object]
) -> int:
    """SIGKILL llama-server each time one of its slots holds the request that asks for
    ``POISON_TOKENS`` (``decoding``: once it generates; else before its first token), at most
    ``most`` times, or ``until`` it is answered; returns the kills: a request that
    llama-server dies on, from its side."""
    kills = 0
    deadline = time.monotonic() + 120
    async with EngineProbe(worker.announcement()["engine_url"]) as engine:
        while kills < most and not until() and time.monotonic() < deadline:
            decoded = [s["next_token"][0]["n_decoded"] for s in await poison_slots(engine)]
            alive = [pid for pid in llama_servers_under(worker.pid) if pid_alive(pid)]
            # Mid-stream: 50 tokens in, its first chunks are out (a 10 ms window).
            hit = decoded and (min(decoded) >= 50 if decoding else max(decoded) == 0)
            if hit and alive:
                for pid in alive:
                    os.kill(pid, signal.SIGKILL)
                kills += 1
                for pid in alive:  # its last answers are not the next one's
                    await wait_until_async(lambda p=pid: not pid_alive(p), what="killed")
            await asyncio.sleep(0.005)
    return kills


@pytest.mark.parametrize("decoding", [False, True], ids=["before-its-first-token", "mid-stream"])
async def test_a_request_llama_server_dies_on_is_given_up_before_it_takes_the_worker_down(
    fault: Fault, decoding: bool
) -> None:
    """Retried while llama-server kept dying on it, such a stream request used to reach
    the engine's crash limit (5 within 5 minutes) and leave the worker ``failed`` before
    its own delivery limit (also 5). After ``ORION_LLAMACPP_REQUEST_CRASH_LIMIT`` (2)
    deaths with it inside, it is answered ``upstream_failed``, not retryable, and
    dead-lettered, and the worker serves on. Its long prompt keeps it in llama-server
    for a while before its first token, and marks it for the killer. An innocent request
    in llama-server at the first death is retried in a turn of its own, not beside the
    poison, so the second death is not blamed on it too. (A pub/sub request broken off
    after llama-server's answer began has one try; one it died with before that is
    retried, and counted the same way.)"""
    worker = fault.spawn("w", slow=True, parallel=2)
    innocent = fault.ledger.add(
        fault.client.request(
            [{"role": "user", "content": "hi"}],
            profile="tiny",
            options={"stream": True, "max_tokens": 5000, "ignore_eos": True},
        )
    )
    await fault.client.send(innocent, profile="tiny", via="stream")
    await first_chunk(fault, innocent)
    long_prompt = [{"role": "user", "content": " ".join(["hello there"] * 300)}]
    poison = fault.ledger.add(
        fault.client.request(
            long_prompt, profile="tiny", options={"stream": True, "max_tokens": POISON_TOKENS}
        )
    )
    killer = asyncio.create_task(
        kill_while_busy(
            worker, decoding=decoding, most=5, until=lambda: fault.ledger.answers(poison)
        )
    )
    await fault.client.send(poison, profile="tiny", via="stream")
    assert await killer == 2
    assert_exactly_once(await fault.ledger.settle(timeout=60))
    answer = fault.ledger.answers(poison)[0]["payload"]
    assert answer["error"] == "upstream_failed"
    assert answer["details"]["retryable"] is False
    assert answer["details"]["engine_deaths"] == 2
    streamed = {c["attempt"] for c in chunks_of(fault, poison)}
    assert streamed == ({1, 2} if decoding else set()), streamed
    dead = await fault.raw.xrange(keys.dlq_stream("orion:stream:llamacpp:tiny:request"))
    assert [fields[b"reason"] for _, fields in dead] == [b"upstream_failed"]
    fine = fault.ledger.answers(innocent)[0]["payload"]
    assert fine["meta"]["finish_reason"] == "length" and fine["meta"]["attempt"] == 2, fine
    assert_chunks_whole(fault, innocent, fine)
    await assert_still_serving(fault)
    assert worker.state() == "ready"


async def test_a_stream_request_broken_off_each_try_gets_max_deliveries_tries_not_one_more(
    fault: Fault,
) -> None:
    """``ORION_LLAMACPP_MAX_DELIVERIES`` (2 here) counts a stream request's tries: its
    stream broken off mid-way each time (llama-server killed under it; its death limit set
    out of the way), it is tried twice and then answered ``upstream_failed`` with the
    second attempt's number. A limit taken as "more than" (a third try, a third kill)
    passed every test: no test ran a request to the end of its tries."""
    worker = fault.spawn(
        "w",
        slow=True,
        ORION_LLAMACPP_MAX_DELIVERIES="2",
        ORION_LLAMACPP_REQUEST_CRASH_LIMIT="5",
        ORION_LLAMACPP_CRASH_LIMIT="9",
    )
    doomed = fault.ledger.add(
        fault.client.request(
            [{"role": "user", "content": "hi"}],
            profile="tiny",
            options={"stream": True, "max_tokens": POISON_TOKENS, "ignore_eos": True},
        )
    )
    killer = asyncio.create_task(
        kill_while_busy(worker, decoding=True, most=4, until=lambda: fault.ledger.answers(doomed))
    )
    await fault.client.send(doomed, profile="tiny", via="stream")
    kills = await killer
    assert_exactly_once(await fault.ledger.settle(timeout=60))
    answer = fault.ledger.answers(doomed)[0]["payload"]
    assert (kills, answer["error"], answer["details"]["attempt"]) == (2, "upstream_failed", 2)
    assert "engine_deaths" not in answer["details"], answer
    assert {c["attempt"] for c in chunks_of(fault, doomed)} == {1, 2}
    await assert_still_serving(fault)


def first_on(fault: Fault, channel: str, attempt: int | None = None) -> int | None:
    """Where the first message on ``channel`` (of ``attempt``, for chunks) stands among
    everything the recorder saw; None before there is one."""
    for at, published in enumerate(list(fault.recorder.messages)):
        if published.channel == channel and (
            attempt is None or published.message["payload"].get("attempt") == attempt
        ):
            return at
    return None


async def test_suspects_waiting_their_turn_leave_their_slots_to_new_requests(
    fault: Fault, hi: list
) -> None:
    """llama-server died with both of its slots busy; the two requests in it are retried
    one at a time. The one waiting for its turn used to keep its slot meanwhile: the
    other slot of llama-server sat idle, and a new request waited in the local queue
    until the first suspect's answer (or was told ``overloaded`` once that queue was
    full). It now steps aside while it waits: the new request runs beside the suspect in
    its turn, and the turns still do not overlap. A long request then takes the lent slot,
    so the second turn takes its slot back over the count; every slot is free at the end."""
    worker = fault.spawn("w", slow=True, parallel=2)
    suspects = []
    for tokens in (2000, POISON_TOKENS):  # the second one marks the request to kill in
        suspects.append(
            fault.ledger.add(
                fault.client.request(
                    hi,
                    profile="tiny",
                    options={"stream": True, "max_tokens": tokens, "ignore_eos": True},
                )
            )
        )
        await fault.client.send(suspects[-1], profile="tiny", via="stream")
        await first_chunk(fault, suspects[-1])
    kills = await kill_while_busy(worker, decoding=True, most=1, until=lambda: False)
    assert kills == 1
    chunks = [e["reply_to"] + ":chunks" for e in suspects]
    await wait_until_async(
        lambda: any(first_on(fault, channel, attempt=2) is not None for channel in chunks),
        timeout=60,
        what="a suspect's turn",
    )
    new = fault.ledger.add(fault.client.request(hi, profile="tiny", options={"max_tokens": 8}))
    await fault.client.send(new, profile="tiny")
    await wait_until_async(lambda: fault.ledger.answers(new), timeout=60, what="the new one")
    # Busy in the lent slot when the second turn comes: that one runs over the count.
    busy = fault.ledger.add(
        fault.client.request(hi, profile="tiny", options={"max_tokens": 4600, "ignore_eos": True})
    )
    await fault.client.send(busy, profile="tiny")
    assert_exactly_once(await fault.ledger.settle(timeout=120))
    beats_after = len(fault.recorder.messages)
    beat = await wait_until_async(
        lambda: [
            m.message["payload"]["details"]
            for m in fault.recorder.messages[beats_after:]
            if m.message.get("kind") == "system.health.v1"
        ],
        timeout=10,
        what="a heartbeat after every answer",
    )
    assert (beat[0]["slots_busy"], beat[0]["slots_total"]) == (0, 2), beat[0]
    answered = first_on(fault, new["reply_to"])
    ends = sorted(first_on(fault, e["reply_to"]) for e in suspects)
    assert answered is not None and answered < ends[0], "the new request waited for a turn"
    first, second = sorted(suspects, key=lambda e: first_on(fault, e["reply_to"]))
    retried = first_on(fault, second["reply_to"] + ":chunks", attempt=2)
    assert retried is not None and retried > first_on(fault, first["reply_to"]), "turns overlap"
    for envelope in suspects:
        answer = fault.ledger.answers(envelope)[0]["payload"]
        assert answer["meta"]["finish_reason"] == "length", answer
        assert answer["meta"]["attempt"] == 2, answer
        assert_chunks_whole(fault, envelope, answer)
    assert "content" in fault.ledger.answers(new)[0]["payload"]
    assert "content" in fault.ledger.answers(busy)[0]["payload"]
    await assert_still_serving(fault)


async def holds_poison(worker: WorkerProc) -> bool:
    """Whether a slot of the worker's llama-server holds the ``POISON_TOKENS`` request."""
    async with EngineProbe(worker.announcement()["engine_url"]) as engine:
        return bool(await poison_slots(engine))


async def test_a_request_llama_server_died_on_keeps_its_count_in_the_next_worker(
    fault: Fault,
) -> None:
    """The deaths a request was in are counted in Redis, beside its attempt number: one
    that moves to another worker (this one killed, drained or ``failed``) is not tried
    ``REQUEST_CRASH_LIMIT`` times more from 0 there. With the limit at 3, one death in
    the first worker, then that worker killed while the retry is in its new llama-server:
    the next worker gives up after two deaths, not three."""
    limit = {"ORION_LLAMACPP_REQUEST_CRASH_LIMIT": "3"}
    first = fault.spawn("w", slow=True, parallel=1, **limit)
    long_prompt = [{"role": "user", "content": " ".join(["hello there"] * 300)}]
    poison = fault.ledger.add(
        fault.client.request(
            long_prompt, profile="tiny", options={"stream": True, "max_tokens": POISON_TOKENS}
        )
    )
    answered = lambda: fault.ledger.answers(poison)  # noqa: E731
    killer = asyncio.create_task(kill_while_busy(first, decoding=False, most=1, until=answered))
    await fault.client.send(poison, profile="tiny", via="stream")
    assert await killer == 1
    await wait_until_async(lambda: holds_poison(first), timeout=60, what="the poison retried")
    engine, url = first.engine_pid(), first.announcement()["engine_url"]
    first.kill()
    await wait_until_async(lambda: not pid_alive(engine), timeout=10, what="engine gone too")
    second = fault.spawn("w", slow=True, parallel=1, ready=False, **limit)
    await wait_until_async(  # the same name: the first one's announcement is there until then
        lambda: (second.announcement() or {}).get("engine_url") not in (None, url),
        timeout=60,
        what="the second worker announced",
    )
    kills = await kill_while_busy(second, decoding=False, most=5, until=answered)
    assert_exactly_once(await fault.ledger.settle(timeout=60))
    answer = fault.ledger.answers(poison)[0]["payload"]
    assert answer.get("error") == "upstream_failed", (kills, answer)
    assert (kills, answer["details"]["engine_deaths"]) == (2, 3), (kills, answer)
    await assert_still_serving(fault)
