"""A TCP proxy in front of a real Redis that can hold replies back, on demand.

Some windows of the worker are a Redis reply long: a cancel landing after a command ran
in Redis but before its reply came back, say. Nothing real widens one on demand, so the
proxy does: armed with a ``trigger``, every connection that sends bytes containing it
has its replies held from then on (Redis has run the commands; the worker has not heard
so), until ``release``. Other connections, the pub/sub one included, flow freely.
``hold`` holds the replies of connections that already sent a marker (the pub/sub one's
``SUBSCRIBE``): messages Redis sends them wait in the proxy.

It runs its own event loop in a thread: the tests' helpers that wait for a worker block
theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading


class HoldingProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.held = 0  # connections that sent the trigger while armed
        self._trigger: bytes | None = None
        self._loop = asyncio.new_event_loop()
        self._released = asyncio.Event()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()
        self._connections: list[tuple[bytearray, asyncio.Event]] = []  # opening, held

    def start(self) -> HoldingProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._connection, "127.0.0.1", 0), self._loop
        ).result(5)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def arm(self, trigger: bytes) -> None:
        self._loop.call_soon_threadsafe(self._arm, trigger)

    def hold(self, marker: bytes) -> None:
        """Hold, from now until ``release``, the replies of every connection whose first
        4 KB sent contain ``marker``."""
        asyncio.run_coroutine_threadsafe(self._hold(marker), self._loop).result(5)

    async def _hold(self, marker: bytes) -> None:
        self._released.clear()
        for opening, held in self._connections:
            if marker in opening and not held.is_set():
                held.set()
                self.held += 1

    def release(self) -> None:
        self._loop.call_soon_threadsafe(self._arm, None)

    def close(self) -> None:
        """Cut every connection (a worker still running reconnects and fails over)."""
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    def _arm(self, trigger: bytes | None) -> None:
        self._trigger = trigger
        if trigger is None:
            self._released.set()
        else:
            self._released.clear()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        held = asyncio.Event()  # set: this connection sent the trigger while armed
        opening = bytearray()
        self._connections.append((opening, held))
        for pump in (
            self._pump(reader, up_writer, held, replies=False, opening=opening),
            self._pump(up_reader, writer, held, replies=True),
        ):
            task = asyncio.create_task(pump)
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        held: asyncio.Event,
        *,
        replies: bool,
        opening: bytearray | None = None,
    ) -> None:
        """One direction of a connection: requests mark it held when they carry the
        trigger (before Redis can answer them); replies wait while it is held."""
        tail = b""  # a trigger split across two reads is still seen
        try:
            while data := await reader.read(65536):
                if opening is not None and len(opening) < 4096:
                    opening += data[: 4096 - len(opening)]
                if replies:
                    if held.is_set():
                        await self._released.wait()
                elif self._trigger and not held.is_set() and self._trigger in tail + data:
                    held.set()
                    self.held += 1
                tail = data[-64:]
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()


class InLoopServer:
    """A TCP server on a free local port for an ``async with`` block, in the test's own
    event loop (a proxy in front of llama-server, say); the block gets its ``http://``
    URL. A subclass answers each connection (``_connection``)."""

    server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError
