"""llama-server's error answers, translated into our exceptions, in one place.

A 400 about the context size is ``ContextExceeded`` (retrying cannot help), a 503 is
``EngineUnavailable`` (loading), anything else ``UpstreamError``; the same rules apply to
an error that arrives inside a stream, and to a stream event that is not JSON.
"""

from __future__ import annotations

from typing import Any

import orjson

from orion_llamaccp.engine.sse import DONE, ChunkEvents, parse_chunk
from orion_llamaccp.errors import ContextExceeded, EngineUnavailable, UpstreamError

_CONTEXT_MARKERS = ("exceed_context_size", "exceeds the available context", "context size")


def _error_message(body: bytes) -> tuple[str, str]:
    try:
        data = orjson.loads(body)
        error = data.get("error", data) if isinstance(data, dict) else {}
        return str(error.get("message", body[:300])), str(error.get("type", ""))
    except (orjson.JSONDecodeError, AttributeError):
        return body[:300].decode(errors="replace"), ""


_NOT_THE_REQUEST = frozenset({401, 403, 404, 408, 429})
# llama-server's "not supported" (embeddings, infill or image input on a server started
# without them): a 5xx that no retry on this profile can change.
_NOT_SUPPORTED = 501


def _refused(status: int | None) -> bool:
    """Whether an error answer refuses this request for good."""
    if status is None:
        return False
    return status == _NOT_SUPPORTED or (400 <= status < 500 and status not in _NOT_THE_REQUEST)


def raise_for_response(status: int, body: bytes) -> None:
    """Translate an HTTP error answer from llama-server into our exceptions."""
    message, kind = _error_message(body)
    text = f"{kind} {message}".lower()
    if status == 400 and any(marker in text for marker in _CONTEXT_MARKERS):
        raise ContextExceeded(
            f"prompt does not fit the context window: {message}", status=400, retryable=False
        )
    if status == 503:
        raise EngineUnavailable(f"llama-server is not ready: {message}")
    # A 4xx refuses this request for good (a grammar it cannot parse, say), except those
    # that say nothing of it: a wrong API key, a timeout, too many requests.
    raise UpstreamError(
        f"llama-server answered {status}: {message}", status=status, retryable=not _refused(status)
    )


def raise_stream_error(error: dict[str, Any]) -> None:
    """An error that arrived inside the stream (``data: {"error": ...}``, or llama.cpp's
    own ``error: {...}`` line), by the rules of an HTTP answer of its ``code``: a 4xx
    refused this request for good (it was retried, then dead-lettered as retryable)."""
    message = str(error.get("message", error))
    kind = str(error.get("type", ""))
    if any(marker in f"{kind} {message}".lower() for marker in _CONTEXT_MARKERS):
        raise ContextExceeded(f"prompt does not fit the context window: {message}", retryable=False)
    code = error.get("code")
    status = code if isinstance(code, int) and not isinstance(code, bool) else None
    raise UpstreamError(
        f"llama-server reported an error mid-stream: {message}",
        status=status,
        retryable=not _refused(status),
    )


def parse_event(data: bytes) -> ChunkEvents:
    try:
        return parse_chunk(data)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError(f"llama-server sent a malformed stream event: {data[:200]!r}") from exc


def chat_event(data: bytes, finished: bool) -> ChunkEvents | None:
    """One ``data:`` payload of a chat stream: its events, or ``None`` at ``[DONE]``.

    ``[DONE]`` before any finish reason, and an error sent inside the stream, raise.
    """
    if data == DONE:
        if not finished:
            raise UpstreamError("stream ended ([DONE]) without a finish reason")
        return None
    events = parse_event(data)
    if events.error is not None:
        raise_stream_error(events.error)
    return events
