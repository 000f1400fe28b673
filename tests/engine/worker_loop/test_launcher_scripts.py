"""A ``LLAMA_SERVER_BIN`` that is a site's launcher script running llama-server as its
child, not by ``exec``: whatever the launcher does, nothing of its process group outlives a
stop or a restart.

On the event loop the worker runs, uvloop (this folder's conftest): asyncio's own loop
reports a child's exit only once every pipe of it is closed, so there a launcher's death
goes unseen while its orphan lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import psutil
import pytest

from orion_llamaccp.engine.process import LlamaProcess
from orion_llamaccp.engine.supervisor import EngineState, Supervisor
from orion_llamaccp.errors import EngineStartError
from tests.engine.conftest import FAST, LaunchFactory, assert_answers
from tests.support.procs import pid_alive, wait_until_async


async def test_stop_returns_once_nothing_of_a_launcher_s_group_is_left(
    make_launch: LaunchFactory, prelude_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    """The binary a site's launcher script that runs llama-server as its child, not by
    ``exec``, next to a helper of its own that ignores SIGTERM, and ends at once on one:
    ``stop`` returned as the launcher ended, llama-server still shutting down and the
    helper running on. It returns once the group is gone, SIGKILLed after the grace."""
    launcher = tmp_path / "launcher.sh"
    launcher.write_text(
        "#!/bin/sh\ntrap '' TERM\nsleep 1000 &\ntrap 'exit 0' TERM\n"
        '"$REAL_LLAMA_SERVER" "$@" &\nwait\n'
    )
    launcher.chmod(0o755)
    proc = LlamaProcess(make_launch(binary=launcher), environ=prelude_env())
    await proc.start()
    pid = proc.pid
    assert pid is not None
    await wait_until_async(
        lambda: len(psutil.Process(pid).children()) == 2, timeout=10, what="its two children"
    )
    group = psutil.Process(pid).children()
    try:
        await asyncio.wait_for(proc.stop(grace=1.0), 30)
        left = [p.pid for p in group if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert left == [], [p.cmdline() for p in group if p.pid in left]
    finally:  # a test that fails leaves nothing behind
        for member in group:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()


def _launcher(tmp_path: Path, helper_on_term: str, then: str) -> Path:
    """A launcher script that starts a helper of its own (a shell that runs
    ``helper_on_term`` on SIGTERM, its log at ``tmp_path/helper.log`` as ``$0``), then runs
    ``then``."""
    launcher = tmp_path / "launcher.sh"
    log = tmp_path / "helper.log"
    on_term = helper_on_term.replace("$0", "\\$0")  # the helper's $0, not the launcher's
    helper = f"trap '{on_term}' TERM; while :; do sleep 0.05; done"
    launcher.write_text(f'#!/bin/sh\nsh -c "{helper}" "{log}" &\n{then}\n')
    launcher.chmod(0o755)
    return launcher


async def _helper_running(proc: LlamaProcess) -> psutil.Process:
    """The launcher's helper, once it runs its loop (its SIGTERM trap set by then)."""
    pid = proc.pid
    assert pid is not None

    def looping() -> psutil.Process | None:  # found by its group: the launcher may be gone
        for process in psutil.process_iter(["name"]):
            with contextlib.suppress(psutil.Error, OSError):
                if process.info["name"] == "sleep" and os.getpgid(process.pid) == pid:
                    return process.parent()
        return None

    helper = await wait_until_async(looping, timeout=10, what="the helper looping")
    assert isinstance(helper, psutil.Process)
    return helper


@contextlib.asynccontextmanager
async def _launched(
    make_launch: LaunchFactory, launcher: Path
) -> AsyncIterator[tuple[LlamaProcess, psutil.Process]]:
    """``launcher`` started as llama-server's binary, with its helper looping; whatever
    the test does, nothing of the launcher's group is left behind."""
    proc = LlamaProcess(make_launch(binary=launcher), environ=dict(os.environ))
    await proc.start()
    try:
        yield proc, await _helper_running(proc)
    finally:
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.killpg(proc.pid, signal.SIGKILL)  # type: ignore[arg-type]


