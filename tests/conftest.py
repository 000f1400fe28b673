"""Shared fixtures: one real Redis per session (flushed per test), the built llama-server,
a tiny random-weight GGUF, and a registry file with a profile that serves it."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis

from orion_llamaccp.client import BusClient
from orion_llamaccp.devtools.random_gguf import write_random_llama
from orion_llamaccp.engine.binary import find_binary
from orion_llamaccp.errors import BinaryNotFound
from orion_llamaccp.settings import ENV_FILE_VARIABLE, ENV_PREFIXES, Settings
from tests.support.orion_contract import check_message
from tests.support.procs import RedisServer, free_port
from tests.support.workers import BusRecorder, WorkerProc, close_all

REPO = Path(__file__).resolve().parent.parent
# Variables of ours that must not leak from the developer's shell into a test.
_OURS = ENV_PREFIXES


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(_OURS):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(ENV_FILE_VARIABLE, "")  # a developer's .env in the repo stays out
    monkeypatch.chdir(REPO)


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    try:
        return find_binary(os.environ.get("LLAMA_SERVER_BIN"), Settings().build_path)
    except BinaryNotFound as exc:
        pytest.fail(f"{exc} (make test builds it)")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_llama(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return _flushed(redis_server)


def _flushed(server: RedisServer) -> str:
    client = redis.Redis.from_url(server.url)
    client.flushall()
    client.close()
    return server.url


# Redis 6.2, the oldest the worker supports (README), built by `make redis-oldest`.
OLDEST_REDIS = Path(
    os.environ.get("ORION_TEST_REDIS_OLDEST")
    or Path.home() / ".cache/orion-llamaccp/redis-6.2/redis-server"
)


@pytest.fixture(scope="session")
def oldest_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if not OLDEST_REDIS.is_file():
        pytest.fail(f"no Redis 6.2 at {OLDEST_REDIS} (make test builds it: make redis-oldest)")
    workdir = tmp_path_factory.mktemp("redis-6.2")
    server = RedisServer(workdir, binary=str(OLDEST_REDIS)).start()
    client = redis.Redis.from_url(server.url)
    version = client.info("server")["redis_version"]
    client.close()
    assert version.startswith("6.2."), version
    yield server
    server.stop()


@pytest.fixture
def oldest_redis_url(oldest_redis_server: RedisServer) -> str:
    return _flushed(oldest_redis_server)


TINY_PROFILE = """\
profiles:
  tiny:
    display_name: "Tiny random llama (tests)"
    task_type: chat
    backend: llamacpp
    model_id: tiny-random-llama
    gpu:
      device_ids: []
    llamacpp:
      model_root: "${{LLM_CACHE_DIR}}"
      model_path: tiny.gguf
      host: 127.0.0.1
      port: {port}
      ctx_size: {ctx}
      parallel: {parallel}
      threads: 1
{extra}
  other-backend:
    backend: vllm
    model_id: some/model
"""


def write_tiny_registry(
    path: Path, *, port: int, ctx: int = 2048, parallel: int = 2, extra: str = ""
) -> Path:
    path.write_text(TINY_PROFILE.format(port=port, ctx=ctx, parallel=parallel, extra=extra))
    return path


@pytest.fixture
def tiny_env(tmp_path: Path, tiny_model: Path, llama_server_bin: Path, redis_url: str) -> dict:
    """Environment variables that select the tiny profile on a free port."""
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(tiny_model, cache / "tiny.gguf")
    registry = write_tiny_registry(tmp_path / "profiles.yaml", port=free_port())
    return {
        "LLM_PROFILE_NAME": "tiny",
        "LLM_PROFILES_CONFIG_PATH": str(registry),
        "LLM_CACHE_DIR": str(cache),
        "LLAMA_SERVER_BIN": str(llama_server_bin),
        "ORION_BUS_URL": redis_url,
        "HF_HUB_OFFLINE": "1",
    }


@pytest.fixture
def subprocess_env(tiny_env: dict) -> dict:
    """A full environment for running the CLI in a child process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OURS)}
    env.update(tiny_env)
    env[ENV_FILE_VARIABLE] = ""
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 1,400 tokens/s on one thread here: long enough to act mid-generation."""
    return write_random_llama(
        tmp_path_factory.mktemp("models") / "slow.gguf",
        n_embd=256,
        n_layers=4,
        n_ff=512,
        n_ctx=16384,
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
        metrics: bool = False,
        **env: str,
    ) -> WorkerProc:
        """``metrics``: its llama-server serves ``/metrics`` (``EngineProbe``), for a test
        that checks what llama-server itself generated."""
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
        if metrics:
            registry = write_tiny_registry(
                tmp_path / f"profiles-{name}.yaml", port=free_port(), extra="      metrics: true"
            )
            worker_env["LLM_PROFILES_CONFIG_PATH"] = str(registry)
        worker = WorkerProc(worker_env, name=name, log_dir=tmp_path, redis_url=redis_url)
        workers.append(worker.start())
        if ready:
            worker.wait_ready()
        return worker

    yield spawn
    close_all(workers)


@pytest.fixture
async def bus(redis_url: str) -> AsyncIterator[BusClient]:
    async with BusClient(redis_url) as client:
        yield client
