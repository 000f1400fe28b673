"""The floor under the bus path's time to first token, measured on this machine.

A bus request crosses Redis twice more than a direct one: caller -> Redis -> worker on
the way in, worker -> Redis -> caller on the way out. ``bench/echo.py`` is the leanest
possible worker (raw sockets, no decoding): a message sent through it and Redis and back
costs what any relay between two processes pays for those crossings, and the same echo
over a direct TCP connection is the direct path's share. Their difference is a floor
that no worker code can go below; the relay benchmark's overhead sits on top of it.
Alternating samples, one message in flight, both sides raw asyncio sockets on uvloop.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import hiredis
import orjson

from bench.callers import DirectLane
from bench.echo import TAG, command
from bench.harness import Workspace, python_path
from bench.report import summary
from tests.support.procs import free_port


class _Replies(asyncio.Protocol):
    """Resolves ``waiting`` with each pub/sub message (or each TCP read)."""

    def __init__(self, pubsub: bool) -> None:
        self.reader = hiredis.Reader() if pubsub else None
        self.waiting: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        if self.reader is not None:
            self.reader.feed(data)
            got = False
            while (reply := self.reader.gets()) is not False:
                got = got or (isinstance(reply, list) and reply[0] == b"message")
            if not got:
                return
        if self.waiting is not None and not self.waiting.done():
            self.waiting.set_result(None)


async def _round_trip(send: asyncio.Transport, replies: _Replies, message: bytes) -> float:
    replies.waiting = asyncio.get_running_loop().create_future()
    started = time.perf_counter()
    send.write(message)
    await asyncio.wait_for(replies.waiting, 5)
    return (time.perf_counter() - started) * 1000


async def measure(ws: Workspace, samples: int = 400) -> dict[str, Any]:
    host, port = "127.0.0.1", ws.redis_server.port
    tcp_port = free_port()
    env = {**os.environ, "PYTHONPATH": python_path()}
    echo_module = (sys.executable, "-m", "bench.echo")
    relay = await asyncio.create_subprocess_exec(
        *echo_module, "redis", host, str(port), "floor:in", "floor:out", env=env
    )
    echo = await asyncio.create_subprocess_exec(*echo_module, "tcp", str(tcp_port), env=env)
    loop = asyncio.get_running_loop()
    try:
        publish, _ = await loop.create_connection(lambda: _Replies(False), host, port)
        via_redis = _Replies(True)
        listen, _ = await loop.create_connection(lambda: via_redis, host, port)
        listen.write(command(b"SUBSCRIBE", b"floor:out"))
        payload = b"x" * 300  # about a chunk envelope's size
        through = command(b"PUBLISH", b"floor:in", payload)
        direct_replies = _Replies(False)
        for _ in range(100):  # both helpers listening
            try:
                direct, _ = await loop.create_connection(lambda: direct_replies, host, tcp_port)
                await _round_trip(publish, via_redis, through)
                break
            except (OSError, TimeoutError):
                await asyncio.sleep(0.05)
        redis_ms, direct_ms = [], []
        for i in range(samples + 20):
            a = await _round_trip(publish, via_redis, through)
            b = await _round_trip(direct, direct_replies, payload)
            if i >= 20:  # warm-up
                redis_ms.append(a)
                direct_ms.append(b)
        for transport in (publish, listen, direct):
            transport.close()
    finally:
        for helper in (relay, echo):
            helper.kill()
            await helper.wait()
    pairs = [a - b for a, b in zip(redis_ms, direct_ms, strict=True)]
    return {
        "through_redis_ms": summary(redis_ms),
        "direct_tcp_ms": summary(direct_ms),
        "difference_ms": summary(pairs),
    }


class _Through(asyncio.Protocol):
    """The lean relay's two messages per request, each behind its tag: the first token's
    read, then ``done``."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.first: dict[bytes, asyncio.Future[float]] = {}
        self.done: dict[bytes, asyncio.Future[None]] = {}

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if not (isinstance(reply, list) and reply[0] == b"message"):
                continue
            tag, rest = reply[2][:TAG], reply[2][TAG:]
            waiting = self.done if rest == b"done" else self.first
            future = waiting.get(tag)
            if future is not None and not future.done():
                future.set_result(time.perf_counter() if waiting is self.first else None)


