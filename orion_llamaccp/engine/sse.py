"""llama-server's streamed chat completions, decoded: pure functions, no I/O.

``ResponseDecoder`` reads the HTTP/1.1 response (status, headers, a chunked or sized
body), ``SSEDecoder`` splits the body into ``data:`` payloads (keep-alive comments
dropped), and ``parse_chunk`` turns one OpenAI-style chunk into typed events. This is the
per-token hot path, so it avoids per-line object churn: one ``orjson.loads`` per event,
slices of the received bytes, no per-chunk objects; a chunk that carries only a token's
text (nearly all of them) is read by ``content_only`` without parsing the whole object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

DONE = b"[DONE]"


class ProtocolError(ValueError):
    """Bytes that are not a valid HTTP/1.1 response."""


_HEAD, _CHUNKED, _SIZED, _UNTIL_CLOSE, _DONE = range(5)
MAX_HEAD = 64 * 1024


class ResponseDecoder:
    """One HTTP/1.1 response, fed as it arrives: ``feed`` returns the body bytes it freed.

    ``status`` and ``headers`` (lower-case names) are set once the head is complete;
    ``complete`` once the body ended (last chunk, ``Content-Length`` reached, or ``eof``
    for a body delimited by the connection's close).
    """

    __slots__ = ("_buffer", "_mode", "_remaining", "headers", "status")

    def __init__(self) -> None:
        self._buffer = b""
        self._mode = _HEAD
        self._remaining = 0
        self.status = 0
        self.headers: dict[str, str] = {}

    @property
    def head_done(self) -> bool:
        return self._mode != _HEAD

    @property
    def complete(self) -> bool:
        return self._mode == _DONE

    @property
    def keep_alive(self) -> bool:
        """Whether the connection may carry another request after this response."""
        return self._mode == _DONE and "close" not in self.headers.get("connection", "").lower()

    def feed(self, data: bytes) -> bytes:
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        if self._mode == _HEAD:
            buffer = self._head(buffer)
            if self._mode == _HEAD:
                return b""
        if self._mode == _CHUNKED:
            return self._chunks(buffer)
        if self._mode == _SIZED:
            body = buffer[: self._remaining]
            self._remaining -= len(body)
            if self._remaining == 0:
                self._mode = _DONE
            return body
        if self._mode == _UNTIL_CLOSE:
            return buffer
        if buffer.strip():
            raise ProtocolError(f"bytes after the end of the response: {buffer[:80]!r}")
        return b""

    def eof(self) -> None:
        """The connection closed: the end of an until-close body, else a truncated one."""
        if self._mode == _UNTIL_CLOSE:
            self._mode = _DONE

    def _head(self, buffer: bytes) -> bytes:
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD:
                raise ProtocolError("response head larger than 64 KiB")
            self._buffer = buffer
            return b""
        lines = buffer[:end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"not an HTTP/1.1 status line: {lines[0][:80]!r}")
        self.status = int(parts[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            self._mode = _CHUNKED
        elif "content-length" in self.headers:
            self._remaining = int(self.headers["content-length"])
            self._mode = _SIZED if self._remaining else _DONE
        elif self.status in (204, 304) or 100 <= self.status < 200:
            self._mode = _DONE
        else:
            self._mode = _UNTIL_CLOSE
        return buffer[end + 4 :]

    def _chunks(self, buffer: bytes) -> bytes:
        pieces = []
        pos = 0
        size_of = int
        while True:
            eol = buffer.find(b"\r\n", pos)
            if eol < 0:
                break
            try:
                size = size_of(buffer[pos:eol], 16)
            except ValueError:
                size = _chunk_size(buffer[pos:eol])
            if size == 0:  # the last chunk, then optional trailers and a blank line
                end = buffer.find(b"\r\n\r\n", eol)
                if end < 0:
                    break
                self._mode = _DONE
                pos = end + 4
                break
            start = eol + 2
            stop = start + size
            if len(buffer) < stop + 2:
                break
            pieces.append(buffer[start:stop])
            pos = stop + 2
        if pos < len(buffer):
            self._buffer = buffer[pos:]
        if len(pieces) == 1:
            return pieces[0]
        return b"".join(pieces)


def _chunk_size(line: bytes) -> int:
    """A chunk-size line with an extension (``1a;name=value``): rare, so not on the fast path."""
    try:
        return int(line.split(b";", 1)[0], 16)
    except ValueError:
        raise ProtocolError(f"bad chunk size line: {line[:80]!r}") from None


class SSEDecoder:
    """Incremental Server-Sent Events decoder yielding each event's ``data`` bytes."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        if (  # llama-server's usual read: exactly one "data: ...\n\n" event
            not self._buffer
            and chunk.startswith(b"data: ")
            and chunk.find(b"\n", 6) == len(chunk) - 2
            and chunk.endswith(b"\n\n")
            and b"\r" not in chunk
        ):
            return [chunk[6:-2]]
        buffer = self._buffer + chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        events = buffer.split(b"\n\n")
        self._buffer = events.pop()
        # llama-server's events are single "data: " lines; anything else takes _data_of
        out = [event[6:] for event in events if event[:6] == b"data: " and b"\n" not in event]
        if len(out) == len(events):
            return out
        return [data for data in map(_data_of, events) if data is not None]

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
    return events


# A chunk with only a token's text, as llama-server lays it out (its JSON keeps insertion
# order): {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"..."}}],
# "created":...,"id":"...","model":"...","system_fingerprint":"...",
# "object":"chat.completion.chunk"}
_CONTENT_HEAD = b'{"choices":[{"finish_reason":null,"index":0,"delta":{"content":"'
_CONTENT_END = b'"}}],"created":'
_CHUNK_END = b',"object":"chat.completion.chunk"}'
_TEXT_AT = len(_CONTENT_HEAD) - 1  # the opening quote of the text


def content_only(data: bytes) -> str | None:
    """The text of a chunk that carries a content delta and nothing else, or ``None``.

    The per-token fast path: two bound checks, one search and a parse of the string alone,
    where ``parse_chunk`` builds the whole object (about 1 µs more per token). Any other
    layout (role, reasoning, tool calls, a finish reason, usage, timings, an error, another
    server's key order) returns ``None`` and goes through ``parse_chunk``. The search cannot
    stop inside the text: in JSON every quote in a string is escaped, so ``],"`` never
    occurs there.
    """
    if not (data.startswith(_CONTENT_HEAD) and data.endswith(_CHUNK_END)):
        return None
    end = data.find(_CONTENT_END, _TEXT_AT)
    if end < 0:
        return None
    try:
        text = orjson.loads(data[_TEXT_AT : end + 1])
    except orjson.JSONDecodeError:
        return None  # parse_chunk reports it
    return text or None  # an empty delta is not a token: parse_chunk says what it is
