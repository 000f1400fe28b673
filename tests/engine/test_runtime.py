"""Where the engine meets the model layer: the corrupt-model re-fetch and shutdown."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from orion_llamaccp.engine.command import LaunchSpec
from orion_llamaccp.engine.plan import build_plan
from orion_llamaccp.engine.runtime import make_supervisor, policy_from
from orion_llamaccp.engine.supervisor import EngineState, Supervisor
from orion_llamaccp.errors import EngineStartError
from orion_llamaccp.settings import Settings, load_settings
from tests.conftest import write_tiny_registry
from tests.engine.conftest import FAST
from tests.support.procs import free_port, wait_until_async


@pytest.fixture
def corrupt_tiny_profile(
    tmp_path: Path, tiny_model: Path, llama_server_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny profile selected through the environment, its model cut in half."""
    cache = tmp_path / "cache"
    cache.mkdir()
    good = tiny_model.read_bytes()
    (cache / "tiny.gguf").write_bytes(good[: len(good) // 2])
    registry = write_tiny_registry(tmp_path / "profiles.yaml", port=free_port())
    for name, value in {
        "LLM_PROFILE_NAME": "tiny",
        "LLM_PROFILES_CONFIG_PATH": str(registry),
        "LLM_CACHE_DIR": str(cache),
        "LLAMA_SERVER_BIN": str(llama_server_bin),
        "HF_HUB_OFFLINE": "1",
    }.items():
        monkeypatch.setenv(name, value)


async def test_stop_interrupts_the_corrupt_model_refetch_stand_in(
    corrupt_tiny_profile: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real llama-server finds the model truncated; the re-fetch is a stand-in that
    runs until told to stop (as a long hash or download would): a stop must not wait."""
    entered, cancelled, left = threading.Event(), threading.Event(), threading.Event()
    release = threading.Event()  # ends the thread at teardown if nothing else does

    def refetch(*_: Any, cancel: threading.Event | None = None, **__: Any) -> None:
        entered.set()
        while not release.wait(0.05):
            if cancel is not None and cancel.is_set():
                cancelled.set()
                break
        left.set()

    monkeypatch.setattr("orion_llamaccp.model.fetch.refetch_corrupt", refetch)
    supervisor = make_supervisor(build_plan(load_settings()), policy=FAST)
    start = asyncio.create_task(supervisor.start())
    try:
        await wait_until_async(entered.is_set, timeout=30, what="re-fetch started")
        await asyncio.wait_for(supervisor.stop(), timeout=30)
        assert supervisor.state is EngineState.STOPPED
        with pytest.raises(EngineStartError):
            await start
        assert await asyncio.to_thread(left.wait, 30)
        assert cancelled.is_set()
    finally:
        release.set()


def test_an_answer_may_wait_as_long_as_the_request_timeout_for_its_first_byte(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client's read timeout was a fixed 600 s: with the request timeout raised for a
    long prompt on a slow card, the first token's wait was cut at 600 s all the same."""
    monkeypatch.setenv("ORION_LLAMACPP_REQUEST_TIMEOUT_SEC", "3600")
    policy = policy_from(Settings())
    assert policy.read_timeout > 3600
    launch = LaunchSpec(argv=("llama-server",), env={}, host="127.0.0.1", port=1)
    assert Supervisor(launch, environ={}, policy=policy).client.read_timeout > 3600


async def test_the_fetch_thread_hands_back_results_and_every_error() -> None:
    """The model is fetched in a daemon thread of its own (a stop must not wait for it):
    what it returns or raises reaches the coroutine, a ``StopIteration`` too, which a
    future cannot hold and which left the worker ``downloading`` for good."""
    from orion_llamaccp.engine.runtime import _in_daemon_thread

    def stop_iteration() -> None:
        raise StopIteration

    def fails() -> None:
        raise ValueError("no")

    assert await _in_daemon_thread(lambda a, b=0: a + b, 1, b=2) == 3
    with pytest.raises(ValueError, match="no"):
        await _in_daemon_thread(fails)
    with pytest.raises(RuntimeError, match="StopIteration"):
        await asyncio.wait_for(_in_daemon_thread(stop_iteration), 10)


async def test_a_fetch_cancelled_by_a_stop_raises_its_error_to_no_one_s_log() -> None:
    """SIGTERM during a download waiting out a retry's backoff (the Hub unreachable): the
    cancel ends the wait, the thread raises its "download ... cancelled" into a future that
    nobody awaits any more, and asyncio logged it at ERROR, as "Future exception was
    never retrieved" and a 40-line traceback, into every such stop's log."""
    import gc
    from types import SimpleNamespace

    from orion_llamaccp.engine.runtime import _cancellable
    from orion_llamaccp.errors import DownloadError

    loop = asyncio.get_running_loop()
    told: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: told.append(context))
    entered, left = threading.Event(), threading.Event()

    def fetch(*_: Any, cancel: threading.Event, **__: Any) -> None:
        entered.set()
        try:
            cancel.wait(10)
            raise DownloadError("download of org/tiny/tiny.gguf cancelled")
        finally:
            left.set()

    plan = SimpleNamespace(profile=None, settings=None)
    task = asyncio.create_task(_cancellable(fetch, plan, None))  # type: ignore[arg-type]
    assert await asyncio.to_thread(entered.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(left.wait, 10)
    for _ in range(20):  # the thread's outcome reaches the loop a step or two later
        await asyncio.sleep(0.01)
    del task
    gc.collect()
    await asyncio.sleep(0.01)
    assert not told, told


REFETCHED_PROFILE = """\
profiles:
  tiny:
    backend: llamacpp
    model_id: tiny-random-llama
    llamacpp:
      model_root: "${{LLM_CACHE_DIR}}"
      hf_repo_id: org/tiny
      hf_filename: tiny.gguf
      host: 127.0.0.1
      port: {port}
      ctx_size: 2048
      threads: 1
"""


async def test_a_refetched_model_is_told_to_whoever_shows_the_model(
    tmp_path: Path, tiny_model: Path, llama_server_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real llama-server finds the model cut in half; the re-fetch downloads it again
    from a local Hub. The worker showed the file and sha256 from before it, and the
    re-fetch's last progress, in every heartbeat after it: it is told the new model."""
    from huggingface_hub import constants as hf_constants

    from tests.model.hub_server import LocalHub

    # Read at its import, which a test before may have made offline (this file's first
    # ones do): run on its own, this file failed here.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)

    good = await asyncio.to_thread(tiny_model.read_bytes)
    cache = tmp_path / "cache"
    cache.mkdir()
    await asyncio.to_thread((cache / "tiny.gguf").write_bytes, good[: len(good) // 2])
    registry = tmp_path / "profiles.yaml"
    await asyncio.to_thread(registry.write_text, REFETCHED_PROFILE.format(port=free_port()))
    told: list[Any] = []
    with LocalHub() as hub:
        sha = hub.add("org/tiny", "tiny.gguf", good)
        for name, value in {
            "LLM_PROFILE_NAME": "tiny",
            "LLM_PROFILES_CONFIG_PATH": str(registry),
            "LLM_CACHE_DIR": str(cache),
            "LLAMA_SERVER_BIN": str(llama_server_bin),
            "HF_HUB_OFFLINE": "0",
            "HF_ENDPOINT": hub.endpoint,
        }.items():
            monkeypatch.setenv(name, value)
        supervisor = make_supervisor(
            build_plan(load_settings()), policy=FAST, refetched=told.append
        )
        try:
            await supervisor.start()
            assert supervisor.state is EngineState.READY
        finally:
            await supervisor.stop()
    assert [(r.sha256, r.size) for r in told] == [(sha, len(good))]
