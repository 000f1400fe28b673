"""The launchers the tests and benchmarks share: a run killed mid-way leaves nothing behind.

A benchmark or test process cut off by a signal runs no ``finally``; without a parent-death
signal its Redis and its worker (and, through the worker, llama-server) would go on
running, holding ports and CPU that the next run measures.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.procs import pid_alive, wait_until

REPO = Path(__file__).resolve().parent.parent

_PARENT = """
import sys, time
from pathlib import Path
from tests.support.procs import RedisServer
server = RedisServer(Path(sys.argv[1])).start()
print(server.proc.pid, flush=True)
time.sleep(60)
"""


def test_a_redis_started_by_a_process_that_gets_killed_goes_with_it(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, str(tmp_path / "redis")],
        cwd=REPO,
        stdout=subprocess.PIPE,
    )
    assert parent.stdout is not None
    redis_pid = int(parent.stdout.readline())
    assert pid_alive(redis_pid)
    parent.kill()  # SIGKILL: no finally, no atexit
    parent.wait()
    wait_until(lambda: not pid_alive(redis_pid), timeout=5, what="redis-server gone")
