"""Intake latency: from the caller's PUBLISH / XADD to the HTTP request reaching the upstream.

The upstream is the synthetic llama-server, which stamps each chat request's arrival with
``time.monotonic_ns()`` (one clock for every process on Linux) under the request's unique
prompt; the bench's stamp is its caller's, taken right before the write (the same
CLOCK_MONOTONIC as ``perf_counter``), after the message is encoded. One request at a time, so
the figure is the worker's own path (decode, claim, idempotency record, HTTP request), not
queueing. The same requests also give the bus time to first token with an upstream that
answers at once.

``--burst N`` (a diagnostic, not part of ``make bench``) sends N requests at once, as the
relay benchmark's caller does at N in flight, and reports when the k-th of them reached
the upstream after the burst's first PUBLISH / XADD: how much later than the first the
last of them can start. (Whether llama-server would have taken them into one batch is
another matter: on the 2-vCPU VM it took even two prompts written at once in turn,
``docs/benchmarks-history.md`` item 51.) ``--pin`` gives the worker a CPU of its
own, as on a many-core GPU machine, where the caller's sends trickle in while the
worker works. ``--replica`` puts a silent second subscriber on the intake channel: the
worker counts a replica, so each pub/sub request waits for its claim before it starts
(the path of a deployment with two replicas; the silent one never claims).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench import floor
from bench.callers import BusCaller, bus_sender
from bench.harness import PROFILE, Worker, WorkerSpec, Workspace, pin_apart, set_affinity
from bench.report import p50_p90, summary, table, target, targets_table, write_result
from bench.trace_worker import offsets


@dataclass(frozen=True)
class IntakeConfig:
    requests: int = 300  # per transport
    warmup: int = 20
    gap_s: float = 0.002  # pause between requests: an idle worker each time
    trace: bool = False  # run bench/trace_worker.py and split the latency into its steps
    bursts: int = 100  # table 3c: bursts of four requests per transport


async def _probe(bus: BusCaller, via: str) -> tuple[str, int, float | None, float | None]:
    marker = f"bench-probe {uuid.uuid4()}"
    envelope = bus.envelope(
        [{"role": "user", "content": marker}], {"max_tokens": 1, "stream": True}
    )
    outcome = await bus.chat(envelope, via)
    if outcome.error:
        raise RuntimeError(f"intake probe failed: {outcome.error}")
    # Stamped just before the write, as the first token and the result beside it (the
    # encoding and the stream entry's fields used to count as intake); perf_counter and
    # the upstream's monotonic_ns are both CLOCK_MONOTONIC on Linux.
    return marker, round(outcome.sent * 1e9), outcome.ttft, outcome.total


async def run(ws: Workspace, cfg: IntakeConfig | None = None) -> dict[str, Any]:
    cfg = cfg or IntakeConfig()
    spec = WorkerSpec(model=ws.tiny_model(), binary=ws.synthetic_launcher(), parallel=4, ctx=8192)
    trace_file = ws.root / "trace.jsonl"
    if cfg.trace:
        spec.command = ("-m", "bench.trace_worker")
        spec.env["BENCH_TRACE_FILE"] = str(trace_file)
    sends: dict[str, list[int]] = {}
    results: dict[str, Any] = {}
    async with _serving(ws, spec, "intake") as (_, bus, arrivals):
        for via in ("pubsub", "stream"):
            for _ in range(cfg.warmup):
                await _probe(bus, via)
            await arrivals()  # forget the warm-up
            probes = []
            for _ in range(cfg.requests):
                probes.append(await _probe(bus, via))
                await asyncio.sleep(cfg.gap_s)
            sends[via] = [sent for _, sent, _, _ in probes]
            arrived = await arrivals()
            intake = [(arrived[m] - sent) / 1e6 for m, sent, _, _ in probes if m in arrived]
            results[via] = {
                "intake_ms": summary(intake),
                "ttft_ms": summary(t * 1000 for _, _, t, _ in probes if t is not None),
                "total_ms": summary(t * 1000 for _, _, _, t in probes if t is not None),
                "missing_arrivals": len(probes) - len(intake),
            }
    if cfg.trace:
        return {"text": _steps(trace_file, sends), "path": str(trace_file), "results": results}
    found = await floor.measure(ws)
    pin = len(os.sched_getaffinity(0)) >= 2
    bursts = await burst(ws, 4, cfg.bursts, pin=pin)
    behind = await burst(ws, 4, cfg.bursts, pin=pin, replica=True)
    return _finish(cfg, results, found, bursts, behind)


@contextlib.asynccontextmanager
async def _serving(
    ws: Workspace, spec: WorkerSpec, name: str
) -> AsyncIterator[tuple[Worker, BusCaller, Callable[[], Awaitable[dict[str, int]]]]]:
    """A ready worker on the synthetic upstream, a bus caller, and what reads (and
    forgets) the upstream's arrival stamps so far, by prompt."""
    worker = Worker(ws, spec, name).start()
    redis = ws.redis()
    try:
        await worker.wait_ready(redis)
        bus = await BusCaller(ws.url, PROFILE).start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{worker.llama_port}") as http:

                async def arrivals() -> dict[str, int]:
                    return (await http.get("/bench/arrivals")).json()["arrivals"]

                yield worker, bus, arrivals
        finally:
            await bus.close()
    finally:
        await redis.aclose()
        worker.stop()


