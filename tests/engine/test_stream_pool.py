"""The stream pool against a server that keeps connections alive, unlike llama-server.

llama-server closes every streamed connection after its response (see test_client.py for
the pool against the real one). A proxy in front of it, or another server, may keep them
open; the stand-in here is a few lines of asyncio that answer every POST with a short SSE
stream and keep the connection, since no real part here behaves that way.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from functools import partial

import pytest

from orion_llamaccp.engine.client import Sent
from orion_llamaccp.engine.stream import _HIGH_WATER, StreamPool, stream_batches
from orion_llamaccp.errors import UpstreamError
from tests.support.procs import ipv6_loopback

SSE = (
    b'data: {"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
    b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: keep-alive\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(SSE), SSE)
)


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            await _request(reader)
            writer.write(RESPONSE)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


@pytest.fixture
async def keep_alive_port() -> AsyncIterator[int]:
    server = await asyncio.start_server(_serve, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


def _pool(port: int, slots: int) -> StreamPool:
    return StreamPool(
        "127.0.0.1",
        port,
        path="/v1/chat/completions",
        api_key=None,
        connect_timeout=5,
        read_timeout=5,
        slots=slots,
    )


async def _chat(pool: StreamPool) -> None:
    conn = await pool.open(b"{}")
    try:
        events = [e async for batch in stream_batches(conn) for e in batch]
        assert len(events) == 2  # the token, then the finish
    finally:
        pool.finish(conn)


async def test_a_keep_alive_server_stand_in_gets_its_connections_reused_not_reopened(
    keep_alive_port: int,
) -> None:
    """Spares are kept per free slot only for a server that closes connections: against
    one that keeps them, a finished response's connection serves the next request, and
    the pool opens about as many connections as requests ever ran at once, not one per
    request (which cost 10-15 % more worker CPU per token in the capacity benchmark)."""
    pool = _pool(keep_alive_port, slots=8)
    try:
        for _ in range(10):
            await _chat(pool)
        for _ in range(10):
            await asyncio.gather(*(_chat(pool) for _ in range(4)))
        await asyncio.sleep(0.05)  # any refill under way lands
        assert not pool.server_closes
        assert pool.connects <= 4 + 2, pool.connects  # 4 at once, and a spare or two
    finally:
        pool.close()


async def test_the_pool_s_own_closes_are_not_taken_for_the_server_s_stand_in(
    keep_alive_port: int,
) -> None:
    """A used connection the pool closes itself (more come back than it keeps idle; a
    request written ahead on it and dropped) is not the server closing it: against a
    keep-alive server the pool goes on reusing connections. Until round 22 it took its
    own close for the server's and from then on opened a connection per request (the
    capacity benchmark did, at 64 in flight)."""
    pool = _pool(keep_alive_port, slots=8)
    pool.max_idle = 2
    try:
        for _ in range(5):
            await asyncio.gather(*(_chat(pool) for _ in range(4)))  # 4 back, 2 kept idle
        pool.idle.sort(key=lambda conn: conn.served)  # one that has served is taken next
        conn = pool.send(b"{}")
        assert conn is not None and conn.served
        Sent(b"{}", conn, pool).drop()  # closed by the pool before its answer came
        await asyncio.sleep(0.05)  # any refill under way lands, the closes are seen
        assert not pool.server_closes
        connects = pool.connects
        for _ in range(10):
            await _chat(pool)
        assert pool.connects <= connects + 1, (connects, pool.connects)
    finally:
        pool.close()


async def test_requests_written_ahead_and_dropped_give_their_connections_back_stand_in(
    keep_alive_port: int,
) -> None:
    """A request written ahead and then dropped (its message was invalid, a duplicate, or
    another replica's) hands its connection back: the pool forgets it and opens the next
    one ahead. Before, a dropped connection stayed on the pool's list until some response
    finished, and no connection was opened ahead for the next request meanwhile."""
    pool = _pool(keep_alive_port, slots=4)
    try:
        await _chat(pool)  # opens the first connection; it stays for the next request
        for _ in range(20):
            conn = None
            for _ in range(200):  # the spare opened in the background lands
                if (conn := pool.send(b"{}")) is not None:
                    break
                await asyncio.sleep(0.005)
            assert conn is not None, "no connection opened ahead after a dropped request"
            Sent(b"{}", conn, pool).drop()
            assert conn.closed
            assert pool.handed_out == 0
    finally:
        pool.close()


TOKEN = (
    b'{"choices":[{"finish_reason":null,"index":0,"delta":{"content":"%d "}}],"created":1,'
    b'"id":"c","model":"m","system_fingerprint":"b0","object":"chat.completion.chunk"}'
)
FINISH = b'{"choices":[{"finish_reason":"length","index":0,"delta":{}}],"created":1}'


async def _flood(tokens: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A long answer written at once, framed as llama-server frames it (a chunk per event)."""
    await reader.readuntil(b"\r\n\r\n")
    events = [TOKEN % n for n in range(tokens)] + [FINISH, b"[DONE]"]
    chunks = (b"data: %b\n\n" % data for data in events)
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n" + b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    )
    await writer.drain()
    writer.close()


async def test_a_slow_reader_pauses_the_socket_and_loses_no_token_stand_in_server() -> None:
    """Decoded events wait for the relay in memory only up to a bound: past it the
    connection stops reading (TCP pushes back on the server) until the relay catches up.
    A stand-in server writes 40,000 token chunks (about 5 MB) at once, faster than any
    llama-server; every token arrives, in order, a list of texts per read, not one per token."""
    tokens = 40_000
    server = await asyncio.start_server(partial(_flood, tokens), "127.0.0.1", 0)
    pool = _pool(server.sockets[0].getsockname()[1], slots=1)
    try:
        conn = await pool.open(b"{}")
        for _ in range(500):
            if conn.paused:
                break
            await asyncio.sleep(0.002)  # the relay is busy elsewhere: nothing reads
        assert conn.paused and conn.pending < 2 * _HIGH_WATER
        texts: list[str] = []
        runs = 0
        async for batch in stream_batches(conn):
            for delta in batch:
                if isinstance(delta, list):
                    texts += delta
                    runs += 1
        pool.finish(conn)
        assert texts == [f"{n} " for n in range(tokens)]
        assert runs < tokens // 10
    finally:
        pool.close()
        server.close()


TICKED = TOKEN.replace(b'"created":1', b'"created":2')  # llama-server's clock ticked


class Seen:
    """The texts a test's reader has been given so far, and a wake-up for each."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.grew = asyncio.Event()

    def add(self, texts: list[str]) -> None:
        self.texts.extend(texts)
        self.grew.set()

    async def at_least(self, count: int) -> None:
        while len(self.texts) < count:
            self.grew.clear()
            await self.grew.wait()


async def _paced(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An answer at a GPU's pace: every event its own chunk in a write of its own, and a
    token written only once the reader has been given the one before, so each read holds
    one token (a pause could not promise that on a loaded machine). The clock ticks
    halfway."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    role = b'{"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant"}}]}'
    tokens = [TOKEN % n for n in range(20)] + [TICKED % n for n in range(20, 40)]
    for n, data in enumerate([role, *tokens, FINISH, b"[DONE]"]):
        chunk = b"data: %b\n\n" % data
        writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        await writer.drain()
        await (seen.at_least(n) if 1 <= n <= len(tokens) else asyncio.sleep(0.002))
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    writer.close()


async def test_tokens_read_one_at_a_time_go_to_the_sink_without_waking_the_reader_stand_in() -> (
    None
):
    """At a GPU's pace each token comes in a read of its own. Once the reader knows the
    tokens' layout, such a read goes to its sink from the read callback, and the reader
    task sleeps on; the role, the tick of the clock (a new layout, read by the reader)
    and the finish still come as batches, and every text arrives once, in order."""
    seen = Seen()
    server = await asyncio.start_server(partial(_paced, seen), "127.0.0.1", 0)
    pool = _pool(server.sockets[0].getsockname()[1], slots=1)
    sunk = batches = 0

    def sink(read: list[str]) -> None:
        nonlocal sunk
        sunk += 1
        seen.add(read)

    try:
        conn = await pool.open(b"{}")
        async for batch in stream_batches(conn, sink):
            batches += 1
            for delta in batch:
                if isinstance(delta, list):
                    seen.add(delta)
        pool.finish(conn)
        assert seen.texts == [f"{n} " for n in range(40)]
        assert sunk == 38  # all but the first token of each layout (0, and 20 after the tick)
        assert batches <= 4  # the role, the first token of each layout, the finish
        assert conn.sink is None  # the reader is gone: nothing more goes to its sink
    finally:
        pool.close()
        server.close()


async def _token_after_done(
    seen: Seen, late: asyncio.Event, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Five tokens at a GPU's pace, the finish and ``[DONE]``, then (once told) one more
    token event in a read of its own, before the body's end: a server that misbehaves."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    role = b'{"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant"}}]}'
    for n, data in enumerate([role, *(TOKEN % n for n in range(5))]):
        chunk = b"data: %b\n\n" % data
        writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        await writer.drain()
        await (seen.at_least(n) if n else asyncio.sleep(0.002))
    ending = (b"data: %b\n\n" % data for data in (FINISH, b"[DONE]"))
    writer.write(b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in ending))  # one read
    await late.wait()
    chunk = b"data: %b\n\n" % (TOKEN % 99)
    writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
    await writer.drain()


async def test_a_token_event_after_done_goes_nowhere_stand_in() -> None:
    """Events after ``[DONE]`` are ignored (``EventReader``); a token event in a read of
    its own then went to the reader's sink all the same, while the reader's consumer
    still held the last batch. The sink is gone as soon as ``[DONE]`` is read."""
    seen, late = Seen(), asyncio.Event()
    server = await asyncio.start_server(partial(_token_after_done, seen, late), "127.0.0.1", 0)
    pool = _pool(server.sockets[0].getsockname()[1], slots=1)
    try:
        conn = await pool.open(b"{}")
        async for batch in stream_batches(conn, seen.add):
            for delta in batch:
                if isinstance(delta, list):
                    seen.add(delta)
            if conn.saw_done:  # the consumer still holds the last batch (publishing it)
                received = conn.received
                late.set()
                while conn.received == received:  # the late token read meanwhile
                    await asyncio.sleep(0.001)
        pool.finish(conn)
        assert seen.texts == [f"{n} " for n in range(5)]
    finally:
        pool.close()
        server.close()


async def _close_delimited(
    response: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """A proxy stand-in: neither Content-Length nor chunks, the close ends the body."""
    await _request(reader)
    writer.write(response)
    await writer.drain()
    writer.close()


async def _request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    await reader.readexactly(length)


async def test_a_body_ended_by_the_close_ends_the_stream_proxy_stand_in() -> None:
    """Without [DONE] (the reader's own end), only the close says the stream is over."""
    without_done = SSE.replace(b"data: [DONE]\n\n", b"")
    response = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n" + without_done
    server = await asyncio.start_server(partial(_close_delimited, response), "127.0.0.1", 0)
    pool = _pool(server.sockets[0].getsockname()[1], slots=1)
    try:
        async with asyncio.timeout(30):  # a guard: before the fix this waited forever
            conn = await pool.open(b"{}")
            events = [e async for batch in stream_batches(conn) for e in batch]
        pool.finish(conn)
        assert [e.content for e in events] == ["hi", ""]
        assert events[-1].finish_reason == "stop"
        assert conn.failure is None and pool.handed_out == 0
    finally:
        pool.close()
        server.close()


async def test_an_error_body_ended_by_the_close_is_raised_proxy_stand_in() -> None:
    body = b'{"error":{"code":500,"message":"boom","type":"server_error"}}'
    response = b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n\r\n"
    server = await asyncio.start_server(partial(_close_delimited, response + body), "127.0.0.1", 0)
    pool = _pool(server.sockets[0].getsockname()[1], slots=1)
    try:
        with pytest.raises(UpstreamError, match="boom"):
            async with asyncio.timeout(30):  # a guard: before the fix this waited forever
                await pool.open(b"{}")
    finally:
        pool.close()
        server.close()


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback")
async def test_the_host_header_brackets_an_ipv6_host_stand_in() -> None:
    """``Host: ::1:8080`` is no valid authority (RFC 9110 wants ``[::1]:8080``).
    llama-server takes either; a stricter proxy in front of it may not, so the stand-in
    records what a request's head says."""
    heads: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        heads.append(head)
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        writer.write(RESPONSE)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(record, "::1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = StreamPool(
        "::1", port, path="/v1/chat/completions", api_key=None, connect_timeout=5, read_timeout=5
    )
    try:
        await _chat(pool)
    finally:
        pool.close()
        server.close()
    (head,) = heads
    assert f"\r\nHost: [::1]:{port}\r\n".encode() in head, head
