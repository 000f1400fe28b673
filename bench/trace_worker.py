"""The worker, with timestamps at each step of a request's way in (a diagnostic, not a bench).

    python -m bench.trace_worker   # instead of `python -m orion_llamaccp run`, same environment

Wraps a few worker functions so each stamps ``time.monotonic_ns()`` (and the worker's CPU
time, ``time.thread_time_ns()``) when it is entered or returns, and writes the stamps to
``$BENCH_TRACE_FILE`` (JSON lines) when the worker exits. ``bench/intake.py --trace`` uses
it to split the intake latency into its steps.
The wrappers cost about a microsecond each; the figures of the real benchmarks never use
this module.
"""

from __future__ import annotations

import atexit
import functools
import gc
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

STAMPS: list[tuple[str, int, int]] = []


def _stamp(label: str) -> None:
    STAMPS.append((label, time.monotonic_ns(), time.thread_time_ns()))


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


def _number_reads(owner: Any) -> None:
    """Stamp the first few reads of each response apart: head, role chunk, first token."""
    received, start = owner.data_received, owner.start

    def data_received(self: Any, data: bytes) -> None:
        self._trace_reads = reads = getattr(self, "_trace_reads", 0) + 1
        if reads <= 4:
            _stamp(f"read {reads} from upstream ({'head' if reads == 1 else 'body'})")
        received(self, data)

    def started(self: Any, *args: Any) -> None:
        self._trace_reads = 0
        start(self, *args)

    owner.data_received, owner.start = data_received, started


def _time_collections() -> None:
    """Stamp each garbage collection (its generation and its start and end)."""
    started: list[int] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[:] = [time.monotonic_ns(), time.thread_time_ns()]
        elif started:
            gen = info["generation"]
            STAMPS.append((f"gc {gen} start", started[0], started[1]))
            _stamp(f"gc {gen} end")

    gc.callbacks.append(on_gc)


def install() -> None:
    from orion_llamaccp.bus import claims, lane, pubsub, replies, streams
    from orion_llamaccp.engine import stream
    from orion_llamaccp.worker import generation, handler, pubsub_requests, records, service

    _wrap_sync(pubsub.PubSubListener, "_dispatch", "pubsub message read")
    _wrap_async(streams.StreamConsumer, "_read_new", None, "stream entry read")
    _wrap_sync(pubsub_requests.PubSubRequests, "_receive", "accept (decode) starts")
    _wrap_async(claims.Claims, "claim_message", None, "message claimed (SET NX)")
    _wrap_async(service.Worker, "_on_entry", "stream entry handed over", None)
    _wrap_async(handler.ChatHandler, "handle", "handler starts", None)
    _wrap_async(generation.Generator, "_run", "generation starts", None)
    _wrap_sync(stream.StreamConnection, "start", "HTTP request written")
    _wrap_sync(generation, "_take", "non-token event (role, finish)")
    _number_reads(stream.StreamConnection)
    _wrap_async(records.Records, "own", None, "request owned (claim and record)")
    _wrap_async(claims.Claims, "begin", "idempotency record sent", "idempotency record (SET NX)")
    _wrap_async(stream.StreamPool, "_open_spare", "spare connection opening", None)
    _wrap_sync(replies.ChunkStream, "_template", "chunk template")
    _wrap_async(stream.StreamPool, "open", None, "HTTP 200 head read")
    _wrap_sync(replies.ChunkStream, "push", "token pushed")
    _wrap_async(replies.ChunkStream, "_send", "chunk send starts", "chunk published")
    _wrap_async(handler.ChatHandler, "_answer", "result publish starts", "result published")
    _wrap_async(lane, "_send", "lane write", None)
    # the first chunk's way out, between "chunk send starts" and "chunk published"
    _wrap_sync(replies.ChunkStream, "_stage", "chunk rendering")
    _wrap_async(replies.Publisher, "commit", "commit starts", None)
    _wrap_async(lane.Lane, "_exchange", None, "lane replies read")

    _time_collections()
    path = os.environ.get("BENCH_TRACE_FILE")
    if path:
        atexit.register(_dump, path)


def offsets(
    path: Path, windows: Iterable[tuple[int, int]], occurrences: int = 1
) -> dict[str, list[float]]:
    """Per step, ms from each window's start to the first ``occurrences`` stamps of that
    step inside it (the second as ``step #2``, ...).

    A window is one request, or the requests of one round: from its send
    (``time.monotonic_ns()``, the clock of the stamps) to where the next round's stamps
    may begin.
    """
    return {
        name: [wall for wall, _ in found]
        for name, found in steps(path, windows, occurrences).items()
    }


def steps(
    path: Path, windows: Iterable[tuple[int, int]], occurrences: int = 1
) -> dict[str, list[tuple[float, float]]]:
    """As ``offsets``, each with the worker's CPU time (ms) spent since the window's first
    stamp: where the wall clock runs ahead of it, the worker was waiting for a CPU (or
    for I/O)."""
    stamps = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    found: dict[str, list[tuple[float, float]]] = {}
    for start, end in windows:
        seen: dict[str, int] = {}
        first_cpu: int | None = None
        for stamp in stamps:
            label = stamp["label"]
            nth = seen.get(label, 0)
            if start <= stamp["ns"] < end and nth < occurrences:
                if first_cpu is None:
                    first_cpu = stamp["cpu"]
                seen[label] = nth + 1
                name = label + (f" #{nth + 1}" if nth else "")
                wall = (stamp["ns"] - start) / 1e6
                found.setdefault(name, []).append((wall, (stamp["cpu"] - first_cpu) / 1e6))
    return found


def _dump(path: str) -> None:
    with open(path, "wb") as out:
        for label, ns, cpu in STAMPS:
            out.write(orjson.dumps({"label": label, "ns": ns, "cpu": cpu}) + b"\n")


def main() -> int:
    install()
    from orion_llamaccp.cli import main as cli_main

    return cli_main(["run", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
