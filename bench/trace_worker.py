"""The worker, with timestamps at each step of a request's way in (a diagnostic, not a bench).

    python -m bench.trace_worker   # instead of `python -m orion_llamaccp run`, same environment

Wraps a few worker functions so each stamps ``time.monotonic_ns()`` when it is entered or
returns, and writes the stamps to ``$BENCH_TRACE_FILE`` (JSON lines) when the worker
exits. ``bench/intake.py --trace`` uses it to split the intake latency into its steps.
The wrappers cost about a microsecond each; the figures of the real benchmarks never use
this module.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
import time
from typing import Any

import orjson

STAMPS: list[tuple[str, int]] = []


def _stamp(label: str) -> None:
    STAMPS.append((label, time.monotonic_ns()))


def _wrap_sync(owner: Any, name: str, label: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _stamp(label)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def _wrap_async(owner: Any, name: str, enter: str | None, leave: str | None) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        if enter:
            _stamp(enter)
        result = await original(*args, **kwargs)
        if leave:
            _stamp(leave)
        return result

    setattr(owner, name, wrapper)


def install() -> None:
    from orion_llamaccp.bus import claims, intake, replies
    from orion_llamaccp.engine import stream
    from orion_llamaccp.worker import handler, service

    _wrap_sync(intake.PubSubListener, "_dispatch", "pubsub message read")
    _wrap_async(intake.StreamConsumer, "_read_new", None, "stream entry read")
    _wrap_async(service.Worker, "_accept_pubsub", "accept (decode) starts", None)
    _wrap_async(claims.Claims, "claim_message", None, "message claimed (SET NX)")
    _wrap_async(handler.ChatHandler, "handle", "handler starts", None)
    _wrap_async(claims.Claims, "begin", None, "idempotency record (SET NX)")
    _wrap_async(stream.StreamPool, "open", "HTTP request sent", "HTTP 200 head read")
    _wrap_sync(replies.ChunkStream, "push", "token pushed")
    _wrap_async(replies.ChunkStream, "_send", None, "chunk published")
    _wrap_async(handler.ChatHandler, "_answer", "result publish starts", "result published")

    path = os.environ.get("BENCH_TRACE_FILE")
    if path:
        atexit.register(_dump, path)


def _dump(path: str) -> None:
    with open(path, "wb") as out:
        for label, ns in STAMPS:
            out.write(orjson.dumps({"label": label, "ns": ns}) + b"\n")


def main() -> int:
    install()
    from orion_llamaccp.cli import main as cli_main

    return cli_main(["run", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