def _steps(trace_file: Path, sends: dict[str, list[int]]) -> str:
    """Median time from the send to each traced step, per transport."""
    blocks = []
    for via, starts in sends.items():
        ends = [*starts[1:], starts[-1] + 10**9]
        steps = offsets(trace_file, zip(starts, ends, strict=True))
        rows = sorted(
            ((label, len(v), summary(v)["p50"], summary(v)["p90"]) for label, v in steps.items()),
            key=lambda row: row[2],
        )
        blocks.append(
            table(f"{via}: ms from PUBLISH/XADD to each step", ["step", "n", "p50", "p90"], rows)
        )
    return "\n".join(blocks)


async def burst(
    ws: Workspace, size: int, rounds: int, pin: bool = False, replica: bool = False
) -> dict[str, Any]:
    """Bursts of ``size`` requests: when each reached the upstream, in order of arrival,
    after the burst's first send (see the module's docstring)."""
    spec = WorkerSpec(
        model=ws.tiny_model(), binary=ws.synthetic_launcher(), parallel=size, ctx=2048 * size
    )
    ours = os.sched_getaffinity(0)
    rows = []
    client = ws.redis()
    silent = client.pubsub()
    if replica:  # subscribed before the worker's first count of replicas
        await silent.subscribe(f"orion:exec:request:LlamaCppHost:{PROFILE}")
    try:
        async with _serving(ws, spec, "intake-burst") as (worker, bus, arrivals):
            if pin:  # the worker on the last CPU, the upstream, Redis and us on the others
                pin_apart(worker.pid, (worker.engine_pid, ws.redis_pid(), os.getpid()), max(ours))
            for via in ("pubsub", "stream"):
                for _ in range(10):
                    await asyncio.gather(*(_probe(bus, via) for _ in range(size)))
                await arrivals()  # forget the warm-up
                bursts = []
                for _ in range(rounds):
                    bursts.append(await asyncio.gather(*(_probe(bus, via) for _ in range(size))))
                    await asyncio.sleep(0.005)
                rows += _burst_rows(via, bursts, await arrivals())
    finally:
        set_affinity(os.getpid(), ours)
        await silent.aclose()
        await client.aclose()
    return {
        "size": size,
        "rounds": rounds,
        "worker_pinned": pin,
        "replica": replica,
        "rows": rows,
    }


def burst_table(found: dict[str, Any]) -> str:
    where = "the worker alone on a CPU" if found["worker_pinned"] else "no pinning"
    number = "3c"
    if found.get("replica"):
        where += "; a silent replica on the channel: pub/sub claims first"
        number = "3d"
    return table(
        f"{number}. Intake of bursts of {found['size']} (ms after the burst's first "
        f"PUBLISH/XADD; "
        f"{found['rounds']} bursts per transport, synthetic upstream, {where})",
        ["intake", "what", "n", "p50", "p90"],
        found["rows"],
    )


def _burst_rows(
    via: str, bursts: list[list[tuple[str, int, Any, Any]]], arrivals: dict[str, int]
) -> list[tuple[Any, ...]]:
    size = len(bursts[0])
    ranks: list[list[float]] = [[] for _ in range(size)]
    last_send: list[float] = []
    for probes in bursts:
        first = min(sent for _, sent, _, _ in probes)
        last_send.append((max(sent for _, sent, _, _ in probes) - first) / 1e6)
        got = sorted(arrivals[m] for m, _, _, _ in probes if m in arrivals)
        for k, arrived in enumerate(got):
            ranks[k].append((arrived - first) / 1e6)
    rows = [(via, "caller: last send", len(last_send), *p50_p90(last_send))]
    for k, found in enumerate(ranks):
        what = f"request {k + 1} of {size} at the upstream"
        rows.append((via, what, len(found), *p50_p90(found)))
    return rows


