"""A llama-server stuck in the kernel (state D: a hung GPU driver, a network file system
gone) outlives SIGKILL until the kernel lets it go: here a process frozen by cgroup v1's
freezer, the same state, for real."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import psutil
import pytest

from orion_llamaccp.engine import process
from orion_llamaccp.engine.process import LlamaProcess
from orion_llamaccp.engine.supervisor import EngineState, Supervisor
from tests.engine.conftest import FAST, LaunchFactory
from tests.support.procs import can_freeze, frozen, pid_alive, wait_until_async


@pytest.mark.skipif(not can_freeze(), reason="no writable cgroup v1 freezer on this machine")
async def test_a_stop_goes_on_when_llama_server_is_stuck_in_the_kernel(
    make_launch: LaunchFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A llama-server stuck in the kernel (a hung GPU driver: state D) outlives SIGKILL
    until the kernel lets it go, and the stop (or a crash's restart) that waited for its
    exit hung with it, for ever and without a word. It now gives up on it a few seconds
    after the SIGKILL, says so, and reaps it if it ever dies. A later stop (a restart's,
    then the worker's own) SIGKILLs it again at once and only glances at it: another
    SIGTERM and grace waited for a shutdown a process in state D cannot run, and another
    whole wait after the SIGKILL made each restart 30 s longer."""
    monkeypatch.setattr(process, "_KILL_WAIT", 1.0)  # the test's scale, not 30 s
    server = tmp_path / "server.sh"
    server.write_text("#!/bin/sh\nexec sleep 600\n")
    server.chmod(0o755)
    proc = LlamaProcess(make_launch(binary=server), environ=dict(os.environ))
    await proc.start()
    pid = proc.pid
    assert pid is not None
    await wait_until_async(lambda: psutil.Process(pid).name() == "sleep", what="the exec")
    try:
        with frozen(pid):
            assert await asyncio.wait_for(proc.stop(grace=0.5), 30) is None
            assert proc.stuck and pid_alive(pid)
            # Known stuck: a glance, not the whole wait again (each restart waited it).
            monkeypatch.setattr(process, "_KILL_WAIT", 600.0)
            assert await asyncio.wait_for(proc.stop(grace=0.5), 30) is None
        graces = [r for r in caplog.records if "ignored SIGTERM" in r.getMessage()]
        assert len(graces) == 1, [r.getMessage() for r in graces]
        assert "stuck in the kernel" in caplog.text
        assert await asyncio.wait_for(proc.wait(), 10) < 0  # thawed: dead of its signals
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not can_freeze(), reason="no writable cgroup v1 freezer on this machine")
async def test_a_supervisor_says_its_llama_server_is_stuck_not_that_the_port_is_taken(
    make_launch: LaunchFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """llama-server frozen while serving: /health fails, the SIGKILL does not end it. Each
    restart found its port taking connections (the kernel still accepts them for the
    frozen process) and said "port is already taken: stop it", another's fault, until
    the crash limit; it now names the stuck process of its own last start."""
    monkeypatch.setattr(process, "_KILL_WAIT", 0.5)  # the test's scale, not 30 s a restart
    supervisor = Supervisor(make_launch(), environ=dict(os.environ), policy=FAST)
    await supervisor.start()
    pid, proc = supervisor.pid, supervisor._proc
    assert pid is not None and proc is not None
    try:
        with frozen(pid):
            await wait_until_async(lambda: proc.stuck, what="the first stop to give up")
            # Each restart's stop SIGKILLs it again: a glance, not the whole wait again.
            monkeypatch.setattr(process, "_KILL_WAIT", 600.0)
            await supervisor.wait_for(EngineState.FAILED, timeout=60)
            failure = str(supervisor.failure)
            assert f"pid {pid} of the last start is still stuck in the kernel" in failure
            assert "port is already taken" not in failure
    finally:
        await asyncio.wait_for(supervisor.stop(), 30)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