async def measure_llama(
    ws: Workspace,
    llama_port: int,
    bodies: list[dict[str, Any]],
    samples: int = 120,
    width: int = 1,
) -> dict[str, Any]:
    """Time to first token through the leanest relay (``bench.echo llama``) and Redis,
    against the same llama-server called directly, alternating, ``width`` requests in
    flight (sent in the same instant both ways; ranked by time to first token within a
    round and paired by rank, as in the relay benchmark)."""

    host, port = "127.0.0.1", ws.redis_server.port
    env = {**os.environ, "PYTHONPATH": python_path()}
    args = ("llama", host, str(port), "floor:llama:in", "floor:llama:out", str(llama_port))
    relay = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.echo", *args, str(width), env=env
    )
    loop = asyncio.get_running_loop()
    lanes = [DirectLane("127.0.0.1", llama_port) for _ in range(width)]
    sent = 0
    try:
        publish, _ = await loop.create_connection(lambda: _Replies(False), host, port)
        through = _Through()
        listen, _ = await loop.create_connection(lambda: through, host, port)
        listen.write(command(b"SUBSCRIBE", b"floor:llama:out"))

        async def via_relay(round_bodies: list[dict[str, Any]]) -> list[float]:
            nonlocal sent
            tags = []
            for _ in round_bodies:
                sent += 1
                tag = b"%08d" % (sent % 10**8)
                tags.append(tag)
                through.first[tag] = loop.create_future()
                through.done[tag] = loop.create_future()
            started = time.perf_counter()
            for tag, body in zip(tags, round_bodies, strict=True):
                payload = tag + orjson.dumps({**body, "stream": True})
                publish.write(command(b"PUBLISH", b"floor:llama:in", payload))
            try:
                firsts = [await asyncio.wait_for(through.first[t], 30) for t in tags]
                for tag in tags:
                    await asyncio.wait_for(through.done[tag], 30)
            finally:
                for tag in tags:
                    through.first.pop(tag, None)
                    through.done.pop(tag, None)
            return sorted((first - started) * 1000 for first in firsts)

        async def direct(round_bodies: list[dict[str, Any]]) -> list[float] | None:
            outcomes = await asyncio.gather(
                *(lane.chat(body) for lane, body in zip(lanes, round_bodies, strict=True))
            )
            if any(o.error or o.ttft is None for o in outcomes):
                return None  # a failed request has no first token (it used to count as 0 ms)
            return sorted(o.ttft * 1000 for o in outcomes)

        for _ in range(100):  # the relay is subscribed
            try:
                await asyncio.wait_for(via_relay(bodies[:1]), 1.0)
                break
            except TimeoutError:
                await asyncio.sleep(0.05)
        relay_ms, direct_ms, control_ms = [], [], []
        failed = 0
        for i in range(samples + 4):
            round_bodies = [bodies[(i * width + j) % len(bodies)] for j in range(width)]
            order = (0, 1, 2) if i % 2 else (2, 1, 0)
            got: dict[int, list[float] | None] = {}
            for which in order:
                got[which] = await (via_relay if which == 1 else direct)(round_bodies)
            if got[0] is None or got[2] is None:
                failed += 1  # the round is left out: its pairs would compare with nothing
            elif i >= 4:  # warm-up
                direct_ms += got[0]
                relay_ms += got[1] or []
                control_ms += got[2]
        for lane in lanes:
            lane.close()
        for transport in (publish, listen):
            transport.close()
    finally:
        relay.kill()
        await relay.wait()
    return {
        "concurrency": width,
        "failed_rounds": failed,
        "direct_ttft_ms": summary(direct_ms),
        "lean_relay_ttft_ms": summary(relay_ms),
        "lean_relay_overhead_ms": summary(b - a for a, b in zip(direct_ms, relay_ms, strict=True)),
        "control_overhead_ms": summary(c - a for a, c in zip(direct_ms, control_ms, strict=True)),
    }
