"""One request, two of it at once: a rolling deploy under one instance id (the
replacement starts while the old worker drains: ``INSTANCE_ID`` defaults to
``{node}:{profile}``; docs/guarantees.md says the draining worker leaves its entries to
it), and one envelope sent twice (on both intakes, or twice to the stream)."""

from __future__ import annotations

import asyncio
import os
import signal

import orjson
import pytest

from orion_llamaccp.bus import keys
from tests.faults.conftest import Fault, assert_chunks_whole, assert_exactly_once, chunks_of
from tests.support.procs import wait_stream_acked, wait_until_async
from tests.support.workers import EngineProbe, WorkerProc


async def _streaming_on_w(
    fault: Fault, hi: list, drain_sec: int, tokens: int = 6000, **env: str
) -> tuple[WorkerProc, dict]:
    """Worker ``w`` on one slot of the slow model, a long stream request streaming on it."""
    old = fault.spawn(
        "w", slow=True, parallel=1, ORION_LLAMACPP_DRAIN_TIMEOUT_SEC=str(drain_sec), **env
    )
    options = {"stream": True, "max_tokens": tokens, "ignore_eos": True}
    envelope = fault.ledger.add(fault.client.request(hi, profile="tiny", options=options))
    await fault.client.send(envelope, profile="tiny", via="stream")
    await wait_until_async(lambda: chunks_of(fault, envelope), timeout=30, what="a chunk")
    return old, envelope


async def test_a_replacement_under_a_draining_worker_s_id_does_not_generate_its_entries_again(
    fault: Fault, hi: list
) -> None:
    """An entry the old worker is still generating in its drain is its to finish: the
    replacement, which shares its consumer name, must not take it as a leftover of its
    own and generate it a second time (a second attempt's chunks interleaved with the
    first's on the caller's channel, and twice the work)."""
    old, envelope = await _streaming_on_w(fault, hi, drain_sec=60)
    old.signal(signal.SIGTERM)
    new = fault.spawn("w", slow=True, parallel=1, ready=False)  # same INSTANCE_ID: "w"
    assert_exactly_once(await fault.ledger.settle(timeout=120))
    answer = fault.ledger.answers(envelope)[0]["payload"]
    assert "error" not in answer, answer
    assert old.proc is not None and old.proc.wait(90) == 0
    assert new.proc is not None and new.proc.poll() is None
    attempts = sorted({c["attempt"] for c in chunks_of(fault, envelope)})
    assert attempts == [1], f"generated again by the replacement: attempts {attempts}"
    assert_chunks_whole(fault, envelope, answer)


async def test_a_stream_request_is_not_answered_by_the_refusal_of_its_pubsub_copy(
    fault: Fault, hi: list
) -> None:
    """The same envelope sent on both intakes (a caller that falls back from pub/sub to
    the work queue, say) is one request (``Job.delivery_id``). Its pub/sub copy, refused
    by a worker that stops, must not be the durable request's answer: the stream entry
    is served by the next worker, and that answer is the one its caller waits for."""
    old, envelope = await _streaming_on_w(fault, hi, drain_sec=3)
    assert await fault.client.send(envelope, profile="tiny", via="pubsub") == 1
    await _stopped_with_one_queued(fault, old)
    await _answered_by_its_generation(fault, envelope)


STREAM, GROUP = "orion:stream:llamacpp:tiny:request", "llamacpp:tiny"


async def _stopped_with_one_queued(fault: Fault, old: WorkerProc) -> None:
    """``old`` told to stop (SIGTERM) with the pub/sub copy just sent queued behind its
    streamed request (one slot), and stopped; a worker ``w2`` started after it."""
    await asyncio.sleep(0.5)
    old.signal(signal.SIGTERM)
    assert old.proc is not None and old.proc.wait(60) == 0
    fault.spawn("w2", slow=True, parallel=1)


async def _answered_by_its_generation(fault: Fault, envelope: dict) -> None:
    """Every request answered once, ``envelope``'s with a generation, not an error."""
    assert_exactly_once(await fault.ledger.settle(timeout=120))
    answer = fault.ledger.answers(envelope)[0]["payload"]
    assert "error" not in answer, answer


