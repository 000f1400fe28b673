"""The fault suite's harness: a Redis of each scenario's own, workers on it, and a ledger.

Every scenario counts every request it sends and what came back for it; the counts are
printed at the end of the run (``pytest_terminal_summary``) so a reader sees the numbers,
and each scenario asserts ``answered twice == 0`` and ``lost == 0``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from orion_llamaccp.client import BusClient
from tests.conftest import write_tiny_registry
from tests.support.orion_contract import check_message
from tests.support.procs import RedisServer, free_port
from tests.support.workers import BusRecorder, WorkerProc, close_all

REPORTS: list[str] = []


# The end of each worker's log in a scenario that failed: printed last, where a CI excerpt
# that keeps the end of the output still shows it (a flake on CI is otherwise a guess).
FAILED_LOGS: list[str] = []
LOG_TAIL_LINES = 40
STACK_LINES = 400  # the threads' stacks, then the asyncio tasks', as many as fit
STACKS_WAIT_SEC = 1.0  # for a loop that runs to log its tasks


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORTS:
        terminalreporter.section("fault suite: every request counted")
        for line in REPORTS:
            terminalreporter.write_line(line)
    if FAILED_LOGS:
        terminalreporter.section("fault suite: the workers' logs of failed scenarios")
        for line in FAILED_LOGS:
            terminalreporter.write_line(line)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for worker in getattr(item, "fault_workers", []):
            size, stacks = stacks_of(worker)
            FAILED_LOGS.append(f"--- {item.name}: {worker.log_path.name}, last lines at INFO+")
            FAILED_LOGS.extend(log_tail(worker.log_path, before=size))
            if stacks:
                FAILED_LOGS.append(f"--- {item.name}: {worker.name}'s stacks, as it failed")
                FAILED_LOGS.extend(stacks[:STACK_LINES])


def log_tail(path: Path, *, before: int | None = None) -> list[str]:
    """The last lines at INFO and above, of the log's first ``before`` bytes if given."""
    with contextlib.suppress(OSError):
        return _above_debug(path.read_bytes()[:before])[-LOG_TAIL_LINES:]
    return [f"(no log at {path})"]


def _above_debug(log: bytes) -> list[str]:
    """A worker log's lines at INFO and above (and those without a level), cut to 240."""
    lines = log.decode(errors="replace").splitlines()
    return [line[:240] for line in lines if " DEBUG " not in line[:40]]


def stacks_of(worker: WorkerProc) -> tuple[int | None, list[str]]:
    """Where a worker still running stands as its scenario failed: every thread's stack
    (SIGUSR2, written by the interpreter, even where the event loop is stuck) and, where
    the loop runs, its asyncio tasks (SIGUSR1). A request left unanswered in a scenario
    that passed everywhere else (a CI run under load) leaves a log that stops mid-way,
    and no clue whether the worker waited on something or was stuck. Returns the log's
    size before the signals, and the lines they added."""
    if worker.proc is None or worker.proc.poll() is not None:
        return None, []
    with contextlib.suppress(OSError):
        size = worker.log_path.stat().st_size
        worker.signal(signal.SIGUSR2)
        worker.signal(signal.SIGUSR1)
        time.sleep(STACKS_WAIT_SEC)
        return size, _above_debug(worker.log_path.read_bytes()[size:])
    return None, []


