"""Relay overhead: the same llama-server, called directly and through the bus, interleaved.

One worker serves a profile; the bench calls that worker's own llama-server directly (an
async SSE client on a keep-alive connection) and through the bus (PUBLISH to the pub/sub
intake, or XADD to the stream intake; chunks and the result read from pub/sub). Same
prompts, temperature 0, fixed seed, fixed ``max_tokens`` with ``ignore_eos``, so both
paths generate the same tokens. Modes take turns round by round, in rotating order, so
drift and noise hit them alike; each bus request is paired with the direct request of the
same round that llama-server served in the same place (ranked by time to first token
within the round; with one request in flight, simply the round's direct request), and a
second direct request per round (``direct again``) measures what pairing two identical
requests shows: the noise floor of this machine.

- time to first token: send -> first content delta (direct) or first chunk (bus);
- tokens/s per request while streaming: the tokens after the first / (first token -> end
  of the answer: ``[DONE]``, or the result), the rate a reader sees once text flows;
- tokens/s per request end to end: completion tokens / (send -> end of the answer).

CPU is accounted per mode (the worker, llama-server, Redis and the bench process itself),
so the worker's CPU per relayed token sits next to what the bench's own direct SSE reader
spends per token.

``python -m bench.relay [--rounds 60] [--pin] [--concurrency N]`` runs the tiny model alone
and prints a few lines (no results file): what ``python -m bench.ab`` compares.

On a machine with two CPUs or more, a last tiny-model run puts llama-server's threads
alone on the first CPU and the worker, Redis and the bench on the others (``BENCH_PIN=0``
skips it): decode no longer competes with the relay for a core, as with a GPU, so what is
left of the overhead is the relay's own.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import floor
from bench.callers import BusCaller, DirectLane, Outcome, bus_sender
from bench.harness import (
    DEMO_MODEL,
    PROFILE,
    CpuMeter,
    Worker,
    WorkerSpec,
    Workspace,
    llama_server_binary,
    pin_apart,
    set_affinity,
)
from bench.report import summary, table, target, targets_table, write_result

PROMPTS = [
    "Tell me a story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "Write a short poem about rain on a tin roof.",
    "List three uses of copper and say why.",
    "Describe the taste of a ripe mango to someone who never had one.",
    "What happens inside a star when it runs out of hydrogen?",
    "Give advice to someone learning to play the violin.",
    "Summarise the rules of chess in a few sentences.",
]
# "control" is a second direct request: its difference to "direct" is the noise floor.
MODES = ("direct", "pubsub", "stream", "control")
FLOOR_TOKENS = 16
LABELS = {"pubsub": "bus, pub/sub", "stream": "bus, stream", "control": "direct again (A/A)"}


@dataclass(frozen=True)
class ModelRun:
    name: str
    model: Path
    max_tokens: int
    rounds: int  # measured rounds per concurrency level
    warmup: int = 2
    concurrency: tuple[int, ...] = (1, 2)
    coalesce_ms: float = 10.0
    floor: bool = False  # also time the leanest relay possible in front of this llama-server
    # llama-server alone on the first CPU, the worker, Redis and the bench on the others:
    # decode does not compete with the relay for a core, as on a GPU (see the docstring).
    pin: bool = False
    # Seconds the measured rounds of one concurrency level may take, going by the warm-up;
    # fewer rounds where they would not fit, never under a third (``_affordable``).
    budget_s: float | None = None


@dataclass
class Samples:
    outcomes: dict[str, list[Outcome]] = field(default_factory=lambda: {m: [] for m in MODES})
    cpu: dict[str, dict[str, float]] = field(default_factory=lambda: {m: {} for m in MODES})
    wall: dict[str, float] = field(default_factory=lambda: dict.fromkeys(MODES, 0.0))


def gpu_runs(model: Path) -> list[ModelRun]:
    """``BENCH_RELAY_MODEL`` set (the GPU run, bench/gpu/run.sh): that model only, with
    coalescing on and off, at concurrency 1 and = slots (``BENCH_SLOTS``)."""
    tokens = int(os.environ.get("BENCH_MAX_TOKENS", "512"))
    rounds = int(os.environ.get("BENCH_ROUNDS", "30"))
    slots = int(os.environ.get("BENCH_SLOTS", "4"))
    return [
        ModelRun("gpu", model, tokens, rounds=rounds, concurrency=(1, slots), floor=True),
        ModelRun(
            "gpu, coalescing off",
            model,
            tokens,
            rounds=max(rounds // 2, 4),
            concurrency=(1, slots),
            coalesce_ms=0,
        ),
    ]


def default_runs() -> list[ModelRun]:
    if os.environ.get("BENCH_RELAY_MODEL"):
        return gpu_runs(Path(os.environ["BENCH_RELAY_MODEL"]))
    runs = [
        ModelRun("tiny", Path(), max_tokens=256, rounds=120, floor=True),
        ModelRun("tiny, coalescing off", Path(), 256, rounds=30, concurrency=(1,), coalesce_ms=0),
    ]
    if DEMO_MODEL.is_file():
        budget = float(os.environ.get("BENCH_DEMO_BUDGET_S", "75"))
        runs.insert(0, ModelRun("demo", DEMO_MODEL, max_tokens=24, rounds=24, budget_s=budget))
    if os.environ.get("BENCH_PIN") != "0" and len(os.sched_getaffinity(0)) >= 2:
        runs.append(ModelRun("tiny, llama-server pinned", Path(), 256, rounds=60, pin=True))
    return runs


def _body(prompt: str, max_tokens: int, seed: int) -> tuple[list[dict[str, str]], dict[str, Any]]:
    messages = [{"role": "user", "content": prompt}]
    options = {
        "temperature": 0,
        "seed": seed,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "cache_prompt": False,  # every request evaluates its whole prompt, whoever came first
    }
    return messages, options


async def _one(mode: str, lane: DirectLane, bus: BusCaller, prompt: str, run: ModelRun) -> Outcome:
    messages, options = _body(prompt, run.max_tokens, 42)
    if mode in ("direct", "control"):
        return await lane.chat({"messages": messages, **options})
    return await bus.chat(bus.envelope(messages, {**options, "stream": True}), mode)


async def _rounds(
    lanes: list[DirectLane],
    bus: BusCaller,
    run: ModelRun,
    rounds: int,
    samples: Samples | None,
    meter: CpuMeter | None = None,
) -> None:
    width = len(lanes)
    for r in range(rounds):
        order = MODES[r % len(MODES) :] + MODES[: r % len(MODES)]
        for mode in order:
            prompts = [PROMPTS[(r * width + j) % len(PROMPTS)] for j in range(width)]
            if meter is not None:
                meter.start()
                bench_cpu = time.process_time()
            done = await asyncio.gather(
                *(_one(mode, lanes[j], bus, prompts[j], run) for j in range(width))
            )
            if samples is None or meter is None:
                continue
            # Requests of one round are paired with the other rounds' by the order llama-server
            # served them (fastest first), not by lane: which lane's prompt it takes up first
            # is its choice and would otherwise show as overhead.
            samples.outcomes[mode].extend(sorted(done, key=_first_token_order))
            cpu = samples.cpu[mode]
            for name, seconds in meter.stop().items():
                cpu[name] = cpu.get(name, 0.0) + seconds
            cpu["bench"] = cpu.get("bench", 0.0) + time.process_time() - bench_cpu
            samples.wall[mode] += meter.wall


def _affordable(run: ModelRun, per_round_s: float) -> int:
    """``run.rounds``, or fewer where its budget would not hold them: on a VM where the
    demo model ran at a third of its usual rate, its rounds alone made ``make bench`` take
    9 min 49 s (``docs/benchmarks-history.md`` item 67). Never under a third of them."""
    if run.budget_s is None or per_round_s <= 0:
        return run.rounds
    return max(run.rounds // 3, min(run.rounds, int(run.budget_s / per_round_s)))


def _floor_bodies() -> list[dict[str, Any]]:
    """The relay's prompts and sampling; few tokens, since only the first one is timed."""
    return [{"messages": m, **o} for m, o in (_body(p, FLOOR_TOKENS, 42) for p in PROMPTS)]


