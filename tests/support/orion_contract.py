"""Orion's strict decoders, written from ``shared/orion-bus-contract.md`` for the tests.

Deliberately independent of ``orion_llamaccp.bus.envelope``: if our models drifted from the
contract, these would still catch it. Every message our worker publishes must pass
``check_message``.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any, Literal
from uuid import UUID

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

STRICT = ConfigDict(extra="forbid")


def _utc(value: datetime) -> datetime:
    # What we publish says its zone: a naive time only counts as UTC on input.
    if value.utcoffset() != timedelta(0):
        raise ValueError(f"created_at must be UTC, got {value.isoformat()}")
    return value


UtcDatetime = Annotated[datetime, AfterValidator(_utc)]


class ServiceRef(BaseModel):
    model_config = STRICT
    name: str
    node: str | None = None
    version: str | None = None
    instance: str | None = None


class CausalityLink(BaseModel):
    model_config = STRICT
    correlation_id: UUID
    kind: str
    source: ServiceRef
    created_at: UtcDatetime


class BaseEnvelope(BaseModel):
    model_config = STRICT  # by alias only: the key is "schema", never "schema_id"
    schema_id: Literal["orion.envelope"] = Field(alias="schema")
    schema_version: Literal["2.0.0"]
    id: UUID
    correlation_id: UUID
    kind: str
    causality_chain: list[CausalityLink]
    source: ServiceRef
    created_at: UtcDatetime
    ttl_ms: int | None
    trace: dict[str, Any]
    reply_to: str | None
    payload: dict[str, Any]


class Usage(BaseModel):
    model_config = STRICT
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatResultPayload(BaseModel):
    """Orion ignores extra keys here; we still check the types of the ones it reads."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())
    content: str | None = None
    reasoning_content: str | None = None
    model_used: str | None = None
    meta: dict[str, Any] | None = None
    usage: dict[str, Any] = Field(default_factory=dict)
    raw: dict[str, Any] = Field(default_factory=dict)


class ChatErrorPayload(BaseModel):
    model_config = ConfigDict(extra="ignore")
    error: str
    details: dict[str, Any]


class ChunkPayload(BaseModel):
    model_config = STRICT
    seq: int = Field(ge=0)
    delta: str
    reasoning_delta: str
    attempt: int = Field(ge=1)


class SystemHealthV1(BaseModel):
    model_config = STRICT
    service: str
    node: str | None = None
    version: str | None = None
    instance: str | None = None
    boot_id: str
    status: Literal["ok", "degraded", "down"]
    last_seen_ts: datetime
    heartbeat_interval_sec: float
    details: dict[str, Any]


class SystemErrorPayload(BaseModel):
    model_config = STRICT
    error: str
    details: dict[str, Any]


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ChatRequestPayload(BaseModel):
    """``ChatRequestPayload``: extra keys forbidden (``stream`` belongs in ``options``)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str | None = None
    profile: str | None = None
    messages: list[ChatMessage]
    raw_user_text: str | None = None
    route: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    attachments: list[Any] = Field(default_factory=list)
    user_id: str | None = None
    session_id: str | None = None


class ChatCancelPayload(BaseModel):
    model_config = STRICT
    correlation_id: UUID


PAYLOADS: dict[str, type[BaseModel]] = {
    "llm.chat.request": ChatRequestPayload,
    "llm.chat.cancel": ChatCancelPayload,
    "llm.chat.chunk": ChunkPayload,
    "system.health.v1": SystemHealthV1,
    "system.error": SystemErrorPayload,
}


def check_message(data: bytes) -> BaseEnvelope:
    """Decode like Orion would; raises pydantic's ValidationError on any violation."""
    envelope = BaseEnvelope.model_validate(orjson.loads(data))
    if envelope.kind == "llm.chat.result":
        if "error" in envelope.payload:
            ChatErrorPayload.model_validate(envelope.payload)
        else:
            result = ChatResultPayload.model_validate(envelope.payload)
            Usage.model_validate(result.usage)
        assert envelope.reply_to is None, "a result carries reply_to: null"
        assert envelope.causality_chain, "a result extends the request's causality chain"
    elif envelope.kind in PAYLOADS:
        PAYLOADS[envelope.kind].model_validate(envelope.payload)
    return envelope
