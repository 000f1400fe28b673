"""Footprint: the worker process's resident memory, idle and relaying, without llama-server.

The worker runs with the synthetic upstream (a process of its own, not counted). RSS and
USS (memory no other process shares) of the worker process alone, sampled every 50 ms:
idle after ``ready``, during a capacity-style load (64 requests in flight, coalescing on),
and idle again after it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import psutil

from bench.callers import BusCaller, Outcome
from bench.capacity import _lane
from bench.harness import PROFILE, Worker, WorkerSpec, Workspace
from bench.report import table, target, targets_table, write_result

MB = 1024 * 1024


@dataclass(frozen=True)
class FootprintConfig:
    concurrency: int = 64
    tokens: int = 256
    load_s: float = 5.0
    idle_s: float = 2.0


class Sampler:
    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.rss: list[float] = []
        self.uss: list[float] = []

    def sample(self) -> None:
        info = self.proc.memory_full_info()
        self.rss.append(info.rss / MB)
        self.uss.append(info.uss / MB)

    async def every(self, seconds: float, until: asyncio.Event) -> None:
        while not until.is_set():
            self.sample()
            await asyncio.sleep(seconds)

    def figures(self) -> dict[str, float]:
        return {
            "rss_mb_max": round(max(self.rss), 1),
            "rss_mb_last": round(self.rss[-1], 1),
            "uss_mb_max": round(max(self.uss), 1),
            "samples": len(self.rss),
        }


async def _sample_for(sampler: Sampler, seconds: float) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(sampler.every(0.05, stop))
    await asyncio.sleep(seconds)
    stop.set()
    await task


async def run(ws: Workspace, cfg: FootprintConfig | None = None) -> dict[str, Any]:
    cfg = cfg or FootprintConfig()
    spec = WorkerSpec(
        model=ws.tiny_model(), binary=ws.synthetic_launcher(), parallel=cfg.concurrency, ctx=65536
    )
    worker = Worker(ws, spec, "footprint").start()
    redis = ws.redis()
    results: dict[str, Any] = {}
    try:
        await worker.wait_ready(redis)
        idle = Sampler(worker.pid)
        await _sample_for(idle, cfg.idle_s)
        results["idle"] = idle.figures()
        bus = await BusCaller(ws.url, PROFILE).start()
        loaded = Sampler(worker.pid)
        stop = asyncio.Event()
        sampling = asyncio.create_task(loaded.every(0.05, stop))
        outcomes: list[Outcome] = []
        stop_at = time.perf_counter() + cfg.load_s
        await asyncio.gather(
            *(_lane(bus, cfg.tokens, stop_at, outcomes) for _ in range(cfg.concurrency))
        )
        stop.set()
        await sampling
        await bus.close()
        results["load"] = {
            **loaded.figures(),
            "requests": len(outcomes),
            "errors": sum(o.error is not None for o in outcomes),
        }
        after = Sampler(worker.pid)
        await _sample_for(after, cfg.idle_s)
        results["after"] = after.figures()
        results["engine_process"] = "synthetic upstream, a separate process: not counted"
    finally:
        await redis.aclose()
        worker.stop()
    return _finish(cfg, results)


def _finish(cfg: FootprintConfig, results: dict[str, Any]) -> dict[str, Any]:
    rows = [
        ("idle, after ready", results["idle"]["rss_mb_max"], results["idle"]["uss_mb_max"]),
        (
            f"relaying, {cfg.concurrency} requests in flight (max)",
            results["load"]["rss_mb_max"],
            results["load"]["uss_mb_max"],
        ),
        (
            "idle again, after the load",
            results["after"]["rss_mb_last"],
            results["after"]["uss_mb_max"],
        ),
    ]
    text = table(
        "5. Footprint: worker process resident memory (MB), without llama-server",
        ["state", "RSS MB", "USS MB"],
        rows,
    )
    targets = [
        target("worker RSS idle MB", results["idle"]["rss_mb_max"], 80, higher_is_better=False),
        target(
            "worker RSS under load MB", results["load"]["rss_mb_max"], 80, higher_is_better=False
        ),
    ]
    text += "\n" + targets_table(targets)
    settings = {
        "concurrency": cfg.concurrency,
        "tokens_per_request": cfg.tokens,
        "load_s": cfg.load_s,
        "sampling": "psutil memory_full_info every 50 ms",
    }
    path = write_result("footprint", settings, results, targets=targets)
    return {"text": text, "path": str(path), "results": results, "targets": targets}
