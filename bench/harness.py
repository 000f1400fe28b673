"""What every benchmark needs: a private Redis, models, worker processes, CPU accounting.

Everything runs in one scratch directory and on free ports; nothing touches a Redis or a
llama-server that the benchmark did not start itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil
import redis.asyncio as aioredis

from orion_llamaccp.bus import keys
from orion_llamaccp.devtools.random_gguf import write_random_llama
from orion_llamaccp.engine.binary import find_binary
from orion_llamaccp.engine.lifeline import die_with_parent
from orion_llamaccp.settings import ENV_PREFIXES
from tests.support.procs import RedisServer, free_port

REPO = Path(__file__).resolve().parent.parent


def set_affinity(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` (``sched_setaffinity`` on a pid moves its main thread only)."""
    for thread in psutil.Process(pid).threads():
        os.sched_setaffinity(thread.id, cpus)


def pin_apart(alone: int | None, others: Iterable[int | None], cpu: int) -> None:
    """``alone``'s threads by themselves on ``cpu``, ``others`` on this process's other CPUs
    (call it before this process moves itself)."""
    cpus = os.sched_getaffinity(0)
    given = list(others)
    rest = [pid for pid in given if pid is not None]
    if len(cpus) < 2 or alone is None or len(rest) < len(given):
        raise RuntimeError("pinning needs two CPUs and every pid")
    set_affinity(alone, {cpu})
    for pid in rest:
        set_affinity(pid, cpus - {cpu})


def python_path(first: Path = REPO) -> str:
    """``first`` ahead of the inherited ``PYTHONPATH``: a bench child process imports this
    checkout and still finds what the GPU run installs beside it (bench/gpu/run.sh)."""
    return os.pathsep.join(p for p in (str(first), os.environ.get("PYTHONPATH")) if p)


CACHE = Path(os.environ.get("ORION_LLAMACPP_CACHE", "~/.cache/orion-llamaccp")).expanduser()
BUILD_DIR = Path(os.environ.get("ORION_LLAMACPP_BUILD_DIR", str(CACHE / "llama-server")))
MODELS_DIR = Path(os.environ.get("LLM_CACHE_DIR", str(CACHE / "models"))).expanduser()
DEMO_MODEL = MODELS_DIR / "gguf" / "gemma-3-270m-q4_k_m.gguf"
PROFILE = "bench"

# Our variables that must not leak from the shell into a worker under test.
_OURS = (*ENV_PREFIXES, "BENCH_")

REGISTRY = """\
profiles:
  {profile}:
    display_name: "Benchmark profile"
    task_type: chat
    backend: llamacpp
    model_id: bench-model
    gpu:
      device_ids: []
    llamacpp:
      model_root: "{root}"
      model_path: "{file}"
      host: 127.0.0.1
      port: {port}
      ctx_size: {ctx}
      parallel: {parallel}
      threads: {threads}
"""

SYNTHETIC_LAUNCHER = """\
#!/bin/sh
# The synthetic llama-server of bench/upstream.py, launched like the real binary.
PYTHONPATH="{repo}${{PYTHONPATH:+:$PYTHONPATH}}" exec "{python}" -m bench.upstream "$@"
"""


def llama_server_binary() -> Path:
    return find_binary(os.environ.get("LLAMA_SERVER_BIN"), BUILD_DIR)