def _first_token_order(outcome: Outcome) -> float:
    return outcome.ttft if outcome.ttft is not None else float("inf")


def _analyse(samples: Samples) -> dict[str, Any]:
    out: dict[str, Any] = {"modes": {}, "pairs": {}}
    direct = samples.outcomes["direct"]
    for mode, outcomes in samples.outcomes.items():
        ok = [o for o in outcomes if o.error is None]
        tokens = sum(o.tokens for o in ok) or 1
        wall = samples.wall[mode] or 1.0
        out["modes"][mode] = {
            "requests": len(outcomes),
            "errors": len(outcomes) - len(ok),
            "error_sample": next((o.error for o in outcomes if o.error), None),
            "ttft_ms": summary(o.ttft * 1000 for o in ok if o.ttft is not None),
            "stream_tokens_per_s": summary(
                (o.stream_tokens_per_sec for o in ok if o.stream_tokens_per_sec), 1
            ),
            "tokens_per_s": summary((o.tokens_per_sec for o in ok if o.tokens_per_sec), 1),
            "cpu_us_per_token": {
                name: round(sec / tokens * 1e6, 2) for name, sec in samples.cpu[mode].items()
            },
            "core_share": {name: round(sec / wall, 3) for name, sec in samples.cpu[mode].items()},
            "tokens": summary((o.tokens for o in ok), 0),
            "server_decode_tokens_per_s": summary((o.server_tps for o in ok if o.server_tps), 1),
        }
        if mode == "direct":
            continue
        pairs = [
            (d, b)
            for d, b in zip(direct, outcomes, strict=True)
            if d.error is None and b.error is None and d.ttft and b.ttft and d.total and b.total
        ]
        out["pairs"][mode] = {
            "pairs": len(pairs),
            "ttft_overhead_ms": summary((b.ttft - d.ttft) * 1000 for d, b in pairs),
            "stream_throughput_ratio": summary(
                (
                    b.stream_tokens_per_sec / d.stream_tokens_per_sec
                    for d, b in pairs
                    if b.stream_tokens_per_sec and d.stream_tokens_per_sec
                ),
                4,
            ),
            "throughput_ratio": summary(
                ((b.tokens / b.total) / (d.tokens / d.total) for d, b in pairs), 4
            ),
            "server_decode_ratio": summary(
                (b.server_tps / d.server_tps for d, b in pairs if b.server_tps and d.server_tps),
                4,
            ),
            "same_text": sum("".join(d.text) == "".join(b.text) for d, b in pairs),
            "same_tokens": sum(d.tokens == b.tokens for d, b in pairs),
            "out_of_order": sum(not b.ok_order for _, b in pairs),
        }
    return out


