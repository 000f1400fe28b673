"""Hostile input on both intakes: a fixed corpus, hypothesis-generated envelopes, huge
messages and ten thousand of them. Every message that names a reply_to gets exactly one
clear answer; stream entries are dead-lettered and acked; the worker keeps serving; no
input reaches the logs unescaped."""

from __future__ import annotations

import copy
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
ERROR_CODES = {"validation_failed", "unsupported_kind", "context_exceeded", "expired"}


def base(fault: Fault) -> dict[str, Any]:
    return fault.client.request(
        [{"role": "user", "content": "hi"}], profile="tiny", options={"max_tokens": 2}
    )


def corpus(fault: Fault) -> list[tuple[str, Any]]:
    """(name, envelope dict or raw bytes); reply_to is set per intake by the sender."""
    cases: list[tuple[str, Any]] = []

    def mutate(name: str, change: Any) -> None:
        envelope = base(fault)
        change(envelope)
        cases.append((name, envelope))

    mutate("extra top-level key", lambda e: e.update(extra=1))
    mutate("extra key in source", lambda e: e["source"].update(pid=7))
    mutate("missing kind", lambda e: e.pop("kind"))
    mutate("missing source", lambda e: e.pop("source"))
    mutate("bad uuid id", lambda e: e.update(id="1234"))
    mutate("bad uuid correlation", lambda e: e.update(correlation_id="x" * 36))
    mutate("wrong kind", lambda e: e.update(kind="llm.embed.request"))
    mutate("kind is a number", lambda e: e.update(kind=42))
    mutate("payload is a list", lambda e: e.update(payload=[1, 2]))
    mutate("messages is a string", lambda e: e["payload"].update(messages="hi"))
    mutate("no messages", lambda e: e["payload"].update(messages=[]))
    mutate("unknown role", lambda e: e["payload"]["messages"][0].update(role="robot"))
    mutate("content parts", lambda e: e["payload"]["messages"][0].update(content=[{"a": 1}]))
    mutate("stream key at payload level", lambda e: e["payload"].update(stream=True))
    mutate("options is a list", lambda e: e["payload"].update(options=[1]))
    mutate("temperature a string", lambda e: e["payload"]["options"].update(temperature="hot"))
    mutate("negative max_tokens", lambda e: e["payload"]["options"].update(max_tokens=-5))
    mutate("ttl a string", lambda e: e.update(ttl_ms="soon"))
    mutate("created_at garbage", lambda e: e.update(created_at="yesterday"))
    mutate("expired ttl", lambda e: e.update(ttl_ms=1, created_at="2020-01-01T00:00:00Z"))
    mutate("log injection in kind", lambda e: e.update(kind="x\nFAKE LOG LINE \x1b[31mred"))
    for label, text in (
        ("nul", "a\u0000b"),
        ("rtl override", "\u202eevil"),
        ("zero width", "a\u200b\u200db"),
        ("emoji", "🦙" * 50),
        ("combining", "e" + "\u0301" * 200),
        ("bom", "\ufeffhi"),
    ):
        mutate(f"unicode {label}", lambda e, t=text: e["payload"]["messages"][0].update(content=t))
    mutate(
        "prompt longer than the context",
        lambda e: e["payload"]["messages"][0].update(content="word " * 20_000),
    )
    mutate("1 MB prompt", lambda e: e["payload"]["messages"][0].update(content="x" * 1_000_000))
    mutate("50 MB payload", lambda e: e["payload"]["messages"][0].update(content="y" * 50_000_000))
    return cases


RAW = [
    b"",
    b"not json",
    b"\xff\xfe\x00",
    b"[]",
    b"null",
    b"42",
    b'"text"',
    b"{}",
    b'{"schema": "orion.envelope"}',
    b'{"reply_to": ["a"]}',
    b"{" * 10_000,
]


def with_reply(envelope: dict[str, Any], tag: str) -> dict[str, Any]:
    """A copy with its own reply_to and, unless the id is what is being broken, its own id
    (two messages with one id are one message: replicas claim by id)."""
    envelope = copy.deepcopy(envelope)
    envelope["reply_to"] = f"test:hostile:{tag}:{uuid.uuid4().hex}"
    if isinstance(envelope.get("id"), str) and len(envelope["id"]) == 36:
        envelope["id"] = str(uuid.uuid4())
    return envelope


async def test_fixed_corpus_on_both_intakes(fault: Fault) -> None:
    worker = fault.spawn("w", ORION_LLAMACPP_LOCAL_QUEUE="64")
    sync = redis.Redis.from_url(fault.redis.url)
    try:
        too_big_for_pubsub = None
        for name, envelope in corpus(fault):
            via_stream = fault.ledger.add(with_reply(envelope, "stream"))
            sync.xadd(STREAM, work_queue_entry(via_stream))
            if name == "50 MB payload":
                too_big_for_pubsub = with_reply(envelope, "pubsub")
                continue
            sync.publish(INTAKE, orjson.dumps(fault.ledger.add(with_reply(envelope, "pubsub"))))
        for raw in RAW:
            sync.publish(INTAKE, raw)
            sync.xadd(STREAM, {"envelope": raw})
        assert_exactly_once(await fault.ledger.settle(timeout=120))
        # Redis cuts off any subscriber that a message over its pub/sub output buffer limit
        # (32 MB hard, by default) would go to, with whatever else was queued for it: such a
        # message never reaches a worker. Sent last and alone; the worker must reconnect.
        sync.publish(INTAKE, orjson.dumps(too_big_for_pubsub))
    finally:
        sync.close()
    codes = {
        a["payload"].get("error", "ok") for e in fault.ledger.sent for a in fault.ledger.answers(e)
    }
    assert codes <= ERROR_CODES | {"ok"}, codes
    for envelope in fault.ledger.sent:
        answer = fault.ledger.answers(envelope)[0]["payload"]
        if "error" in answer:
            assert answer["details"]["message"], answer
    await wait_stream_acked(fault.raw, STREAM, "llamacpp:tiny")
    dead = await fault.raw.xlen(STREAM + ":dlq")
    assert dead >= len(RAW), dead
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