@dataclass
class Ledger:
    """Requests sent in a scenario, and how many answers each one got."""

    name: str
    recorder: BusRecorder
    sent: list[dict] = field(default_factory=list)

    def add(self, envelope: dict) -> dict:
        self.sent.append(envelope)
        return envelope

    def answers(self, envelope: dict) -> list[dict]:
        return [m.message for m in self.recorder.on(envelope["reply_to"])]

    def counts(self) -> dict[str, int]:
        tally = [len(self.answers(e)) for e in self.sent]
        return {
            "sent": len(self.sent),
            "answered once": tally.count(1),
            "answered twice": sum(1 for n in tally if n > 1),
            "lost": tally.count(0),
        }

    async def settle(self, timeout: float = 60.0, grace: float = 1.0) -> dict[str, int]:
        """Wait until everything is answered (or the deadline), then a grace period in which
        a second answer would show up; record and return the counts."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.counts()["lost"]:
            await asyncio.sleep(0.05)
        await asyncio.sleep(grace)
        counts = self.counts()
        REPORTS.append(f"{self.name:<58} " + "  ".join(f"{k}={v}" for k, v in counts.items()))
        return counts


@dataclass
class Fault:
    redis: RedisServer
    recorder: BusRecorder
    client: BusClient
    ledger: Ledger
    spawn: Callable[..., WorkerProc]
    raw: aioredis.Redis


@pytest.fixture
def fault_redis_args() -> tuple[str, ...]:
    return ()


@pytest.fixture
def fault_appendonly() -> bool:
    return False


@pytest.fixture
async def fault(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    subprocess_env: dict,
    tiny_model: Path,
    slow_model: Path,
    fault_appendonly: bool,
    fault_redis_args: tuple[str, ...],
) -> AsyncIterator[Fault]:
    server = RedisServer(
        tmp_path / "redis", appendonly=fault_appendonly, extra_args=fault_redis_args
    ).start()
    recorder = BusRecorder(server.url)
    workers: list[WorkerProc] = []
    registry = write_tiny_registry(
        tmp_path / "fault-profiles.yaml",
        port=free_port(),
        extra="      n_predict: 64\n      metrics: true",  # metrics: for EngineProbe
    )

    def spawn(
        name: str, *, slow: bool = False, parallel: int = 2, ready: bool = True, **env: str
    ) -> WorkerProc:
        worker_env = {
            **subprocess_env,
            "ORION_BUS_URL": server.url,
            "LLM_PROFILES_CONFIG_PATH": str(registry),
            "LLAMACPP_PORT_OVERRIDE": str(free_port()),
            "LLAMACPP_PARALLEL_OVERRIDE": str(parallel),
            "LLAMACPP_CTX_SIZE_OVERRIDE": "16384",
            "HEARTBEAT_INTERVAL_SEC": "1",
            "ANNOUNCE_INTERVAL_SEC": "5",
            "ORION_LLAMACPP_HEALTH_INTERVAL_SEC": "0.5",
            "ORION_LLAMACPP_HEALTH_TIMEOUT_SEC": "1",
            # Watched in every fault test, so a false alarm anywhere would show; above the
            # /health detection of a SIGSTOP (3 x (0.5 + 1) s), which those tests check.
            "ORION_LLAMACPP_PROGRESS_TIMEOUT_SEC": "10",
            "ORION_LLAMACPP_REDIS_SOCKET_TIMEOUT_SEC": "2",
            "ORION_LLAMACPP_PUBSUB_PING_SEC": "0.5",
            **({"LLAMACPP_MODEL_PATH_OVERRIDE": str(slow_model)} if slow else {}),
            **env,
        }
        worker = WorkerProc(worker_env, name=name, log_dir=tmp_path, redis_url=server.url)
        workers.append(worker.start())
        if ready:
            worker.wait_ready()
        return worker

    request.node.fault_workers = workers  # for their logs, should the scenario fail
    raw = aioredis.Redis.from_url(server.url)
    async with BusClient(server.url) as client:
        yield Fault(server, recorder, client, Ledger(request.node.name, recorder), spawn, raw)
    try:
        close_all(workers)
    finally:
        recorder.close()
        await raw.aclose()
        server.stop()
    # Retries, dead letters, draining and failed states are what these scenarios publish:
    # each held to the contract as strictly as the plain tests' messages (``recorder``).
    for published in recorder.from_service():
        check_message(published.data)


async def assert_still_serving(fault: Fault) -> None:
    """A fresh request is answered: the worker came through whatever the test did to it."""
    result = await fault.client.chat(
        [{"role": "user", "content": "still there?"}],
        profile="tiny",
        options={"max_tokens": 2},
        timeout=30,
    )
    assert result.ok, result.payload


def chunks_of(fault: Fault, envelope: dict) -> list[dict]:
    """The chunk payloads published for ``envelope``, in the order the recorder saw them."""
    return [m.message["payload"] for m in fault.recorder.on(envelope["reply_to"] + ":chunks")]


def assert_chunks_whole(fault: Fault, envelope: dict, answer: dict) -> None:
    """No chunk twice, and the chunks of the answer's attempt gapless from 0 and its text."""
    chunks = chunks_of(fault, envelope)
    keys = [(c["attempt"], c["seq"]) for c in chunks]
    assert len(keys) == len(set(keys)), f"a chunk delivered twice: {keys}"
    last = [c for c in chunks if c["attempt"] == answer["meta"]["attempt"]]
    assert [c["seq"] for c in last] == list(range(len(last)))
    assert "".join(c["delta"] for c in last) == answer["content"]


def assert_exactly_once(counts: dict[str, int]) -> None:
    assert counts["answered twice"] == 0, counts
    assert counts["lost"] == 0, counts
    assert counts["answered once"] == counts["sent"], counts


@pytest.fixture
def hi() -> Iterator[list[dict[str, str]]]:
    yield [{"role": "user", "content": "hello there"}]
