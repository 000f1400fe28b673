"""The least a process between a caller and Redis can cost: the floor under the bus path.

    python -m bench.echo redis HOST PORT IN OUT   # SUBSCRIBE IN, PUBLISH each message to OUT
    python -m bench.echo tcp PORT                 # echo bytes back on the same connection

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
    if argv[0] == "redis":
        uvloop.run(redis_relay(argv[1], int(argv[2]), argv[3], argv[4]))
    else:
        uvloop.run(tcp_echo(int(argv[1])))


if __name__ == "__main__":
    main(sys.argv[1:])