async def flood(
    ws: Workspace, size: int, rounds: int = 1, inbox: int | None = None
) -> dict[str, Any]:
    """``size`` pub/sub requests sent at once to a worker whose one slot is busy, ``rounds``
    times: the local queue takes ``ORION_LLAMACPP_LOCAL_QUEUE`` (16) of them, the rest are
    answered ``overloaded``. How fast those answers go out is how fast the worker empties
    its pub/sub inbox under a flood; its peak resident memory is what the inbox holds
    (``ORION_LLAMACPP_INBOX_SIZE``, ``inbox``: beyond it a request waits apart for its
    refusal, beyond twice it is dropped, "unanswered" here); its CPU time from the first
    send to the last refusal, less what relaying the occupant's tokens took at that pace
    just before, divided by the refusals, is what a refusal costs it."""
    env = {"BENCH_TOKEN_INTERVAL_US": "1000"}  # the slot's occupant: a token a ms
    if inbox is not None:
        env["ORION_LLAMACPP_INBOX_SIZE"] = str(inbox)
    spec = WorkerSpec(
        model=ws.tiny_model(), binary=ws.synthetic_launcher(), parallel=1, ctx=2048, env=env
    )
    async with _serving(ws, spec, "intake-flood") as (worker, bus, _):
        process = psutil.Process(worker.pid)
        idle_mb = process.memory_info().rss / 2**20
        found = [await _flood_round(bus, process, size, idle_mb) for _ in range(rounds)]
    per_refusal = summary(r["cpu_us_per_refusal"] for r in found)
    return {"rounds": found, "cpu_us_per_refusal_p50": per_refusal.get("p50")}


async def _flood_round(
    bus: BusCaller, process: psutil.Process, size: int, idle_mb: float
) -> dict[str, Any]:
    occupant = _flood_request(bus, max(3000, size))  # about as many ms
    occupying = asyncio.create_task(bus.chat(occupant, keep_text=False))
    await asyncio.sleep(0.2)  # generating: the slot is taken
    before, relaying = _cpu(process), time.perf_counter()
    await asyncio.sleep(0.5)
    relay_rate = (_cpu(process) - before) / (time.perf_counter() - relaying)
    requests = [_flood_request(bus, 1) for _ in range(size)]
    samples: list[tuple[float, float, float]] = []
    sampling = asyncio.create_task(_sample(process, samples))
    started, cpu = time.perf_counter(), _cpu(process)
    outcomes = await asyncio.gather(*(_answered(bus, r) for r in requests))
    sampling.cancel()
    await occupying
    answered = [o for o in outcomes if o is not None]
    refused = sorted(o.done - started for o in answered if o.error and "overloaded" in o.error)
    served = sum(1 for o in answered if not o.error)
    last = refused[-1] if refused else 0.0
    # The first sample taken after the last refusal went out (10 ms apart).
    at_last = next((c for t, _, c in samples if t - started >= last), _cpu(process))
    worked = at_last - cpu - relay_rate * last
    return {
        "size": size,
        "overloaded": len(refused),
        "served": served,
        "other": len(answered) - len(refused) - served,
        "unanswered": size - len(answered),
        "last_overloaded_s": refused[-1] if refused else None,
        "overloaded_per_s": len(refused) / last if refused else None,
        "worker_rss_idle_mb": idle_mb,
        "worker_rss_peak_mb": max([idle_mb, *(rss for _, rss, _ in samples)]),
        "cpu_us_per_refusal": worked / len(refused) * 1e6 if refused else None,
    }


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


async def _answered(bus: BusCaller, request: dict[str, Any]) -> Any:
    """Its outcome, or None: one dropped beyond twice the inbox's bound gets no answer."""
    with contextlib.suppress(TimeoutError):
        return await asyncio.wait_for(bus.chat(request, keep_text=False), FLOOD_ANSWER_S)
    return None


FLOOD_ANSWER_S = 30.0  # the occupant's 3-5 s, then the local queue's turns


def _flood_request(bus: BusCaller, tokens: int) -> dict[str, Any]:
    return bus.envelope([{"role": "user", "content": "flood"}], {"max_tokens": tokens})


async def _sample(process: psutil.Process, samples: list[tuple[float, float, float]]) -> None:
    """Every 10 ms: when, the resident memory (MB) and the CPU time so far (s)."""
    while True:
        samples.append((time.perf_counter(), process.memory_info().rss / 2**20, _cpu(process)))
        await asyncio.sleep(0.01)


