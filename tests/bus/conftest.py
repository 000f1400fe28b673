"""Bus fixtures: real worker processes on the session's Redis, a bus recorder that checks
every message the worker publishes against Orion's strict decoders, and a client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from orion_llamaccp.client import BusClient
from orion_llamaccp.devtools.random_gguf import write_random_llama
from tests.support.orion_contract import check_message
from tests.support.procs import free_port
from tests.support.workers import BusRecorder, WorkerProc


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 1,400 tokens/s on one thread here: long enough to act mid-generation."""
    return write_random_llama(
        tmp_path_factory.mktemp("models") / "slow.gguf", n_embd=256, n_layers=4, n_ff=512
    )


@pytest.fixture
def recorder(redis_url: str) -> Iterator[BusRecorder]:
    rec = BusRecorder(redis_url)
    yield rec
    rec.close()
    for published in rec.from_service():
        check_message(published.data)


SpawnWorker = Callable[..., WorkerProc]


@pytest.fixture
def spawn_worker(
    subprocess_env: dict, tmp_path: Path, redis_url: str, slow_model: Path, recorder: BusRecorder
) -> Iterator[SpawnWorker]:
    workers: list[WorkerProc] = []

    def spawn(
        name: str = "w1",
        *,
        slow: bool = False,
        parallel: int = 2,
        ctx: int = 8192,
        ready: bool = True,
        **env: str,
    ) -> WorkerProc:
        worker_env = {
            **subprocess_env,
            "LLAMACPP_PORT_OVERRIDE": str(free_port()),
            "LLAMACPP_PARALLEL_OVERRIDE": str(parallel),
            "LLAMACPP_CTX_SIZE_OVERRIDE": str(ctx),
            "HEARTBEAT_INTERVAL_SEC": "1",
            "ANNOUNCE_INTERVAL_SEC": "5",
            "ORION_LLAMACPP_DRAIN_TIMEOUT_SEC": "10",
            "ORION_LLAMACPP_HEALTH_INTERVAL_SEC": "0.5",
            **env,
        }
        if slow:
            worker_env["LLAMACPP_MODEL_PATH_OVERRIDE"] = str(slow_model)
        worker = WorkerProc(worker_env, name=name, log_dir=tmp_path, redis_url=redis_url)
        workers.append(worker.start())
        if ready:
            worker.wait_ready()
        return worker

    yield spawn
    for worker in workers:
        worker.close()


@pytest.fixture
async def bus(redis_url: str) -> AsyncIterator[BusClient]:
    async with BusClient(redis_url) as client:
        yield client
