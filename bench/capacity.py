"""Relay capacity: the worker's own ceiling, with a synthetic upstream that is never the limit.

One real worker process relays requests from the bench (pub/sub intake) to the synthetic
llama-server of ``bench/upstream.py`` and back as chunks and results, closed loop, at 1, 8
and 64 requests in flight, with coalescing on (``ORION_LLAMACPP_COALESCE_MS=10``) and off
(``0``: one chunk per token). Reported: relayed tokens/s and requests/s, worker CPU per
token and per request, the worker's share of a core, Redis commands per token (the
commands the worker sent, some of them pipelined together, and everything Redis executed
for it, script internals included) and the worker's writes to Redis per request (each a
system call on both sides; commands of one loop step share one, ``bus.lane``).

Table 2c is the same worker at a GPU's pace instead: the upstream writes one event per
write, a token per millisecond per request (about what one answer gets from a GPU), so
that each token is a read of its own, as in production; there the worker's CPU per token
is mostly waking up for each read, which the unpaced table does not show.

Table 2d is the upstream as llama-server writes, one event per write, as fast as it can:
table 2's upstream writes 16 events per write, so an answer arrives in a read or two,
before its claim is confirmed, and leaves as one chunk. The CPU-per-token target is
judged on both (docs/benchmarks-history.md item 77).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import redis.asyncio as aioredis

from bench.callers import BusCaller, Outcome
from bench.harness import (
    PROFILE,
    CpuMeter,
    Worker,
    WorkerSpec,
    Workspace,
    diff_counts,
    redis_counts,
)
from bench.report import summary, table, target, targets_table, write_result
from orion_llamaccp.bus.lane import Lane

MESSAGES = [{"role": "user", "content": "Relay as fast as you can."}]


@dataclass(frozen=True)
class CapacityConfig:
    tokens: int = 256  # per request
    seconds: float = 4.0  # per measured point
    concurrency: tuple[int, ...] = (1, 8, 64)
    coalesce: tuple[float, ...] = (10.0, 0.0)
    burst: int = 16  # upstream events per socket write
    token_interval_us: float = 0.0  # upstream pause per token (0: as fast as it can)
    paced: tuple[int, ...] = (4, 16)  # requests in flight at a GPU's pace (table 2c)
    paced_interval_us: float = 1000.0  # ... one token per this many microseconds each
    # Table 2d: one event per socket write, as llama-server writes them, as fast as it can.
    framed: tuple[int, ...] = (8, 64)


async def _lane(bus: BusCaller, tokens: int, stop_at: float, out: list[Outcome]) -> None:
    options = {"max_tokens": tokens, "stream": True}
    while time.perf_counter() < stop_at:
        out.append(await bus.chat(bus.envelope(MESSAGES, options), "pubsub", keep_text=False))


async def measure(
    ws: Workspace, worker: Worker, bus: BusCaller, concurrency: int, cfg: CapacityConfig
) -> dict[str, Any]:
    redis = ws.redis()
    try:
        # warm up: connections in the worker's pools, caches
        warm: list[Outcome] = []
        await asyncio.gather(
            *(_lane(bus, cfg.tokens, time.perf_counter() + 0.3, warm) for _ in range(concurrency))
        )
        outcomes: list[Outcome] = []
        before = await redis_counts(redis)
        commands_before = bus.commands
        meter = CpuMeter(
            {"worker": worker.pid, "upstream": worker.engine_pid, "redis": ws.redis_pid()}
        ).start()
        bench_cpu0 = time.process_time()
        stop_at = time.perf_counter() + cfg.seconds
        started = time.perf_counter()
        await asyncio.gather(
            *(_lane(bus, cfg.tokens, stop_at, outcomes) for _ in range(concurrency))
        )
        wall = time.perf_counter() - started
        cpu = meter.stop()
        bench_cpu = time.process_time() - bench_cpu0
        after = await redis_counts(redis)
    finally:
        await redis.aclose()
    ok = [o for o in outcomes if o.error is None]
    tokens = sum(o.tokens for o in ok)
    chunks = sum(o.messages for o in outcomes)
    delta = diff_counts(after, before)
    caller = bus.commands - commands_before
    executed = delta.get("_total", 0) - delta.get("info", 0) - caller
    # Script internals: the chunk script runs EXISTS, GET, SET, PUBLISH; the result script
    # SET NX, PUBLISH, and SET for the stored result of one that succeeded (bus/scripts.py).
    # Counted 3 and 2 until round 21, which doubled the figure without coalescing.
    sent = executed - 4 * chunks - 3 * len(ok) - 2 * (len(outcomes) - len(ok))
    # Redis reads each of the caller's commands on its own (its redis-py sender, ``run``);
    # the counters' own INFO calls add two reads.
    writes = delta.get("_reads", 0) - caller - 2
    worker_cpu = cpu["worker"]
    return {
        "concurrency": concurrency,
        "requests": len(outcomes),
        "errors": len(outcomes) - len(ok),
        "error_sample": next((o.error for o in outcomes if o.error), None),
        "out_of_order": sum(not o.ok_order for o in outcomes),
        "wall_s": round(wall, 3),
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "requests_per_s": round(len(outcomes) / wall, 1),
        "chunks": chunks,
        "tokens_per_chunk": round(tokens / chunks, 2) if chunks else None,
        "worker_cpu_s": round(worker_cpu, 3),
        "worker_core_share": round(worker_cpu / wall, 3),
        "worker_cpu_us_per_token": round(worker_cpu / tokens * 1e6, 2) if tokens else None,
        "worker_cpu_us_per_request": round(worker_cpu / len(outcomes) * 1e6, 1)
        if outcomes
        else None,
        "one_core_tokens_per_s": round(tokens / worker_cpu, 0) if worker_cpu else None,
        "upstream_core_share": round(cpu.get("upstream", 0) / wall, 3),
        "redis_core_share": round(cpu.get("redis", 0) / wall, 3),
        "bench_core_share": round(bench_cpu / wall, 3),
        "redis_commands_sent_per_token": round(sent / tokens, 4) if tokens else None,
        "redis_commands_per_token": round(executed / tokens, 4) if tokens else None,
        "redis_writes_per_request": round(writes / len(outcomes), 2) if outcomes else None,
        "redis_commands": {k: v for k, v in delta.items() if k not in ("_total", "_reads", "info")},
        "request_latency_ms": summary(o.total * 1000 for o in ok if o.total),
    }


async def redis_round_trip_cpu(url: str, n: int = 2000) -> dict[str, float]:
    """Client CPU (µs) of one Redis round trip from this process: ``SET NX EX`` through
    redis-py's client and through the worker's ``Lane`` (what a claim costs the worker),
    and a bare asyncio socket ``ECHO`` (the system calls alone), the floor under the
    per-request part of the worker's CPU."""
    client = aioredis.Redis.from_url(url)
    await client.ping()
    cpu0 = time.process_time()
    for i in range(n):
        await client.set(f"bench:rtt:{i}", b"1", nx=True, ex=5)
    redis_py = (time.process_time() - cpu0) / n * 1e6
    lane = Lane(client)
    await lane.call("PING")
    cpu0 = time.process_time()
    for i in range(n):
        await lane.call("SET", f"bench:rtt:lane:{i}", b"1", "NX", "EX", 5)
    lane_us = (time.process_time() - cpu0) / n * 1e6
    await lane.aclose()
    await client.aclose()
    where = client.connection_pool.connection_kwargs
    reader, writer = await asyncio.open_connection(where["host"], where["port"])
    cpu0 = time.process_time()
    for _ in range(n):
        writer.write(b"*2\r\n$4\r\nECHO\r\n$1\r\nx\r\n")
        await reader.readuntil(b"\r\n")
        await reader.readuntil(b"\r\n")
    raw = (time.process_time() - cpu0) / n * 1e6
    writer.close()
    return {
        "redis_py_set_nx_us": round(redis_py, 1),
        "lane_set_nx_us": round(lane_us, 1),
        "raw_asyncio_us": round(raw, 1),
    }


