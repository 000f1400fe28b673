"""Every error code of the contract, each produced by a real situation."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import orjson
import psutil
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from orion_llamaccp.bus import keys
from orion_llamaccp.bus.envelope import CHAT_CANCEL
from orion_llamaccp.bus.scripts import DEAD_LETTER_ONCE
from orion_llamaccp.client import BusClient, work_queue_entry
from orion_llamaccp.worker.jobs import decode_job
from tests.bus.conftest import SpawnWorker, loading_worker
from tests.engine.conftest import PRELUDE
from tests.support.procs import RedisServer, free_port, wait_stream_acked, wait_until_async
from tests.support.proxy import HoldingProxy
from tests.support.workers import (
    BusRecorder,
    EngineProbe,
    metrics_once_counted,
    wait_replicas_counted,
)

HI = [{"role": "user", "content": "hello there"}]
# A generation that is not cut off: LONG tokens exactly (a worker's slot holds 8,192)
LONG = 4000
INTAKE = "orion:exec:request:LlamaCppHost:tiny"
STREAM = "orion:stream:llamacpp:tiny:request"


async def _publish_raw(redis_url: str, data: bytes, channel: str = INTAKE) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.publish(channel, data)
    finally:
        await client.aclose()


async def _answer_on(recorder: BusRecorder, channel: str, timeout: float = 20) -> dict:
    found = await wait_until_async(
        lambda: recorder.on(channel), timeout=timeout, what=f"an answer on {channel}"
    )
    return found[0].message  # type: ignore[index]


async def _a_long_one_generating(
    bus: BusClient, recorder: BusRecorder, via: Literal["pubsub", "stream"] = "pubsub"
) -> dict:
    """A long streamed request, generating: a one-slot worker's slot is busy with it for
    far longer than any test waits (about 40 s here), and each test cancels it."""
    long = bus.request(
        HI, profile="tiny", options={"stream": True, "max_tokens": 8000, "ignore_eos": True}
    )
    await bus.send(long, profile="tiny", via=via)
    await wait_until_async(
        lambda: recorder.on(long["reply_to"] + ":chunks"), timeout=20, what="the long one"
    )
    return long


async def _more_chunks(recorder: BusRecorder, request: dict) -> None:
    """Wait for a chunk of ``request`` beyond those already heard: it is still generating."""
    channel = request["reply_to"] + ":chunks"
    heard = len(recorder.on(channel))
    await wait_until_async(
        lambda: len(recorder.on(channel)) > heard, timeout=20, what="another chunk"
    )


async def test_validation_failed_for_extra_key_bad_uuid_and_bad_option(
    spawn_worker: SpawnWorker, bus: BusClient, redis_url: str, recorder: BusRecorder
) -> None:
    spawn_worker()
    extra = bus.request(HI, profile="tiny")
    extra["unexpected"] = 1
    bad_uuid = bus.request(HI, profile="tiny")
    bad_uuid["correlation_id"] = "not-a-uuid"
    bad_option = bus.request(HI, profile="tiny", options={"temperature": "hot"})
    bad_message = bus.request(HI, profile="tiny")
    bad_message["payload"]["messages"] = [{"role": "user", "content": ["parts"]}]
    for message in (extra, bad_uuid, bad_option, bad_message):
        await _publish_raw(redis_url, orjson.dumps(message))
    for message, loc in (
        (extra, "unexpected"),
        (bad_uuid, "correlation_id"),
        (bad_option, "payload.options.temperature"),
        (bad_message, "messages.0.content"),
    ):
        answer = await _answer_on(recorder, message["reply_to"])
        assert answer["payload"]["error"] == "validation_failed"
        locs = [e["loc"] for e in answer["payload"]["details"]["errors"]]
        assert any(loc in entry for entry in locs), (loc, locs)
        assert answer["payload"]["details"]["retryable"] is False
    errors = recorder.kinds("system.error")
    assert len(errors) >= 4
    # A correlation id that is no UUID: the answer and the error report make up one, the
    # same (each made up its own, and the report could not be matched with the answer).
    made_up = (await _answer_on(recorder, bad_uuid["reply_to"]))["correlation_id"]
    reports = [orjson.loads(e.data) for e in recorder.kinds("system.error")]
    assert made_up in [r["correlation_id"] for r in reports], (made_up, reports)


async def test_unsupported_kind(
    spawn_worker: SpawnWorker, bus: BusClient, recorder: BusRecorder
) -> None:
    spawn_worker()
    envelope = bus.request(HI, profile="tiny")
    envelope["kind"] = "llm.embed.request"
    await bus.send(envelope, profile="tiny")
    answer = await _answer_on(recorder, envelope["reply_to"])
    assert answer["payload"]["error"] == "unsupported_kind"


async def test_a_secret_in_a_failure_is_hidden_in_every_copy_of_it(
    spawn_worker: SpawnWorker, bus: BusClient, recorder: BusRecorder, redis_url: str
) -> None:
    """A failure's words may quote what it failed on (here a kind that holds the worker's
    ``HF_TOKEN``). Only the dead letter's copy was redacted: the caller's answer and the
    ``system.error`` every service hears quoted the secret."""
    secret = "hf_" + uuid.uuid4().hex
    spawn_worker(HF_TOKEN=secret)
    envelope = bus.request(HI, profile="tiny")
    envelope["kind"] = f"llm.{secret}.request"
    await bus.send(envelope, profile="tiny", via="stream")
    answer = await _answer_on(recorder, envelope["reply_to"])
    assert answer["payload"]["error"] == "unsupported_kind"
    errors = await wait_until_async(
        lambda: recorder.kinds("system.error"), timeout=10, what="the system.error"
    )
    client = aioredis.Redis.from_url(redis_url)
    try:
        letters = await wait_until_async(
            lambda: client.xrange(STREAM + ":dlq"), timeout=10, what="the dead letter"
        )
    finally:
        await client.aclose()
    copies = [
        orjson.dumps(answer["payload"]),
        *(orjson.dumps(orjson.loads(e.data)["payload"]) for e in errors),
        letters[0][1][b"error"],
    ]
    assert all(secret.encode() not in copy and b"***" in copy for copy in copies), copies


async def test_expired_request_is_not_generated(
    spawn_worker: SpawnWorker, bus: BusClient, recorder: BusRecorder, redis_url: str
) -> None:
    """An expired request is answered ``expired`` and not generated. Once a request has
    been served (its connection to llama-server is then open ahead), the next one is
    written to llama-server from its raw message, before it is validated and found expired:
    llama-server may start on it, and must be stopped, far short of the ``LONG`` tokens
    asked; and nothing of it reaches the caller."""
    worker = spawn_worker(slow=True, parallel=1, metrics=True)
    await wait_replicas_counted(recorder, redis_url, INTAKE, [worker.name])  # alone: ahead
    long = {"stream": True, "max_tokens": LONG, "ignore_eos": True}
    old = bus.request(HI, profile="tiny", ttl_ms=1000, options=long)
    old["created_at"] = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    work = bus.request(
        HI,
        profile="tiny",
        options=long,
        trace={"work": {"expires_at_ms": int(time.time() * 1000) - 10}},
    )
    async with EngineProbe(worker.announcement()["engine_url"]) as probe:
        for envelope, via in ((old, "pubsub"), (work, "stream")):
            decoded = await _refused_after_written_ahead(
                bus, recorder, probe, envelope, via, "expired"
            )
            assert decoded < LONG // 2, f"{via}: {decoded} tokens generated for it"
            assert recorder.on(envelope["reply_to"] + ":chunks") == [], via


async def test_overloaded_beyond_slots_and_local_queue(
    spawn_worker: SpawnWorker, bus: BusClient, recorder: BusRecorder
) -> None:
    """Beyond its slot and its local queue a worker answers ``overloaded``, and counts
    those answers in ``/metrics`` as it counts the others (they were missing there)."""
    port = free_port()
    spawn_worker(slow=True, parallel=1, ORION_LLAMACPP_LOCAL_QUEUE="1", METRICS_PORT=str(port))
    # Two seconds a generation or so: a first one that ended before the sixth send (the
    # test process descheduled on a loaded machine) let a third in (seen once, 300 tokens).
    envelopes = [bus.request(HI, profile="tiny", options={"max_tokens": 3000}) for _ in range(6)]
    for envelope in envelopes:
        await bus.send(envelope, profile="tiny")
    answers = [await _answer_on(recorder, e["reply_to"], timeout=60) for e in envelopes]
    codes = [a["payload"].get("error", "ok") for a in answers]
    assert codes.count("ok") == 2, codes  # one in the slot, one in the local queue
    assert codes.count("overloaded") == 4, codes
    overloaded = next(a for a in answers if a["payload"].get("error") == "overloaded")
    assert overloaded["payload"]["details"]["retryable"] is True
    text = await metrics_once_counted(port, 6)
    counted = {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "orion_llamacpp_requests_total"
    }
    assert counted == {"ok": 2, "overloaded": 4}, counted


async def test_context_exceeded(spawn_worker: SpawnWorker, bus: BusClient) -> None:
    spawn_worker(ctx=512, parallel=1)
    long = [{"role": "user", "content": "word " * 2000}]
    result = await bus.chat(long, profile="tiny", timeout=30)
    assert result.payload["error"] == "context_exceeded"
    assert result.payload["details"]["retryable"] is False


async def test_a_request_llama_server_refuses_is_answered_once_and_not_retried(
    spawn_worker: SpawnWorker, bus: BusClient, redis_url: str
) -> None:
    """llama-server answers 400 to a grammar it cannot parse: the request can never
    succeed, anywhere. The caller is told so at once (``validation_failed``, not
    retryable, with llama-server's words), and a stream entry is dead-lettered and acked
    after its one attempt. It used to be a retryable ``upstream_failed``, and a stream
    entry was run again up to ``ORION_LLAMACPP_MAX_DELIVERIES`` times first."""
    spawn_worker(parallel=1)
    options = {"max_tokens": 4, "grammar": "root ::= ( unclosed"}
    client = aioredis.Redis.from_url(redis_url)
    try:
        for via in ("pubsub", "stream"):
            result = await bus.chat(HI, profile="tiny", options=options, via=via, timeout=30)
            payload = result.payload
            assert payload.get("error") == "validation_failed", payload
            assert payload["details"]["retryable"] is False
            assert payload["details"]["upstream_status"] == 400, payload
            assert "llama-server" in str(payload["details"]), payload
        (letter,) = await wait_until_async(
            lambda: client.xrange(STREAM + ":dlq"), timeout=10, what="the dead letter"
        )
        assert letter[1][b"reason"] == b"validation_failed"
        assert letter[1][b"attempt"] == b"1"
        await wait_stream_acked(client, STREAM, "llamacpp:tiny")
        assert not await client.keys("orion:llamacpp:attempts:*")  # never a second attempt
    finally:
        await client.aclose()


@pytest.mark.parametrize("answered", [False, True], ids=["unanswered", "answered"])
async def test_a_stream_entry_delivered_too_often_is_settled_without_a_try(
    spawn_worker: SpawnWorker,
    bus: BusClient,
    recorder: BusRecorder,
    redis_url: str,
    answered: bool,
) -> None:
    """An entry delivered more than ``ORION_LLAMACPP_MAX_DELIVERIES`` times (its workers
    kept dying) is not tried again. Unanswered, its caller is told ``upstream_failed`` (not
    retryable) and it is dead-lettered; answered already (its worker died between the
    result and the ack), it is only acked: the caller has its answer, and a second word or
    a dead letter would be false. That one used to get both."""
    envelope = bus.request(HI, profile="tiny", options={"max_tokens": 2})
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.xgroup_create(STREAM, "llamacpp:tiny", id="0", mkstream=True)
        entry_id = await client.xadd(STREAM, work_queue_entry(envelope))
        for _ in range(2):  # two deliveries to a worker that died with it
            await client.xreadgroup("llamacpp:tiny", "gone", {STREAM: ">"})
            await client.xclaim(STREAM, "llamacpp:tiny", "gone", 0, [entry_id])
        if answered:
            job = decode_job(orjson.dumps(envelope), "stream", 1 << 20)
            await client.set(keys.answered(job.delivery_id), 1)
        spawn_worker(ORION_LLAMACPP_MAX_DELIVERIES="2", ORION_LLAMACPP_CLAIM_IDLE_MS="1000")
        await wait_stream_acked(client, STREAM, "llamacpp:tiny")
        await asyncio.sleep(0.5)  # an answer or a dead letter would be there by now
        letters = await client.xrange(STREAM + ":dlq")
        answers = [m.message["payload"] for m in recorder.on(envelope["reply_to"])]
    finally:
        await client.aclose()
    if answered:
        assert answers == [] and letters == []
    else:
        assert [a["error"] for a in answers] == ["upstream_failed"]
        assert answers[0]["details"]["retryable"] is False
        assert len(letters) == 1


BUG_INJECTED = """
# A bug in the worker, injected for one marked request: its answer's payload cannot be
# built (the test that imports this: test_a_bug_on_a_request_is_answered_once_bug_injected).
import orion_llamaccp.worker.handler as handler

_built = handler.ChatHandler._success_payload


def _broken(self, gen, attempt, job):
    if "BUG-HERE" in str(job.envelope.payload if job.envelope else ""):
        raise RuntimeError("an injected bug")
    return _built(self, gen, attempt, job)


handler.ChatHandler._success_payload = _broken
"""


async def test_a_bug_on_a_request_is_answered_once_and_dead_lettered_bug_injected(
    spawn_worker: SpawnWorker, bus: BusClient, recorder: BusRecorder, redis_url: str, tmp_path: Path
) -> None:
    """A bug the worker did not foresee, on one request (here a payload that cannot be
    built, injected through ``sitecustomize``): its caller gets one ``internal_error``
    (retryable), the fleet a ``system.error``, its stream entry a dead letter and an ack,
    and the worker serves the next request. No test reached that path at all."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(BUG_INJECTED)
    spawn_worker(PYTHONPATH=f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    doomed = bus.request([{"role": "user", "content": "BUG-HERE"}], profile="tiny")
    doomed["payload"]["options"] = {"max_tokens": 2}
    await bus.send(doomed, profile="tiny", via="stream")
    answer = await _answer_on(recorder, doomed["reply_to"])
    assert answer["payload"]["error"] == "internal_error", answer["payload"]
    assert answer["payload"]["details"]["retryable"] is True
    assert "an injected bug" in answer["payload"]["details"]["message"]
    client = aioredis.Redis.from_url(redis_url)
    try:
        await wait_stream_acked(client, STREAM, "llamacpp:tiny")
        letters = await client.xrange(STREAM + ":dlq")
    finally:
        await client.aclose()
    assert [letter[b"reason"] for _, letter in letters] == [b"internal_error"]
    reports = [m.message["payload"] for m in recorder.kinds("system.error")]
    assert [r["error"] for r in reports] == ["internal_error"], reports
    after = await bus.chat(HI, profile="tiny", options={"max_tokens": 2}, timeout=30)
    assert after.ok, after.payload
    await asyncio.sleep(0.5)  # a second answer would be out by now
    assert len(recorder.on(doomed["reply_to"])) == 1


async def test_a_stream_entry_at_its_delivery_limit_is_still_tried(
    spawn_worker: SpawnWorker, bus: BusClient
) -> None:
    """``ORION_LLAMACPP_MAX_DELIVERIES`` counts the tries an entry gets: with a limit of
    1 its one delivery is served. Only a delivery beyond the limit is refused (a limit
    taken as "at least" refused every fresh entry at 1, and the last try at 5; no test
    held the boundary)."""
    spawn_worker(ORION_LLAMACPP_MAX_DELIVERIES="1")
    result = await bus.chat(HI, profile="tiny", via="stream", options={"max_tokens": 2}, timeout=30)
    assert result.ok, result.payload


async def test_an_entry_whose_worker_died_after_its_dead_letter_has_one_dead_letter(
    spawn_worker: SpawnWorker,
    bus: BusClient,
    recorder: BusRecorder,
    redis_url: str,
    redis_server: RedisServer,
) -> None:
    """A worker that died between an entry's dead letter and its ack (here the reply to
    its dead letter held back, then SIGKILL) left the entry pending: the worker that took
    it over wrote a second dead letter beside the first. (A dead letter retried after a
    timeout did too.) The caller is answered once, as before."""
    proxy = HoldingProxy(redis_server.port).start()
    client = aioredis.Redis.from_url(redis_url)
    try:
        first = spawn_worker("first", ORION_BUS_URL=proxy.url)
        # Known to Redis, as after any dead letter before: otherwise the script's first
        # EVALSHA gets NOSCRIPT, whose reply the proxy holds, and nothing is written.
        await client.script_load(DEAD_LETTER_ONCE)
        envelope = bus.request(HI, profile="tiny")
        envelope["kind"] = "llm.embed.request"  # never servable: dead-lettered
        proxy.arm((STREAM + ":dlq").encode())
        await bus.send(envelope, profile="tiny", via="stream")
        await wait_until_async(lambda: proxy.held, timeout=20, what="the dead letter's reply held")
        await wait_until_async(
            lambda: client.xrange(STREAM + ":dlq"), timeout=10, what="the first dead letter"
        )
        first.kill()
        spawn_worker("second", ORION_LLAMACPP_CLAIM_IDLE_MS="1000")
        await wait_stream_acked(client, STREAM, "llamacpp:tiny")
        letters = await client.xrange(STREAM + ":dlq")
    finally:
        proxy.close()
        await client.aclose()
    assert len(letters) == 1, letters
    answers = [m.message["payload"]["error"] for m in recorder.on(envelope["reply_to"])]
    assert answers == ["unsupported_kind"], answers


async def test_a_caller_s_timeout_cannot_outlast_the_operator_s(
    spawn_worker: SpawnWorker, bus: BusClient
) -> None:
    """``options.timeout_sec`` may shorten a generation's deadline, not lengthen it past
    ``ORION_LLAMACPP_REQUEST_TIMEOUT_SEC``: a caller's 3600 s ran past the operator's."""
    spawn_worker(slow=True, parallel=1, ORION_LLAMACPP_REQUEST_TIMEOUT_SEC="1")
    options = {"max_tokens": 100_000, "ignore_eos": True, "timeout_sec": 3600}
    result = await bus.chat(HI, profile="tiny", options=options, timeout=30)
    assert result.payload.get("error") == "upstream_failed", result.payload
    assert "exceeded 1s" in result.payload["details"]["message"], result.payload


async def test_engine_unavailable_while_loading(
    spawn_worker: SpawnWorker, bus: BusClient, llama_server_bin
) -> None:
    worker = loading_worker(spawn_worker, llama_server_bin, seconds=6, ENGINE_WAIT_SEC="0.5")
    result = await bus.chat(HI, profile="tiny", timeout=30)
    assert result.payload["error"] == "engine_unavailable"
    assert result.payload["details"]["retryable"] is True
    assert result.payload["details"]["engine_state"] == "loading"
    worker.wait_ready()
    assert (await bus.chat(HI, profile="tiny", options={"max_tokens": 2}, timeout=30)).ok


async def test_a_request_that_expires_while_llama_server_loads_is_answered_expired_then(
    spawn_worker: SpawnWorker, bus: BusClient, recorder: BusRecorder, llama_server_bin
) -> None:
    """A request waiting for llama-server (loading here; a restart is the same wait) is
    answered ``expired`` when it expires, while llama-server still loads. It used to wait
    until it was ready (minutes, for a large model), or until the engine wait ran out:
    ``engine_unavailable``, ``retryable``, for a request no retry can serve any more."""
    worker = loading_worker(spawn_worker, llama_server_bin, seconds=8, ENGINE_WAIT_SEC="60")
    envelope = bus.request(HI, profile="tiny", ttl_ms=1000)
    await bus.send(envelope, profile="tiny")
    answer = await _answer_on(recorder, envelope["reply_to"], timeout=30)
    assert worker.state() == "loading"  # answered before llama-server was ready
    assert answer["payload"]["error"] == "expired", answer["payload"]
    assert "not generated" in answer["payload"]["details"]["message"]
    worker.wait_ready()
    assert (await bus.chat(HI, profile="tiny", options={"max_tokens": 2}, timeout=30)).ok


async def test_upstream_failed_when_llama_server_dies_mid_stream(
    spawn_worker: SpawnWorker, bus: BusClient
) -> None:
    worker = spawn_worker(slow=True)
    pid = worker.engine_pid()
    killed: list[int] = []

    def kill_on_first(delta: str) -> None:
        if not killed:
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)

    result = await bus.chat(
        HI,
        profile="tiny",
        stream=True,
        options={"max_tokens": 2000},
        on_delta=kill_on_first,
        timeout=60,
    )
    assert killed
    assert result.payload["error"] == "upstream_failed"
    assert result.payload["details"]["retryable"] is True
    worker.wait_ready()
    assert (await bus.chat(HI, profile="tiny", options={"max_tokens": 2}, timeout=30)).ok


async def test_a_request_sent_before_the_worker_sees_llama_server_dead_waits_for_it(
    spawn_worker: SpawnWorker, bus: BusClient, llama_server_bin
) -> None:
    """llama-server is dead, and the supervisor has not noticed yet (here the process it
    watches outlives llama-server by two seconds; in production, the moment before its
    exit is reaped). A pub/sub request sent then cannot reach it, and nothing of it was
    generated or published: it waits for the restart, as one sent during the restart
    does, and is answered, where it used to be refused at once (``engine_unavailable``)."""
    worker = spawn_worker(
        LLAMA_SERVER_BIN=str(PRELUDE),
        REAL_LLAMA_SERVER=str(llama_server_bin),
        PRELUDE_OUTLIVE="2",
    )
    (server,) = psutil.Process(worker.engine_pid()).children()
    server.kill()
    server.wait(5)
    assert worker.state() == "ready"  # the worker has not seen it yet
    result = await bus.chat(HI, profile="tiny", options={"max_tokens": 2}, timeout=60)
    assert result.ok, result.payload


async def test_cancel_stops_generation_and_frees_the_slot(
    spawn_worker: SpawnWorker, bus: BusClient, recorder: BusRecorder
) -> None:
    """A cancel after the first chunk answers ``cancelled`` and stops llama-server: its slot
    is idle and its own counter shows far fewer than the ``LONG`` tokens an uncut answer
    has (``ignore_eos``: exactly that many)."""
    worker = spawn_worker(slow=True, parallel=1, metrics=True)
    options = {"stream": True, "max_tokens": LONG, "ignore_eos": True}
    envelope = bus.request(HI, profile="tiny", options=options)
    async with EngineProbe(worker.announcement()["engine_url"]) as probe:
        before = await probe.settled()
        chat = asyncio.create_task(bus.chat(HI, profile="tiny", envelope=envelope, timeout=60))
        await wait_until_async(
            lambda: recorder.on(envelope["reply_to"] + ":chunks"), timeout=20, what="first chunk"
        )
        await bus.cancel(envelope["correlation_id"])
        result = await chat
        assert result.payload["error"] == "cancelled"
        decoded = await probe.settled() - before
    assert 1 <= decoded < LONG // 2, f"{decoded} tokens generated despite the cancel"


async def test_a_cancel_spelling_the_id_in_upper_case_stops_the_generation(
    spawn_worker: SpawnWorker, bus: BusClient, recorder: BusRecorder
) -> None:
    spawn_worker(slow=True, parallel=1)
    correlation_id = str(uuid.uuid4()).upper()  # a UUID all the same, as Orion parses it
    envelope = bus.request(
        HI,
        profile="tiny",
        options={"stream": True, "max_tokens": 4000},
        correlation_id=correlation_id,
    )
    chat = asyncio.create_task(bus.chat(HI, profile="tiny", envelope=envelope, timeout=60))
    await wait_until_async(
        lambda: recorder.on(envelope["reply_to"] + ":chunks"), timeout=20, what="first chunk"
    )
    await bus.cancel(correlation_id)  # exactly as the request carried it
    result = await chat
    assert result.payload.get("error") == "cancelled", result.payload
    assert result.payload["details"]["retryable"] is False


async def test_nothing_to_reply_to(
    spawn_worker: SpawnWorker, bus: BusClient, redis_url: str, recorder: BusRecorder
) -> None:
    spawn_worker()
    pubsub = bus.request(HI, profile="tiny")
    pubsub["reply_to"] = None
    stream = bus.request(HI, profile="tiny")
    stream["reply_to"] = None
    await bus.send(pubsub, profile="tiny")
    await bus.send(stream, profile="tiny", via="stream")
    client = aioredis.Redis.from_url(redis_url)
    try:

        async def dead_lettered() -> list:
            return await client.xrange(STREAM + ":dlq")

        entries = await wait_until_async(dead_lettered, timeout=20, what="dead letter")
        fields = {k.decode(): v for k, v in entries[0][1].items()}  # type: ignore[index]
        assert set(fields) == {
            "original_stream",
            "original_message_id",
            "error",
            "reason",
            "attempt",
            "failed_at_ms",
            "envelope",
        }
        assert fields["original_stream"].decode() == STREAM
        assert orjson.loads(fields["envelope"])["id"] == stream["id"]
        await wait_stream_acked(client, STREAM, "llamacpp:tiny")
    finally:
        await client.aclose()
    reports = [m.message for m in recorder.kinds("system.error")]
    assert any(r["correlation_id"] == pubsub["correlation_id"] for r in reports)


async def test_a_stream_entry_that_needs_no_reply_is_not_dead_lettered_for_expiring(
    spawn_worker: SpawnWorker, bus: BusClient, redis_url: str, recorder: BusRecorder
) -> None:
    """``trace.work.reply_optional``: a fire-and-forget entry with no ``reply_to``. One
    that expired is acked and reported on the error channel, not dead-lettered (as an
    entry that needed a reply and had none is): nothing about it needs a second look."""
    spawn_worker()
    envelope = bus.request(HI, profile="tiny", trace={"work": {"reply_optional": True}})
    envelope["reply_to"] = None
    envelope["ttl_ms"] = 1
    envelope["created_at"] = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    await bus.send(envelope, profile="tiny", via="stream")
    client = aioredis.Redis.from_url(redis_url)
    try:
        await wait_stream_acked(client, STREAM, "llamacpp:tiny")
        assert await client.xrange(STREAM + ":dlq") == []
    finally:
        await client.aclose()
    reports = [m.message for m in recorder.kinds("system.error")]
    assert [r["payload"]["error"] for r in reports] == ["expired"]


async def test_undecodable_stream_entries_are_dead_lettered(
    spawn_worker: SpawnWorker, redis_url: str
) -> None:
    spawn_worker()
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.xadd(STREAM, {"envelope": b"{not json"})
        await client.xadd(STREAM, {"something": b"else"})
        # A field name that is not UTF-8: the entry went unanswered and unacked for good
        await client.xadd(STREAM, {b"\xff\xfe": b"else"})

        async def three() -> bool:
            return len(await client.xrange(STREAM + ":dlq")) == 3

        await wait_until_async(three, timeout=20, what="three dead letters")
        reasons = {e[1][b"reason"] for e in await client.xrange(STREAM + ":dlq")}
        assert reasons == {b"validation_failed"}
        await wait_stream_acked(client, STREAM, "llamacpp:tiny")
    finally:
        await client.aclose()


@pytest.mark.parametrize("envelope", [b'{"schema": "orion.envelope", "kind": "llm.cha', None])
async def test_a_stream_entry_with_an_unreadable_envelope_is_answered_where_its_fields_say(
    spawn_worker: SpawnWorker,
    bus: BusClient,
    redis_url: str,
    recorder: BusRecorder,
    envelope: bytes | None,
) -> None:
    """Orion's work queue writes ``reply_to`` and ``correlation_id`` in each entry beside
    the envelope. An envelope cut short (or missing) used to leave its caller waiting
    for good: the error went to ``system.error`` alone, under a made-up id."""
    spawn_worker()
    entry = work_queue_entry(bus.request(HI, profile="tiny"))
    if envelope is None:
        del entry["envelope"]
    else:
        entry["envelope"] = envelope
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.xadd(STREAM, entry)
        await wait_stream_acked(client, STREAM, "llamacpp:tiny")
    finally:
        await client.aclose()
    answer = await _answer_on(recorder, entry["reply_to"])
    assert answer["payload"]["error"] == "validation_failed", answer
    assert answer["correlation_id"] == entry["correlation_id"]
    reports = [m.message for m in recorder.kinds("system.error")]
    assert [r["correlation_id"] for r in reports] == [entry["correlation_id"]]
    await asyncio.sleep(0.5)  # a second answer would be out by now
    assert len(recorder.on(entry["reply_to"])) == 1


async def test_a_stream_entry_without_envelope_nor_correlation_id_gets_one_made_up_once(
    spawn_worker: SpawnWorker, redis_url: str, recorder: BusRecorder
) -> None:
    """Nothing in the entry says its correlation id: the answer and the error report make
    up one, the same (each made up its own, and the two could not be matched)."""
    spawn_worker()
    reply_to = f"orion:test:reply:{uuid.uuid4()}"
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.xadd(STREAM, {"reply_to": reply_to, "kind": "llm.chat.request"})
        await wait_stream_acked(client, STREAM, "llamacpp:tiny")
    finally:
        await client.aclose()
    answer = await _answer_on(recorder, reply_to)
    assert answer["payload"]["error"] == "validation_failed", answer
    reports = [m.message for m in recorder.kinds("system.error")]
    assert [r["correlation_id"] for r in reports] == [answer["correlation_id"]], reports


async def test_acked_entries_leave_the_stream_and_dead_letters_keep_the_newest(
    spawn_worker: SpawnWorker, bus: BusClient, redis_url: str
) -> None:
    """An ack alone kept every request's envelope in the stream for good, and every dead
    letter (up to 8 MB each): the worker deletes the entries every group is done with,
    and the dead-letter stream keeps the newest ``ORION_LLAMACPP_DLQ_MAXLEN``."""
    spawn_worker(ORION_LLAMACPP_STREAM_TRIM_SEC="0.2", ORION_LLAMACPP_DLQ_MAXLEN="2")
    client = aioredis.Redis.from_url(redis_url)
    try:
        for _ in range(4):
            request = bus.request(HI, profile="tiny", options={"max_tokens": 2})
            await bus.send(request, profile="tiny", via="stream")
        letters = [await client.xadd(STREAM, {"envelope": b"{not json %d" % n}) for n in range(4)]
        await wait_stream_acked(client, STREAM, "llamacpp:tiny", timeout=30)

        async def trimmed() -> bool:  # the last entry read too: no request left behind
            return await client.xlen(STREAM) == 0

        await wait_until_async(trimmed, timeout=20, what="the acked entries deleted")
        kept = [f[b"original_message_id"] for _, f in await client.xrange(STREAM + ":dlq")]
    finally:
        await client.aclose()
    assert len(kept) == 2 and set(kept) <= set(letters), (kept, letters)


async def test_worker_survives_garbage(
    spawn_worker: SpawnWorker, bus: BusClient, redis_url: str
) -> None:
    worker = spawn_worker()
    for data in (b"\xff\xfe", b"[]", b"null", b'"text"', b"{}", b'{"schema": "orion.envelope"}'):
        await _publish_raw(redis_url, data)
    assert (await bus.chat(HI, profile="tiny", options={"max_tokens": 2}, timeout=30)).ok
    assert worker.proc is not None and worker.proc.poll() is None
    assert uuid.UUID(str((await bus.chat(HI, profile="tiny", timeout=30)).envelope.id))


async def test_a_request_written_before_validation_is_cut_off_when_invalid(
    spawn_worker: SpawnWorker, bus: BusClient, recorder: BusRecorder, redis_url: str
) -> None:
    """The worker writes a request to llama-server from the message's raw JSON, before
    pydantic has validated it (``Generator.ahead``). One that then fails validation is
    answered ``validation_failed``, and llama-server stops generating it: its own counter
    shows far fewer than the ``LONG`` tokens asked."""
    worker = spawn_worker(slow=True, parallel=1, metrics=True)
    await wait_replicas_counted(recorder, redis_url, INTAKE, [worker.name])  # alone: ahead
    async with EngineProbe(worker.announcement()["engine_url"]) as probe:
        for via in ("pubsub", "stream"):
            envelope = bus.request(
                HI, profile="tiny", options={"max_tokens": LONG, "ignore_eos": True, "top_p": 2}
            )
            decoded = await _refused_after_written_ahead(
                bus, recorder, probe, envelope, via, "validation_failed"
            )
            assert decoded < LONG // 2, f"{via}: {decoded} tokens generated, not cut off"


async def _refused_after_written_ahead(
    bus: BusClient, recorder: BusRecorder, probe: EngineProbe, envelope: dict, via: str, code: str
) -> int:
    """Send ``envelope`` after a warm-up (a connection open ahead: it is written to
    llama-server from its raw JSON before it is validated); it must be answered ``code``.
    Returns how many tokens llama-server generated for it."""
    assert (await bus.chat(HI, profile="tiny", options={"max_tokens": 2})).ok  # warm
    before = await probe.settled()
    task = await probe.last_task()
    await bus.send(envelope, profile="tiny", via=via)
    answer = await _answer_on(recorder, envelope["reply_to"])
    assert answer["payload"]["error"] == code, answer
    what = f"the {code} request ({via}) reached it: was it not written ahead?"
    return await probe.settled(after_task=task, what=what) - before


async def test_a_cancel_while_an_error_answer_goes_out_never_takes_the_answer_away(
    spawn_worker: SpawnWorker, bus: BusClient, recorder: BusRecorder
) -> None:
    """A request answered with an error (here ``expired``) and a cancel for it a moment
    later: the cancel must not land inside the answer's own round trips and leave the
    caller none (it did for about a quarter of such pairs). Each request gets one answer,
    whichever of the two. The delays spread the cancels over the answer's window."""
    spawn_worker()
    expired = datetime.now(UTC) - timedelta(seconds=5)
    envelopes = []
    for n in range(80):
        envelope = bus.request(HI, profile="tiny", ttl_ms=1000)
        envelope["created_at"] = expired.isoformat()
        envelopes.append(envelope)
        await bus.send(envelope, profile="tiny")
        await asyncio.sleep((n % 16) * 0.0001)
        await bus.cancel(envelope["correlation_id"])
        await asyncio.sleep(0.01)
    await wait_until_async(
        lambda: all(recorder.on(e["reply_to"]) for e in envelopes),
        timeout=30,
        what="an answer for every request",
    )
    await asyncio.sleep(0.5)  # a second answer would arrive now
    answers = [
        [m.message["payload"]["error"] for m in recorder.on(e["reply_to"])] for e in envelopes
    ]
    assert all(len(a) == 1 and a[0] in ("expired", "cancelled") for a in answers), answers


async def test_a_request_cancelled_while_queued_is_answered_at_once(
    spawn_worker: SpawnWorker, bus: BusClient, recorder: BusRecorder
) -> None:
    """A pub/sub request waiting for a slot (the only one busy with a long answer) and
    then cancelled is answered ``cancelled`` at once, not once the slot frees (minutes, for
    a long generation); the long one goes on, and the cancelled one is answered once."""
    spawn_worker(slow=True, parallel=1)
    long = await _a_long_one_generating(bus, recorder)
    queued = bus.request(HI, profile="tiny", options={"max_tokens": 2})
    await bus.send(queued, profile="tiny")

    def queued_up() -> bool:  # heard and queued (were it not, the cancel would be lost)
        return any(
            m.message["payload"]["details"]["queue_local"] >= 1
            for m in recorder.kinds("system.health.v1")
        )

    await wait_until_async(queued_up, timeout=20, what="a heartbeat with the request queued")
    await bus.cancel(queued["correlation_id"])
    answer = await _answer_on(recorder, queued["reply_to"])
    assert answer["payload"]["error"] == "cancelled", answer
    assert recorder.on(long["reply_to"]) == []  # answered while the long one still runs
    await _more_chunks(recorder, long)  # the long one goes on
    await bus.cancel(long["correlation_id"])
    await _answer_on(recorder, long["reply_to"])
    assert len(recorder.on(queued["reply_to"])) == 1


async def test_a_request_cancelled_while_queued_gives_its_place_in_the_queue_back(
    spawn_worker: SpawnWorker, bus: BusClient, recorder: BusRecorder
) -> None:
    """One slot, busy, and a local queue of one: a request queued and then cancelled
    leaves the queue at once, so the next request takes its place instead of being told
    ``overloaded``. The cancelled one used to count as waiting until the slot freed."""
    spawn_worker(slow=True, parallel=1, ORION_LLAMACPP_LOCAL_QUEUE="1")
    long = await _a_long_one_generating(bus, recorder)
    cancelled, after = (bus.request(HI, profile="tiny", options={"max_tokens": 2}) for _ in "ab")
    await bus.send(cancelled, profile="tiny")
    await wait_until_async(
        lambda: any(
            m.message["payload"]["details"]["queue_local"] == 1
            for m in recorder.kinds("system.health.v1")
        ),
        timeout=20,
        what="a heartbeat with the request queued",
    )
    await bus.cancel(cancelled["correlation_id"])
    answer = await _answer_on(recorder, cancelled["reply_to"])
    assert answer["payload"]["error"] == "cancelled", answer
    await bus.send(after, profile="tiny")
    await asyncio.sleep(0.5)  # an ``overloaded`` would be back by now
    assert recorder.on(after["reply_to"]) == []  # queued, behind the long one
    await bus.cancel(long["correlation_id"])
    result = await _answer_on(recorder, after["reply_to"])
    assert "content" in result["payload"], result


async def test_a_request_that_expires_while_queued_is_answered_then_and_gives_its_place_back(
    spawn_worker: SpawnWorker, bus: BusClient, recorder: BusRecorder
) -> None:
    """One slot, busy, and a local queue of one: a request queued with ``ttl_ms`` is
    answered ``expired`` when its time is up, while the long one still runs, and the
    next request takes its place in the queue instead of being told ``overloaded``. It
    used to wait for the slot, and be answered only once the long one had ended."""
    spawn_worker(slow=True, parallel=1, ORION_LLAMACPP_LOCAL_QUEUE="1")
    long = await _a_long_one_generating(bus, recorder)
    expiring = bus.request(HI, profile="tiny", ttl_ms=1500, options={"max_tokens": 2})
    await bus.send(expiring, profile="tiny")
    answer = await _answer_on(recorder, expiring["reply_to"], timeout=60)
    assert answer["payload"]["error"] == "expired", answer
    assert "ttl_ms=1500" in answer["payload"]["details"]["message"], answer
    assert recorder.on(long["reply_to"]) == []  # answered while the long one still runs
    after = bus.request(HI, profile="tiny", options={"max_tokens": 2})
    await bus.send(after, profile="tiny")
    await asyncio.sleep(0.5)  # an ``overloaded`` would be back by now
    assert recorder.on(after["reply_to"]) == []  # queued, behind the long one
    await bus.cancel(long["correlation_id"])
    result = await _answer_on(recorder, after["reply_to"])
    assert "content" in result["payload"], result


async def test_a_request_cancelled_during_its_claim_is_answered_cancelled_not_overloaded(
    spawn_worker: SpawnWorker,
    bus: BusClient,
    recorder: BusRecorder,
    redis_server: RedisServer,
    redis_url: str,
) -> None:
    """With a replica on the channel a pub/sub request waits for its claim; its cancel
    comes meanwhile (a proxy in front of Redis holds the claim's reply). The worker is
    full (one slot, busy; no local queue): the request is answered ``cancelled``, as its
    caller asked, not ``overloaded`` (retryable, which would invite a resend)."""
    silent = aioredis.Redis.from_url(redis_url)
    listening = silent.pubsub()
    await listening.subscribe(INTAKE)  # before the worker's first count: never alone
    proxy = HoldingProxy(redis_server.port).start()
    try:
        spawn_worker(slow=True, parallel=1, ORION_BUS_URL=proxy.url, ORION_LLAMACPP_LOCAL_QUEUE="0")
        long = await _a_long_one_generating(bus, recorder)
        envelope = bus.request(HI, profile="tiny", options={"max_tokens": 2})
        proxy.arm(b"orion:llamacpp:claim:" + envelope["id"].encode())
        await bus.send(envelope, profile="tiny")
        await wait_until_async(lambda: proxy.held, timeout=5, what="the claim held")
        await bus.cancel(envelope["correlation_id"])
        await asyncio.sleep(0.5)  # heard: the pub/sub connection is not held
        proxy.release()
        answer = await _answer_on(recorder, envelope["reply_to"])
        assert answer["payload"]["error"] == "cancelled", answer
        await bus.cancel(long["correlation_id"])
        await _answer_on(recorder, long["reply_to"])
    finally:
        proxy.close()
        await listening.aclose()
        await silent.aclose()


async def test_a_cancel_heard_before_its_stream_entry_is_read_still_applies(
    spawn_worker: SpawnWorker, bus: BusClient, recorder: BusRecorder
) -> None:
    """A stream request waiting in the backlog (the one slot busy), cancelled there: read
    later, it is answered ``cancelled`` without a generation (it used to run in full).
    A request the flow sends afterwards under the same correlation id runs."""
    spawn_worker(slow=True, parallel=1)
    long = await _a_long_one_generating(bus, recorder, via="stream")
    waiting = bus.request(HI, profile="tiny", options={"max_tokens": 8})
    await bus.send(waiting, profile="tiny", via="stream")
    await bus.cancel(waiting["correlation_id"])
    assert recorder.on(long["reply_to"]) == []  # the cancel came while the entry waited
    await bus.cancel(long["correlation_id"])  # its slot free: the entry is read now
    await _answer_on(recorder, long["reply_to"])
    answer = await _answer_on(recorder, waiting["reply_to"])
    assert answer["payload"]["error"] == "cancelled", answer
    later = bus.request(
        HI, profile="tiny", options={"max_tokens": 8}, correlation_id=waiting["correlation_id"]
    )
    await bus.send(later, profile="tiny", via="stream")
    assert "content" in (await _answer_on(recorder, later["reply_to"]))["payload"]


async def test_a_request_created_before_a_cancel_it_arrives_after_is_answered_at_once(
    spawn_worker: SpawnWorker, bus: BusClient, recorder: BusRecorder
) -> None:
    """A pub/sub request that reaches the worker after its cancel (created before it, sent
    by a slower path) is not queued behind the busy slot: answered ``cancelled`` at once."""
    spawn_worker(slow=True, parallel=1)
    long = await _a_long_one_generating(bus, recorder)
    late = bus.request(HI, profile="tiny", options={"max_tokens": 2})
    late["created_at"] = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    await bus.cancel(late["correlation_id"])
    await bus.send(late, profile="tiny")
    answer = await _answer_on(recorder, late["reply_to"])
    assert answer["payload"]["error"] == "cancelled", answer
    assert recorder.on(long["reply_to"]) == []  # answered while the long one still runs
    await bus.cancel(long["correlation_id"])


async def test_a_cancel_landing_before_the_record_s_reply_gives_the_record_back(
    spawn_worker: SpawnWorker,
    bus: BusClient,
    recorder: BusRecorder,
    redis_server: RedisServer,
    redis_url: str,
) -> None:
    """The worker talks to Redis through a proxy that holds back the reply to the
    idempotency record's ``SET NX``: the record is in Redis, the worker does not know yet,
    and the cancel lands right there. The worker must give the record up, not leave it
    running: a resend of the question would wait out its lease (30 s) for an answer that
    never comes."""
    proxy = HoldingProxy(redis_server.port).start()
    raw = aioredis.Redis.from_url(redis_url)
    try:
        spawn_worker(slow=True, parallel=1, ORION_BUS_URL=proxy.url)
        options = {"stream": True, "max_tokens": 4000, "ignore_eos": True}
        # A first request cancelled mid-generation gives its record up too, which loads
        # the release script: held back, the reply to its first EVALSHA (NOSCRIPT) would
        # hold up the release below.
        first = bus.request(HI, profile="tiny", options=options)
        await bus.send(first, profile="tiny")
        await wait_until_async(
            lambda: recorder.on(first["reply_to"] + ":chunks"), timeout=20, what="a first chunk"
        )
        await bus.cancel(first["correlation_id"])
        assert (await _answer_on(recorder, first["reply_to"]))["payload"]["error"] == "cancelled"
        envelope = bus.request(HI, profile="tiny", options=options)
        proxy.arm(b"orion:llamacpp:dedup:")
        await bus.send(envelope, profile="tiny", via="stream")

        async def record() -> list[bytes]:
            return await raw.keys("orion:llamacpp:dedup:*")

        (key,) = await wait_until_async(record, timeout=20, what="the record set in Redis")
        assert proxy.held >= 1 and orjson.loads(await raw.get(key))["state"] == "running"
        await bus.cancel(envelope["correlation_id"])

        async def given_back() -> bool:
            return not await raw.exists(key)

        # Bounds the wait only: left running, the record would outlive it (its lease is 30 s).
        await wait_until_async(given_back, timeout=10, what="the record given back")
        proxy.release()
        answer = await _answer_on(recorder, envelope["reply_to"])
        assert answer["payload"]["error"] == "cancelled", answer
    finally:
        proxy.close()
        await raw.aclose()


async def test_a_cancel_before_a_lone_worker_s_claim_is_back_gives_the_record_back(
    spawn_worker: SpawnWorker,
    bus: BusClient,
    recorder: BusRecorder,
    redis_server: RedisServer,
    redis_url: str,
) -> None:
    """A worker alone on its channel starts a pub/sub request before its claim is back,
    and sends the idempotency record beside the claim. A proxy holds the claim's reply
    (the record is in Redis by then) and the cancel lands right there: the release saw
    the claim unsettled and kept the record, which then ran out its lease (30 s) while a
    resend of the question waited for an answer that never came."""
    proxy = HoldingProxy(redis_server.port).start()
    raw = aioredis.Redis.from_url(redis_url)
    try:
        spawn_worker(slow=True, parallel=1, ORION_BUS_URL=proxy.url)
        warm = bus.request(HI, profile="tiny", options={"max_tokens": 2})  # scripts loaded
        await bus.send(warm, profile="tiny")
        await _answer_on(recorder, warm["reply_to"])
        before = set(await raw.keys("orion:llamacpp:dedup:*"))  # the first one's, stored
        envelope = bus.request(HI, profile="tiny", options={"max_tokens": 4000})
        proxy.arm(b"orion:llamacpp:claim:" + envelope["id"].encode())
        await bus.send(envelope, profile="tiny")

        async def record() -> list[bytes]:
            return [k for k in await raw.keys("orion:llamacpp:dedup:*") if k not in before]

        (key,) = await wait_until_async(record, timeout=20, what="the record set in Redis")
        assert proxy.held >= 1 and orjson.loads(await raw.get(key))["state"] == "running"
        await bus.cancel(envelope["correlation_id"])
        await asyncio.sleep(0.5)  # heard: the pub/sub connection is not held
        proxy.release()
        answer = await _answer_on(recorder, envelope["reply_to"])
        assert answer["payload"]["error"] == "cancelled", answer

        async def given_back() -> bool:
            return not await raw.exists(key)

        # Bounds the wait only: left running, the record would outlive it (its lease is 30 s).
        await wait_until_async(given_back, timeout=10, what="the record given back")
    finally:
        proxy.close()
        await raw.aclose()


async def test_a_generation_done_in_time_is_answered_though_its_record_s_reply_came_late(
    spawn_worker: SpawnWorker,
    bus: BusClient,
    recorder: BusRecorder,
    redis_server: RedisServer,
) -> None:
    """A streamed request's chunks wait for the claim and the record (its ownership); a
    proxy holds the record's reply longer than the caller's ``timeout_sec`` while
    llama-server finishes well within it. The wait for the last chunks ran inside the
    generation's timeout: a finished generation was answered ``upstream_failed``,
    "generation exceeded 1s" (and dead-lettered, for a stream entry)."""
    proxy = HoldingProxy(redis_server.port).start()
    try:
        spawn_worker(ORION_BUS_URL=proxy.url)
        warm = bus.request(HI, profile="tiny", options={"max_tokens": 2})  # scripts loaded
        await bus.send(warm, profile="tiny", via="stream")
        await _answer_on(recorder, warm["reply_to"])
        envelope = bus.request(
            HI, profile="tiny", options={"stream": True, "max_tokens": 8, "timeout_sec": 1}
        )
        proxy.arm(b"orion:llamacpp:dedup:")
        await bus.send(envelope, profile="tiny", via="stream")
        await wait_until_async(lambda: proxy.held, timeout=10, what="the record's reply held")
        await asyncio.sleep(2.5)  # past the caller's second: the 8 tokens are long done
        proxy.release()
        answer = await _answer_on(recorder, envelope["reply_to"])
        assert "content" in answer["payload"], answer
        chunks = [m.message["payload"] for m in recorder.on(envelope["reply_to"] + ":chunks")]
        assert "".join(c["delta"] for c in chunks) == answer["payload"]["content"]
    finally:
        proxy.close()


async def test_a_cancel_read_with_its_request_gets_one_answer_and_frees_the_slot(
    spawn_worker: SpawnWorker, bus: BusClient, recorder: BusRecorder, redis_url: str
) -> None:
    """A request and its ``llm.chat.cancel`` in one write reach the worker in one read: the
    request's task is spawned and cancelled before it ever ran. It must still answer
    ``cancelled`` once, give its slot back and stop llama-server (its request was written
    as the message was read): llama-server's own counter shows far fewer than the
    ``LONG`` tokens an uncut generation makes (its slot is idle either way by the time a
    next request has had it)."""
    worker = spawn_worker(slow=True, parallel=1, metrics=True)
    assert (await bus.chat(HI, profile="tiny", options={"max_tokens": 2})).ok  # warm
    envelope = bus.request(
        HI, profile="tiny", options={"max_tokens": LONG, "ignore_eos": True, "stream": True}
    )
    cancel = bus.outbox.encode(
        CHAT_CANCEL,
        {"correlation_id": envelope["correlation_id"]},
        correlation_id=envelope["correlation_id"],
    )
    async with EngineProbe(worker.announcement()["engine_url"]) as probe:
        before = await probe.settled()
        client = aioredis.Redis.from_url(redis_url)
        async with client.pipeline(transaction=False) as pipe:
            pipe.publish(INTAKE, orjson.dumps(envelope))
            pipe.publish("orion:llamacpp:cancel", cancel)
            await pipe.execute()
        await client.aclose()
        answer = await _answer_on(recorder, envelope["reply_to"])
        assert answer["payload"]["error"] == "cancelled", answer
        assert (await bus.chat(HI, profile="tiny", options={"max_tokens": 2}, timeout=30)).ok
        decoded = await probe.settled() - before
    assert decoded < LONG // 2, f"{decoded} tokens generated despite the cancel"
    assert len(recorder.on(envelope["reply_to"])) == 1
