"""Engine fixtures: launch specs for the real llama-server serving the tiny model."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from orion_llamaccp.engine.binary import probe
from orion_llamaccp.engine.command import LaunchSpec, build_launch
from orion_llamaccp.engine.supervisor import Supervisor, SupervisorPolicy
from orion_llamaccp.model.paths import plan_files
from orion_llamaccp.profiles.registry import parse_profile
from orion_llamaccp.settings import Overrides
from tests.support.procs import free_port

PRELUDE = Path(__file__).resolve().parent.parent / "support" / "llama_prelude.sh"

FAST = SupervisorPolicy(
    silence_timeout=20.0,
    health_interval=0.2,
    health_timeout=0.5,
    health_failures=2,
    backoff_initial=0.05,
    backoff_max=0.2,
    crash_limit=3,
    crash_window=60.0,
    stop_grace=5.0,
)


@pytest.fixture
def model_dir(tmp_path: Path, tiny_model: Path) -> Path:
    shutil.copy(tiny_model, tmp_path / "tiny.gguf")
    return tmp_path


LaunchFactory = Callable[..., LaunchSpec]


@pytest.fixture
def make_launch(llama_server_bin: Path, model_dir: Path) -> LaunchFactory:
    def factory(
        *,
        binary: Path | None = None,
        port: int | None = None,
        unix_socket: str | None = None,
        gpus: list[int] | None = None,
        probed: bool = False,
        **knobs: Any,
    ) -> LaunchSpec:
        """``probed``: built against the binary's ``--help`` (its flags checked, and what
        depends on its build decided), as the worker builds it."""
        llamacpp = {
            "model_path": "tiny.gguf",
            "host": "127.0.0.1",
            "port": port or free_port(),
            "ctx_size": 2048,
            "parallel": 2,
            "threads": 1,
            **knobs,
        }
        gpu = {"gpu": {"device_ids": gpus}} if gpus is not None else {}
        profile = parse_profile("tiny", {"backend": "llamacpp", "llamacpp": llamacpp, **gpu})
        files = plan_files(profile, None, {"LLM_CACHE_DIR": str(model_dir)})
        return build_launch(
            profile,
            Overrides(),
            files,
            binary=probe(binary or llama_server_bin) if unix_socket or probed else None,
            binary_path=str(binary or llama_server_bin),
            environ={},
            unix_socket=(lambda _host, _port: unix_socket) if unix_socket else None,
        )

    return factory


@pytest.fixture
def prelude_env(llama_server_bin: Path) -> Callable[..., dict[str, str]]:
    def env(**switches: str) -> dict[str, str]:
        return {**os.environ, "REAL_LLAMA_SERVER": str(llama_server_bin), **switches}

    return env


@pytest.fixture
async def ready_engine(make_launch: LaunchFactory) -> AsyncIterator[Supervisor]:
    supervisor = Supervisor(make_launch(), environ=dict(os.environ), policy=FAST)
    await supervisor.start()
    yield supervisor
    await supervisor.stop()


@pytest.fixture
async def metered_engine(make_launch: LaunchFactory) -> AsyncIterator[Supervisor]:
    """``ready_engine`` serving its own counters (``/metrics``, see ``EngineProbe``), with
    2,048 tokens of context per slot: room for a generation long enough that one which was
    not cut off stands out in them."""
    launch = make_launch(metrics=True, ctx_size=4096)
    supervisor = Supervisor(launch, environ=dict(os.environ), policy=FAST)
    await supervisor.start()
    yield supervisor
    await supervisor.stop()


async def assert_answers(supervisor: Supervisor, max_tokens: int = 2) -> None:
    """The engine serves a short streamed chat to its end (usage on the last event)."""
    async with supervisor.client.chat_stream(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    ) as stream:
        assert [e async for e in stream][-1].usage is not None
