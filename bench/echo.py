"""The least a process between a caller and Redis can cost: the floor under the bus path.

    python -m bench.echo redis HOST PORT IN OUT   # SUBSCRIBE IN, PUBLISH each message to OUT
    python -m bench.echo tcp PORT                 # echo bytes back on the same connection
    python -m bench.echo llama HOST PORT IN OUT LLAMA_PORT [SLOTS]
        # SUBSCRIBE IN; each message is an 8-byte tag and a chat body: POST it to
        # llama-server, PUBLISH the tag and the read that holds the first token to OUT

Raw asyncio protocols on uvloop with hiredis parsing: no validation, no claims, no task per
message. ``bench/floor.py`` times a message through it, through Redis and back, against
the same process echoing over a direct TCP connection.
"""

from __future__ import annotations

import asyncio
import sys

import hiredis
import uvloop


def command(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out += [b"$%d\r\n" % len(part), part, b"\r\n"]
    return b"".join(out)


class Drain(asyncio.Protocol):
    """The PUBLISH connection: its replies (subscriber counts) are not needed."""

    def data_received(self, data: bytes) -> None:
        pass


class Relay(asyncio.Protocol):
    def __init__(self, publish: asyncio.Transport, out: bytes) -> None:
        self.reader = hiredis.Reader()
        self.publish = publish
        self.out = out

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if isinstance(reply, list) and reply[0] == b"message":
                self.publish.write(command(b"PUBLISH", self.out, reply[2]))


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


TAG = 8  # bytes before a llama message's body: echoed before each reply, to tell requests apart


class Upstream(asyncio.Protocol):
    """One streamed response from llama-server; the read with the first token goes out."""

    def __init__(self, relay: LlamaRelay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.tag = b""
        self.sent = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.sent and b'"content":"' in data:
            self.sent = True
            self.relay.publish.write(command(b"PUBLISH", self.relay.out, self.tag + data))
        if b"data: [DONE]" in data:
            self.relay.publish.write(command(b"PUBLISH", self.relay.out, self.tag + b"done"))
        if data == b"0\r\n\r\n" or data.endswith(b"\r\n0\r\n\r\n"):  # the body's last chunk
            self.transport.close()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.relay.spares:
            self.relay.spares.remove(self)
        self.relay.refill()


class LlamaRelay(Relay):
    """The leanest bus worker in front of llama-server: no decoding, no claims, one
    connection opened ahead per slot (llama-server closes each one after a streamed
    response). A message is a tag of ``TAG`` bytes, then the chat body."""

    def __init__(self, publish: asyncio.Transport, out: bytes, llama_port: int, slots: int) -> None:
        super().__init__(publish, out)
        self.llama_port = llama_port
        self.slots = slots
        self.spares: list[Upstream] = []
        self.opening = 0
        self.head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"

    def refill(self) -> None:
        for _ in range(self.slots - len(self.spares) - self.opening):
            self.opening += 1
            asyncio.get_running_loop().create_task(self._open_spare())

    async def _open_spare(self) -> None:
        try:
            self.spares.append(await self._connect())
        finally:
            self.opening -= 1

    async def _connect(self) -> Upstream:
        loop = asyncio.get_running_loop()
        _, upstream = await loop.create_connection(
            lambda: Upstream(self), "127.0.0.1", self.llama_port
        )
        return upstream

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if isinstance(reply, list) and reply[0] == b"message":
                tag, body = reply[2][:TAG], reply[2][TAG:]
                request = self.head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                upstream = self.spares.pop() if self.spares else None
                if upstream is not None and not upstream.transport.is_closing():  # type: ignore[union-attr]
                    upstream.tag = tag
                    upstream.transport.write(request)  # type: ignore[union-attr]
                else:  # no connection ready: open one first
                    asyncio.get_running_loop().create_task(self._send_fresh(tag, request))

    async def _send_fresh(self, tag: bytes, request: bytes) -> None:
        upstream = await self._connect()
        upstream.tag = tag
        upstream.transport.write(request)  # type: ignore[union-attr]


async def llama_relay(
    host: str, port: int, inbound: str, outbound: str, llama: int, slots: int
) -> None:
    loop = asyncio.get_running_loop()
    publish, _ = await loop.create_connection(Drain, host, port)
    relay = LlamaRelay(publish, outbound.encode(), llama, slots)
    relay.refill()
    subscribe, _ = await loop.create_connection(lambda: relay, host, port)
    subscribe.write(command(b"SUBSCRIBE", inbound.encode()))
    await asyncio.Event().wait()


async def redis_relay(host: str, port: int, inbound: str, outbound: str) -> None:
    loop = asyncio.get_running_loop()
    publish, _ = await loop.create_connection(Drain, host, port)
    subscribe, _ = await loop.create_connection(
        lambda: Relay(publish, outbound.encode()), host, port
    )
    subscribe.write(command(b"SUBSCRIBE", inbound.encode()))
    await asyncio.Event().wait()


async def tcp_echo(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", port)
    await server.serve_forever()


def main(argv: list[str]) -> None:
    if argv[0] == "llama":
        slots = int(argv[6]) if len(argv) > 6 else 1
        uvloop.run(llama_relay(argv[1], int(argv[2]), argv[3], argv[4], int(argv[5]), slots))
    elif argv[0] == "redis":
        uvloop.run(redis_relay(argv[1], int(argv[2]), argv[3], argv[4]))
    else:
        uvloop.run(tcp_echo(int(argv[1])))


if __name__ == "__main__":
    main(sys.argv[1:])
