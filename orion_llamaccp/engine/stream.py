"""Streamed chat completions on pooled keep-alive HTTP/1.1 connections.

This is the per-token hot path, so it does not go through a general HTTP library: bytes
are decoded in the protocol callback as they arrive and the reader awaits once per socket
read, not once per library layer per token. A response is read to its end so that its
connection can carry the next request; leaving a stream early closes the connection,
which tells llama-server to stop generating.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from orion_llamaccp.engine.events import Delta, EventReader, TextSink
from orion_llamaccp.engine.http_errors import raise_for_response
from orion_llamaccp.engine.sse import ProtocolError, ResponseDecoder, SSEDecoder, lone_token
from orion_llamaccp.errors import EngineUnavailable, UpstreamError, describe

_HIGH_WATER = 256 * 1024  # bytes of events waiting for the reader: stop reading the socket
_LOW_WATER = 32 * 1024  # ... and read again once the reader is down to this many
_FINISH_GRACE = 5.0  # seconds a response may take to end after [DONE] and still be reused


class StreamConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one streamed response at a time.

    ``data_received`` decodes at once (HTTP framing, then SSE) into ``runs`` of whole
    events; the reader (``stream_batches``) awaits ``wait()`` only when it has consumed them all. A
    run of nothing but tokens that arrives while the reader has taken every run before it
    goes straight to the reader's ``sink``, if it has one, and the reader is not woken; a
    read that is one chunk holding one token (``sse.lone_token``: a GPU's pace) goes
    there in one check and one parse. A timer per response fails it after
    ``read_timeout`` seconds without a byte.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.active = False
        self.paused = False
        self.saw_done = False
        self.on_complete: Any = None
        self.on_idle_close: Any = None
        self.served = False  # has carried a whole response
        self.grace: asyncio.TimerHandle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timeout = 0.0
        self._reset()

    def _reset(self) -> None:
        self.decoder = ResponseDecoder()
        self.sse = SSEDecoder()
        self.runs: list[bytes] = []
        self.pending = 0  # bytes in runs
        self.reader: EventReader | None = None  # the reader's, while it reads this response
        self.sink: TextSink | None = None  # ... and where it takes token texts directly
        self.body: list[bytes] = []
        self.failure: BaseException | None = None
        self.received = 0
        self.waiter: asyncio.Future[None] | None = None
        self.last_read = self.loop.time()
        self.saw_done = False

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is not None and not self.runs and self.active:  # the reader took every run
            layout = self.reader.layout  # type: ignore[union-attr]  # set with the sink
            if layout is not None and len(data) < layout.lone_below:
                text = lone_token(data, self.decoder, self.sse, layout)
                if text is not None:  # a token at a GPU's pace: nearly every read
                    self.received += len(data)
                    self.last_read = self.loop.time()
                    sink([text])
                    return
        if not self.active:  # bytes nobody asked for: this connection cannot be trusted
            self.close()
            return
        self.received += len(data)
        self.last_read = self.loop.time()
        decoder = self.decoder
        try:
            body = decoder.feed(data)
        except (ProtocolError, ValueError) as exc:
            self._fail(exc)
            self.close()
            return
        if body:
            if decoder.status == 200:
                run = self.sse.feed_run(body)
                if run and self._sunk(run):
                    if not decoder.complete:
                        return  # nothing for the reader: it sleeps on
                elif run:
                    self.runs.append(run)
                    self.pending += len(run)
                    if self.pending > _HIGH_WATER and not self.paused and self.transport:
                        self.paused = True
                        self.transport.pause_reading()
            else:
                self.body.append(body)
        if decoder.complete and self.on_complete is not None:
            done, self.on_complete = self.on_complete, None
            done(self)
        self._wake()

    def _sunk(self, run: bytes) -> bool:
        """Whether ``run`` went to the reader's sink: a run of nothing but tokens, with
        every earlier run taken by the reader, so that the order holds."""
        sink, reader = self.sink, self.reader
        if sink is None or reader is None or self.runs:
            return False
        texts = reader.token_texts(run)
        if texts is None:
            return False
        sink(texts)
        return True

    def eof_received(self) -> bool:
        if self.active:
            self.decoder.eof()  # the end of a body delimited by the close (from a proxy)
            if self.decoder.complete and self.on_complete is not None:
                done, self.on_complete = self.on_complete, None
                done(self)
            self._wake()  # else the reader sleeps on: connection_lost sees it complete
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        ours = self.closed  # close() came first: not the server's doing
        self.closed = True
        if not self.active and not ours and self.on_idle_close is not None:  # it has served
            self.on_idle_close()  # the server closes connections after a response
        if self.active and not self.decoder.complete:
            self._fail(exc or ConnectionResetError("llama-server closed the connection"))
        self._cancel_timer()

    # -- the reader's side

    def start(self, request: bytes, timeout: float) -> None:
        """Send one request on this (idle) connection."""
        assert self.transport is not None
        self._reset()
        self.active = True
        self._timeout = timeout
        self._timer = self.loop.call_at(self.last_read + timeout, self._check_idle)
        self.transport.write(request)

    async def wait(self) -> None:
        """Until more bytes are decoded, the response ends, or it fails."""
        if self.paused and self.pending <= _LOW_WATER and self.transport:
            self.paused = False
            self.transport.resume_reading()
        if self.failure is not None or self.decoder.complete:
            return
        self.waiter = waiter = self.loop.create_future()
        try:
            await waiter
        finally:
            self.waiter = None

    async def head(self) -> None:
        while not self.decoder.head_done:
            if self.failure is not None:
                raise self.failure
            await self.wait()

    async def read_body(self) -> bytes:
        while not self.decoder.complete:
            if self.failure is not None:
                raise self.failure
            await self.wait()
        return b"".join(self.body)

    def close(self) -> None:
        self.active = False
        self.closed = True
        self.on_complete = None
        self._cancel_timer()
        if self.grace is not None:
            self.grace.cancel()
            self.grace = None
        if self.transport is not None:
            self.transport.close()

    def idle(self) -> None:
        """The response ended: wait, reading, for the next request."""
        self.active = False
        self.served = True
        self._cancel_timer()
        if self.grace is not None:
            self.grace.cancel()
            self.grace = None
        self.runs.clear()
        self.pending = 0
        self.reader = self.sink = None
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    # -- internals

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
        self._wake()

    def _check_idle(self) -> None:
        self._timer = None
        if not self.active:
            return
        silent = self.loop.time() - self.last_read
        if silent >= self._timeout:
            self._fail(TimeoutError(f"no bytes from llama-server for {silent:.1f}s"))
            self.close()
        else:
            self._timer = self.loop.call_at(self.last_read + self._timeout, self._check_idle)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class StreamPool:
    """Keep-alive connections for streamed chats; a used one goes back when its response ended.

    llama-server (cpp-httplib) closes the connection after every streamed response, so
    reuse alone would make each request connect first. The pool therefore keeps
    connections opened ahead of need: a response that ends starts opening the next in the
    background (and a request that found none connects itself). Once it has seen the
    server close them, it keeps one spare per slot not streaming (``slots``, set from
    llama-server's ``/props``), and at least one: requests that arrive together each find
    a connection open (with one spare, the second of two connected first). The
    connections open stay within slots + 1: idle ones cost llama-server a socket each
    (measured here, six idle connections to a 2-slot llama-server did not delay a
    request), and there is no use for more.
    An unused spare is closed by llama-server after its keep-alive timeout (5 s) and not
    replaced until the next request, so an idle worker holds no connection for long.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        path: str,
        api_key: str | None,
        connect_timeout: float,
        read_timeout: float,
        max_idle: int = 64,
        slots: int = 1,
        unix_socket: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.unix_socket = unix_socket  # connect there instead of to host:port
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        self.slots = slots
        self.idle: list[StreamConnection] = []
        self._out: list[StreamConnection] = []  # handed to requests: streaming, or about to
        self.connects = 0
        self.connects_waited = 0  # ... of which a request had to wait for
        self.server_closes = False  # learnt: the server ends a connection after a response
        self._opening = 0
        self._closed = False
        self._refills: set[asyncio.Task[None]] = set()
        auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        self._head = (
            f"POST {path} HTTP/1.1\r\nHost: {_authority(host, port)}\r\n"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\n{auth}"
        ).encode("latin-1")

    async def _connect(self) -> StreamConnection:
        self.connects += 1
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.unix_socket:
                    _, conn = await loop.create_unix_connection(
                        lambda: StreamConnection(loop), self.unix_socket
                    )
                else:
                    _, conn = await loop.create_connection(
                        lambda: StreamConnection(loop), self.host, self.port
                    )
        except (OSError, TimeoutError) as exc:
            raise EngineUnavailable(f"cannot reach llama-server: {describe(exc)}") from exc
        return conn

    def send(self, payload: bytes) -> StreamConnection | None:
        """Write the request now on a connection opened ahead; None when there is none.

        Synchronous on purpose: a caller can put the request on the wire before it yields
        to the event loop, ahead of whatever else is ready to run (``open`` goes on).
        """
        conn = self._take_idle()
        if conn is not None:
            conn.start(self._request(payload), self.read_timeout)
            self._out.append(conn)
        return conn

    def _request(self, payload: bytes) -> bytes:
        return self._head + b"Content-Length: %d\r\n\r\n" % len(payload) + payload

    async def open(self, payload: bytes, sent: StreamConnection | None = None) -> StreamConnection:
        """Send the request (unless ``sent`` carries it already); the connection once a 200
        head arrived, else the error raised."""
        wrote = False
        while True:
            conn, sent = sent or self.send(payload), None
            reused = conn is not None
            if conn is None:
                self.connects_waited += 1
                try:
                    conn = await self._connect()
                except EngineUnavailable as exc:
                    exc.reached = wrote  # on a connection the server closed: it may have died
                    raise
                conn.start(self._request(payload), self.read_timeout)
                self._out.append(conn)
            wrote = True
            try:
                await conn.head()
            except asyncio.CancelledError:
                conn.close()
                raise
            except Exception as exc:
                conn.close()
                if reused and conn.received == 0 and not isinstance(exc, TimeoutError):
                    if conn.served:
                        self._learn_server_closes()
                    continue  # a keep-alive connection the server had closed: use a fresh one
                raise EngineUnavailable(
                    f"llama-server took the request and went away without an answer: "
                    f"{type(exc).__name__}: {exc}",
                    reached=True,
                ) from exc
            if conn.decoder.status == 200:
                return conn
            try:
                body = await conn.read_body()
            except Exception as exc:
                conn.close()
                raise EngineUnavailable(
                    f"llama-server answered {conn.decoder.status} and broke off: {exc}",
                    reached=True,
                ) from exc
            self.finish(conn)
            raise_for_response(conn.decoder.status, body)

    @property
    def handed_out(self) -> int:
        """Connections handed to requests and not yet given back (``finish``)."""
        return len(self._out)

    @property
    def spares(self) -> int:
        """How many connections to keep open unused: one per slot not streaming (at least
        one) once the server is known to close them after a response; else one, since a
        connection that ended its response comes back for the next request."""
        return max(1, self.slots - len(self._out)) if self.server_closes else 1

    def _refill(self) -> None:
        """Open connections in the background until ``spares`` wait unused."""
        if self._closed:
            return
        self.idle = [conn for conn in self.idle if not conn.closed]
        for _ in range(self.spares - len(self.idle) - self._opening):
            self._opening += 1
            task = asyncio.get_running_loop().create_task(self._open_spare())
            self._refills.add(task)
            task.add_done_callback(self._refills.discard)

    async def _open_spare(self) -> None:
        try:
            conn = await self._connect()
        except EngineUnavailable:
            return  # llama-server is down or restarting: the next request finds out itself
        finally:
            self._opening -= 1
        if len(self.idle) < self.max_idle:
            self.idle.append(conn)
        else:
            conn.close()

    def _take_idle(self) -> StreamConnection | None:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
        return None

    def finish(self, conn: StreamConnection) -> None:
        """Back to the pool if the response ended cleanly, else closed (cancels generation).

        The spare for the next request is opened now, not when this one was sent: then
        the connect (the worker's and llama-server's CPU) would compete with llama-server
        reading this request's prompt, which delays its first token on a small machine.
        """
        conn.sink = None  # whatever else comes is no one's
        self._out = [out for out in self._out if out is not conn and out.active and not out.closed]
        self._refill()
        if conn.decoder.complete and not conn.closed:
            self._release(conn)
        elif conn.saw_done and conn.failure is None and not conn.closed:
            # [DONE] came, the last chunk is on its way: reuse the connection when it lands
            conn.on_complete = self._release
            conn.grace = conn.loop.call_later(_FINISH_GRACE, conn.close)
        else:
            conn.close()

    def _release(self, conn: StreamConnection) -> None:
        if (
            conn.closed
            or self.server_closes
            or not conn.decoder.keep_alive
            or len(self.idle) >= self.max_idle
        ):
            conn.close()
            return
        conn.on_idle_close = self._learn_server_closes
        conn.idle()
        self.idle.append(conn)

    def _learn_server_closes(self) -> None:
        """A used connection was closed by the server while idle: llama-server does that
        after every streamed response, so reusing one would only cost a failed write, and
        the spares to keep open are one per slot from now on."""
        if not self.server_closes:
            self.server_closes = True
            self._refill()

    def close(self) -> None:
        self._closed = True
        for task in self._refills:
            task.cancel()
        for conn in self.idle:
            conn.close()
        self.idle.clear()


async def stream_batches(
    conn: StreamConnection, sink: TextSink | None = None
) -> AsyncIterator[list[Delta]]:
    """The events of one streamed response, a batch per wake-up, as fast as decoded;
    ``sink``, if given, takes the token texts of reads that hold nothing else instead
    (``ChatStream.batches``)."""
    reader = conn.reader = EventReader()
    conn.sink = sink
    try:
        while True:
            runs = conn.runs
            if runs:
                batch = reader.take_runs(runs)  # nothing adds to it meanwhile: no await in take
                runs.clear()
                conn.pending = 0
                conn.saw_done = reader.done
                if reader.done:  # events after it are ignored: those of a sink's reads too
                    conn.sink = None
                if batch:
                    yield batch
                if reader.done:
                    return
                continue
            failure = conn.failure
            if failure is not None:
                rest = _whole_before_the_break(conn, reader)
                if rest is not None:
                    if rest:
                        yield rest
                    return
                raise UpstreamError(
                    f"stream from llama-server broke off: {type(failure).__name__}: {failure}",
                    broken=True,
                ) from failure
            if conn.decoder.complete:
                break
            if conn.paused:
                await conn.wait()
                continue
            conn.waiter = waiter = conn.loop.create_future()  # conn.wait(), inlined: per read
            try:
                await waiter
            finally:
                conn.waiter = None
        rest = reader.end(conn.sse.flush())
        if rest:
            yield rest
    finally:
        if conn.sink is sink:  # the reader is gone: nothing more goes to its sink
            conn.sink = None


def _whole_before_the_break(conn: StreamConnection, reader: EventReader) -> list[Delta] | None:
    """The events left in the chunk a broken connection was cut inside, if the answer
    had finished by then (only its usage or ``[DONE]`` was lost); else None."""
    try:
        batch = reader.take_runs([conn.sse.feed_run(conn.decoder.cut_short())])
    except UpstreamError:  # not events: the break is the error to report
        return None
    return batch if reader.finished else None


def _authority(host: str, port: int) -> str:
    """``host:port`` as a Host header writes it: an IPv6 literal in brackets (RFC 9110)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
