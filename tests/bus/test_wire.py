"""The wire format without a worker: our codec on what callers send, and the strict Orion
decoders of ``tests/support/orion_contract.py`` on what we publish."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from orion_llamaccp.bus.codec import decode_chat, decode_envelope
from orion_llamaccp.bus.envelope import ServiceRef
from orion_llamaccp.bus.outbox import Outbox
from orion_llamaccp.errors import DecodeError
from tests.support.orion_contract import check_message

HI = [{"role": "user", "content": "hi"}]
USAGE = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}


def _envelope(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "schema": "orion.envelope",
        "schema_version": "2.0.0",
        "id": str(uuid.uuid4()),
        "correlation_id": str(uuid.uuid4()),
        "kind": "llm.chat.request",
        "causality_chain": [],
        "source": {"name": "caller"},
        "created_at": "2026-01-01T00:00:00Z",
        "ttl_ms": None,
        "trace": {},
        "reply_to": "caller:reply",
        "payload": {"messages": HI},
    }
    return base | changes


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"created_at": "2026-01-01T00:00:00"}, "created_at"),
        ({"created_at": "2026-01-01T09:00:00+09:00"}, "created_at"),
        (
            {
                "causality_chain": [
                    {
                        "correlation_id": str(uuid.uuid4()),
                        "kind": "k",
                        "source": {"name": "a"},
                        "created_at": "2026-01-01T00:00:00",
                    }
                ]
            },
            "causality_chain.0.created_at",
        ),
    ],
)
def test_the_contract_model_wants_utc_times(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        check_message(orjson.dumps(_envelope(**changes)))
    assert [".".join(map(str, e["loc"])) for e in caught.value.errors()] == [field]


def test_the_contract_model_wants_the_schema_key_not_schema_id() -> None:
    message = _envelope()
    message["schema_id"] = message.pop("schema")
    with pytest.raises(ValidationError):
        check_message(orjson.dumps(message))


def test_a_reply_carries_utc_times_whatever_zone_the_request_used() -> None:
    request = _envelope(
        created_at="2026-01-01T09:00:00+09:00",
        causality_chain=[
            {
                "correlation_id": str(uuid.uuid4()),
                "kind": "llm.chat.request",
                "source": {"name": "gateway"},
                "created_at": "2026-01-01T00:00:00",  # naive: counts as UTC
            }
        ],
    )
    outbox = Outbox(ServiceRef(name="orion-llamaccp"))
    reply = outbox.result(decode_envelope(orjson.dumps(request)), {"content": "x", "usage": USAGE})
    chain = check_message(reply).causality_chain
    assert [link.created_at.isoformat() for link in chain] == [
        "2026-01-01T00:00:00+00:00",
        "2026-01-01T00:00:00+00:00",
    ]


def test_attachments_of_any_shape_orion_accepts_are_accepted() -> None:
    """Orion's model takes any list there (the contract says "images by sha256
    reference", in no fixed shape): a bare hash or an object without a ``sha256`` key
    was refused as ``validation_failed``, where the worker ignores attachments anyway."""
    sha = "ab" * 32
    attachments = [
        {"sha256": sha},
        {"sha256": sha, "mime": "image/png", "caption": "a chart"},
        sha,
        {"type": "image", "ref": f"sha256:{sha}"},
    ]
    chat = decode_chat(decode_envelope(orjson.dumps(_envelope(payload=_chat(attachments)))))
    assert chat.model_dump(mode="json")["attachments"] == attachments
    with pytest.raises(DecodeError):  # a list it still must be
        decode_chat(decode_envelope(orjson.dumps(_envelope(payload=_chat({"sha256": sha})))))


def _chat(attachments: Any) -> dict[str, Any]:
    return {"messages": HI, "attachments": attachments}


@pytest.mark.parametrize("empty", [None, {}])
def test_a_legacy_chat_dict_may_carry_its_request_under_body(empty: dict | None) -> None:
    legacy = {"event": "chat", "reply_to": "r", "payload": empty, "body": {"messages": HI}}
    envelope = decode_envelope(orjson.dumps(legacy))
    assert envelope.kind == "llm.chat.request"
    assert decode_chat(envelope).messages[0].content == "hi"


@pytest.mark.parametrize("event", [["chat"], {"chat": 1}])
def test_a_legacy_event_that_is_not_a_string_is_no_chat_and_no_crash(event: Any) -> None:
    """Hashed against the set of chat events, a list or an object raised TypeError, which
    no caller of the codec expects: the message went unanswered (its request written to
    llama-server ahead, on pub/sub) or, from a stream, was redelivered forever."""
    legacy = {"event": event, "reply_to": "r", "payload": {"messages": HI}}
    assert decode_envelope(orjson.dumps(legacy)).kind == "legacy.message"


def test_a_dict_of_kind_chat_request_that_is_no_envelope_is_refused_as_orion_refuses_it() -> None:
    """Orion wraps a dict without ``schema: orion.envelope`` whole as the payload, which
    its strict chat payload refuses (extra keys). We used to take the dict's ``payload``
    as the request: a caller's mistake that worked here and nowhere else in the mesh."""
    mistaken = {"kind": "llm.chat.request", "reply_to": "r", "payload": {"messages": HI}}
    envelope = decode_envelope(orjson.dumps(mistaken))
    assert envelope.kind == "llm.chat.request" and envelope.source.name == "legacy"
    with pytest.raises(DecodeError) as refused:
        decode_chat(envelope)
    extra = {e["loc"] for e in refused.value.errors if e["type"] == "extra_forbidden"}
    assert extra == {"kind", "reply_to", "payload"}, refused.value.errors


