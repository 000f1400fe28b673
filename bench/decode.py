"""What reading a streamed answer costs per token: whole reads at once, or event by event.

    python -m bench.decode [--reads 20000]

The worker decodes llama-server's stream in three layers (HTTP chunked framing, SSE
events, the token chunks' JSON), then hands the texts to the relay. Both ways through
those layers run here on the same bytes, in the same process, taking turns:

- *whole reads*: a read that ends where a write did, as on loopback nearly every read
  does: the framing comes off in one split (``sse._whole_chunks``) and a run of token
  chunks is read in one parse (``sse.TokenLayout``);
- *event by event*: the same bytes arriving as two reads cut inside a chunk, which the
  worker decodes chunk by chunk, event by event (``sse.content_only``), as it did for
  every read before round 10 (docs/benchmarks.md, item 52).

The bytes are the synthetic upstream's (``bench/upstream.py``, llama-server's layout), one
event per read (a GPU's pace for one answer: each token is written as it is made) and 16
(the capacity benchmark's writes). Each figure is the median of 9 passes of ``--reads``
reads, in ns per token, including the relay's side (texts into the answer and the chunk
buffer). Not a project test: figures only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

from bench.report import table
from bench.upstream import STREAM_HEAD, Renderer
from orion_llamaccp.engine.events import EventReader
from orion_llamaccp.engine.sse import ResponseDecoder, SSEDecoder

Pass = Callable[[], int]


def _whole(read: bytes, reads: int) -> Pass:
    decoder, sse, reader = _opened()

    def run() -> int:
        texts: list[str] = []
        for _ in range(reads):
            for delta in reader.take_runs((sse.feed_run(decoder.feed(read)),)):
                texts += delta  # type: ignore[arg-type]
        return len(texts)

    return run


def _by_event(read: bytes, reads: int) -> Pass:
    decoder, sse, reader = _opened()
    first, second = read[:-1], read[-1:]  # the cut falls inside the last chunk's CRLF

    def run() -> int:
        texts: list[str] = []
        for _ in range(reads):
            body = decoder.feed(first) + decoder.feed(second)
            for delta in reader.take(sse.feed(body)):
                texts += delta  # type: ignore[arg-type]
        return len(texts)

    return run


def _opened() -> tuple[ResponseDecoder, SSEDecoder, EventReader]:
    decoder = ResponseDecoder()
    decoder.feed(STREAM_HEAD)
    return decoder, SSEDecoder(), EventReader()


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
        passes = {"whole": _whole(read, reads), "by event": _by_event(read, reads)}
        for run in passes.values():
            run()  # warm up, and learn the layout
        ns = _ns_per_token(passes, reads * per_read)
        rows.append((per_read, ns["whole"], ns["by event"], ns["by event"] / ns["whole"]))
    print(
        table(
            "Decoding llama-server's stream, ns per token (median of 9 passes)",
            ["events per read", "whole reads", "event by event", "ratio"],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
