"""llama-server's streamed chat completions, decoded: pure functions, no I/O.

``ResponseDecoder`` reads the HTTP/1.1 response (status, headers, a chunked or sized
body), ``SSEDecoder`` cuts the body into runs of whole events (keep-alive comments
dropped), and ``parse_chunk`` turns one OpenAI-style chunk into typed events. This is the
per-token hot path, so it works on a read at a time where it can: a chunked body made of
whole chunks is unframed by one split, and a run of chunks that carry only a token's
text (nearly all of them) is read by ``TokenLayout.texts`` in one ``orjson.loads``,
without a step of Python per token (``python -m bench.decode`` measures it).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat
from operator import itemgetter
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

    def cut_short(self) -> bytes:
        """The data held back when the connection broke inside a chunk (a chunked body):
        the chunks before it that a read ending inside one left waiting, and that chunk's
        own bytes. They may still hold whole events, such as an answer's finish."""
        if self._mode != _CHUNKED:
            return b""
        buffer, pos, pieces = self._buffer, 0, []  # it starts at a chunk-size line
        while (eol := buffer.find(b"\r\n", pos)) >= 0:
            try:
                size = _chunk_size(buffer[pos:eol])
            except ProtocolError:
                break
            start = eol + 2
            pieces.append(buffer[start : start + size])
            pos = start + size + 2
            if size == 0 or pos > len(buffer):
                break
        return b"".join(pieces)

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
        if buffer.endswith(b"\r\n"):  # a read that ends where a write did: the usual one
            if buffer.endswith(b"\r\n0\r\n\r\n"):  # ... and the last chunk (no trailers)
                body = _whole_chunks(buffer[:-5])
                if body is not None:
                    self._mode = _DONE
                    return body
            else:
                body = _whole_chunks(buffer)
                if body is not None:
                    return body
        else:  # a read that ends inside a chunk (a full socket buffer): the chunks before it
            cut = buffer.rfind(b"\n\n\r\n") + 4  # where an event's chunk ends, from the end
            body = _whole_chunks(buffer[:cut]) if cut > 4 else None
            if body is not None:
                self._buffer = buffer[cut:]
                return body
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


def _whole_chunks(buffer: bytes) -> bytes | None:
    """The data of ``buffer`` if it is whole chunks and nothing else, else None.

    llama-server writes each event as its own chunk, and a read usually ends where a
    write did: split at every CRLF, such a buffer alternates size lines and data. When
    every size matches its data this is exactly what the loop in ``_chunks`` would read
    (by induction over the chunks), so any other buffer (a last chunk, an extension, a
    CRLF inside data, a read that ends mid-chunk) is left to that loop.
    """
    eol = buffer.find(b"\r\n")
    try:
        size = int(buffer[:eol], 16)
    except ValueError:
        return None
    if eol + size + 4 == len(buffer):  # one chunk: a token at a GPU's pace
        return buffer[eol + 2 : -2] if size and buffer.endswith(b"\r\n") else None
    if not buffer.endswith(b"\r\n"):
        return None
    parts = buffer.split(b"\r\n")
    if len(parts) % 2 == 0:
        return None
    data = parts[1::2]
    try:
        sizes = list(map(int, parts[0:-1:2], repeat(16)))
    except ValueError:
        return None
    if 0 in sizes or sizes != list(map(len, data)):
        return None
    return b"".join(data)


def _chunk_size(line: bytes) -> int:
    """A chunk-size line with an extension (``1a;name=value``): rare, so not on the fast path."""
    try:
        return int(line.split(b";", 1)[0], 16)
    except ValueError:
        raise ProtocolError(f"bad chunk size line: {line[:80]!r}") from None


