"""Does a small gap between two requests' arrivals cost the later one a batch? (a
diagnostic, not a bench)

    python -m bench.arrival_gap [--rounds 40] [--gaps 0,50,130,250,500]

Through the bus, two requests sent together reach llama-server some 0.1 ms apart (each
message is read, and its request written, in turn), where the direct baseline writes
both at once. If llama-server took two prompts that arrive together into one batch, that
gap alone could push the later request's first token back by a whole prompt. This calls
the relay benchmark's llama-server (tiny model, two slots) directly, the second request
written ``gap`` µs after the first, the gaps taking turns round by round, and prints the
round's two first tokens (ms from the first write) and the time between them. The answer
on the VM (``docs/benchmarks-history.md`` item 51): no, the prompts are taken in turn either way.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from bench import relay
from bench.callers import DirectLane, Outcome
from bench.harness import Worker, Workspace
from bench.report import summary, table


def _hold(microseconds: int) -> None:
    """Block the loop: the first request is already written, the second waits."""
    end = time.perf_counter() + microseconds / 1e6
    while time.perf_counter() < end:
        pass


async def _later(lane: DirectLane, body: dict, gap: int) -> Outcome:
    _hold(gap)
    return await lane.chat(body)


async def run(ws: Workspace, rounds: int, gaps: list[int]) -> str:
    worker = Worker(ws, relay.worker_spec(ws.tiny_model(), 2), "arrival-gap").start()
    redis = ws.redis()
    lanes = [DirectLane("127.0.0.1", worker.llama_port) for _ in range(2)]
    found: dict[int, list[tuple[float, float]]] = {gap: [] for gap in gaps}
    try:
        await worker.wait_ready(redis)
        for r in range(rounds + 2):  # the first two warm up
            for gap in gaps[r % len(gaps) :] + gaps[: r % len(gaps)]:
                bodies = [
                    {"messages": m, **o}
                    for m, o in (
                        relay._body(relay.PROMPTS[(2 * r + j) % len(relay.PROMPTS)], 64, 42)
                        for j in range(2)
                    )
                ]
                a, b = await asyncio.gather(
                    lanes[0].chat(bodies[0]), _later(lanes[1], bodies[1], gap)
                )
                if r >= 2 and a.ttft is not None and b.ttft is not None:
                    start = min(a.sent, b.sent)
                    first, second = sorted((a.sent + a.ttft - start, b.sent + b.ttft - start))
                    found[gap].append((first * 1000, second * 1000))
    finally:
        for lane in lanes:
            lane.close()
        worker.stop()
        await redis.aclose()
    rows = [
        (
            gap,
            len(pairs),
            summary(f for f, _ in pairs)["p50"],
            summary(s for _, s in pairs)["p50"],
            summary(s - f for f, s in pairs)["p50"],
        )
        for gap, pairs in found.items()
    ]
    return table(
        "Two requests written `gap` µs apart, direct: their first tokens, ms after the first write",
        ["gap µs", "rounds", "earlier p50", "later p50", "later - earlier p50"],
        rows,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.arrival_gap")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--gaps", default="0,50,130,250,500", help="µs, comma-separated")
    args = parser.parse_args(argv)
    gaps = [int(g) for g in args.gaps.split(",")]

    async def go() -> None:
        with Workspace() as ws:
            print(await run(ws, args.rounds, gaps))

    asyncio.run(go())
    return 0


if __name__ == "__main__":
    sys.exit(main())