def _gpu_env() -> dict[str, str]:
    """Layers on the GPU and its pinning, when the GPU run asks for them."""
    env = {}
    if os.environ.get("BENCH_N_GPU_LAYERS"):
        env["LLAMACPP_N_GPU_LAYERS_OVERRIDE"] = os.environ["BENCH_N_GPU_LAYERS"]
    if os.environ.get("BENCH_CUDA_DEVICES"):
        env["CUDA_VISIBLE_DEVICES_OVERRIDE"] = os.environ["BENCH_CUDA_DEVICES"]
    return env


def worker_spec(model: Path, slots: int, coalesce_ms: float = 10.0) -> WorkerSpec:
    """The worker of this benchmark: the real llama-server with ``slots`` slots of 2,048
    tokens, ``BENCH_THREADS`` threads and the GPU settings of the GPU run, if any."""
    return WorkerSpec(
        model=model,
        binary=llama_server_binary(),
        parallel=slots,
        ctx=2048 * slots,
        threads=int(os.environ.get("BENCH_THREADS", "1")),
        coalesce_ms=coalesce_ms,
        env=_gpu_env(),
    )


async def run_model(ws: Workspace, run: ModelRun) -> dict[str, Any]:
    model = run.model if run.model != Path() else ws.tiny_model()
    spec = worker_spec(model, max(run.concurrency), run.coalesce_ms)
    worker = Worker(ws, spec, f"relay-{len(run.name)}-{run.coalesce_ms:g}").start()
    redis = ws.redis()
    results: dict[str, Any] = {}
    ours = os.sched_getaffinity(0)
    try:
        await worker.wait_ready(redis)
        if run.pin:
            _pin(worker, ws)
        bus = await BusCaller(ws.url, PROFILE).start()
        for concurrency in run.concurrency:
            lanes = [DirectLane("127.0.0.1", worker.llama_port) for _ in range(concurrency)]
            started = time.perf_counter()
            await _rounds(lanes, bus, run, run.warmup, None)
            rounds = _affordable(run, (time.perf_counter() - started) / max(run.warmup, 1))
            samples = Samples()
            meter = CpuMeter(
                {"worker": worker.pid, "llama-server": worker.engine_pid, "redis": ws.redis_pid()}
            )
            gc.collect()
            gc.disable()  # no collector pauses in the bench's own readers while measuring
            try:
                await _rounds(lanes, bus, run, rounds, samples, meter)
            finally:
                gc.enable()
            for lane in lanes:
                lane.close()
            results[f"c{concurrency}"] = {
                "concurrency": concurrency,
                "rounds": rounds,
                **_analyse(samples),
            }
        await bus.close()
        for width in run.concurrency if run.floor else ():
            results["floor" if width == 1 else f"floor_c{width}"] = await floor.measure_llama(
                ws, worker.llama_port, _floor_bodies(), samples=run.rounds, width=width
            )
    finally:
        set_affinity(os.getpid(), ours)
        await redis.aclose()
        worker.stop()
    return {"model": str(model), "max_tokens": run.max_tokens, "rounds": run.rounds, **results}


