"""The supervisor against the real llama-server: start, restart, fail, diagnose, stop.

Slow and hung loaders are imitated by a shell prelude that runs before the real binary
(``tests/support/llama_prelude.sh``); everything after the prelude is real llama-server.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import pytest

from orion_llamaccp.engine.diagnostics import Cause
from orion_llamaccp.engine.supervisor import EngineEvent, EngineState, Supervisor
from orion_llamaccp.errors import EngineStartError
from tests.engine.conftest import FAST, PRELUDE, LaunchFactory
from tests.support.procs import pid_alive, wait_until_async


def record(supervisor: Supervisor) -> list[EngineEvent]:
    events: list[EngineEvent] = []
    supervisor.add_listener(events.append)
    return events


async def test_ready_reached_then_stopped_cleanly(make_launch: LaunchFactory) -> None:
    supervisor = Supervisor(make_launch(), environ=dict(os.environ), policy=FAST)
    events = record(supervisor)
    await supervisor.start()
    pid = supervisor.pid
    assert supervisor.state is EngineState.READY
    assert supervisor.props is not None and supervisor.props.total_slots == 2
    assert supervisor.props.n_ctx == 1024  # per slot: 2048 over 2 slots (-np splits the cache)
    await supervisor.stop()
    await supervisor.stop()  # twice is fine
    assert [e.state for e in events] == [
        EngineState.STARTING,
        EngineState.LOADING,
        EngineState.READY,
        EngineState.STOPPED,
    ]
    assert pid is not None and not pid_alive(pid)


async def test_slow_loader_that_keeps_printing_is_not_killed(
    make_launch: LaunchFactory, prelude_env
) -> None:
    policy = FAST.__class__(**{**FAST.__dict__, "silence_timeout": 1.0})
    supervisor = Supervisor(
        make_launch(binary=PRELUDE),
        policy=policy,
        environ=prelude_env(PRELUDE_LINES="10", PRELUDE_DELAY="0.3"),  # 3 s > silence_timeout
    )
    events = record(supervisor)
    await supervisor.start()
    try:
        assert supervisor.state is EngineState.READY
        assert supervisor.restarts == 0
        assert EngineState.RESTARTING not in [e.state for e in events]
    finally:
        await supervisor.stop()


async def test_silent_hung_loader_is_detected_and_killed(
    make_launch: LaunchFactory, prelude_env
) -> None:
    policy = FAST.__class__(**{**FAST.__dict__, "silence_timeout": 1.0, "crash_limit": 1})
    supervisor = Supervisor(
        make_launch(binary=PRELUDE), policy=policy, environ=prelude_env(PRELUDE_SILENT="60")
    )
    with pytest.raises(EngineStartError, match="hung while loading"):
        await supervisor.start()
    assert supervisor.state is EngineState.FAILED
    assert supervisor._proc is not None and not pid_alive(supervisor._proc.pid)
    await supervisor.stop()


async def test_sigkill_while_ready_restarts_and_serves_again(ready_engine: Supervisor) -> None:
    events = record(ready_engine)
    first = ready_engine.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    await wait_until_async(
        lambda: ready_engine.state is EngineState.RESTARTING, timeout=10, what="restarting"
    )
    await ready_engine.wait_for(EngineState.READY, timeout=30)
    assert ready_engine.restarts == 1
    assert ready_engine.pid != first
    assert "exited with code" in (events[0].reason or "")
    async with ready_engine.client.chat_stream(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    ) as stream:
        assert [e async for e in stream][-1].usage is not None


async def test_wedged_server_is_detected_and_restarted(ready_engine: Supervisor) -> None:
    first = ready_engine.pid
    assert first is not None
    os.kill(first, signal.SIGSTOP)
    await wait_until_async(
        lambda: ready_engine.state is EngineState.RESTARTING, timeout=10, what="wedge detected"
    )
    await ready_engine.wait_for(EngineState.READY, timeout=30)
    assert ready_engine.pid != first and not pid_alive(first)


async def test_crash_loop_ends_in_failed_with_its_cause(make_launch: LaunchFactory) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        supervisor = Supervisor(make_launch(port=port), environ=dict(os.environ), policy=FAST)
        events = record(supervisor)
        with pytest.raises(EngineStartError) as err:
            await supervisor.start()
    assert supervisor.state is EngineState.FAILED
    assert "crash loop: 3 failures" in str(err.value)
    assert "port is already taken" in str(err.value)
    assert [e.state for e in events].count(EngineState.RESTARTING) == FAST.crash_limit - 1
    await supervisor.stop()


async def test_unknown_flag_fails_at_once_with_clear_error(make_launch: LaunchFactory) -> None:
    supervisor = Supervisor(
        make_launch(extra_args=["--n-parallel", "2"]), environ=dict(os.environ), policy=FAST
    )
    with pytest.raises(EngineStartError) as err:
        await supervisor.start()
    assert supervisor.restarts == 0
    assert "does not know a flag" in str(err.value)
    assert "--n-parallel" in str(err.value)
    await supervisor.stop()


def _truncate(path: Path) -> bytes:
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    return good


async def test_corrupt_model_triggers_one_refetch(
    make_launch: LaunchFactory, model_dir: Path
) -> None:
    good = _truncate(model_dir / "tiny.gguf")
    calls: list[int] = []

    async def refetch() -> None:
        calls.append(1)
        (model_dir / "tiny.gguf").write_bytes(good)

    supervisor = Supervisor(
        make_launch(), environ=dict(os.environ), policy=FAST, on_corrupt=refetch
    )
    await supervisor.start()
    try:
        assert calls == [1]
        assert supervisor.state is EngineState.READY
    finally:
        await supervisor.stop()


async def test_corrupt_model_that_stays_corrupt_is_a_clear_error(
    make_launch: LaunchFactory, model_dir: Path
) -> None:
    _truncate(model_dir / "tiny.gguf")
    calls: list[int] = []

    async def refetch() -> None:
        calls.append(1)

    supervisor = Supervisor(
        make_launch(), environ=dict(os.environ), policy=FAST, on_corrupt=refetch
    )
    with pytest.raises(EngineStartError) as err:
        await supervisor.start()
    assert calls == [1]
    assert "corrupt" in str(err.value) and "re-download" in str(err.value)
    assert err.value.diagnosis is not None
    assert "not within the file bounds" in str(err.value)
    await supervisor.stop()


async def test_missing_model_fails_without_restart_storm(
    make_launch: LaunchFactory, model_dir: Path
) -> None:
    (model_dir / "tiny.gguf").unlink()
    supervisor = Supervisor(make_launch(), environ=dict(os.environ), policy=FAST)
    with pytest.raises(EngineStartError):
        await supervisor.start()
    assert supervisor.restarts == 0
    await supervisor.stop()


async def test_drain_then_stop(ready_engine: Supervisor) -> None:
    events = record(ready_engine)
    ready_engine.begin_drain()
    assert ready_engine.state is EngineState.DRAINING
    pid = ready_engine.pid
    await ready_engine.stop()
    assert [e.state for e in events] == [EngineState.DRAINING, EngineState.STOPPED]
    assert pid is not None and not pid_alive(pid)


def test_diagnosis_order_prefers_corrupt() -> None:
    from orion_llamaccp.engine.diagnostics import diagnose_all

    lines = [
        "llama_model_load_from_file_impl: failed to load model",
        "error loading model: tensor 'x' data is not within the file bounds",
    ]
    diagnosis = diagnose_all(lines)
    assert diagnosis is not None and diagnosis.cause is Cause.CORRUPT_MODEL


async def test_stop_while_loading_leaves_nothing(make_launch: LaunchFactory, prelude_env) -> None:
    supervisor = Supervisor(
        make_launch(binary=PRELUDE),
        policy=FAST,
        environ=prelude_env(PRELUDE_LINES="100", PRELUDE_DELAY="0.1"),
    )
    task = asyncio.create_task(supervisor.start())
    await wait_until_async(lambda: supervisor.state is EngineState.LOADING, what="loading")
    pid = supervisor.pid
    await supervisor.stop()
    with pytest.raises(EngineStartError):
        await task
    assert pid is not None and not pid_alive(pid)