async def split(
    ws: Workspace, worker: Worker, bus: BusCaller, cfg: CapacityConfig
) -> dict[str, Any]:
    """The all-in CPU per token, split into a per-request and a per-token part, from two
    extra points: 1-token answers (all per request) and 4096-token answers (nearly all per
    token), at the largest concurrency, coalescing on."""
    concurrency = max(cfg.concurrency)
    short = await measure(ws, worker, bus, concurrency, replace(cfg, tokens=1))
    long = await measure(ws, worker, bus, concurrency, replace(cfg, tokens=4096))
    per_request = short["worker_cpu_us_per_request"]
    per_token = (long["worker_cpu_us_per_request"] - per_request) / 4095
    return {
        "concurrency": concurrency,
        "per_request_us": per_request,
        "per_token_us": round(per_token, 2),
        "implied_us_per_token": round(per_token + per_request / cfg.tokens, 2),
        "per_request_budget_us": round((5.0 - per_token) * cfg.tokens, 0),
        **await redis_round_trip_cpu(ws.url),
    }


def _spec(
    ws: Workspace, parallel: int, coalesce: float, burst: int, interval_us: float
) -> WorkerSpec:
    return WorkerSpec(
        model=ws.tiny_model(),
        binary=ws.synthetic_launcher(),
        parallel=parallel,
        ctx=65536,
        coalesce_ms=coalesce,
        env={
            "BENCH_BURST": str(burst),
            "BENCH_TOKEN_INTERVAL_US": str(interval_us),
            # The worker's environment drops BENCH_*: passed on by name, for the upstream
            "BENCH_KEEP_ALIVE": os.environ.get("BENCH_KEEP_ALIVE", ""),
        },
    )


