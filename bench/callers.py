"""The two ways a benchmark asks for tokens, built alike so their costs compare.

- ``DirectLane``: an async HTTP/1.1 client on one keep-alive connection to llama-server,
  reading the SSE stream (chunked transfer encoding) straight off the socket.
- ``BusCaller``: publishes ``llm.chat.request`` envelopes (PUBLISH or XADD) and reads the
  chunks and the result on one pattern-subscribed connection.

Both are ``asyncio.Protocol`` readers on the same event loop that timestamp each socket
read once (``time.perf_counter()``) and decode each message with one ``orjson.loads``, so
neither side's measuring costs more than the other's. Both send the same way too: the
request's bytes, built before the clock starts, in one socket write. Through redis-py's
client a ``PUBLISH`` cost the caller 83 µs before its bytes left, against 25 µs for the
write, and with two in flight it spread a round's requests 0.1 ms apart where the direct
lane's leave together: the caller's library, not the bus, in the bus's figures.
``BENCH_BUS_SENDER=redis-py`` (or ``BusCaller(..., sender="redis-py")``) sends through
redis-py's client as before.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import hiredis
import orjson
import redis.asyncio as aioredis

from orion_llamaccp.bus import keys
from orion_llamaccp.client import work_queue_entry


@dataclass(slots=True)
class Outcome:
    """One request as its caller saw it (``perf_counter`` seconds)."""

    sent: float = 0.0
    first: float | None = None
    done: float | None = None
    tokens: int = 0  # completion tokens, from usage
    messages: int = 0  # content events (direct) or chunk messages (bus) received
    text: list[str] = field(default_factory=list)
    error: str | None = None
    ok_order: bool = True
    server_tps: float | None = None  # llama-server's own decode rate (timings)

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    @property
    def total(self) -> float | None:
        return None if self.done is None else self.done - self.sent

    @property
    def tokens_per_sec(self) -> float | None:
        """End to end: completion tokens / (send -> end of the answer)."""
        total = self.total
        return self.tokens / total if total and self.tokens else None

    @property
    def stream_tokens_per_sec(self) -> float | None:
        """While streaming: the tokens after the first / (first token -> end of the answer)."""
        if self.first is None or self.done is None or self.tokens < 2 or self.done <= self.first:
            return None  # (all of it in one socket read: the reader was stalled, no rate)
        return (self.tokens - 1) / (self.done - self.first)


# ---------------------------------------------------------------------------- direct SSE


class _SSEProtocol(asyncio.Protocol):
    """Reads one response at a time: status line, headers, chunked SSE body."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self._reset(None, None)

    def _reset(self, outcome: Outcome | None, waiter: asyncio.Future | None) -> None:
        self.outcome = outcome
        self.waiter = waiter
        self.buf = b""
        self.head = True
        self.chunked = False
        self.length = 0
        self.sse = b""
        self.status = 0
        self.close_after = False
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.received += len(data)
        self.buf += data
        if self.head:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self._headers(self.buf[:end])
            self.buf = self.buf[end + 4 :]
            self.head = False
        if self.chunked:
            self._chunks(now)
        elif len(self.buf) >= self.length:
            assert self.outcome is not None
            self.outcome.error = f"HTTP {self.status}: {self.buf[: self.length][:200]!r}"
            self.outcome.done = now
            self._complete()

    def _headers(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split(b" ", 2)[1])
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                self.chunked = True
            elif name == b"content-length":
                self.length = int(value)
            elif name == b"connection" and b"close" in value.lower():
                self.close_after = True  # llama-server: the 100th request on a connection

    def _chunks(self, now: float) -> None:
        buf, pos = self.buf, 0
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(buf[pos:eol].split(b";", 1)[0], 16)
            if size == 0:
                if len(buf) < eol + 4:
                    break
                self.buf = b""
                assert self.outcome is not None
                self.outcome.done = self.outcome.done or now
                self._complete()
                return
            start, stop = eol + 2, eol + 2 + size
            if len(buf) < stop + 2:
                break
            self._sse(buf[start:stop], now)
            pos = stop + 2
        self.buf = buf[pos:]

    def _sse(self, data: bytes, now: float) -> None:
        events = (self.sse + data).split(b"\n\n")
        self.sse = events.pop()
        outcome = self.outcome
        assert outcome is not None
        for event in events:
            if not event.startswith(b"data: "):
                continue
            payload = event[6:]
            if payload == b"[DONE]":
                outcome.done = now
                continue
            obj = orjson.loads(payload)
            choices = obj.get("choices")
            if choices:
                content = (choices[0].get("delta") or {}).get("content")
                if content:
                    if outcome.first is None:
                        outcome.first = now
                    outcome.messages += 1
                    outcome.text.append(content)
            usage = obj.get("usage")
            if usage:
                outcome.tokens = int(usage.get("completion_tokens", 0))
            timings = obj.get("timings")
            if timings:
                outcome.server_tps = timings.get("predicted_per_second")
            if "error" in obj:
                outcome.error = str(obj["error"])[:200]

    def _complete(self) -> None:
        waiter = self.waiter
        if self.close_after and self.transport is not None:
            self.transport.close()
        self._reset(None, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def request(self, raw: bytes, outcome: Outcome) -> asyncio.Future:
        assert self.transport is not None
        waiter = asyncio.get_running_loop().create_future()
        self._reset(outcome, waiter)
        outcome.sent = time.perf_counter()
        self.transport.write(raw)
        return waiter


class DirectLane:
    """One keep-alive connection to llama-server, one streamed request at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._proto: _SSEProtocol | None = None

    async def _connection(self) -> _SSEProtocol:
        proto = self._proto
        if proto is None or proto.closed.done():
            loop = asyncio.get_running_loop()
            _, proto = await loop.create_connection(_SSEProtocol, self.host, self.port)
            self._proto = proto
        return proto

    async def chat(self, body: dict[str, Any]) -> Outcome:
        payload = orjson.dumps({**body, "stream": True, "stream_options": {"include_usage": True}})
        raw = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s:%d\r\nAccept: text/event-stream\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (self.host.encode(), self.port, len(payload), payload)
        )
        for attempt in (1, 2):
            outcome = Outcome()
            proto = await self._connection()
            try:
                await proto.request(raw, outcome)
                return outcome
            except ConnectionError as exc:
                outcome.error = str(exc)
                if proto.received or attempt == 2:
                    return outcome
                # a keep-alive connection the server closed just then: once more, fresh
        return outcome

    def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()


# ---------------------------------------------------------------------------- bus


class _PatternSubscriber(asyncio.Protocol):
    """A PSUBSCRIBE connection parsed by hiredis; each message goes to ``on_message``."""

    def __init__(self, on_message) -> None:
        self.on_message = on_message
        self.reader = hiredis.Reader()
        self.subscribed = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            kind = reply[0]
            if kind == b"pmessage":
                self.on_message(reply[2], reply[3], now)
            elif kind == b"psubscribe" and not self.subscribed.done():
                self.subscribed.set_result(None)


class _Commands(asyncio.Protocol):
    """A connection for the caller's own commands, each written as packed bytes in one
    write, as ``DirectLane`` writes its requests; replies come back in order."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: deque[asyncio.Future] = deque()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectionError(f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            waiter = self.waiting.popleft()
            if isinstance(reply, hiredis.ReplyError):
                waiter.set_exception(reply)
            else:
                waiter.set_result(reply)

    def send(self, packed: bytes) -> asyncio.Future:
        """Writes ``packed`` now; the future holds its reply."""
        assert self.transport is not None
        self.transport.write(packed)
        waiter = asyncio.get_running_loop().create_future()
        self.waiting.append(waiter)
        return waiter


def bus_sender() -> str:
    """The bus caller's sender unless one is named: ``BENCH_BUS_SENDER``, else ``raw``."""
    return os.environ.get("BENCH_BUS_SENDER") or "raw"


@dataclass(slots=True)
class _Pending:
    outcome: Outcome
    waiter: asyncio.Future
    next_seq: int = 0
    keep_text: bool = True


class BusCaller:
    """Sends chat requests over the bus and collects their chunks and results."""

    def __init__(
        self, url: str, profile: str, *, prefix: str = "bench:reply:", sender: str | None = None
    ) -> None:
        sender = sender or bus_sender()
        if sender not in ("raw", "redis-py"):
            raise ValueError(f"sender must be 'raw' or 'redis-py', not {sender!r}")
        self.url = url
        self.profile = profile
        self.prefix = prefix
        self.sender = sender
        self.redis = aioredis.Redis.from_url(url)
        self.pending: dict[bytes, _Pending] = {}
        self.commands = 0  # Redis commands this caller issued (to subtract from totals)
        self._sub: _PatternSubscriber | None = None
        self._commands: _Commands | None = None
        self._source = {"name": "orion-bench", "node": None, "version": None, "instance": "b"}

    async def start(self) -> BusCaller:
        host, port = _host_port(self.url)
        loop = asyncio.get_running_loop()
        _, sub = await loop.create_connection(
            lambda: _PatternSubscriber(self._on_message), host, port
        )
        self._sub = sub
        pattern = f"{self.prefix}*".encode()
        assert sub.transport is not None
        sub.transport.write(b"*2\r\n$10\r\nPSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(pattern), pattern))
        await sub.subscribed
        self.commands += 1
        _, self._commands = await loop.create_connection(_Commands, host, port)
        return self

    async def close(self) -> None:
        for protocol in (self._sub, self._commands):
            if protocol is not None and protocol.transport is not None:
                protocol.transport.close()
        await self.redis.aclose()

    def envelope(self, messages: list[dict[str, str]], options: dict[str, Any]) -> dict[str, Any]:
        """An ``llm.chat.request`` envelope exactly as Orion's strict decoder wants it."""
        return {
            "schema": "orion.envelope",
            "schema_version": "2.0.0",
            "id": str(uuid.uuid4()),
            "correlation_id": str(uuid.uuid4()),
            "kind": "llm.chat.request",
            "causality_chain": [],
            "source": self._source,
            "created_at": _now_iso(),
            "ttl_ms": None,
            "trace": {},
            "reply_to": f"{self.prefix}{uuid.uuid4().hex}",
            "payload": {"messages": messages, "profile": self.profile, "options": options},
        }

    async def chat(
        self, envelope: dict[str, Any], via: str = "pubsub", keep_text: bool = True
    ) -> Outcome:
        reply_to = envelope["reply_to"].encode()
        outcome = Outcome()
        waiter = asyncio.get_running_loop().create_future()
        self.pending[reply_to] = _Pending(outcome, waiter, keep_text=keep_text)
        if via == "pubsub":
            command = ["PUBLISH", keys.intake_channel(self.profile), orjson.dumps(envelope)]
        else:
            command = ["XADD", keys.intake_stream(self.profile), "*"]
            for name, value in work_queue_entry(envelope).items():
                command += [name, value]
        if self.sender == "raw":
            assert self._commands is not None
            packed = hiredis.pack_command(tuple(command))
            outcome.sent = time.perf_counter()
            await self._commands.send(packed)
        else:
            outcome.sent = time.perf_counter()
            await self.redis.execute_command(*command)
        self.commands += 1
        try:
            await waiter
        finally:
            self.pending.pop(reply_to, None)
        return outcome

    def _on_message(self, channel: bytes, data: bytes, now: float) -> None:
        if channel.endswith(b":chunks"):
            pending = self.pending.get(channel[:-7])
            if pending is None:
                return
            payload = orjson.loads(data)["payload"]
            outcome = pending.outcome
            if payload.get("seq") != pending.next_seq:
                outcome.ok_order = False
            pending.next_seq += 1
            delta = payload.get("delta")
            if delta:
                if outcome.first is None:
                    outcome.first = now
                outcome.messages += 1
                if pending.keep_text:
                    outcome.text.append(delta)
            return
        pending = self.pending.get(channel)
        if pending is None:
            return
        payload = orjson.loads(data)["payload"]
        outcome = pending.outcome
        outcome.done = now
        if "error" in payload:
            outcome.error = f"{payload['error']}: {payload.get('details')}"[:300]
        outcome.tokens = int((payload.get("usage") or {}).get("completion_tokens", 0))
        timings = (payload.get("meta") or {}).get("timings") or {}
        outcome.server_tps = timings.get("predicted_per_second")
        if not pending.waiter.done():
            pending.waiter.set_result(None)


def _now_iso() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _host_port(url: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 6379
