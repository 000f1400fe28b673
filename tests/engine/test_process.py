"""The llama-server child process itself: how it is spawned."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Runs as PID 1 of its own PID namespace, as a container entrypoint does under plain
# `docker run` or Kubernetes, and starts the real binary through LlamaProcess.
_AS_PID1 = """
import asyncio, os, sys
from orion_llamaccp.engine.command import LaunchSpec
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
