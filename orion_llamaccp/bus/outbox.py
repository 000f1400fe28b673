"""Build the envelopes we publish, as bytes, with exactly Orion's keys.

Replies keep the request's ``correlation_id``, extend its causality chain with a link to
the request, and carry ``reply_to: null``. Chunks are the hot path: their constant part
is rendered once per request and only ``id``, ``created_at`` and the payload change.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from uuid import uuid4

import orjson

from orion_llamaccp.bus import keys
from orion_llamaccp.bus.envelope import (
    CHAT_CHUNK,
    CHAT_RESULT,
    SCHEMA,
    SCHEMA_VERSION,
    SYSTEM_ERROR,
    Envelope,
    ServiceRef,
)

if TYPE_CHECKING:
    from orion_llamaccp.settings import Settings


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def chunk_channel(reply_to: str | None, stream_channel: str | None) -> str | None:
    """Where a request's chunks go: ``options.stream_channel``, else ``{reply_to}:chunks``.

    The worker and the reference client both ask here, so a caller listens where the
    chunks are sent. A ``stream_channel`` equal to ``reply_to`` is not used: Orion's
    ``rpc_request`` takes the first message on ``reply_to`` as the answer, so nothing but
    the one result may go there.
    """
    if stream_channel and stream_channel != reply_to:
        return stream_channel
    return keys.chunk_channel(reply_to) if reply_to else None


def _trace(request: Envelope | None) -> dict[str, Any]:
    """Only the trace id travels on: ``trace.work`` hints belong to the request."""
    if request is None or request.trace_id is None:
        return {}
    return {"trace_id": request.trace_id}


class Outbox:
    """Envelope builders for one service identity."""

    def __init__(self, source: ServiceRef) -> None:
        self.source = source
        self._source = source.model_dump(mode="json")

    @classmethod
    def of(cls, settings: Settings) -> Outbox:
        """The outbox of the service these settings describe (name, node, version, id)."""
        return cls(
            ServiceRef(
                name=settings.service_name,
                node=settings.node_name,
                version=settings.service_version,
                instance=settings.instance_id,
            )
        )

    def envelope(
        self,
        kind: str,
        payload: dict[str, Any],
        *,
        request: Envelope | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
    ) -> dict[str, Any]:
        chain: list[dict[str, Any]] = []
        if request is not None:
            chain = [link.model_dump(mode="json") for link in request.causality_chain]
            chain.append(request.link().model_dump(mode="json"))
            correlation_id = str(request.correlation_id)
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "id": str(uuid4()),
            "correlation_id": correlation_id or str(uuid4()),
            "kind": kind,
            "causality_chain": chain,
            "source": dict(self._source),  # a copy: callers may edit what they get
            "created_at": _now(),
            "ttl_ms": None,
            "trace": _trace(request),
            "reply_to": reply_to,
            "payload": payload,
        }

    def encode(self, kind: str, payload: dict[str, Any], **kw: Any) -> bytes:
        return orjson.dumps(self.envelope(kind, payload, **kw))

    def result(self, request: Envelope, payload: dict[str, Any]) -> bytes:
        return self.encode(CHAT_RESULT, payload, request=request)

    def result_for_undecodable(self, salvaged: dict[str, Any], payload: dict[str, Any]) -> bytes:
        """A result for a request too broken to decode, linked to what could be read of it."""
        message = self.envelope(CHAT_RESULT, payload, correlation_id=salvaged.get("correlation_id"))
        message["causality_chain"] = [
            {
                "correlation_id": message["correlation_id"],
                "kind": salvaged.get("kind", "unknown"),
                "source": {
                    "name": salvaged.get("source", "unknown"),
                    "node": None,
                    "version": None,
                    "instance": None,
                },
                "created_at": message["created_at"],
            }
        ]
        if salvaged.get("trace_id"):
            message["trace"] = {"trace_id": salvaged["trace_id"]}
        return orjson.dumps(message)

    def system_error(
        self,
        error: str,
        details: dict[str, Any],
        *,
        request: Envelope | None = None,
        correlation_id: str | None = None,
    ) -> bytes:
        return self.encode(
            SYSTEM_ERROR,
            {"error": error, "details": details},
            request=request,
            correlation_id=correlation_id,
        )

    def chunks_for(self, request: Envelope) -> ChunkTemplate:
        return ChunkTemplate(self.envelope(CHAT_CHUNK, {}, request=request))


class ChunkTemplate:
    """The fixed part of one request's chunk envelopes, rendered once."""

    __slots__ = ("_base",)

    def __init__(self, base: dict[str, Any]) -> None:
        self._base = base

    def render(self, seq: int, delta: str, reasoning: str, attempt: int) -> bytes:
        message = self._base.copy()
        message["id"] = str(uuid4())
        message["created_at"] = _now()
        message["payload"] = {
            "seq": seq,
            "delta": delta,
            "reasoning_delta": reasoning,
            "attempt": attempt,
        }
        return orjson.dumps(message)