class SSEDecoder:
    """Incremental Server-Sent Events decoder: ``feed_run`` returns the whole events read
    so far as one run of bytes, ``feed`` their ``data`` payloads."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed_run(self, chunk: bytes) -> bytes:
        """The events that ``chunk`` completes, as one run ending with a blank line (or
        empty); what follows the last blank line waits for the next ``chunk``."""
        buffer = self._buffer + chunk if self._buffer else chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        if buffer.endswith(b"\n\n") and not buffer.endswith(b"\n\n\n"):
            self._buffer = b""  # a read that ends with an event: llama-server's usual one
            return buffer
        end = buffer.rfind(b"\n\n") + 2  # from the end: only the partial event is read
        if end == 1:
            self._buffer = buffer
            return b""
        if buffer[end - 3 : end - 2] == b"\n":  # 3+ newlines: pair them as split does
            end = len(buffer) - len(buffer.split(b"\n\n")[-1])
        self._buffer = buffer[end:]
        return buffer[:end]

    def feed(self, chunk: bytes) -> list[bytes]:
        return events_of(self.feed_run(chunk))

    def flush(self) -> list[bytes]:
        """The last event when the stream ended without a blank line."""
        rest, self._buffer = self._buffer, b""
        data = _data_of(rest) if rest.strip() else None
        return [data] if data is not None else []


def events_of(run: bytes) -> list[bytes]:
    """The ``data`` payloads of a run of whole events (``SSEDecoder.feed_run``)."""
    if not run:
        return []
    events = run.split(b"\n\n")
    events.pop()  # the run ends with a blank line: nothing after it
    # llama-server's events are single "data: " lines; anything else takes _data_of
    out = [event[6:] for event in events if event[:6] == b"data: " and b"\n" not in event]
    if len(out) == len(events):
        return out
    return [data for data in map(_data_of, events) if data is not None]


def _data_of(event: bytes) -> bytes | None:
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:]
    lines = event.split(b"\n")
    parts = [line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:")]
    if parts:
        return b"\n".join(parts)
    # llama.cpp sends an error found after the response began as a line of its own,
    # ``error: {...}`` (no ``data:``): read as ``{"error": {...}}``, not skipped.
    errors = [line[6:].strip() for line in lines if line.startswith(b"error:")]
    return b'{"error": ' + errors[0] + b"}" if errors and errors[0] else None


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
TOKEN_EVENT = b"data: " + _CONTENT_HEAD
"""How a token's event starts (its text follows)."""


def content_only(data: bytes) -> str | None:
    """The text of a chunk that carries a content delta and nothing else, or ``None``.

    The per-token fast path for a chunk on its own: two bound checks, one search and a
    parse of the string alone, where ``parse_chunk`` builds the whole object (about 1 µs
    more per token). Any other layout (role, reasoning, tool calls, a finish reason,
    usage, timings, an error, another server's key order) returns ``None`` and goes
    through ``parse_chunk``.
    """
    end = _text_end(data)
    if end < 0:
        return None
    try:
        text = orjson.loads(data[_TEXT_AT : end + 1])
    except orjson.JSONDecodeError:
        return None  # parse_chunk reports it
    return text or None  # an empty delta is not a token: parse_chunk says what it is


def _texts_of(quoted: list[bytes]) -> list[str] | None:
    """The strings of ``quoted``, each a token's text with its quotes, in one parse.

    Joined with commas they make a JSON array, whose strings are the texts if every
    quoted text is one JSON string. The count alone does not prove that: a text whose
    closing quote is escaped runs on through the comma into the next one, and two
    malformed texts can still parse as two strings (``"\\"`` and ``","a"`` as ``['",',
    'a']``) where reading them one by one fails. So an array with such a text is
    refused, and its run read event by event; ``\\",`` is in every such array, so the
    texts themselves are looked at only when it is. ``tests/engine/test_sse.py``
    searches for misreads at random.
    """
    array = b"[%b]" % b",".join(quoted)
    if b'\\",' in array and any(map(_escaped_close, quoted)):
        return None
    return orjson.loads(array)


def _escaped_close(quoted: bytes) -> bool:
    """Whether the last quote of ``quoted`` is escaped: an odd run of backslashes before it."""
    text = quoted[:-1]
    return (len(text) - len(text.rstrip(b"\\"))) % 2 == 1


def _text_end(data: bytes) -> int:
    """Where the closing quote of a token chunk's text is, or -1 for another layout.

    The search cannot stop inside the text: in JSON every quote in a string is escaped,
    so ``"}}],"`` never occurs there.
    """
    if not (data.startswith(_CONTENT_HEAD) and data.endswith(_CHUNK_END)):
        return -1
    return data.find(_CONTENT_END, _TEXT_AT)