@asynccontextmanager
async def _serving(
    ws: Workspace, spec: WorkerSpec, name: str
) -> AsyncIterator[tuple[Worker, BusCaller]]:
    """A worker started with ``spec`` and ready, and a bus caller for it; both stop after."""
    worker = Worker(ws, spec, name).start()
    bus = None
    redis = ws.redis()
    try:
        await worker.wait_ready(redis)
        # redis-py's client: one connection per command in flight, so Redis reads each of
        # the caller's commands on its own and ``measure`` can subtract one read per
        # command (the raw sender's pipelined writes can arrive several to a read).
        bus = await BusCaller(ws.url, PROFILE, sender="redis-py").start()
        yield worker, bus
    finally:
        if bus is not None:
            await bus.close()
        await redis.aclose()
        worker.stop()


async def run(ws: Workspace, cfg: CapacityConfig | None = None) -> dict[str, Any]:
    cfg = cfg or CapacityConfig()
    points: list[dict[str, Any]] = []
    paced: list[dict[str, Any]] = []
    costs: dict[str, Any] = {}
    for coalesce in cfg.coalesce:
        spec = _spec(ws, max(cfg.concurrency), coalesce, cfg.burst, cfg.token_interval_us)
        async with _serving(ws, spec, f"capacity-{coalesce:g}") as (worker, bus):
            for concurrency in cfg.concurrency:
                point = await measure(ws, worker, bus, concurrency, cfg)
                point["coalesce_ms"] = coalesce
                points.append(point)
            if coalesce > 0 and not costs:
                costs = await split(ws, worker, bus, cfg)
    if cfg.paced:
        paced = await run_paced(ws, cfg)
    framed = await _one_event_per_write(ws, cfg, cfg.framed, 0.0) if cfg.framed else []
    return _finish(cfg, points, costs, paced, framed)


async def run_paced(ws: Workspace, cfg: CapacityConfig) -> list[dict[str, Any]]:
    """Table 2c's points: one worker, the upstream at a GPU's pace."""
    return await _one_event_per_write(ws, cfg, cfg.paced, cfg.paced_interval_us)


async def _one_event_per_write(
    ws: Workspace, cfg: CapacityConfig, in_flight: tuple[int, ...], interval_us: float
) -> list[dict[str, Any]]:
    """Points with the upstream writing each SSE event on its own, as llama-server does;
    ``interval_us`` between a request's tokens (0: as fast as it can, table 2d)."""
    spec = _spec(ws, max(in_flight), cfg.coalesce[0], 1, interval_us)
    name = "capacity-paced" if interval_us else "capacity-framed"
    async with _serving(ws, spec, name) as (worker, bus):
        return [await measure(ws, worker, bus, concurrency, cfg) for concurrency in in_flight]


