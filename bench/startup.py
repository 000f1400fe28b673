"""Start-up: how soon a worker listens, and how soon it says ``ready`` once llama-server is.

Each round starts a real worker serving the tiny model with the real llama-server and
stamps (``time.monotonic()``, one clock for all processes on Linux):

- ``spawned``: just before the worker process is created;
- ``subscribed``: ``PUBSUB NUMSUB`` of the intake channel turns 1 (polled every ~0.5 ms);
- ``health 200``: llama-server's own ``/health`` first answers 200 (polled every ~0.5 ms
  on a keep-alive connection, beside the supervisor's own polling);
- ``ready``: the worker's first ``llm.profile.announce.v1`` with ``state: ready`` arrives.

Interpreter start and the import of the worker's modules are timed too, for scale: those
the worker needs before it subscribes (``worker.startup``), and all of them.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import orjson

from bench.callers import _host_port, _PatternSubscriber
from bench.harness import PROFILE, REPO, Worker, WorkerSpec, Workspace, llama_server_binary
from bench.report import summary, table, target, targets_table, write_result
from orion_llamaccp.bus import keys

ANNOUNCE = "orion:llm:profile:announce"


@dataclass(frozen=True)
class StartupConfig:
    rounds: int = 8
    import_runs: int = 5


class _Health(asyncio.Protocol):
    """GET /health on one keep-alive connection; ``status`` of the last answer."""

    def __init__(self) -> None:
        self.buffer = b""
        self.answer: asyncio.Future[int] | None = None
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.answer is not None and not self.answer.done():
            self.answer.set_result(0)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = self.buffer[:head_end]
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(self.buffer) < head_end + 4 + length:
            return
        self.buffer = self.buffer[head_end + 4 + length :]
        if self.answer is not None and not self.answer.done():
            self.answer.set_result(int(head.split(b" ", 2)[1]))


async def _health_200(port: int, deadline: float) -> float | None:
    """The first moment llama-server's /health answers 200."""
    loop = asyncio.get_running_loop()
    proto: _Health | None = None
    while time.monotonic() < deadline:
        if proto is None or proto.lost:
            try:
                _, proto = await loop.create_connection(_Health, "127.0.0.1", port)
            except OSError:
                proto = None
                await asyncio.sleep(0.0005)
                continue
        assert proto.transport is not None
        proto.answer = loop.create_future()
        proto.transport.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status = await proto.answer
        if status == 200:
            now = time.monotonic()
            proto.transport.close()
            return now
        await asyncio.sleep(0.0005)
    return None


async def _subscribed(ws: Workspace, channel: str, deadline: float) -> float | None:
    redis = ws.redis()
    try:
        while time.monotonic() < deadline:
            counts = await redis.pubsub_numsub(channel)
            if counts and counts[0][1] >= 1:
                return time.monotonic()
            await asyncio.sleep(0.0005)
    finally:
        await redis.aclose()
    return None


async def one_start(ws: Workspace, index: int) -> dict[str, float | None]:
    spec = WorkerSpec(model=ws.tiny_model(), binary=llama_server_binary(), parallel=2)
    name = f"startup-{index}"
    worker = Worker(ws, spec, name)
    ready: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    def on_announce(channel: bytes, data: bytes, now: float) -> None:
        payload = orjson.loads(data).get("payload") or {}
        ready_now = payload.get("instance") == name and payload.get("state") == "ready"
        if ready_now and not ready.done():
            ready.set_result(time.monotonic())

    host, port = _host_port(ws.url)
    loop = asyncio.get_running_loop()
    _, sub = await loop.create_connection(lambda: _PatternSubscriber(on_announce), host, port)
    assert sub.transport is not None
    pattern = ANNOUNCE.encode()
    sub.transport.write(b"*2\r\n$10\r\nPSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(pattern), pattern))
    await sub.subscribed
    try:
        spawned = time.monotonic()
        worker.start()
        deadline = spawned + 60
        subscribed, health = await asyncio.gather(
            _subscribed(ws, keys.intake_channel(PROFILE), deadline),
            _health_200(worker.llama_port, deadline),
        )
        ready_at = await asyncio.wait_for(ready, 60)
    finally:
        sub.transport.close()
        worker.stop()
    return {
        "spawn_to_subscribed_ms": _ms(subscribed, spawned),
        "health_200_to_ready_ms": _ms(ready_at, health),
        "spawn_to_health_200_ms": _ms(health, spawned),
        "spawn_to_ready_ms": _ms(ready_at, spawned),
    }


def _ms(later: float | None, earlier: float | None) -> float | None:
    return None if later is None or earlier is None else (later - earlier) * 1000


def _time_python(args: list[str], runs: int) -> dict[str, Any]:
    spent = []
    for _ in range(runs):
        started = time.monotonic()
        subprocess.run([sys.executable, *args], cwd=REPO, check=True, capture_output=True)
        spent.append((time.monotonic() - started) * 1000)
    return summary(spent, 1)


async def run(ws: Workspace, cfg: StartupConfig | None = None) -> dict[str, Any]:
    cfg = cfg or StartupConfig()
    rounds = [await one_start(ws, i) for i in range(cfg.rounds)]
    results: dict[str, Any] = {
        key: summary((r[key] for r in rounds if r[key] is not None), 1) for key in rounds[0]
    }
    results["python_start_ms"] = _time_python(["-c", "pass"], cfg.import_runs)
    results["import_subscribe_ms"] = _time_python(
        ["-c", "import orion_llamaccp.cli, orion_llamaccp.worker.startup"], cfg.import_runs
    )
    results["import_worker_ms"] = _time_python(
        ["-c", "import orion_llamaccp.cli, orion_llamaccp.worker.service"], cfg.import_runs
    )
    results["rounds"] = rounds
    return _finish(cfg, results)


def _finish(cfg: StartupConfig, results: dict[str, Any]) -> dict[str, Any]:
    labels = {
        "spawn_to_subscribed_ms": "worker spawned -> intake subscribed",
        "health_200_to_ready_ms": "llama-server /health 200 -> `ready` announced",
        "spawn_to_health_200_ms": "worker spawned -> llama-server /health 200",
        "spawn_to_ready_ms": "worker spawned -> `ready` announced",
        "python_start_ms": "for scale: `python -c pass`",
        "import_subscribe_ms": "for scale: python + import of what subscribing needs",
        "import_worker_ms": "for scale: python + import of the worker's modules",
    }
    rows = [
        (label, results[key]["n"], results[key]["p50"], results[key]["p90"], results[key]["max"])
        for key, label in labels.items()
    ]
    text = table(
        f"4. Start-up (ms), tiny model, {cfg.rounds} starts",
        ["interval", "n", "p50", "p90", "max"],
        rows,
    )
    targets = [
        target(
            "worker start -> subscribed p50 ms",
            results["spawn_to_subscribed_ms"]["p50"],
            300,
            higher_is_better=False,
        ),
        target(
            "/health 200 -> ready announcement p50 ms",
            results["health_200_to_ready_ms"]["p50"],
            50,
            higher_is_better=False,
        ),
    ]
    text += "\n" + targets_table(targets)
    settings = {
        "rounds": cfg.rounds,
        "model": "random llama (bench/harness), real llama-server",
        "polling": "PUBSUB NUMSUB and GET /health every ~0.5 ms",
    }
    path = write_result("startup", settings, results, targets=targets)
    return {"text": text, "path": str(path), "results": results, "targets": targets}