class Workspace:
    """A scratch directory with a private Redis; ``close()`` removes both."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="orion-bench-"))
        self.redis_server = RedisServer(self.root / "redis").start()
        self.url = self.redis_server.url
        self._tiny: Path | None = None
        self._launcher: Path | None = None

    def tiny_model(self) -> Path:
        """The random-weight llama of the tests: 2 layers, n_embd 64, about 600 kB."""
        if self._tiny is None:
            self._tiny = write_random_llama(self.root / "models" / "tiny.gguf")
        return self._tiny

    def synthetic_launcher(self) -> Path:
        if self._launcher is None:
            path = self.root / "bin" / "llama-server-synthetic"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(SYNTHETIC_LAUNCHER.format(repo=REPO, python=sys.executable))
            path.chmod(0o755)
            self._launcher = path
        return self._launcher

    def redis(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(self.url)

    def redis_pid(self) -> int:
        assert self.redis_server.proc is not None
        return self.redis_server.proc.pid

    def close(self) -> None:
        self.redis_server.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class WorkerSpec:
    model: Path
    binary: Path
    parallel: int = 2
    ctx: int = 4096
    threads: int = 1
    coalesce_ms: float = 10.0
    env: dict[str, str] = field(default_factory=dict)
    command: tuple[str, ...] = ("-m", "orion_llamaccp", "run")


class Worker:
    """``python -m orion_llamaccp run`` as a child process, configured by environment."""

    def __init__(self, ws: Workspace, spec: WorkerSpec, name: str) -> None:
        self.ws = ws
        self.spec = spec
        self.name = name
        self.llama_port = free_port()
        self.dir = ws.root / f"worker-{name}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "worker.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.engine_pid: int | None = None

    def environ(self) -> dict[str, str]:
        spec = self.spec
        registry = self.dir / "profiles.yaml"
        registry.write_text(
            REGISTRY.format(
                profile=PROFILE,
                root=spec.model.parent,
                file=spec.model.name,
                port=self.llama_port,
                ctx=spec.ctx,
                parallel=spec.parallel,
                threads=spec.threads,
            )
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(_OURS)}
        env.update(
            {
                "LLM_PROFILE_NAME": PROFILE,
                "LLM_PROFILES_CONFIG_PATH": str(registry),
                "LLM_CACHE_DIR": str(self.dir / "cache"),
                "LLAMA_SERVER_BIN": str(spec.binary),
                "ORION_BUS_URL": self.ws.url,
                "HF_HUB_OFFLINE": "1",
                "INSTANCE_ID": self.name,
                "ORION_LLAMACPP_COALESCE_MS": str(spec.coalesce_ms),
                "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": python_path(),
                **spec.env,
            }
        )
        return env

    def start(self) -> Worker:
        env = self.environ()
        self._log = self.log_path.open("ab")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, *self.spec.command],
            env=env,
            cwd=self.dir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),  # and its llama-server with it
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def announcement(self, redis: aioredis.Redis) -> dict[str, Any] | None:
        raw = await redis.hget(keys.registry(PROFILE, self.name), "announcement")
        return orjson.loads(raw)["payload"] if raw else None

    async def wait_ready(self, redis: aioredis.Redis, timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"worker {self.name} exited {self.proc.returncode}:\n{self.log()}"
                )
            found = await self.announcement(redis)
            if found and found.get("state") == "ready":
                self.engine_pid = found.get("engine_pid")
                return found
            await asyncio.sleep(0.02)
        raise RuntimeError(f"worker {self.name} not ready after {timeout:.0f}s:\n{self.log()}")

    def log(self, tail: int = 4000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-tail:]

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        if self.engine_pid:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(self.engine_pid).wait(10)
        self._log.close()


class CpuMeter:
    """CPU seconds (user + system) that named processes spend between ``start`` and ``stop``."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items() if pid}
        self.before: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.wall = 0.0

    @staticmethod
    def _cpu(proc: psutil.Process) -> float:
        times = proc.cpu_times()
        return times.user + times.system

    def start(self) -> CpuMeter:
        self.before = {name: self._cpu(p) for name, p in self.procs.items()}
        self._t0 = time.monotonic()
        return self

    def stop(self) -> dict[str, float]:
        self.wall = time.monotonic() - self._t0
        self.seconds = {name: self._cpu(p) - self.before[name] for name, p in self.procs.items()}
        return self.seconds

    @staticmethod
    def split(proc: psutil.Process) -> tuple[float, float]:
        times = proc.cpu_times()
        return times.user, times.system

    def share(self) -> dict[str, float]:
        """Each process's CPU as a fraction of one core over the measured wall time."""
        return {name: round(s / self.wall, 3) for name, s in self.seconds.items()}


async def redis_counts(redis: aioredis.Redis) -> dict[str, int]:
    """Commands executed so far, in total and per command (script internals included), and
    ``_reads``: the reads Redis made from its clients' sockets, about one per client write."""
    info = await redis.info("commandstats")
    counts = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in info.items()}
    counts["_total"] = sum(counts.values())
    counts["_reads"] = int((await redis.info("stats"))["total_reads_processed"])
    return counts


def diff_counts(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
