#!/usr/bin/env python3
"""The real llama-server (``REAL_LLAMA_SERVER``) behind a proxy that cuts a streamed answer
right after its finish event: the usage event and ``[DONE]`` that llama-server writes
after it, in the same HTTP chunk, never arrive, as when a network between a worker and a
remote llama-server breaks there. Nothing real cuts an answer at an exact event.

Launched as the binary (``LLAMA_SERVER_BIN``): llama-server's arguments, its ``--port``
taken by the proxy and the real one moved to a free port. Only the answers to requests
that hold ``CUT_MARK`` are cut; the rest pass through whole. ``--help`` and ``--version``
go to the real binary as they are.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys

CUT_MARK = b"CUT-AFTER-FINISH"
_FINISH = b'"finish_reason":"'  # a finish reason given (before it: null, unquoted)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream_port: int
) -> None:
    try:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
    except OSError:  # not listening yet (loading): as if nothing were on the port
        writer.transport.abort()
        return
    marked = asyncio.Event()

    async def requests() -> None:
        while data := await reader.read(65536):
            if CUT_MARK in data:
                marked.set()
            up_writer.write(data)
        up_writer.close()

    pump = asyncio.create_task(requests())
    seen = b""
    try:
        while data := await up_reader.read(65536):
            if not marked.is_set():
                writer.write(data)
                await writer.drain()
                continue
            seen += data
            at = seen.find(_FINISH)
            end = seen.find(b"\n\n", at) if at >= 0 else -1
            if end < 0:
                continue  # held back until the finish event is whole
            writer.write(seen[: end + 2])
            await writer.drain()
            writer.transport.abort()
            return
        writer.close()
    except ConnectionError:
        writer.transport.abort()
    finally:
        pump.cancel()
        up_writer.close()


async def main(argv: list[str]) -> int:
    real = os.environ["REAL_LLAMA_SERVER"]
    if "--help" in argv or "--version" in argv:
        os.execv(real, [real, *argv])
    at = argv.index("--port")
    port, upstream = int(argv[at + 1]), _free_port()
    argv = [*argv[: at + 1], str(upstream), *argv[at + 2 :]]
    server = await asyncio.create_subprocess_exec(real, *argv)
    proxy = await asyncio.start_server(
        lambda r, w: _pipe(r, w, upstream), "127.0.0.1", port, reuse_address=True
    )
    async with proxy:
        return await server.wait()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
