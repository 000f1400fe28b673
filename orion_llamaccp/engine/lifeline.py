"""A child process that cannot outlive its parent, even a SIGKILLed one."""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None]:
    """A hook for ``preexec_fn`` that SIGKILLs the child when its parent dies.

    Here llama-server goes with the wrapper, and so does the ``--help`` / ``--version``
    probe's child (``engine.binary.Children``); the tests and benchmarks use it too, so that a
    run cut off by a signal leaves no worker or Redis behind. The kernel ties this to the
    thread that started the child: start it from one that lives as long as the parent.
    Call it in the parent: the parent's pid is taken now, before the fork, since the
    wrapper may itself be PID 1 (a container entrypoint), where "the parent is PID 1"
    would not mean that it died.
    """
    parent = os.getpid()

    def hook() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # not Linux: the process group still covers stop()
            pass
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook
