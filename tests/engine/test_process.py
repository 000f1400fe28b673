"""The llama-server child process itself: how it is spawned."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from orion_llamaccp.engine.diagnostics import Cause
from orion_llamaccp.engine.process import LlamaProcess
from tests.engine.conftest import PRELUDE, LaunchFactory
from tests.support.procs import wait_until_async

REPO = Path(__file__).resolve().parents[2]

# Runs as PID 1 of its own PID namespace, as a container entrypoint does under plain
# `docker run` or Kubernetes, and starts the real binary through LlamaProcess.
_AS_PID1 = """
import asyncio, os, sys
from orion_llamaccp.engine.command import LaunchSpec
from orion_llamaccp.engine.diagnostics import Cause
from orion_llamaccp.engine.process import LlamaProcess

async def main() -> None:
    assert os.getpid() == 1, os.getpid()
    spec = LaunchSpec(argv=(sys.argv[1], "--version"), env={}, host="127.0.0.1", port=1)
    proc = LlamaProcess(spec, environ=dict(os.environ))
    await proc.start()
    print("exit", await proc.wait())
    print("\\n".join(proc.tail))

asyncio.run(main())
"""


def _unshare_pid_allowed() -> bool:
    if shutil.which("unshare") is None:
        return False
    done = subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True)
    return done.returncode == 0


@pytest.mark.skipif(
    not _unshare_pid_allowed(), reason="this machine does not permit `unshare --pid`"
)
def test_llama_server_starts_when_the_wrapper_is_pid_1(llama_server_bin: Path) -> None:
    done = subprocess.run(
        ["unshare", "--pid", "--fork", sys.executable, "-c", _AS_PID1, str(llama_server_bin)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "exit 0", done.stdout
    assert any(line.startswith("version:") for line in lines[1:]), done.stdout


async def test_a_server_that_ignores_sigterm_is_killed_after_the_grace(
    make_launch: LaunchFactory, prelude_env: Callable[..., dict[str, str]]
) -> None:
    """A llama-server whose shutdown deadlocks (SIGTERM ignored): ``stop`` kills it after
    its grace, its whole group, and reaps it. Nothing ignored SIGTERM in any test, and a
    stop without the SIGKILL survived them all (a worker's stop would hang for ever)."""
    proc = LlamaProcess(make_launch(binary=PRELUDE), environ=prelude_env(PRELUDE_IGNORE_TERM="1"))
    await proc.start()
    pid = proc.pid
    assert pid is not None
    await wait_until_async(
        lambda: len(psutil.Process(pid).children(recursive=True)) == 2,
        timeout=10,
        what="the server and the sleep under the prelude",
    )
    group = [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    try:
        code = await asyncio.wait_for(proc.stop(grace=1.0), 15)
    finally:  # a stop that hangs leaves the test, not the processes
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    assert code == -signal.SIGKILL, code
    await wait_until_async(
        lambda: (
            not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in group)
        ),
        timeout=10,
        what="the whole group gone",
    )


async def test_the_most_specific_cause_printed_wins_whatever_came_first(
    make_launch: LaunchFactory, tmp_path: Path
) -> None:
    """A corrupt model's load may say "unable to allocate" before "missing tensor": the
    first line read decided, out of memory, which fails the start at once, where a
    corrupt file is fetched again."""
    server = tmp_path / "server.sh"
    server.write_text(
        "#!/bin/sh\n"
        "echo 'llama_model_load: unable to allocate CPU buffer'\n"
        "echo \"llama_model_load: error loading model: missing tensor 'blk.0.attn_q.weight'\"\n"
        "exit 1\n"
    )
    server.chmod(0o755)
    proc = LlamaProcess(make_launch(binary=server), environ=dict(os.environ))
    await proc.start()
    assert await asyncio.wait_for(proc.wait(), 30) == 1
    found = proc.final_diagnosis()
    assert found is not None and found.cause is Cause.CORRUPT_MODEL, found


async def test_a_stop_wakes_a_paused_llama_server_so_that_it_hears_its_sigterm(
    make_launch: LaunchFactory,
) -> None:
    """A llama-server paused by SIGSTOP (a debugger, a job-control stop, a hang the watch
    has not called yet) acts on no SIGTERM until it is continued: a stop without the
    SIGCONT that follows waited out its whole grace, then SIGKILLed it, its shutdown never
    run. Continued, it ends of the SIGTERM, long before a grace made long here."""
    proc = LlamaProcess(make_launch(), environ=dict(os.environ))
    await proc.start()
    pid = proc.pid
    assert pid is not None
    try:
        await asyncio.wait_for(proc.loaded.wait(), 60)
        os.kill(pid, signal.SIGSTOP)
        code = await asyncio.wait_for(proc.stop(grace=20.0), 60)
    finally:  # a stop that fails leaves the test, not the process
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    assert code != -signal.SIGKILL, code


async def test_a_paused_group_dies_of_sigkill_alone(
    make_launch: LaunchFactory,
    prelude_env: Callable[..., dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every process of llama-server's group SIGSTOPped (a launcher, llama-server under
    it, a sleep): ``killed`` ends them all and reaps the leader with SIGKILL alone. A
    SIGCONT sent after the SIGKILL (for "the rest of the group", which had the SIGKILL
    too) was dead code, and a mutant without it passed every test."""
    proc = LlamaProcess(make_launch(binary=PRELUDE), environ=prelude_env(PRELUDE_IGNORE_TERM="1"))
    await proc.start()
    pid = proc.pid
    assert pid is not None
    try:
        await wait_until_async(
            lambda: len(psutil.Process(pid).children(recursive=True)) == 2,
            timeout=10,
            what="the server and the sleep under the prelude",
        )
        group = [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
        os.killpg(pid, signal.SIGSTOP)
        await wait_until_async(
            lambda: all(psutil.Process(p).status() == psutil.STATUS_STOPPED for p in group),
            timeout=10,
            what="the whole group stopped",
        )
        sent: list[signal.Signals] = []
        real = os.killpg

        def spy(pgid: int, sig: int) -> None:  # sees which signals go out, sends each
            sent.append(signal.Signals(sig))
            real(pgid, sig)

        with monkeypatch.context() as patch:
            patch.setattr(os, "killpg", spy)
            code = await asyncio.wait_for(proc.killed(), 15)
    finally:  # a kill that fails leaves the test, not the processes
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    assert code == -signal.SIGKILL and signal.SIGCONT not in sent, (code, sent)
    await wait_until_async(
        lambda: (
            not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in group)
        ),
        timeout=10,
        what="the whole group gone",
    )