def _pin(worker: Worker, ws: Workspace) -> None:
    """llama-server's threads on the first CPU; the worker's, Redis's and ours on the rest."""
    others = (worker.pid, ws.redis_pid(), os.getpid())
    pin_apart(worker.engine_pid, others, min(os.sched_getaffinity(0)))


async def run(ws: Workspace, runs: list[ModelRun] | None = None) -> dict[str, Any]:
    runs = runs or default_runs()
    results = {}
    for model_run in runs:
        results[model_run.name] = await run_model(ws, model_run)
    return _finish(runs, results)


def _finish(runs: list[ModelRun], results: dict[str, Any]) -> dict[str, Any]:
    rows = []
    targets = []
    for model_run in runs:
        res = results[model_run.name]
        for key in (f"c{c}" for c in model_run.concurrency):
            point = res[key]
            d = point["modes"]["direct"]
            for mode in ("pubsub", "stream", "control"):
                b, p = point["modes"][mode], point["pairs"][mode]
                rows.append(
                    (
                        model_run.name,
                        point["concurrency"],
                        LABELS[mode],
                        p["pairs"],
                        d["ttft_ms"].get("p50"),
                        b["ttft_ms"].get("p50"),
                        p["ttft_overhead_ms"].get("p50"),
                        p["ttft_overhead_ms"].get("p99"),
                        d["stream_tokens_per_s"].get("p50"),
                        b["stream_tokens_per_s"].get("p50"),
                        p["stream_throughput_ratio"].get("p50"),
                        p["throughput_ratio"].get("p50"),
                        p["server_decode_ratio"].get("p50"),
                        b["cpu_us_per_token"].get("worker") if mode != "control" else None,
                        d["cpu_us_per_token"].get("bench"),
                        b["errors"] + d["errors"],
                    )
                )
                if model_run.coalesce_ms > 0 and mode != "control":
                    targets += _targets(model_run, point, mode)
    text = table(
        "1. Relay overhead: direct SSE vs through the bus (same llama-server, interleaved)",
        [
            "model",
            "conc",
            "path",
            "pairs",
            "TTFT direct ms",
            "TTFT bus ms",
            "overhead p50 ms",
            "overhead p99 ms",
            "tok/s direct",
            "tok/s bus",
            "bus/direct",
            "e2e bus/direct",
            "decode bus/direct",
            "worker us/tok",
            "direct reader us/tok",
            "errors",
        ],
        rows,
    )
    text += _floor_table(runs, results)
    text += "\n" + targets_table(targets)
    settings = {
        m.name: {
            "model": str(m.model) if m.model != Path() else "random llama (bench/harness)",
            "max_tokens": m.max_tokens,
            "rounds": m.rounds,
            "warmup_rounds": m.warmup,
            "concurrency": list(m.concurrency),
            "coalesce_ms": m.coalesce_ms,
        }
        for m in runs
    }
    settings["common"] = {
        "llama_server": f"--threads {os.environ.get('BENCH_THREADS', '1')}, --parallel = max "
        f"concurrency, --ctx-size 2048 per slot, extra: {_gpu_env() or 'none'}",
        "sampling": "temperature 0, seed 42, ignore_eos (same tokens both ways), cache_prompt "
        "false (no request profits from the prompt cache another one filled)",
        "direct_client": "bench/callers.py DirectLane: asyncio HTTP/1.1 keep-alive SSE reader",
        "bus_client": "bench/callers.py BusCaller: PUBLISH/XADD + PSUBSCRIBE reader (hiredis); "
        f"sender: {bus_sender()} (raw: packed bytes in one write, "
        "as the direct client writes its requests; redis-py: its client's execute_command)",
        "pairing": "modes take turns round by round in rotating order; within a round, requests "
        "are ranked by time to first token and paired by rank with the direct round; "
        "'direct again' (A/A) is a second direct request per round: the noise floor",
    }
    path = write_result("relay", settings, results, targets=targets)
    return {"text": text, "path": str(path), "results": results, "targets": targets}


