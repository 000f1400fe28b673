"""The cancel registry's memory of recent cancels (``RecentCancels``), on its own: which
later jobs a remembered cancel reaches. The bus tests show it end to end
(``test_a_cancel_heard_before_its_stream_entry_is_read_still_applies``)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from uuid import uuid4

import orjson

from orion_llamaccp.bus.envelope import Envelope, ServiceRef
from orion_llamaccp.worker.inflight import InFlight, RecentCancels
from orion_llamaccp.worker.jobs import Job, decode_job

T0 = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def job(correlation_id: str, created_at: datetime) -> Job:
    envelope = Envelope(
        kind="llm.chat.request",
        source=ServiceRef(name="caller"),
        correlation_id=correlation_id,
        created_at=created_at,
    )
    return Job(raw=b"{}", transport="stream", key=str(envelope.id), envelope=envelope)


def test_a_job_filed_after_its_cancel_is_marked_unless_created_after_it() -> None:
    inflight = InFlight(RecentCancels(keep_sec=60))
    flow = str(uuid4())
    assert inflight.cancel(flow, T0) == []  # nothing of it here yet
    before, same, after = (job(flow, T0 + timedelta(seconds=s)) for s in (-1, 0, 1))
    other = job(str(uuid4()), T0 - timedelta(seconds=1))
    for filed in (before, same, after, other):
        inflight.file(filed)
    assert [j.user_cancelled for j in (before, same, after, other)] == [True, True, False, False]


def test_the_latest_of_two_cancels_counts_and_the_oldest_go_first() -> None:
    recent = RecentCancels(keep_sec=60, limit=2)
    flow, second, third = (str(uuid4()) for _ in range(3))
    recent.add(flow, T0 + timedelta(seconds=5))
    recent.add(flow, T0)  # an older cancel, heard late, does not narrow the first
    assert recent.cancels(job(flow, T0 + timedelta(seconds=4)))
    recent.add(second, T0)
    recent.add(third, T0)
    assert len(recent) == 2
    assert not recent.cancels(job(flow, T0))  # the oldest, dropped for the limit
    assert recent.cancels(job(third, T0))


def test_cancels_are_forgotten_after_keep_sec_and_kept_not_at_all_with_zero() -> None:
    recent = RecentCancels(keep_sec=0.05)
    flow = str(uuid4())
    recent.add(flow, T0)
    assert recent.cancels(job(flow, T0))
    time.sleep(0.1)
    assert not recent.cancels(job(flow, T0))
    recent.add(str(uuid4()), T0)  # adding prunes what expired
    assert len(recent) == 1
    off = RecentCancels(keep_sec=0)
    off.add(flow, T0)
    assert len(off) == 0 and not off.cancels(job(flow, T0))


def test_a_job_already_answering_is_not_marked() -> None:
    inflight = InFlight(RecentCancels(keep_sec=60))
    flow = str(uuid4())
    inflight.cancel(flow, T0)
    answering = job(flow, T0)
    answering.answering = True
    inflight.file(answering)
    assert not answering.user_cancelled


async def test_a_cancel_leaves_a_job_alone_that_is_sending_its_answer() -> None:
    """A cancel that lands while a job's answer goes out (its generation done) would stop
    the answer, not the request: the caller would get ``cancelled`` for a finished one.
    ``file`` honoured ``answering``; nothing held ``cancel`` to it."""
    inflight = InFlight(RecentCancels(keep_sec=60))
    flow = str(uuid4())
    sending = job(flow, T0)
    task = asyncio.create_task(asyncio.sleep(10))
    await asyncio.sleep(0)  # running: a task that has not run is only marked
    inflight.file(sending, task)
    sending.answering = True
    inflight.cancel(flow, T0 + timedelta(seconds=1))
    await asyncio.sleep(0)
    assert not task.cancelled() and not sending.user_cancelled
    running = job(flow, T0)
    other = asyncio.create_task(asyncio.sleep(10))
    await asyncio.sleep(0)
    inflight.file(running, other)
    inflight.cancel(flow, T0 + timedelta(seconds=2))  # not answering yet: stopped
    await asyncio.sleep(0)
    assert other.cancelled() and running.user_cancelled
    task.cancel()


def test_a_legacy_dict_is_reached_only_by_a_cancel_heard_after_it_arrived() -> None:
    """A legacy dict's ``created_at`` is the moment it was decoded, on our clock: compared
    with a cancel's, from the sender's, it would let a skew decide. Only a cancel heard
    after the request arrived (one read with it, or during its claim) reaches it."""
    inflight = InFlight(RecentCancels(keep_sec=60))
    flow, early = str(uuid4()), str(uuid4())

    def legacy(correlation_id: str) -> Job:
        message = {"event": "chat", "reply_to": "r", "correlation_id": correlation_id}
        return decode_job(orjson.dumps({**message, "payload": {}}), "pubsub", 1 << 20)

    heard_first = datetime.now(UTC) + timedelta(hours=1)  # a sender's clock far ahead
    inflight.cancel(early, heard_first)
    arrived_after = legacy(early)
    arrived_before = legacy(flow)
    inflight.cancel(flow, datetime.now(UTC) - timedelta(hours=1))  # ... or far behind
    for filed in (arrived_after, arrived_before):
        inflight.file(filed)
    assert not arrived_after.user_cancelled
    assert arrived_before.user_cancelled


async def test_a_dated_cancel_stops_only_the_jobs_of_its_flow_created_before_it() -> None:
    """An Orion flow may send a request, cancel it, and send the next request under the
    same correlation id; read before the cancel (a backed-up inbox), that next request
    runs on: the cancel is older than it. A cancel that carries no date reaches them all."""
    inflight = InFlight(RecentCancels(keep_sec=60))
    flow = str(uuid4())
    jobs = [job(flow, T0 + timedelta(seconds=s)) for s in (-1, 1)]
    tasks = [inflight.spawn(asyncio.sleep(60), j) for j in jobs]
    await asyncio.sleep(0)  # running: a cancel reaches their tasks
    inflight.cancel(flow, T0)
    await asyncio.sleep(0)
    assert [t.cancelled() for t in tasks[:2]] == [True, False]
    inflight.cancel(flow, None)
    await asyncio.sleep(0)
    assert tasks[1].cancelled()