def flood_table(found: dict[str, Any]) -> str:
    rows = [
        (
            r["size"],
            r["overloaded"],
            r["served"],
            r["other"],
            r["unanswered"],
            r["last_overloaded_s"],
            r["overloaded_per_s"],
            r["worker_rss_idle_mb"],
            r["worker_rss_peak_mb"],
            r["cpu_us_per_refusal"],
        )
        for r in found["rounds"]
    ]
    text = table(
        "Pub/sub flood: requests sent at once to a worker with its one slot busy "
        "(synthetic upstream), a round a row",
        [
            "sent",
            "overloaded",
            "served",
            "other",
            "unanswered",
            "last overloaded (s)",
            "overloaded / s",
            "RSS idle MB",
            "RSS peak MB",
            "worker CPU µs / refusal",
        ],
        rows,
    )
    p50 = found["cpu_us_per_refusal_p50"]
    median = "-" if p50 is None else f"{p50:.0f} µs"
    return f"{text}\nworker CPU per refusal, median of {len(rows)} rounds: {median}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.intake")
    parser.add_argument("--trace", action="store_true", help="split the latency into steps")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--burst", type=int, default=0, help="N requests at once (diagnostic)")
    parser.add_argument("--pin", action="store_true", help="with --burst: the worker alone")
    parser.add_argument(
        "--replica", action="store_true", help="with --burst: a silent second subscriber"
    )
    parser.add_argument("--flood", type=int, default=0, help="N pub/sub requests, one slot busy")
    parser.add_argument("--rounds", type=int, default=1, help="with --flood: floods in a row")
    parser.add_argument(
        "--inbox", type=int, default=None, help="with --flood: ORION_LLAMACPP_INBOX_SIZE"
    )
    args = parser.parse_args(argv)

    async def go() -> None:
        with Workspace() as ws:
            if args.flood:
                print(flood_table(await flood(ws, args.flood, args.rounds, args.inbox)))
                return
            if args.burst:
                rounds = args.requests // args.burst
                found = await burst(ws, args.burst, rounds, args.pin, args.replica)
                print(burst_table(found))
                return
            result = await run(ws, IntakeConfig(requests=args.requests, trace=args.trace))
            print(result["text"])

    asyncio.run(go())
    return 0


def _floor_table(found: dict[str, Any]) -> str:
    rows = [
        (what, found[key]["n"], found[key]["p50"], found[key]["p90"], found[key]["p99"])
        for what, key in (
            ("message through Redis and a bare relay process, and back", "through_redis_ms"),
            ("the same process echoing over a direct TCP connection", "direct_tcp_ms"),
            ("difference, sample by sample: what crossing Redis costs", "difference_ms"),
        )
    ]
    return "\n" + table(
        "3b. The floor (ms): bench/echo.py, the leanest relay, one message in flight",
        ["round trip", "n", "p50", "p90", "p99"],
        rows,
    )


def _finish(
    cfg: IntakeConfig,
    results: dict[str, Any],
    found: dict[str, Any] | None = None,
    bursts: dict[str, Any] | None = None,
    behind: dict[str, Any] | None = None,
) -> dict[str, Any]:
    rows = []
    for via, r in results.items():
        for what, key in (
            ("PUBLISH/XADD -> upstream has the request", "intake_ms"),
            ("PUBLISH/XADD -> first chunk", "ttft_ms"),
            ("PUBLISH/XADD -> result", "total_ms"),
        ):
            s = r[key]
            rows.append((via, what, s["n"], s["p50"], s["p90"], s["p99"], s["max"]))
    text = table(
        f"3. Intake latency (ms): one request at a time, synthetic upstream, "
        f"{cfg.requests} requests per transport",
        ["intake", "interval", "n", "p50", "p90", "p99", "max"],
        rows,
    )
    targets = [
        target(f"{via} intake p50 ms", r["intake_ms"]["p50"], 1.0, higher_is_better=False)
        for via, r in results.items()
    ]
    if found:
        text += _floor_table(found)
    if bursts:
        text += "\n" + burst_table(bursts)
    if behind:
        text += "\n" + burst_table(behind)
    text += "\n" + targets_table(targets)
    settings = {
        "requests_per_transport": cfg.requests,
        "warmup": cfg.warmup,
        "gap_between_requests_s": cfg.gap_s,
        "upstream": "bench/upstream.py (stamps arrival with time.monotonic_ns)",
        "clock": "CLOCK_MONOTONIC in both processes",
        "bus_sender": bus_sender(),
    }
    path = write_result(
        "intake",
        settings,
        {
            **results,
            "floor": found or {},
            "bursts": bursts or {},
            "bursts_behind_a_replica": behind or {},
        },
        targets=targets,
    )
    return {"text": text, "path": str(path), "results": results, "targets": targets}


if __name__ == "__main__":
    sys.exit(main())
