"""Bytes <-> envelopes. Tolerant on the way in, exact on the way out.

Decoding never raises anything but ``DecodeError``, whose ``errors`` list says what was
wrong, and ``salvage`` recovers where to send that error when the message was too broken
to decode.
"""

from __future__ import annotations

import hashlib
from typing import Any
from uuid import UUID

import orjson
from pydantic import ValidationError

from orion_llamaccp.bus.envelope import (
    CHAT_REQUEST,
    LEGACY_CHAT_EVENT,
    LEGACY_KIND,
    SCHEMA,
    ChatRequestPayload,
    Envelope,
)
from orion_llamaccp.errors import DecodeError


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def _errors(exc: ValidationError) -> list[dict[str, Any]]:
    """Field errors, JSON-safe and short (inputs are not echoed: they can be huge)."""
    return [
        {"loc": ".".join(str(p) for p in err["loc"]), "msg": err["msg"], "type": err["type"]}
        for err in exc.errors()[:20]
    ]


def loads_object(raw: bytes | str) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"message is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DecodeError(f"message is JSON but not an object (got {type(data).__name__})")
    return data


def _legacy(data: dict[str, Any]) -> dict[str, Any]:
    """Orion's wrapping of a dict without ``schema: orion.envelope``: the whole dict is
    the payload, but for a legacy chat dict (``event: chat``), whose request is under
    ``payload`` or ``body``. A dict of kind ``llm.chat.request`` that is no envelope is
    refused for its extra payload keys, as Orion refuses it: served here, it would work
    against this worker and nowhere else in the mesh."""
    if data.get("event") == LEGACY_CHAT_EVENT:
        kind = CHAT_REQUEST
        inner = data.get("payload") or data.get("body")  # "payload": null with a body too
        payload = inner if isinstance(inner, dict) else {}
    else:
        kind = data.get("kind") or LEGACY_KIND
        payload = data
    wrapped: dict[str, Any] = {
        "schema": SCHEMA,
        "kind": kind,
        "source": {"name": "legacy"},
        "reply_to": data.get("reply_to") or data.get("reply_channel"),
        "payload": payload,
    }
    for key in ("correlation_id", "corr_id"):
        if data.get(key):
            wrapped["correlation_id"] = data[key]
            break
    return wrapped


def decode_envelope(raw: bytes | str) -> Envelope:
    """An envelope from the wire: Orion's envelope (with input aliases) or a legacy dict."""
    data = loads_object(raw)
    if data.get("schema_id") == SCHEMA and "schema" not in data:
        raise DecodeError("envelope names itself with 'schema_id'; the key is 'schema'")
    try:
        return Envelope.model_validate(data if data.get("schema") == SCHEMA else _legacy(data))
    except ValidationError as exc:
        raise DecodeError(
            "envelope does not match orion.envelope 2.0.0", errors=_errors(exc)
        ) from None
    except Exception as exc:
        # A shape no rule here foresaw is still the sender's: anything but a DecodeError
        # would leave the message unanswered (and a stream entry redelivered forever).
        raise DecodeError(f"message could not be decoded ({type(exc).__name__})") from exc


def decode_chat(envelope: Envelope) -> ChatRequestPayload:
    try:
        return ChatRequestPayload.model_validate(envelope.payload)
    except ValidationError as exc:
        raise DecodeError(
            "payload is not a valid ChatRequestPayload", errors=_errors(exc)
        ) from None


def as_uuid(value: Any) -> str | None:
    """``value`` as a UUID in canonical form (jobs are filed under it: a sender may spell
    one in upper case, with braces or without dashes); None if it is not one."""
    try:
        return str(UUID(str(value)))
    except (ValueError, TypeError):
        return None


def salvage(raw: bytes | str) -> dict[str, Any]:
    """What can be read from a message that failed to decode: reply_to, ids, trace."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(data, dict):
        return {}
    reply_to = data.get("reply_to") or data.get("reply_channel")
    kind = data.get("kind") or data.get("event")
    source = data.get("source") if isinstance(data.get("source"), dict) else {}
    return {
        "reply_to": reply_to if isinstance(reply_to, str) and reply_to else None,
        "correlation_id": as_uuid(data.get("correlation_id") or data.get("corr_id")),
        "id": as_uuid(data.get("id")),
        "kind": kind if isinstance(kind, str) and kind else "unknown",
        "source": str(source.get("name") or source.get("service") or "unknown"),
        "trace_id": str(data["trace"]["trace_id"])
        if isinstance(data.get("trace"), dict) and data["trace"].get("trace_id")
        else None,
    }


CONTENT_KEY = "sha256:"  # a message key made from the message's bytes: it has no id


def own_id(envelope: Envelope | None) -> str | None:
    """The id the message names itself by: an envelope's own, not a legacy dict's, nor
    the one made up for an envelope sent without one (``Envelope.id`` then differs at
    each decode: two replicas, or a redelivery, would each take it for another message)."""
    if (
        envelope is None
        or envelope.source.name == "legacy"
        or "id" not in envelope.model_fields_set
    ):
        return None
    return str(envelope.id)


def attempt_suffix(attempt: int) -> str:
    """What a producer's retry adds to the keys of its first attempt (none for that one,
    so that a message without a hint keeps the keys it always had)."""
    return f":a{attempt}" if attempt > 1 else ""


def message_key(raw: bytes | str, envelope: Envelope | None) -> str:
    """Identity of a message that every replica computes alike (the claim key). A
    producer's retry (``trace.work.attempt`` raised) is a message of its own: the first
    attempt's claim still holds its key."""
    if (named := own_id(envelope)) is not None:
        assert envelope is not None
        return named + attempt_suffix(envelope.hinted_attempt)
    data = raw.encode() if isinstance(raw, str) else raw
    return CONTENT_KEY + hashlib.sha256(data).hexdigest()[:40]