class TokenLayout:
    """The bytes around a token's text in one answer's chunks, to read a run of them at once.

    A token's chunk is the same bytes every time but for its text: the head (up to the
    opening quote of the text) is fixed, and the tail (``created``, ``id``, ``model``,
    ...) is the same for every token of an answer until ``created`` (seconds) ticks. A
    run of token events is split at its blank lines, each event's quoted text sliced out
    by a C-level ``map``, and the run checked by joining the texts back with the bytes
    between them; one ``orjson.loads`` then reads them all: no step of Python per token.
    The result is exactly what ``content_only`` reads event by event, or None: an event
    of another layout fails the check, and a text with an unescaped quote fails the
    parse or yields more texts than events. When ``created`` ticks, a run is read event
    by event once and the reader learns the layout again.
    """

    __slots__ = ("_between", "_framed", "_quoted", "_two", "last", "lone_below", "tail")

    def __init__(self, tail: bytes) -> None:
        self.tail = tail
        """What follows a token's text in its chunk, from the closing quote on."""
        self._quoted = itemgetter(slice(_TEXT_AT, 1 - len(tail)))  # the text, quotes included
        self._between = tail[1:] + b"\n\n" + TOKEN_EVENT[:-1]  # from one quoted text to the next
        self.last = tail + b"\n\n"
        """How a token's event of this layout ends (its text before)."""
        self._two = 2 * (len(TOKEN_EVENT) + len(self.last))  # two events take at least this
        self._framed = self.last + b"\r\n"  # ... and its HTTP chunk
        self.lone_below = self._two + 8
        """Reads shorter than this cannot hold two chunks of token events (``lone_token``
        looks only at them: a longer one, a busy stream's, would cost it checks in vain)."""

    @classmethod
    def learn(cls, data: bytes) -> TokenLayout | None:
        """The layout of ``data``, a chunk that ``content_only`` reads; else None."""
        end = _text_end(data)
        if end < 0 or b"\n" in data:
            return None
        return cls(data[end:])

    def texts(self, run: bytes) -> list[str] | None:
        """The texts of a run of whole events (``SSEDecoder.feed_run``) if every one of
        them is a token chunk of this layout, else None."""
        if not (run.startswith(TOKEN_EVENT) and run.endswith(self.last)):
            return None
        start, end = len(TOKEN_EVENT) - 1, len(run) - len(self.last) + 1
        # a run too short for two events is one: a token at a GPU's pace
        events = run[6:-2].split(b"\n\ndata: ") if len(run) >= self._two else ()
        try:
            if len(events) < 2:  # one event: its quoted text is a JSON string
                text = orjson.loads(run[start:end])
                return [text] if text else None
            quoted = list(map(self._quoted, events))
            if self._between.join(quoted) != run[start:end]:
                return None
            texts = _texts_of(quoted)
        except orjson.JSONDecodeError:
            return None
        if texts is None or len(texts) != len(events) or "" in texts:
            return None  # an empty delta, or an unescaped quote: event by event
        return texts


def lone_token(
    data: bytes, decoder: ResponseDecoder, sse: SSEDecoder, layout: TokenLayout
) -> str | None:
    """The text of ``data`` if it is one HTTP chunk holding one token event of ``layout``,
    with nothing held over from the reads before it; else None, and nothing has changed.

    At a GPU's pace nearly every read from llama-server is one such chunk, and this is
    all the reading a token then costs: the checks and the one parse that ``decoder.feed``,
    ``sse.feed_run`` and ``layout.texts`` make, without their steps for other reads (about
    a microsecond less per token: ``python -m bench.decode``, its second table). It reads
    what they read: the chunk's size line is parsed as ``_whole_chunks`` parses it, and the
    text between the layout's head and tail must parse as one JSON string, which it cannot
    if the chunk holds two events (a raw line break is not allowed in one).
    """
    if decoder._mode != _CHUNKED or decoder._buffer or sse._buffer:
        return None
    framed = layout._framed
    if not data.endswith(framed):
        return None
    eol = data.find(b"\r\n")
    start = eol + 2
    try:
        if int(data[:eol], 16) + start + 2 != len(data):
            return None
    except ValueError:
        return None
    if not data.startswith(TOKEN_EVENT, start):
        return None
    try:
        text = orjson.loads(data[start + _QUOTE_AT : len(data) + 1 - len(framed)])
    except orjson.JSONDecodeError:
        return None
    return text or None  # a quoted JSON string: a str; an empty one is not a token


_QUOTE_AT = len(TOKEN_EVENT) - 1  # a token's event, from its start to the text's opening quote


def merge_tool_calls(calls: list[dict[str, Any]], deltas: list[Any]) -> None:
    """Fold one chunk's ``delta.tool_calls`` into ``calls``, the whole calls so far.

    A stream sends each call in pieces under its ``index``: the first carries its ``id``,
    ``type`` and ``function.name``, the rest only further text of ``function.arguments``.
    """
    for delta in deltas:
        if not isinstance(delta, dict):
            continue
        index = delta.get("index")
        index = index if isinstance(index, int) and index >= 0 else len(calls)
        while len(calls) <= index:
            calls.append(
                {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
            )
        call = calls[index]
        for key in ("id", "type"):
            if delta.get(key):
                call[key] = delta[key]
        function = delta.get("function")
        if isinstance(function, dict):
            if function.get("name"):
                call["function"]["name"] = function["name"]
            if isinstance(function.get("arguments"), str):
                call["function"]["arguments"] += function["arguments"]
