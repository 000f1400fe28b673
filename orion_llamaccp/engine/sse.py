"""llama-server's streamed chat completions, decoded: pure functions, no I/O.

``SSEDecoder`` splits bytes into ``data:`` payloads (keep-alive comments dropped), and
``parse_chunk`` turns one OpenAI-style chunk into typed events. This is the per-token hot
path, so it avoids per-line object churn: one ``orjson.loads`` per event and plain tuples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

DONE = b"[DONE]"


class SSEDecoder:
    """Incremental Server-Sent Events decoder yielding each event's ``data`` bytes."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        buffer = self._buffer + chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        events = buffer.split(b"\n\n")
        self._buffer = events.pop()
        out: list[bytes] = []
        for event in events:
            data = _data_of(event)
            if data is not None:
                out.append(data)
        return out

    def flush(self) -> list[bytes]:
        """The last event when the stream ended without a blank line."""
        rest, self._buffer = self._buffer, b""
        data = _data_of(rest) if rest.strip() else None
        return [data] if data is not None else []


def _data_of(event: bytes) -> bytes | None:
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:]
    parts = [
        line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")
    ]
    return b"\n".join(parts) if parts else None


@dataclass(slots=True)
class ChunkEvents:
    """What one streamed chunk carried; most chunks carry only ``content``."""

    content: str = ""
    reasoning: str = ""
    role: str | None = None
    tool_calls: list[Any] | None = None
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    timings: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def parse_chunk(data: bytes) -> ChunkEvents:
    """One ``data:`` payload of ``/v1/chat/completions`` with ``stream: true``."""
    obj = orjson.loads(data)
    events = ChunkEvents()
    if not isinstance(obj, dict):
        events.error = {"message": f"unexpected stream payload: {data[:200]!r}"}
        return events
    if "error" in obj:
        error = obj["error"]
        events.error = error if isinstance(error, dict) else {"message": str(error)}
        return events
    choices = obj.get("choices") or ()
    if choices:
        choice = choices[0]
        delta = choice.get("delta") or {}
        events.content = delta.get("content") or ""
        events.reasoning = delta.get("reasoning_content") or ""
        events.role = delta.get("role")
        events.tool_calls = delta.get("tool_calls")
        events.finish_reason = choice.get("finish_reason")
    if obj.get("usage"):
        events.usage = obj["usage"]
    if obj.get("timings"):
        events.timings = obj["timings"]
    events.model = obj.get("model")
    return events
