"""Hostile input on both intakes: a fixed corpus, hypothesis-generated envelopes, huge
messages and ten thousand of them. Every message that names a reply_to gets exactly one
clear answer; stream entries are dead-lettered and acked; the worker keeps serving; no
input reaches the logs unescaped."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import os
import uuid
from typing import Any

import orjson
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orion_llamaccp.client import work_queue_entry
from tests.faults.conftest import Fault, assert_exactly_once, assert_still_serving
from tests.support.procs import subscribers, wait_stream_acked, wait_until_async

INTAKE = "orion:exec:request:LlamaCppHost:tiny"
STREAM = "orion:stream:llamacpp:tiny:request"


def base(fault: Fault) -> dict[str, Any]:
    return fault.client.request(
        [{"role": "user", "content": "hi"}], profile="tiny", options={"max_tokens": 2}
    )


OK = "ok"
# Codes after which the contract dead-letters a stream entry that carries a reply_to
# (it can never succeed); ``expired`` and ``context_exceeded`` are answered and acked only.
DEAD_LETTERED = {"validation_failed", "unsupported_kind"}


def corpus(fault: Fault) -> list[tuple[str, Any, str]]:
    """(name, envelope dict, the outcome the contract gives it on either intake: an error
    code or ``ok``); reply_to is set per intake by the sender."""
    cases: list[tuple[str, Any, str]] = []

    def mutate(name: str, change: Any, expected: str) -> None:
        envelope = base(fault)
        change(envelope)
        cases.append((name, envelope, expected))

    invalid = "validation_failed"
    mutate("extra top-level key", lambda e: e.update(extra=1), invalid)
    mutate("extra key in source", lambda e: e["source"].update(pid=7), invalid)
    mutate("missing kind", lambda e: e.pop("kind"), invalid)
    mutate("missing source", lambda e: e.pop("source"), invalid)
    mutate("bad uuid id", lambda e: e.update(id="1234"), invalid)
    mutate("bad uuid correlation", lambda e: e.update(correlation_id="x" * 36), invalid)
    mutate("wrong kind", lambda e: e.update(kind="llm.embed.request"), "unsupported_kind")
    mutate("kind is a number", lambda e: e.update(kind=42), invalid)
    mutate("payload is a list", lambda e: e.update(payload=[1, 2]), invalid)
    mutate("messages is a string", lambda e: e["payload"].update(messages="hi"), invalid)
    # Not settled by the contract (it says "list"): the code requires one message at least.
    mutate("no messages", lambda e: e["payload"].update(messages=[]), invalid)
    mutate("unknown role", lambda e: e["payload"]["messages"][0].update(role="robot"), invalid)
    mutate(
        "content parts",
        lambda e: e["payload"]["messages"][0].update(content=[{"a": 1}]),
        invalid,
    )
    mutate("stream key at payload level", lambda e: e["payload"].update(stream=True), invalid)
    mutate("options is a list", lambda e: e["payload"].update(options=[1]), invalid)
    mutate(
        "temperature a string",
        lambda e: e["payload"]["options"].update(temperature="hot"),
        invalid,
    )
    # Not settled by the contract (it names max_tokens, not its range): the project's own
    # rule (llama_request.py) is that a bad knob is validation_failed, not llama-server's.
    mutate("negative max_tokens", lambda e: e["payload"]["options"].update(max_tokens=-5), invalid)
    mutate("ttl a string", lambda e: e.update(ttl_ms="soon"), invalid)
    mutate("created_at garbage", lambda e: e.update(created_at="yesterday"), invalid)
    mutate(
        "expired ttl",
        lambda e: e.update(ttl_ms=1, created_at="2020-01-01T00:00:00Z"),
        "expired",
    )
    mutate(
        "log injection in kind",
        lambda e: e.update(kind="x\nFAKE LOG LINE \x1b[31mred"),
        "unsupported_kind",
    )
    for label, text in (
        ("nul", "a\u0000b"),
        ("rtl override", "\u202eevil"),
        ("zero width", "a\u200b\u200db"),
        ("emoji", "🦙" * 50),
        ("combining", "e" + "\u0301" * 200),
        ("bom", "\ufeffhi"),
    ):
        mutate(
            f"unicode {label}",
            lambda e, t=text: e["payload"]["messages"][0].update(content=t),
            OK,
        )
    # A slot holds 8,192 tokens here (16,384 context, 2 slots).
    mutate(
        "prompt longer than the context",
        lambda e: e["payload"]["messages"][0].update(content="word " * 20_000),
        "context_exceeded",
    )
    mutate(
        "1 MB prompt",
        lambda e: e["payload"]["messages"][0].update(content="x" * 1_000_000),
        "context_exceeded",
    )
    # Over ORION_LLAMACPP_MAX_MESSAGE_BYTES (8 MB). On pub/sub it never reaches a worker.
    mutate(
        "50 MB payload",
        lambda e: e["payload"]["messages"][0].update(content="y" * 50_000_000),
        invalid,
    )
    return cases


# (raw message, the code the contract gives it). None names no reply_to: each one is
# reported on orion:system:error and, from the stream, dead-lettered.
RAW = [
    (b"", "validation_failed"),
    (b"not json", "validation_failed"),
    (b"\xff\xfe\x00", "validation_failed"),
    (b"[]", "validation_failed"),
    (b"null", "validation_failed"),
    (b"42", "validation_failed"),
    (b'"text"', "validation_failed"),
    # A dict without schema is a legacy message of kind legacy.message (the contract, 1).
    (b"{}", "unsupported_kind"),
    (b'{"schema": "orion.envelope"}', "validation_failed"),
    (b'{"reply_to": ["a"]}', "validation_failed"),
    # An event that is not a string is no chat event: before, it raised TypeError past the
    # codec (the request, written ahead on pub/sub, ran on for nobody; the entry looped).
    (
        b'{"event": ["chat"], "payload": {"messages": [{"role": "user", "content": "hi"}]}}',
        "unsupported_kind",
    ),
    (
        b'{"event": {"chat": 1}, "payload": {"messages": [{"role": "user", "content": "hi"}]}}',
        "unsupported_kind",
    ),
    (b"{" * 10_000, "validation_failed"),
]


def with_reply(envelope: dict[str, Any], tag: str) -> dict[str, Any]:
    """A copy with its own reply_to and, unless the id is what is being broken, its own id
    (two messages with one id are one message: replicas claim by id)."""
    envelope = copy.deepcopy(envelope)
    envelope["reply_to"] = f"test:hostile:{tag}:{uuid.uuid4().hex}"
    if isinstance(envelope.get("id"), str) and len(envelope["id"]) == 36:
        envelope["id"] = str(uuid.uuid4())
    return envelope


def own_request(envelope: dict[str, Any], tag: str) -> dict[str, Any]:
    """``with_reply``, and its own correlation id unless that is what is being broken: one
    question under one correlation id is a duplicate, answered with the first copy's
    stored result, and each intake must be seen to serve its own copy."""
    envelope = with_reply(envelope, tag)
    if envelope.get("correlation_id") != "x" * 36:
        envelope["correlation_id"] = str(uuid.uuid4())
    return envelope


def raw_request_id(raw: bytes) -> str:
    """The id the worker files a pub/sub message under when it has no envelope id of its
    own (``codec.message_key``): how its system.error report is told apart."""
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:40]


def system_errors(fault: Fault) -> list[dict[str, Any]]:
    return [m.message["payload"] for m in fault.recorder.on("orion:system:error")]


async def test_fixed_corpus_on_both_intakes(fault: Fault) -> None:
    """Every corpus case gets the outcome the contract gives it, on each intake, once; the
    stream's dead-letter stream holds exactly the entries that can never succeed (each
    RAW one, each invalid or unsupported envelope), with the right reason."""
    worker = fault.spawn("w", ORION_LLAMACPP_LOCAL_QUEUE="64")
    sync = redis.Redis.from_url(fault.redis.url)
    expected: list[tuple[str, str, dict[str, Any], str]] = []  # intake, case, sent, outcome
    dead: dict[str, tuple[str, bytes | None]] = {}  # stream id -> (reason, raw bytes)
    try:
        too_big_for_pubsub = None
        for name, envelope, outcome in corpus(fault):
            via_stream = fault.ledger.add(own_request(envelope, "stream"))
            entry_id = sync.xadd(STREAM, work_queue_entry(via_stream)).decode()
            expected.append(("stream", name, via_stream, outcome))
            if outcome in DEAD_LETTERED:
                dead[entry_id] = (outcome, None)
            if name == "50 MB payload":
                too_big_for_pubsub = own_request(envelope, "pubsub")
                continue
            via_pubsub = fault.ledger.add(own_request(envelope, "pubsub"))
            sync.publish(INTAKE, orjson.dumps(via_pubsub))
            expected.append(("pubsub", name, via_pubsub, outcome))
        for raw, code in RAW:
            sync.publish(INTAKE, raw)
            dead[sync.xadd(STREAM, {"envelope": raw}).decode()] = (code, raw)
        assert_exactly_once(await fault.ledger.settle(timeout=120))

        # Nothing to answer: each RAW message is reported on orion:system:error, once per
        # intake, with its code. Waited for before the big message below cuts the recorder
        # off too (it subscribes to every channel).
        def reports() -> dict[tuple[str, str], list[str]]:
            found: dict[tuple[str, str], list[str]] = {}
            for error in system_errors(fault):
                key = (error["details"].get("request_id"), error["details"].get("transport"))
                found.setdefault(key, []).append(error["error"])
            return found

        wanted = {(raw_request_id(raw), "pubsub"): [code] for raw, code in RAW}
        wanted |= {  # a stream entry is named by its id
            (entry_id, "stream"): [code]
            for entry_id, (code, raw) in dead.items()
            if raw is not None
        }
        await wait_until_async(
            lambda: all(k in reports() for k in wanted), timeout=30, what="system.error reports"
        )
        await asyncio.sleep(0.5)  # a second report would show up
        assert {k: v for k, v in reports().items() if k in wanted} == wanted
        # Redis cuts off any subscriber that a message over its pub/sub output buffer limit
        # (32 MB hard, by default) would go to, with whatever else was queued for it: such a
        # message never reaches a worker. Sent last and alone; the worker must reconnect.
        sync.publish(INTAKE, orjson.dumps(too_big_for_pubsub))
    finally:
        sync.close()
    wrong = []
    for intake, name, envelope, outcome in expected:
        answer = fault.ledger.answers(envelope)[0]["payload"]
        got = answer.get("error", OK)
        if got != outcome:
            wrong.append((intake, name, outcome, got, answer.get("details")))
        elif got != OK:
            assert answer["details"]["message"], answer
            assert answer["details"]["retryable"] is False, answer  # the error table
        else:
            assert answer["meta"]["transport"] == intake, answer  # generated, not a copy
    assert not wrong, "\n".join(map(str, wrong))
    await wait_stream_acked(fault.raw, STREAM, "llamacpp:tiny")
    letters = {
        fields[b"original_message_id"].decode(): fields
        for _, fields in await fault.raw.xrange(STREAM + ":dlq")
    }
    assert len(letters) == await fault.raw.xlen(STREAM + ":dlq")  # one letter per entry
    assert set(letters) == set(dead), (sorted(letters), sorted(dead))
    for entry_id, (reason, raw) in dead.items():
        letter = letters[entry_id]
        assert letter[b"reason"].decode() == reason, (entry_id, letter)
        assert letter[b"original_stream"].decode() == STREAM
        if raw is not None:
            assert letter[b"envelope"] == raw, entry_id
    await wait_until_async(
        lambda: "pub/sub connection lost" in worker.log(),
        what="Redis dropping the worker's subscription",
    )
    await wait_until_async(lambda: _subscribed(fault), what="the worker subscribed again")
    # Redis may cut off the new connection too if the big message was still on its way
    # (a busy Redis, a ping timeout): wait until a discovery probe makes the round trip.
    await wait_until_async(
        lambda: _discovery_answered(fault),
        timeout=30,
        interval=0.5,
        what="the worker's subscription to work again",
    )
    await assert_still_serving(fault)
    assert worker.proc is not None and worker.proc.poll() is None
    log = worker.log()
    assert "\x1b" not in log
    assert not any(line.startswith("FAKE") for line in log.splitlines())


async def _subscribed(fault: Fault) -> bool:
    return await subscribers(fault.raw, INTAKE) == 1  # the new connection only


async def _discovery_answered(fault: Fault) -> bool:
    probe = fault.client.outbox.envelope(
        "llm.profile.discover.v1", {}, reply_to=f"test:probe:{uuid.uuid4().hex}"
    )
    pubsub = fault.raw.pubsub()
    await pubsub.subscribe(probe["reply_to"])
    try:
        await fault.raw.publish("orion:llm:profile:discover", orjson.dumps(probe))
        for _ in range(10):
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if message is not None:
                return True
        return False
    finally:
        await pubsub.aclose()


def json_values() -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text()
    )
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
        ),
        max_leaves=6,
    )


PATHS = [
    ("id",),
    ("correlation_id",),
    ("kind",),
    ("schema",),
    ("schema_version",),
    ("source",),
    ("source", "name"),
    ("created_at",),
    ("ttl_ms",),
    ("trace",),
    ("causality_chain",),
    ("payload",),
    ("payload", "messages"),
    ("payload", "options"),
    ("payload", "options", "max_tokens"),
    ("payload", "options", "stream"),
    ("payload", "attachments"),
]


@st.composite
def mutated(draw: st.DrawFn, template: dict[str, Any]) -> dict[str, Any]:
    envelope = copy.deepcopy(template)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        target = envelope
        for key in path[:-1]:
            target = target.get(key) if isinstance(target, dict) else None
            if not isinstance(target, dict):
                break
        if not isinstance(target, dict):
            continue
        action = draw(st.sampled_from(["set", "delete", "extra"]))
        if action == "set":
            target[path[-1]] = draw(json_values())
        elif action == "delete":
            target.pop(path[-1], None)
        else:
            target[draw(st.text(min_size=1, max_size=6))] = draw(json_values())
    return envelope


async def test_generated_envelopes_on_both_intakes(fault: Fault) -> None:
    worker = fault.spawn("w", ORION_LLAMACPP_LOCAL_QUEUE="256")
    sync = redis.Redis.from_url(fault.redis.url)
    template = base(fault)

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        derandomize=os.environ.get("HYPOTHESIS_RANDOM") is None,
        suppress_health_check=list(HealthCheck),
    )
    @given(envelope=mutated(template), via_stream=st.booleans())
    def send(envelope: dict[str, Any], via_stream: bool) -> None:
        envelope = fault.ledger.add(with_reply(envelope, "hyp"))
        if via_stream:
            # The stdlib encoder: generated values include integers beyond 64 bits.
            sync.xadd(STREAM, {"envelope": json.dumps(envelope), "kind": "llm.chat.request"})
        else:
            sync.publish(INTAKE, json.dumps(envelope))

    try:
        send()
    finally:
        sync.close()
    assert_exactly_once(await fault.ledger.settle(timeout=120))
    await wait_stream_acked(fault.raw, STREAM, "llamacpp:tiny", timeout=30)
    assert worker.proc is not None and worker.proc.poll() is None
    await assert_still_serving(fault)


async def test_ten_thousand_messages(fault: Fault) -> None:
    worker = fault.spawn("w")
    sync = redis.Redis.from_url(fault.redis.url)
    try:
        pipe = sync.pipeline(transaction=False)
        for i in range(10_000):
            reply = f"test:flood:{i}"
            fault.ledger.sent.append({"reply_to": reply})
            body = (
                {"reply_to": reply, "schema": "orion.envelope", "n": i}
                if i % 2
                else {"reply_to": reply, "kind": "llm.chat.request", "payload": {"messages": "x"}}
            )
            pipe.publish(INTAKE, orjson.dumps(body))
            if i % 500 == 499:
                pipe.execute()
        pipe.execute()
    finally:
        sync.close()
    assert_exactly_once(await fault.ledger.settle(timeout=180))
    await assert_still_serving(fault)
    assert worker.proc is not None and worker.proc.poll() is None
