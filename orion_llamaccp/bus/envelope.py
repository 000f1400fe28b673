"""The Orion envelope and chat payloads, as Orion's strict decoder sees them.

Inbound we are tolerant (input aliases, legacy dicts: see ``codec.decode_envelope``);
outbound we emit exactly Orion's keys and nothing else, because Orion rejects a message
with one extra key.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID, uuid4

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA = "orion.envelope"
SCHEMA_VERSION = "2.0.0"

CHAT_REQUEST = "llm.chat.request"
CHAT_RESULT = "llm.chat.result"
CHAT_CHUNK = "llm.chat.chunk"
CHAT_CANCEL = "llm.chat.cancel"
HEALTH = "system.health.v1"
SYSTEM_ERROR = "system.error"
PROFILE_ANNOUNCE = "llm.profile.announce.v1"
PROFILE_DISCOVER = "llm.profile.discover.v1"
LEGACY_KIND = "legacy.message"
LEGACY_CHAT_EVENT = "chat"  # the contract's only legacy chat dict

_STRICT = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """Naive times count as UTC; others are turned to UTC, as the times we send must be."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:  # year 1 or 9999 near midnight: a validation error, not a crash
        raise ValueError("datetime out of range in UTC") from None


def seconds_until_due(work: dict[str, Any]) -> float:
    """How long until ``trace.work.not_before_ms`` (Orion's work queue delays a retry with
    it): 0 when it is unset or past."""
    not_before = work.get("not_before_ms")
    if not isinstance(not_before, int | float):
        return 0.0
    return max(0.0, not_before / 1000 - time.time())


class ServiceRef(BaseModel):
    model_config = _STRICT

    name: str = Field(validation_alias=AliasChoices("name", "service"))
    node: str | None = None
    version: str | None = None
    instance: str | None = None


class CausalityLink(BaseModel):
    model_config = _STRICT

    correlation_id: UUID
    kind: str
    source: ServiceRef
    created_at: datetime = Field(default_factory=utcnow)

    @field_validator("created_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return as_utc(value)  # a link we pass on in a reply's chain


class Envelope(BaseModel):
    """Orion's ``BaseEnvelope``: the one shape of every message on the bus."""

    # No whitespace stripping: ``reply_to`` is a channel the caller listens on, byte for
    # byte, and payload and trace keys are the caller's too. Only ``kind`` is trimmed.
    model_config = _STRICT

    schema_id: Literal["orion.envelope"] = Field(SCHEMA, alias="schema")
    schema_version: str = SCHEMA_VERSION
    id: UUID = Field(default_factory=uuid4)
    correlation_id: UUID = Field(
        default_factory=uuid4, validation_alias=AliasChoices("correlation_id", "corr_id")
    )
    kind: str = Field(validation_alias=AliasChoices("kind", "event"))
    causality_chain: list[CausalityLink] = Field(default_factory=list)
    source: ServiceRef = Field(validation_alias=AliasChoices("source", "service"))
    created_at: datetime = Field(
        default_factory=utcnow, validation_alias=AliasChoices("created_at", "ts")
    )
    ttl_ms: int | None = None
    trace: dict[str, Any] = Field(default_factory=dict)
    reply_to: str | None = None
    payload: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kind")
    @classmethod
    def _trim(cls, value: str) -> str:
        return value.strip()

    @field_validator("created_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return as_utc(value)

    def link(self) -> CausalityLink:
        """This message as a link in a reply's causality chain."""
        return CausalityLink(
            correlation_id=self.correlation_id,
            kind=self.kind,
            source=self.source,
            created_at=self.created_at,
        )

    @property
    def work(self) -> dict[str, Any]:
        """Orion work-queue hints (``trace.work``): attempt, expiry, idempotency key..."""
        work = self.trace.get("work")
        return work if isinstance(work, dict) else {}

    @property
    def hinted_attempt(self) -> int:
        """The producer's ``trace.work.attempt`` (a retry raises it); 1 without one."""
        hinted = self.work.get("attempt")
        whole = isinstance(hinted, int) and not isinstance(hinted, bool)
        return hinted if whole and hinted > 0 else 1

    @property
    def trace_id(self) -> str | None:
        value = self.trace.get("trace_id")
        return str(value) if value is not None else None

    def wire(self) -> dict[str, Any]:
        """The JSON-ready dict Orion decodes: ``schema`` key, no extras."""
        return self.model_dump(mode="json", by_alias=True)


class LLMMessage(BaseModel):
    model_config = _STRICT

    role: Literal["system", "user", "assistant", "tool"] = "user"
    content: str


class ChatRequestPayload(BaseModel):
    """Orion's ``ChatRequestPayload``; per-request switches live in ``options``."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, protected_namespaces=()
    )

    model: str | None = None
    profile: str | None = None
    messages: list[LLMMessage] = Field(min_length=1)
    raw_user_text: str | None = None
    route: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    # Images by sha256 reference, in no shape the contract fixes (Orion's own model takes
    # any list): kept as sent, and left out of the prompt, which a result says.
    attachments: list[Any] = Field(default_factory=list)
    user_id: str | None = None
    session_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _raw_text_alone(cls, data: Any) -> Any:
        """A request with ``raw_user_text`` and no messages (the contract allows it: both
        are fields of the payload) asks that text as the user: it was refused as empty."""
        if isinstance(data, dict) and not data.get("messages"):
            text = data.get("raw_user_text")
            if isinstance(text, str) and text.strip():
                return {**data, "messages": [{"role": "user", "content": text}]}
        return data


class SystemHealthV1(BaseModel):
    """Orion's heartbeat payload, exactly (extra keys forbidden)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    service: str
    node: str | None = None
    version: str | None = None
    instance: str | None = None
    boot_id: str
    status: Literal["ok", "degraded", "down"] = "ok"
    last_seen_ts: datetime
    heartbeat_interval_sec: float = 10.0
    details: dict[str, Any] = Field(default_factory=dict)
