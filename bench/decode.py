"""What reading a streamed answer costs per token: a read's tokens at once, or one by one.

    python -m bench.decode [--reads 20000]

The worker decodes llama-server's stream in three layers (HTTP chunked framing, SSE
events, the token chunks' JSON), then hands the texts to the relay. Both ways through
those layers run here on the same bytes, in the same process, taking turns:

- *at once*: a read that ends where a write did, as on loopback nearly every read does:
  the framing comes off in one split (``sse._whole_chunks``) and a run of token chunks
  is read in one parse (``sse.TokenLayout``), what the worker does;
- *tokens one by one*: the same framing, then every token chunk read on its own
  (``EventReader.take``: ``sse.content_only`` per event, as every read was before round
  10, docs/benchmarks-history.md item 52).

The second isolates the token decoding; the framing's own gain (a split instead of a
loop per chunk) shows against the code before round 10 only (item 52 has both). The
bytes are the synthetic upstream's (``bench/upstream.py``, llama-server's layout), one
event per read (a GPU's pace for one answer: each token is written as it is made) and 16
(the capacity benchmark's writes). Each figure is the median of 9 passes of ``--reads``
reads, in ns per token, including the relay's side (texts into the answer).

A second table reads the same bytes through the connection's read callback
(``StreamConnection.data_received``, no socket: a transport that goes nowhere) to the
relay's sink, with ``sse.lone_token`` (a read that is one chunk of one token, read in one
check and one parse, docs/benchmarks-history.md item 78) and without it (the long way:
framing, SSE run, layout), taking turns. Not a project test: figures only.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable

from bench.report import table
from bench.upstream import STREAM_HEAD, Renderer
from orion_llamaccp.engine import sse, stream
from orion_llamaccp.engine.events import EventReader
from orion_llamaccp.engine.sse import ResponseDecoder, SSEDecoder, events_of
from orion_llamaccp.engine.stream import StreamConnection

Pass = Callable[[], int]


def _pass(read: bytes, reads: int, take: Callable[[EventReader, bytes], list]) -> Pass:
    """``reads`` times: the read through the framing and SSE, then ``take`` on its run."""
    decoder, sse, reader = _opened()

    def run() -> int:
        texts: list[str] = []
        for _ in range(reads):
            for delta in take(reader, sse.feed_run(decoder.feed(read))):
                texts += delta
        return len(texts)

    return run


def _at_once(reader: EventReader, run: bytes) -> list:
    return reader.take_runs((run,))


def _one_by_one(reader: EventReader, run: bytes) -> list:
    return reader.take(events_of(run))


def _opened() -> tuple[ResponseDecoder, SSEDecoder, EventReader]:
    decoder = ResponseDecoder()
    decoder.feed(STREAM_HEAD)
    return decoder, SSEDecoder(), EventReader()


class _Nowhere:
    """The connection's transport: its writes and flow control go nowhere."""

    def write(self, data: bytes) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


def _never(*_: object) -> None:
    return None  # lone_token refusing every read: each goes the long way


def _read_pass(
    loop: asyncio.AbstractEventLoop, renderer: Renderer, read: bytes, reads: int, lone: bool
) -> Pass:
    """``reads`` times ``read`` into a streaming connection whose reader knows the
    layout and has a sink, as the relay's connection is between two tokens."""

    def run() -> int:
        stream.lone_token = sse.lone_token if lone else _never  # type: ignore[assignment]
        conn = StreamConnection(loop)
        conn.connection_made(_Nowhere())  # type: ignore[arg-type]
        conn.start(b"", 60.0)
        conn.data_received(STREAM_HEAD + renderer.role + renderer.tokens[0])
        reader = conn.reader = EventReader()
        reader.take_runs(conn.runs)  # the role and a token: the layout is learnt
        conn.runs.clear()
        texts: list[str] = []
        conn.sink = texts.extend
        receive = conn.data_received
        for _ in range(reads):
            receive(read)
        conn.close()
        return len(texts) if not conn.runs else -1

    return run


def _ns_per_token(passes: dict[str, Pass], tokens: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(9):
        for name, run in passes.items():  # taking turns: the machine's drift hits both
            started = time.perf_counter_ns()
            counted = run()
            times[name].append((time.perf_counter_ns() - started) / counted)
            assert counted == tokens, (name, counted, tokens)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decode")
    parser.add_argument("--reads", type=int, default=20000)
    args = parser.parse_args(argv)
    renderer = Renderer()
    rows = []
    for per_read in (1, 16):
        read = b"".join(renderer.tokens[n % len(renderer.tokens)] for n in range(per_read))
        reads = max(1, args.reads // per_read)
        passes = {
            "at once": _pass(read, reads, _at_once),
            "one by one": _pass(read, reads, _one_by_one),
        }
        for run in passes.values():
            run()  # warm up, and learn the layout
        ns = _ns_per_token(passes, reads * per_read)
        rows.append((per_read, ns["at once"], ns["one by one"], ns["one by one"] / ns["at once"]))
    print(
        table(
            "Decoding llama-server's stream, ns per token (median of 9 passes)",
            ["events per read", "tokens at once", "tokens one by one", "ratio"],
            rows,
        )
    )
    print(table(*_through_the_connection(renderer, args.reads)))
    return 0


def _through_the_connection(renderer: Renderer, reads: int) -> tuple[str, list[str], list]:
    loop = asyncio.new_event_loop()  # the connection's clock and timers; never run
    rows = []
    try:
        for per_read in (1, 4):
            read = b"".join(
                renderer.tokens[(n + 1) % len(renderer.tokens)] for n in range(per_read)
            )
            count = max(1, reads // per_read)
            passes = {
                "lone_token": _read_pass(loop, renderer, read, count, lone=True),
                "the long way": _read_pass(loop, renderer, read, count, lone=False),
            }
            ns = _ns_per_token(passes, count * per_read)
            rows.append(
                (
                    per_read,
                    ns["lone_token"],
                    ns["the long way"],
                    ns["the long way"] / ns["lone_token"],
                )
            )
    finally:
        stream.lone_token = sse.lone_token  # type: ignore[assignment]
        loop.close()
    title = "Read through the connection to the relay's sink, ns per token (median of 9)"
    return title, ["events per read", "with lone_token", "the long way", "ratio"], rows


if __name__ == "__main__":
    sys.exit(main())