def _split_table(cfg: CapacityConfig, costs: dict[str, Any]) -> str:
    if not costs:
        return ""
    rows = [
        ("worker CPU per request (1-token answers)", costs["per_request_us"]),
        ("worker CPU per relayed token (from 4096-token answers)", costs["per_token_us"]),
        (f"implied all-in per token at {cfg.tokens}-token answers", costs["implied_us_per_token"]),
        (f"per-request budget, 5 us/token at {cfg.tokens} tokens", costs["per_request_budget_us"]),
        ("one Redis round trip, redis-py SET NX, client CPU", costs["redis_py_set_nx_us"]),
        ("one Redis round trip, the worker's Lane, SET NX, client CPU", costs["lane_set_nx_us"]),
        ("one Redis round trip, bare asyncio socket, client CPU", costs["raw_asyncio_us"]),
    ]
    return "\n" + table(
        f"2b. Where the all-in CPU goes: {costs['concurrency']} in flight, coalescing on (us)",
        ["part", "us"],
        rows,
    )


def _paced_table(cfg: CapacityConfig, paced: list[dict[str, Any]]) -> str:
    if not paced:
        return ""
    rate = 1e6 / cfg.paced_interval_us
    rows = [
        (
            p["concurrency"],
            round(p["concurrency"] * rate),
            p["tokens_per_s"],
            p["tokens_per_chunk"],
            p["worker_cpu_us_per_token"],
            p["worker_cpu_us_per_request"],
            p["worker_core_share"],
            p["redis_writes_per_request"],
            p["errors"],
        )
        for p in paced
    ]
    return "\n" + table(
        f"2c. At a GPU's pace: one event per write, a token per {cfg.paced_interval_us:g} us "
        f"per request, {cfg.tokens} tokens/request, coalescing {cfg.coalesce[0]:g} ms",
        [
            "in flight",
            "paced tok/s",
            "tokens/s",
            "tok/chunk",
            "CPU us/tok",
            "CPU us/req",
            "worker core",
            "writes/req",
            "errors",
        ],
        rows,
    )


def _framed_table(cfg: CapacityConfig, framed: list[dict[str, Any]]) -> str:
    if not framed:
        return ""
    rows = [
        (
            p["concurrency"],
            p["tokens_per_s"],
            p["tokens_per_chunk"],
            p["worker_cpu_us_per_token"],
            p["worker_core_share"],
            p["one_core_tokens_per_s"],
            p["redis_commands_sent_per_token"],
            p.get("redis_writes_per_request"),
            p["errors"],
        )
        for p in framed
    ]
    return "\n" + table(
        f"2d. llama-server's framing: one event per socket write, as fast as it can, "
        f"{cfg.tokens} tokens/request, coalescing {cfg.coalesce[0]:g} ms",
        [
            "in flight",
            "tokens/s",
            "tok/chunk",
            "CPU us/tok",
            "worker core",
            "tok/s per core",
            "Redis sent/tok",
            "writes/req",
            "errors",
        ],
        rows,
    )