@pytest.mark.parametrize("refusal", ["overloaded", "stopping"])
async def test_a_stream_request_still_unread_is_not_answered_by_the_refusal_of_its_pubsub_copy(
    fault: Fault, hi: list, refusal: str
) -> None:
    """As above, with the stream copy still waiting in the backlog (not read yet: nothing
    of it in Redis but its entry). The pub/sub copy is refused, ``overloaded`` (one slot,
    no local queue) or "worker is stopping" (queued as the drain begins): that retryable
    error was the durable request's one answer, and its generation, later, was dropped
    as a repeat. The stream copy answers it now, with its generation."""
    overloaded = refusal == "overloaded"
    env = {"ORION_LLAMACPP_LOCAL_QUEUE": "0"} if overloaded else {}
    old, _ = await _streaming_on_w(fault, hi, drain_sec=3, tokens=4000, **env)
    envelope = fault.ledger.add(fault.client.request(hi, profile="tiny", options={"max_tokens": 8}))
    await fault.client.send(envelope, profile="tiny", via="stream")  # unread: no slot free
    assert await fault.client.send(envelope, profile="tiny", via="pubsub") == 1
    if not overloaded:
        await _stopped_with_one_queued(fault, old)
    await _answered_by_its_generation(fault, envelope)
    await wait_stream_acked(fault.raw, STREAM, GROUP)


@pytest.mark.parametrize(
    "limit",
    ["ORION_LLAMACPP_MAX_DELIVERIES", "ORION_LLAMACPP_REQUEST_CRASH_LIMIT"],
    ids=["tries", "engine_deaths"],
)
async def test_a_copy_whose_twin_fails_takes_the_twin_s_answer_and_is_acked(
    fault: Fault, hi: list, limit: str
) -> None:
    """One envelope added to the stream twice: the copy waits while the first generates.
    llama-server dies, and the first gives the request up with a failure, its one answer
    (``upstream_failed`` after its one try, or after one engine death with it inside).
    The copy took that for a twin leaving it unanswered: it generated the request again,
    its chunks dropped as those of an answered request and its entry left pending until
    another delivery, or, at the engine-death limit, it was dead-lettered a second time.
    It only acks its entry now."""
    worker = fault.spawn("w", slow=True, parallel=2, **{limit: "1"})
    options = {"stream": True, "max_tokens": 3000, "ignore_eos": True}
    envelope = fault.ledger.add(fault.client.request(hi, profile="tiny", options=options))
    for _ in range(2):
        await fault.client.send(envelope, profile="tiny", via="stream")
    await wait_until_async(lambda: len(chunks_of(fault, envelope)) > 5, timeout=30, what="chunks")
    os.kill(worker.engine_pid(), signal.SIGKILL)
    assert_exactly_once(await fault.ledger.settle(timeout=60))
    answer = fault.ledger.answers(envelope)[0]["payload"]
    assert answer.get("error") == "upstream_failed", answer
    await wait_stream_acked(fault.raw, STREAM, GROUP)
    assert await fault.raw.xlen(f"{STREAM}:dlq") == 1
    worker.wait_ready()
    async with EngineProbe(worker.announcement()["engine_url"]) as engine:
        assert await engine.settled() == 0, "the copy generated the request again"


async def test_a_stream_copy_added_after_its_pubsub_copy_was_answered_is_acked_at_once(
    fault: Fault, hi: list
) -> None:
    """The pub/sub copy is refused (``overloaded``) before the stream copy is added: no
    copy to leave its answer to, so that is the request's answer, and the stream copy's
    generation is stopped at its first chunk, dropped by Redis as one of an answered
    request. Its entry stayed pending until another delivery (the claim idle time, 10
    minutes by default), only to be acked then: it is acked at once."""
    await _streaming_on_w(fault, hi, drain_sec=3, tokens=2000, ORION_LLAMACPP_LOCAL_QUEUE="0")
    options = {"stream": True, "max_tokens": 2000, "ignore_eos": True}
    envelope = fault.ledger.add(fault.client.request(hi, profile="tiny", options=options))
    assert await fault.client.send(envelope, profile="tiny", via="pubsub") == 1
    await wait_until_async(lambda: fault.ledger.answers(envelope), timeout=30, what="refused")
    await fault.client.send(envelope, profile="tiny", via="stream")
    assert_exactly_once(await fault.ledger.settle(timeout=120))
    assert fault.ledger.answers(envelope)[0]["payload"]["error"] == "overloaded"
    await wait_stream_acked(fault.raw, STREAM, GROUP, timeout=60)
    assert chunks_of(fault, envelope) == []


async def _pubsub_copy_streaming(fault: Fault, hi: list, parallel: int, **env: str) -> tuple:
    """Worker ``w``: an envelope's pub/sub copy streaming on it, then its stream copy
    added: read, and waiting on the pub/sub copy (a slot free), or unread (none free)."""
    worker = fault.spawn("w", slow=True, parallel=parallel, **env)
    options = {"stream": True, "max_tokens": 6000, "ignore_eos": True}
    envelope = fault.ledger.add(fault.client.request(hi, profile="tiny", options=options))
    assert await fault.client.send(envelope, profile="tiny", via="pubsub") == 1
    await wait_until_async(lambda: len(chunks_of(fault, envelope)) > 5, timeout=30, what="chunks")
    await fault.client.send(envelope, profile="tiny", via="stream")
    if parallel > 1:

        async def read() -> bool:
            return (await fault.raw.xpending(STREAM, GROUP))["pending"] == 1

        await wait_until_async(read, timeout=30, what="the stream copy read")
    return worker, envelope