@pytest.mark.parametrize("event", ["llm.chat", "llm.chat.request"])
def test_only_event_chat_makes_a_legacy_chat_dict(event: str) -> None:
    legacy = {"event": event, "reply_to": "r", "payload": {"messages": HI}}
    assert decode_envelope(orjson.dumps(legacy)).kind == "legacy.message"


def test_an_envelope_keyed_schema_id_is_told_the_key_is_schema() -> None:
    """The mistake Orion's own docs invite (the model's field is ``schema_id``): without
    ``schema`` the dict is a legacy message, and its errors would say nothing of why."""
    message = _envelope()
    message["schema_id"] = message.pop("schema")
    with pytest.raises(DecodeError, match="the key is 'schema'"):
        decode_envelope(orjson.dumps(message))


@pytest.mark.parametrize("stamp", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-05:00"])
def test_a_time_that_has_no_utc_equivalent_is_a_decode_error(stamp: str) -> None:
    with pytest.raises(DecodeError):
        decode_envelope(orjson.dumps(_envelope(created_at=stamp)))


def test_an_envelope_without_an_id_is_one_message_to_every_reader() -> None:
    """Sent without an ``id``, an envelope was given a new one at each decode: two
    replicas claimed it under two keys (both answered it), and a stream entry's
    redelivery was not found answered (answered again). Its bytes name it, on pub/sub;
    its entry, on a stream; an envelope's own id still names it."""
    from orion_llamaccp.bus.streams import StreamEntry
    from orion_llamaccp.worker.jobs import decode_job

    unnamed = _envelope()
    del unnamed["id"]
    raw = orjson.dumps(unnamed)
    replicas = [decode_job(raw, "pubsub", len(raw)) for _ in range(2)]
    assert replicas[0].key == replicas[1].key and replicas[0].key.startswith("sha256:")
    entry = StreamEntry("1-0", {b"envelope": raw}, 1)
    redelivered = StreamEntry("1-0", {b"envelope": raw}, 2, reclaimed=True)
    deliveries = [decode_job(raw, "stream", len(raw), e).delivery_id for e in (entry, redelivered)]
    assert deliveries[0] == deliveries[1] and deliveries[0].startswith("1-0:")
    named = _envelope()
    data = orjson.dumps(named)
    assert decode_job(data, "pubsub", len(data)).key == named["id"]
    assert decode_job(data, "stream", len(data), entry).request_id == named["id"]


def test_raw_user_text_alone_is_asked_as_the_user() -> None:
    """The contract's request has ``raw_user_text`` beside ``messages``: a request that
    gives the text and no messages was refused ("messages: at least 1 item")."""
    chat = decode_chat(
        decode_envelope(orjson.dumps(_envelope(payload={"messages": [], "raw_user_text": "hey"})))
    )
    assert [(m.role, m.content) for m in chat.messages] == [("user", "hey")]
    assert chat.raw_user_text == "hey"
    both = _envelope(payload={"messages": HI, "raw_user_text": "ignored"})
    assert [m.content for m in decode_chat(decode_envelope(orjson.dumps(both))).messages] == ["hi"]
    with pytest.raises(DecodeError) as empty:
        decode_chat(decode_envelope(orjson.dumps(_envelope(payload={"messages": []}))))
    assert [e["loc"] for e in empty.value.errors] == ["messages"], empty.value.errors
