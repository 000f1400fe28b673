"""Stop one thread of a running process while its other threads go on.

llama-server runs its inference loop (and every decode) on its main thread and answers
HTTP on others, so stopping the main thread alone is the wedge that ``/health`` cannot see:
a GPU kernel that never returns, a deadlock. ``SIGSTOP`` would stop every thread; ptrace
stops one: ``PTRACE_SEIZE`` attaches without stopping, ``PTRACE_INTERRUPT`` stops that
thread alone.

The tracer is a process of its own (``python -m tests.support.freeze TID``), never
llama-server's parent: a tracer's waits see its tracee's stops, and a parent's child
watcher would take them for exits. The tracer also reaps the thread if it is killed while
frozen (a traced thread-group leader is reaped by its tracer before its parent hears of
it), and if the tracer dies, the kernel lets the thread go.
"""

from __future__ import annotations

import ctypes
import os
import select
import subprocess
import sys

_PTRACE_DETACH = 17
_PTRACE_SEIZE = 0x4206
_PTRACE_INTERRUPT = 0x4207
_WALL = 0x40000000


class FrozenThread:
    """``with FrozenThread(tid):`` thread ``tid`` is stopped until the block ends, or until
    its process is killed (``exited`` then says so)."""

    def __init__(self, tid: int) -> None:
        self.tid = tid
        self.exited = False
        self._tracer: subprocess.Popen[str] | None = None

    def __enter__(self) -> FrozenThread:
        self._tracer = subprocess.Popen(
            [sys.executable, "-m", "tests.support.freeze", str(self.tid)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._tracer.stdout is not None
        line = self._tracer.stdout.readline().strip()
        if line != "frozen":
            self._tracer.kill()
            raise RuntimeError(f"could not freeze thread {self.tid}: {line or 'no answer'}")
        return self

    def __exit__(self, *exc: object) -> None:
        tracer = self._tracer
        assert tracer is not None and tracer.stdin is not None and tracer.stdout is not None
        tracer.stdin.close()  # let it go
        self.exited = tracer.stdout.read().strip() == "exited"
        tracer.wait(10)


def _ptrace(libc: ctypes.CDLL, request: int, tid: int) -> None:
    if libc.ptrace(request, tid, None, None) == -1:
        errno = ctypes.get_errno()
        raise OSError(errno, f"ptrace({request:#x}, {tid}): {os.strerror(errno)}")


def _trace(tid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    libc.ptrace.restype = ctypes.c_long
    try:
        _ptrace(libc, _PTRACE_SEIZE, tid)
        _ptrace(libc, _PTRACE_INTERRUPT, tid)
        os.waitpid(tid, _WALL)  # its stop
    except OSError as exc:
        print(exc, flush=True)
        return
    print("frozen", flush=True)
    while True:
        pid, status = os.waitpid(tid, _WALL | os.WNOHANG)
        if pid and not os.WIFSTOPPED(status):
            print("exited", flush=True)
            return
        if select.select([sys.stdin], [], [], 0.01)[0]:  # stdin closed: let it go
            break
    try:
        _ptrace(libc, _PTRACE_DETACH, tid)
    except ProcessLookupError:  # killed since the last look: reap it
        os.waitpid(tid, _WALL)
        print("exited", flush=True)


if __name__ == "__main__":
    _trace(int(sys.argv[1]))
