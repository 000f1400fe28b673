"""The relay benchmark's first-token path, step by step (a diagnostic, not a bench).

    python -m bench.relay_trace [--rounds 120] [--tokens 64] [--concurrency N] [--pin]
                                [--occurrences K]

Runs the relay benchmark's rounds (tiny model, or ``BENCH_RELAY_MODEL`` with the GPU
settings of ``bench/gpu/run.sh``; direct, pub/sub, stream and the A/A control in turn)
against a worker started as ``bench/trace_worker.py``,
and prints, per intake, the median time from the caller's PUBLISH / XADD to each step the
worker stamped, next to the caller's own first chunk, and the worker's CPU time spent from
its first stamp of the round to that step (wall time well ahead of it: the worker waited
for a CPU). A step taken more than once in a round shows as ``step #2``, ... up to
``--occurrences`` (default: the concurrency); at one in flight, ``--occurrences 3`` shows
the first chunk's own Redis round trip (``lane write #2``) beside the idempotency
record's. The stamps cost about a
microsecond each, so the overheads printed here run a little above the benchmark's.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
from pathlib import Path

from bench import relay
from bench.callers import BusCaller, DirectLane
from bench.harness import (
    PROFILE,
    CpuMeter,
    Worker,
    Workspace,
    set_affinity,
)
from bench.report import p50_p90, summary, table
from bench.trace_worker import steps as traced_steps


async def run(
    ws: Workspace,
    rounds: int,
    tokens: int,
    width: int = 1,
    pin: bool = False,
    occurrences: int | None = None,
) -> str:
    model_run = relay.ModelRun(
        "tiny", Path(), max_tokens=tokens, rounds=rounds, concurrency=(width,)
    )
    # BENCH_RELAY_MODEL and the GPU settings as in the relay benchmark (bench/gpu/run.sh)
    model = Path(os.environ.get("BENCH_RELAY_MODEL") or ws.tiny_model())
    spec = relay.worker_spec(model, width)
    trace_file = ws.root / "trace.jsonl"
    spec.command = ("-m", "bench.trace_worker")
    spec.env["BENCH_TRACE_FILE"] = str(trace_file)
    worker = Worker(ws, spec, "relay-trace").start()
    redis = ws.redis()
    samples = relay.Samples()
    ours = os.sched_getaffinity(0)
    try:
        await worker.wait_ready(redis)
        if pin:
            relay._pin(worker, ws)
        bus = await BusCaller(ws.url, PROFILE).start()
        lanes = [DirectLane("127.0.0.1", worker.llama_port) for _ in range(width)]
        await relay._rounds(lanes, bus, model_run, model_run.warmup, None)
        gc.disable()
        try:
            await relay._rounds(lanes, bus, model_run, rounds, samples, CpuMeter({}))
        finally:
            gc.enable()
        for lane in lanes:
            lane.close()
        await bus.close()
    finally:
        set_affinity(os.getpid(), ours)
        await redis.aclose()
        worker.stop()  # the worker writes its stamps as it exits
    analysed = relay._analyse(samples)
    pairs, direct = analysed["pairs"], analysed["modes"]["direct"]["ttft_ms"]["p50"]
    blocks = []
    for mode in ("pubsub", "stream"):
        overhead = pairs[mode]["ttft_overhead_ms"]
        outcomes = samples.outcomes[mode]
        # perf_counter is monotonic_ns's clock; a round's requests share its window
        starts = [
            int(min(o.sent for o in outcomes[i : i + width]) * 1e9)
            for i in range(0, len(outcomes), width)
        ]
        found = traced_steps(
            trace_file, ((s, s + 10**9) for s in starts), occurrences=occurrences or width
        )
        rows = [
            (k, len(v), *p50_p90([w for w, _ in v]), summary([c for _, c in v])["p50"])
            for k, v in found.items()
        ]
        for nth in range(width):
            label = "caller: first chunk" + (f" #{nth + 1}" if nth else "")
            caller = [
                (o.sent + o.ttft) * 1000 - s / 1e6
                for o, s in zip(outcomes[nth::width], starts, strict=False)
                if o.ttft is not None
            ]
            rows.append((label, len(caller), *p50_p90(caller), "-"))
        rows.sort(key=lambda row: row[2])
        title = (
            f"{mode}: ms from PUBLISH/XADD to each step (TTFT overhead p50 "
            f"{overhead['p50']} ms, direct TTFT p50 {direct} ms)"
        )
        blocks.append(table(title, ["step", "n", "p50", "p90", "worker CPU p50"], rows))
    return "\n".join(blocks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay_trace")
    parser.add_argument("--rounds", type=int, default=120)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument(
        "--concurrency", type=int, default=1, help="requests per round (the n-th step: #n)"
    )
    parser.add_argument("--pin", action="store_true", help="llama-server alone on CPU 0")
    parser.add_argument(
        "--occurrences", type=int, default=None, help="stamps kept per step and round"
    )
    args = parser.parse_args(argv)

    async def go() -> None:
        with Workspace() as ws:
            width, occurrences = args.concurrency, args.occurrences
            print(await run(ws, args.rounds, args.tokens, width, args.pin, occurrences))

    asyncio.run(go())
    return 0


if __name__ == "__main__":
    sys.exit(main())