def _finish(
    cfg: CapacityConfig,
    points: list[dict[str, Any]],
    costs: dict[str, Any] | None = None,
    paced: list[dict[str, Any]] | None = None,
    framed: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    rows = [
        (
            f"{p['coalesce_ms']:g}",
            p["concurrency"],
            p["tokens_per_s"],
            p["requests_per_s"],
            p["tokens_per_chunk"],
            p["worker_cpu_us_per_token"],
            p["worker_cpu_us_per_request"],
            p["worker_core_share"],
            p["one_core_tokens_per_s"],
            p["redis_commands_sent_per_token"],
            p["redis_commands_per_token"],
            p.get("redis_writes_per_request"),
            p["errors"],
        )
        for p in points
    ]
    text = table(
        f"2. Relay capacity: one worker, synthetic upstream, {cfg.tokens} tokens/request, "
        f"{cfg.seconds:g} s per point",
        [
            "coalesce ms",
            "in flight",
            "tokens/s",
            "req/s",
            "tok/chunk",
            "CPU us/tok",
            "CPU us/req",
            "worker core",
            "tok/s per core",
            "Redis sent/tok",
            "Redis cmd/tok",
            "writes/req",
            "errors",
        ],
        rows,
    )
    on = [p for p in points if p["coalesce_ms"] > 0]
    best = max(on, key=lambda p: p["one_core_tokens_per_s"] or 0) if on else None
    at64 = next((p for p in on if p["concurrency"] == max(cfg.concurrency)), best)
    targets = [
        target(
            f"tokens/s on one core, coalescing on, {cfg.burst} events/write",
            best["one_core_tokens_per_s"] if best else None,
            50_000,
            higher_is_better=True,
        ),
        target(
            f"worker CPU us/token, coalescing on, {max(cfg.concurrency)} in flight, "
            f"{cfg.burst} events/write",
            at64["worker_cpu_us_per_token"] if at64 else None,
            5.0,
            higher_is_better=False,
        ),
    ]
    # The same two at llama-server's own framing (2d): where a whole answer no longer
    # comes in one read before its claim is confirmed, so each read relays fewer tokens.
    if framed:
        widest = max(framed, key=lambda p: p["concurrency"])
        targets += [
            target(
                "tokens/s on one core, 1 event/write",
                max(
                    (p["one_core_tokens_per_s"] for p in framed if p["one_core_tokens_per_s"]),
                    default=None,
                ),
                50_000,
                higher_is_better=True,
            ),
            target(
                f"worker CPU us/token, {widest['concurrency']} in flight, 1 event/write",
                widest["worker_cpu_us_per_token"],
                5.0,
                higher_is_better=False,
            ),
        ]
    text += _split_table(cfg, costs or {})
    text += _paced_table(cfg, paced or [])
    text += _framed_table(cfg, framed or [])
    text += "\n" + targets_table(targets)
    settings = {
        "tokens_per_request": cfg.tokens,
        "seconds_per_point": cfg.seconds,
        "concurrency": list(cfg.concurrency),
        "coalesce_ms": list(cfg.coalesce),
        "upstream": f"bench/upstream.py, {cfg.burst} SSE events per socket write, "
        "llama-server framing (chunked, one HTTP chunk per event)",
        "intake": "pub/sub",
        "paced": f"2c: one event per write, {cfg.paced_interval_us:g} us per token per request, "
        f"{list(cfg.paced)} in flight",
        "framed": f"2d: one event per write, as fast as it can, {list(cfg.framed)} in flight",
    }
    results = {
        "points": points,
        "split": costs or {},
        "paced": paced or [],
        "framed": framed or [],
    }
    path = write_result("capacity", settings, results, targets=targets)
    return {"text": text, "path": str(path), "points": points, "targets": targets}


def main(argv: list[str] | None = None) -> int:
    """Table 2c or 2d alone, printed, nothing written: for A/Bs of the per-read path."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.capacity",
        description="table 2c alone (a GPU's pace), or 2d (--framed: as fast as it can)",
    )
    parser.add_argument("--paced", default="4,16,32", help="requests in flight, comma-separated")
    parser.add_argument(
        "--framed", default="", help="table 2d instead, at these requests in flight (e.g. 8,64)"
    )
    parser.add_argument("--seconds", type=float, default=6.0, help="per point")
    args = parser.parse_args(argv)
    framed = tuple(map(int, args.framed.split(","))) if args.framed else ()
    cfg = CapacityConfig(
        seconds=args.seconds, paced=tuple(map(int, args.paced.split(","))), framed=framed
    )

    async def one_table() -> list[dict[str, Any]]:
        with Workspace() as ws:
            if framed:
                return await _one_event_per_write(ws, cfg, framed, 0.0)
            return await run_paced(ws, cfg)

    points = asyncio.run(one_table())
    print(_framed_table(cfg, points) if framed else _paced_table(cfg, points))
    return 0


if __name__ == "__main__":
    sys.exit(main())
