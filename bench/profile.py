"""Where the worker's CPU goes: py-spy on a worker relaying capacity-benchmark load.

    python -m bench.profile [--coalesce-ms 10] [--concurrency 64] [--seconds 8] [--tokens 256]
                            [--upstream synthetic|tiny] [--burst 16] [--interval-us 0]

Starts a worker (synthetic upstream, or the real llama-server with the tiny model), keeps
``--concurrency`` requests in flight through pub/sub, samples the worker with
``py-spy record`` (not a project dependency: ``pip install py-spy``) and prints the
functions that hold the CPU, by their own time and with what they call, idle excluded.
The raw folded stacks are kept under ``bench/results/profile-*.txt``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import time

from bench.callers import BusCaller, Outcome
from bench.capacity import _lane
from bench.harness import PROFILE, Worker, WorkerSpec, Workspace, llama_server_binary
from bench.report import RESULTS

IDLE = ("Runner.run (asyncio/runners.py", "run_forever", "_run_once", "select (selectors.py")


def top_frames(folded: str, limit: int = 20) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    busy = 0
    for line in folded.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue  # a thread name with a line break in it, not a stack
        frames = stack.split(";")
        if not frames or frames[-1].startswith(IDLE):
            continue  # the event loop waiting for I/O
        samples = int(count)
        busy += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    if not busy:
        return "no busy samples"
    lines = [f"{busy} busy samples", "-- own time"]
    lines += [f"{100 * n / busy:5.1f}%  {f}" for f, n in own.most_common(limit)]
    lines.append("-- including callees")
    skip = ("<module>", "_run_code", "_run_module_as_main", "main (", "run_async", "cmd_run")
    ranked = [(f, n) for f, n in inclusive.most_common(limit * 3) if not f.startswith(skip)]
    lines += [f"{100 * n / busy:5.1f}%  {f}" for f, n in ranked[: limit * 2]]
    return "\n".join(lines)


async def profile(args: argparse.Namespace) -> int:
    spy = shutil.which("py-spy")
    if spy is None:
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    ws = Workspace()
    synthetic = args.upstream == "synthetic"
    spec = WorkerSpec(
        model=ws.tiny_model(),
        binary=ws.synthetic_launcher() if synthetic else llama_server_binary(),
        parallel=args.concurrency if synthetic else 2,
        ctx=65536 if synthetic else 4096,
        coalesce_ms=args.coalesce_ms,
        env={"BENCH_BURST": str(args.burst), "BENCH_TOKEN_INTERVAL_US": str(args.interval_us)},
    )
    worker = Worker(ws, spec, "profile").start()
    redis = ws.redis()
    name = f"profile-{args.upstream}-c{args.concurrency}-coalesce{args.coalesce_ms:g}"
    out = RESULTS / f"{name}.txt"
    RESULTS.mkdir(parents=True, exist_ok=True)
    try:
        await worker.wait_ready(redis)
        bus = await BusCaller(ws.url, PROFILE).start()
        record = [spy, "record", "-p", str(worker.pid), "-d", str(args.seconds), "-r", "250"]
        proc = subprocess.Popen(  # noqa: ASYNC220 - py-spy runs beside us, never awaited
            [*record, "-f", "raw", "-o", str(out), "--nonblocking"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        outcomes: list[Outcome] = []
        while proc.poll() is None:
            stop_at = time.perf_counter() + 0.5
            await asyncio.gather(
                *(_lane(bus, args.tokens, stop_at, outcomes) for _ in range(args.concurrency))
            )
        await bus.close()
        tokens = sum(o.tokens for o in outcomes)
        print(f"{name}: {len(outcomes)} requests, {tokens} tokens relayed while sampling")
        print(top_frames(out.read_text()) if out.exists() else "py-spy wrote nothing")
        print(f"(folded stacks: {out})")
    finally:
        await redis.aclose()
        worker.stop()
        ws.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("--coalesce-ms", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--upstream", choices=("synthetic", "tiny"), default="synthetic")
    parser.add_argument("--burst", type=int, default=16, help="synthetic: events per write")
    parser.add_argument(
        "--interval-us", type=float, default=0.0, help="synthetic: pause per token (paced)"
    )
    args = parser.parse_args(argv)
    return asyncio.run(profile(args))


if __name__ == "__main__":
    sys.exit(main())