async def _answered_by_its_stream_copy_anew(fault: Fault, envelope: dict) -> None:
    """``envelope`` answered once, by its stream copy's generation, under an attempt above
    the pub/sub copy's (its chunks, from ``seq`` 0, are the answer's text), its entry
    acked."""
    await _answered_by_its_generation(fault, envelope)
    answer = fault.ledger.answers(envelope)[0]["payload"]
    assert answer["meta"]["transport"] == "stream", answer["meta"]
    attempts = sorted({c["attempt"] for c in chunks_of(fault, envelope)})
    assert attempts == [1, answer["meta"]["attempt"]], attempts
    assert_chunks_whole(fault, envelope, answer)
    await wait_stream_acked(fault.raw, STREAM, GROUP, timeout=30)


@pytest.mark.parametrize("parallel", [2, 1], ids=["waiting", "unread"])
async def test_a_pubsub_copy_that_streamed_then_failed_leaves_the_request_to_its_stream_copy(
    fault: Fault, hi: list, parallel: int
) -> None:
    """One envelope on both intakes, its pub/sub copy generating, its chunks out, when
    llama-server dies: that copy's ``upstream_failed`` (retryable) was the durable
    request's one answer, its stream copy only acked. The stream copy takes the request
    over now and generates it under the next attempt (its chunks tell the caller to drop
    the first's): read and waiting on the pub/sub copy, or still in the backlog (handed
    over, not released: it generated under the first's attempt, its first chunks dropped
    as repeats and the rest spliced onto the first's text)."""
    worker, envelope = await _pubsub_copy_streaming(fault, hi, parallel)
    os.kill(worker.engine_pid(), signal.SIGKILL)
    await _answered_by_its_stream_copy_anew(fault, envelope)


async def test_a_pubsub_copy_a_drain_cut_off_leaves_the_request_to_its_stream_copy(
    fault: Fault, hi: list
) -> None:
    """As above, the pub/sub copy cut off by its worker's drain ("worker stopped before
    finishing the request"), its stream copy unread: the next worker answers it."""
    old, envelope = await _pubsub_copy_streaming(fault, hi, 1, ORION_LLAMACPP_DRAIN_TIMEOUT_SEC="3")
    old.signal(signal.SIGTERM)
    assert old.proc is not None and old.proc.wait(60) == 0
    fault.spawn("w2", slow=True, parallel=1)
    await _answered_by_its_stream_copy_anew(fault, envelope)


async def test_a_pubsub_copy_past_its_time_limit_answers_for_its_stream_copy(
    fault: Fault, hi: list
) -> None:
    """A pub/sub copy whose generation ran past the request's ``timeout_sec`` is not
    left to its stream copy: under the same limit that would run as long, and a stream
    entry's generation past its limit is not tried again. Its ``upstream_failed`` is the
    request's answer, the stream copy only acked (not generated, nor dead-lettered)."""
    fault.spawn("w", slow=True, parallel=2)
    options = {"stream": True, "max_tokens": 6000, "ignore_eos": True, "timeout_sec": 2}
    envelope = fault.ledger.add(fault.client.request(hi, profile="tiny", options=options))
    assert await fault.client.send(envelope, profile="tiny", via="pubsub") == 1
    await wait_until_async(lambda: chunks_of(fault, envelope), timeout=30, what="a chunk")
    await fault.client.send(envelope, profile="tiny", via="stream")
    assert_exactly_once(await fault.ledger.settle(timeout=60))
    answer = fault.ledger.answers(envelope)[0]["payload"]
    assert answer.get("error") == "upstream_failed", answer
    assert "exceeded" in answer["details"]["message"], answer
    assert answer["meta"]["transport"] == "pubsub", answer["meta"]
    await wait_stream_acked(fault.raw, STREAM, GROUP, timeout=30)
    assert {c["attempt"] for c in chunks_of(fault, envelope)} == {1}
    assert await fault.raw.xlen(f"{STREAM}:dlq") == 0


async def _record(fault: Fault) -> dict | None:
    """The one idempotency record in the scenario's Redis, if any."""
    found = [key async for key in fault.raw.scan_iter(match=keys.dedup("tiny", "*"))]
    assert len(found) <= 1, found
    value = await fault.raw.get(found[0]) if found else None
    return orjson.loads(value) if value else None