def _floor_table(runs: list[ModelRun], results: dict[str, Any]) -> str:
    rows = []
    for model_run in runs:
        for key, found in results[model_run.name].items():
            if key.startswith("floor"):
                rows.append(_floor_row(model_run.name, found))
    if not rows:
        return ""
    return "\n" + table(
        "1b. The floor: the leanest relay possible (bench/echo.py llama: raw sockets, no "
        "decoding, no claims) through Redis to the same llama-server",
        [
            "model",
            "conc",
            "n",
            "TTFT direct ms",
            "TTFT lean relay ms",
            "overhead p50 ms",
            "p90 ms",
            "p99 ms",
            "A/A p50 ms",
            "A/A p99 ms",
        ],
        rows,
    )


def _floor_row(name: str, found: dict[str, Any]) -> tuple[Any, ...]:
    lean, aa = found["lean_relay_overhead_ms"], found["control_overhead_ms"]
    return (
        name,
        found.get("concurrency", 1),
        lean.get("n"),
        found["direct_ttft_ms"].get("p50"),
        found["lean_relay_ttft_ms"].get("p50"),
        lean.get("p50"),
        lean.get("p90"),
        lean.get("p99"),
        aa.get("p50"),
        aa.get("p99"),
    )


def _targets(run: ModelRun, point: dict[str, Any], mode: str) -> list[dict]:
    label = f"{run.name} c{point['concurrency']} {mode}"
    pairs = point["pairs"][mode]
    kept = 0.98 if run.name == "demo" else 0.95
    return [
        target(
            f"{label} TTFT overhead p50 ms",
            pairs["ttft_overhead_ms"].get("p50"),
            1.0,
            higher_is_better=False,
        ),
        target(
            f"{label} TTFT overhead p99 ms",
            pairs["ttft_overhead_ms"].get("p99"),
            5.0,
            higher_is_better=False,
        ),
        target(
            f"{label} streaming tok/s bus/direct p50",
            pairs["stream_throughput_ratio"].get("p50"),
            kept,
            higher_is_better=True,
        ),
    ]


async def quick(rounds: int, pin: bool, concurrency: int = 1) -> str:
    """The tiny model alone, ``concurrency`` requests in flight, a few lines and no results
    file: what an A/B comparison needs (``python -m bench.ab``)."""
    ws = Workspace()
    try:
        name = "tiny, llama-server pinned" if pin else "tiny"
        found = await run_model(
            ws, ModelRun(name, Path(), 256, rounds=rounds, concurrency=(concurrency,), pin=pin)
        )
    finally:
        ws.close()
    point = found[f"c{concurrency}"]
    direct = point["modes"]["direct"]
    lines = [
        f"{name}, {concurrency} in flight, {rounds} rounds: "
        f"direct TTFT p50 {direct['ttft_ms']['p50']:.2f} ms, "
        f"{direct['stream_tokens_per_s']['p50']:,.0f} tok/s"
    ]
    for mode in ("pubsub", "stream", "control"):
        pairs, ours = point["pairs"][mode], point["modes"][mode]
        overhead = pairs["ttft_overhead_ms"]
        lines.append(
            f"{LABELS[mode]:>18}: TTFT overhead p50 {overhead['p50']:.2f} p99 "
            f"{overhead['p99']:.2f} ms, throughput kept "
            f"{pairs['stream_throughput_ratio']['p50']:.3f}, worker "
            f"{ours['cpu_us_per_token'].get('worker', 0):.1f} us/token"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.relay",
        description="The tiny model alone, printed in a few lines.",
    )
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--pin", action="store_true", help="llama-server alone on CPU 0")
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight")
    args = parser.parse_args(argv)
    print(asyncio.run(quick(args.rounds, args.pin, args.concurrency)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