async def test_a_stop_signals_a_launcher_s_group_once_then_kills_what_stays(
    make_launch: LaunchFactory, tmp_path: Path
) -> None:
    """A helper that only notes SIGTERM: it gets one, with the rest of the group, and is
    SIGKILLed at the grace. A second SIGTERM to what a launcher leaves makes llama-server
    quit at once, its shutdown cut short; nothing checked that a stop sends none."""
    launcher = _launcher(tmp_path, "echo TERM >> $0", "trap 'exit 0' TERM\nwait")
    async with _launched(make_launch, launcher) as (proc, helper):
        await asyncio.wait_for(proc.stop(grace=1.0), 30)
        assert not pid_alive(helper.pid)
    assert (tmp_path / "helper.log").read_text().split() == ["TERM"]


async def test_what_a_launcher_that_ended_alone_left_gets_the_whole_grace(
    make_launch: LaunchFactory, tmp_path: Path
) -> None:
    """The launcher ends by itself; its helper, told SIGTERM, needs 1.8 s to finish. With
    a grace of 3 s it finishes: the grace was counted from the stop's start, and the 2 s
    the stop waits for the output of a process whose pipe the helper holds left it 1 s."""
    launcher = _launcher(tmp_path, "sleep 1.8; echo done >> $0; exit 0", "exit 3")
    async with _launched(make_launch, launcher) as (proc, helper):
        await wait_until_async(lambda: proc.returncode is not None, what="the launcher ended")
        await asyncio.wait_for(proc.stop(grace=3.0), 30)
        assert not pid_alive(helper.pid)
    assert (tmp_path / "helper.log").read_text().split() == ["done"]


async def test_a_launcher_that_dies_alone_leaves_no_llama_server_on_the_port(
    make_launch: LaunchFactory, prelude_env, tmp_path: Path
) -> None:
    """A site's launcher script runs llama-server as its child (not by ``exec``) and dies
    alone, llama-server serving: the orphan kept the port, and every restart found it
    taken (``port is already taken``) until the crash limit failed the engine. What is
    left of a dead life's process group goes before the next life starts."""
    launcher, orphan, die = tmp_path / "launcher.sh", tmp_path / "orphan", tmp_path / "die"
    launcher.write_text(
        "#!/bin/sh\n"
        f'if [ ! -e "{orphan}" ]; then  # the first life only\n'
        f'  "$REAL_LLAMA_SERVER" "$@" & echo $! > "{orphan}"\n'
        f'  while [ ! -e "{die}" ]; do sleep 0.05; done\n'
        "  exit 3\n"
        "fi\n"
        'exec "$REAL_LLAMA_SERVER" "$@"\n'
    )
    launcher.chmod(0o755)
    supervisor = Supervisor(make_launch(binary=launcher), environ=prelude_env(), policy=FAST)
    try:
        await supervisor.start()
        die.touch()
        await wait_until_async(lambda: supervisor.restarts, timeout=30, what="a restart")
        await supervisor.wait_for(EngineState.READY, EngineState.FAILED, timeout=60)
        assert supervisor.state is EngineState.READY, supervisor.failure
        assert supervisor.restarts == 1
        assert not pid_alive(int(orphan.read_text()))
        await assert_answers(supervisor)
    finally:
        await supervisor.stop()


async def test_why_llama_server_failed_is_read_even_when_its_launcher_s_output_comes_late(
    make_launch: LaunchFactory, prelude_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    """A launcher that sends llama-server's output through a filter of its own (a logger,
    a timestamper): its last lines reach the pipe after it has died, and uvloop reports
    the exit at once. Judged without them, a flag it does not know was no known cause:
    restarted up to the crash limit, then "crash loop: exited with code 1", the reason
    llama-server printed lost."""
    launcher = tmp_path / "launcher.sh"
    launcher.write_text(
        '#!/bin/bash\nexec > >(sleep 1; exec cat) 2>&1\nexec "$REAL_LLAMA_SERVER" "$@"\n'
    )
    launcher.chmod(0o755)
    launch = make_launch(binary=launcher, extra_args=["--n-parallel", "2"])
    supervisor = Supervisor(launch, environ=prelude_env(), policy=FAST)
    try:
        with pytest.raises(EngineStartError) as failed:
            await asyncio.wait_for(supervisor.start(), 60)
    finally:
        await supervisor.stop()
    error = str(failed.value)
    assert "does not know a flag" in error and "--n-parallel" in error, error
    assert supervisor.restarts == 0