async def test_a_stream_copy_left_unanswered_after_a_hand_over_hands_the_request_on(
    fault: Fault, hi: list
) -> None:
    """The pub/sub copy streamed and failed (llama-server died) and handed the request
    over to its stream copy, which took it over and was then left unanswered itself (its
    worker's drain cut it off). Released, the record let the envelope's next copy in the
    stream (the producer's XADD retried), read only after that, begin afresh: it generated
    under the pub/sub copy's attempt, its first chunks dropped as repeats and the rest
    spliced onto the pub/sub copy's text. Handed on, the copy generates under the next
    attempt, its chunks from ``seq`` 0. (The first entry's own redelivery was never at
    risk: a redelivery always numbers its attempt above those before.)"""
    worker, envelope = await _pubsub_copy_streaming(
        fault, hi, 2, ORION_LLAMACPP_DRAIN_TIMEOUT_SEC="1", ORION_LLAMACPP_CLAIM_IDLE_MS="60000"
    )
    os.kill(worker.engine_pid(), signal.SIGKILL)

    async def taken_over() -> bool:
        record = await _record(fault)
        return record is not None and "handed_by" in record

    await wait_until_async(taken_over, timeout=30, what="the stream copy took the request over")
    worker.signal(signal.SIGTERM)
    assert worker.proc is not None and worker.proc.wait(60) == 0
    # Handed back as the drain ended, the first entry is idle 60 s, not the 10 minutes
    # the next worker's XAUTOCLAIM waits for: the copy below is all it reads.
    await fault.client.send(envelope, profile="tiny", via="stream")
    fault.spawn("w2", slow=True, parallel=1)
    assert_exactly_once(await fault.ledger.settle(timeout=120))
    answer = fault.ledger.answers(envelope)[0]["payload"]
    assert "error" not in answer, answer
    assert answer["meta"]["attempt"] > 1, answer["meta"]
    assert_chunks_whole(fault, envelope, answer)


async def test_a_redelivery_left_unanswered_before_it_streamed_still_hands_the_request_on(
    fault: Fault, hi: list
) -> None:
    """The entry streamed on ``w`` and was cut off by its drain (handed on). Its
    redelivery on ``w2`` took the record over and was cut off too, before a chunk of its
    own went out (``w2``'s llama-server frozen). Released then, the record let the
    envelope's next copy in the stream (the producer's XADD retried) begin afresh under
    the first attempt's number: its first chunks dropped as repeats of ``w``'s and the
    rest spliced onto that text. A redelivery hands it on as well: an attempt of it may
    have streamed before, on the worker it came from."""
    idle = {"ORION_LLAMACPP_CLAIM_IDLE_MS": "60000"}  # the hand-back's idle: w2 takes it
    old, envelope = await _streaming_on_w(fault, hi, drain_sec=1, **idle)
    # Its frozen llama-server not taken for hung while the test needs it so.
    w2 = fault.spawn(
        "w2",
        slow=True,
        parallel=1,
        ORION_LLAMACPP_DRAIN_TIMEOUT_SEC="1",
        ORION_LLAMACPP_HEALTH_TIMEOUT_SEC="120",
        ORION_LLAMACPP_PROGRESS_TIMEOUT_SEC="0",
        **idle,
    )
    engine = w2.engine_pid()
    os.kill(engine, signal.SIGSTOP)
    try:
        old.signal(signal.SIGTERM)
        assert old.proc is not None and old.proc.wait(60) == 0

        async def redelivered() -> bool:
            record = await _record(fault)
            return record is not None and record["state"] == "running" and "handed_by" in record

        await wait_until_async(redelivered, timeout=60, what="the redelivery took the record")
        w2.signal(signal.SIGTERM)

        async def given_up() -> bool:
            record = await _record(fault)
            return record is None or record["state"] != "running"

        await wait_until_async(given_up, timeout=30, what="w2's drain gave the record up")
    finally:
        os.kill(engine, signal.SIGCONT)
    assert w2.proc is not None and w2.proc.wait(60) == 0
    assert {c["attempt"] for c in chunks_of(fault, envelope)} == {1}  # none of w2's
    # Handed back idle 60 s, not the 10 minutes w3's XAUTOCLAIM waits for: the copy
    # below is all it reads.
    await fault.client.send(envelope, profile="tiny", via="stream")
    fault.spawn("w3", slow=True, parallel=1)
    assert_exactly_once(await fault.ledger.settle(timeout=120))
    answer = fault.ledger.answers(envelope)[0]["payload"]
    assert "error" not in answer, answer
    assert answer["meta"]["attempt"] > 1, answer["meta"]
    assert_chunks_whole(fault, envelope, answer)
