"""One llama-server child process: spawn, pump its output, stop it, leave nothing behind.

The child runs in its own process group (so a stop reaches every thread and helper it has,
and whatever of the group outlives it goes too: a launcher script's llama-server) and gets
the parent-death signal SIGKILL, so it cannot outlive the wrapper even when the wrapper
itself is SIGKILLed (the child itself: a launcher's own children do not inherit it).
Output is read in raw chunks, not lines: llama-server prints its loading progress as dots
without newlines, and those bytes are what tell a slow load from a hung one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import time
from collections import deque
from collections.abc import Mapping

from orion_llamaccp.engine.command import LaunchSpec
from orion_llamaccp.engine.diagnostics import (
    Diagnosis,
    diagnose,
    diagnose_all,
    most_specific,
    no_gpu,
)
from orion_llamaccp.engine.lifeline import die_with_parent

log = logging.getLogger("orion_llamaccp.llama_server")
# Once llama-server serves, these still deserve INFO; its per-request lines go to DEBUG.
_NOTEWORTHY = re.compile(r"error|warn|fail|fatal|abort|exception|out of memory", re.I)
# What llama-server prints as its load ends, before /health says ready: read, everything
# it printed while loading has been read too (a "no usable GPU found" among it).
_LOADED = re.compile(r"\bmodel loaded\b")


class LlamaProcess:
    """A started llama-server; ``stop()`` is safe to call twice."""

    def __init__(self, launch: LaunchSpec, *, environ: Mapping[str, str], tail: int = 200) -> None:
        self.launch = launch
        self._environ = environ
        self.tail: deque[str] = deque(maxlen=tail)
        self.last_output_at = time.monotonic()
        self.last_busy_at = self.last_output_at  # as ``look`` last saw it work
        self._since: tuple[float, tuple[float, int, int]] | None = None  # when, what: ``look``
        self._looked_at = 0.0
        self.output_bytes = 0
        self.output = asyncio.Event()  # set on every read: a reason to look at /health again
        self.diagnosis: Diagnosis | None = None
        # Why it would serve a profile that pins GPUs on the CPU (``diagnostics.no_gpu``).
        self.no_gpu: Diagnosis | None = None
        self.loaded = asyncio.Event()  # its "model loaded" line read (``_LOADED``)
        # Set once llama-server is ready: its routine per-request lines (slot launched,
        # timings, released: about ten a request) are logged at DEBUG, not INFO. Each one
        # was a write to our stderr, several percent of the worker's CPU at GPU speeds.
        self.quiet = False
        self._proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None
        # Cleared once: a later stop must not signal the group id again, which may be
        # another's by then.
        self._group_cleared = False
        self._kill_sent = False
        self.stuck = False  # alive after SIGKILL (``_reaped``)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    async def start(self) -> None:
        env, dropped = self.launch.child_env(self._environ)
        if replaced := self.launch.replaced_gpus(self._environ):
            log.warning("%s", replaced)
        if dropped:
            log.info(
                "not passed on to llama-server (its settings come from the profile and "
                "LLAMACPP_*_OVERRIDE): %s",
                ", ".join(dropped),
            )
        self._proc = await asyncio.create_subprocess_exec(
            *self.launch.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        self.last_output_at = time.monotonic()
        self._pump = asyncio.create_task(self._read_output(), name=f"llama-server-{self.pid}")
        log.info("started llama-server pid %s: %s", self.pid, " ".join(self.launch.masked_argv()))

    def look(self) -> None:
        """Note whether llama-server worked since the last look: used CPU, read from disk
        or mapped more of its model in. A load that prints nothing for minutes (a warm-up
        run, a large model paged in from a slow disk through mmap) is working, not hung;
        a hung one (blocked on a dead mount, waiting on a lock) does none of these. Once
        per ``_LOOK_EVERY`` at most: the supervisor polls every few milliseconds while
        llama-server prints, and each look reads three files of ``/proc``.

        Work is judged over ``_LOOK_SPAN``, not from one look to the next: a hung load's
        HTTP threads still answer our /health polls (503 "Loading model"), a few clock
        ticks of CPU a minute, and any tick counted as work kept the silence watch from
        ever calling it hung."""
        now = time.monotonic()
        if now - self._looked_at < _LOOK_EVERY:
            return
        self._looked_at = now
        work = _work_done(self.pid)
        if work is None:
            return
        if self._since is None:
            self._since = (now, work)
            return
        then, before = self._since
        if _worked(before, work, now - then):
            self.last_busy_at = now
            self._since = (now, work)
        elif now - then >= _LOOK_SPAN:
            self._since = (now, work)

    @property
    def last_sign_of_life(self) -> float:
        """When it last printed or worked (``look``), on the monotonic clock."""
        return max(self.last_output_at, self.last_busy_at)

    async def _read_output(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        stream = self._proc.stdout
        partial = b""
        prefix = f"[llama-server {self.pid}]"
        while chunk := await stream.read(65536):
            self.output_bytes += len(chunk)
            self.last_output_at = time.monotonic()
            self.output.set()
            lines = (partial + chunk).split(b"\n")
            partial = lines.pop()
            for raw in lines:
                self._line(prefix, raw)
        if partial:
            self._line(prefix, partial)

    def _line(self, prefix: str, raw: bytes) -> None:
        line = raw.decode(errors="replace").rstrip()
        if not line or set(line) == {"."}:
            return
        self.tail.append(line)
        if not self.loaded.is_set() and _LOADED.search(line):
            self.loaded.set()
        if not self.quiet:  # serving: a crash reads the tail
            # The most specific so far: a corrupt model's load may say "unable to allocate"
            # first, and that alone would fail the start instead of fetching the file again.
            if found := diagnose(line):
                self.diagnosis = most_specific(self.diagnosis, found)
            if self.no_gpu is None and (pinned := self.launch.gpus_required):
                self.no_gpu = no_gpu(line, pinned)
        level = logging.DEBUG if self.quiet and not _NOTEWORTHY.search(line) else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "%s %s", prefix, line)

    def tail_text(self, lines: int = 30) -> str:
        return "\n".join(list(self.tail)[-lines:])

    def final_diagnosis(self) -> Diagnosis | None:
        return self.diagnosis or diagnose_all(list(self.tail))

    async def wait(self) -> int:
        assert self._proc is not None
        code = await self._proc.wait()
        if self._pump is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._pump), 2.0)
        return code

    def _signal_group(self, sig: signal.Signals) -> None:
        if self._proc is not None and self._proc.returncode is None:
            _group_signal(self._proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole group now (a wedged server ignores SIGTERM)."""
        self._kill_sent = True
        # SIGKILL ends a SIGSTOPped process too, without a SIGCONT (one after it, here
        # once, changed nothing: the whole group had the SIGKILL).
        self._signal_group(signal.SIGKILL)

    async def killed(self) -> int | None:
        """SIGKILL the group now and reap its leader: its exit code, or None if it is
        stuck (``_reaped``)."""
        self.kill()
        return await self._reaped()

    async def _reaped(self) -> int | None:
        """The exit code once the leader is reaped, or None while it lives on
        ``_KILL_WAIT`` s after SIGKILL: a process stuck in the kernel (a hung GPU driver,
        a network file system gone) dies only when the kernel lets it, and a stop or a
        restart that waited for it hung with it, saying nothing."""
        assert self._proc is not None
        # Known stuck: a glance, not another wait (each restart's stop waited it again).
        wait = _STUCK_GLANCE if self.stuck else _KILL_WAIT
        try:
            await asyncio.wait_for(asyncio.shield(self._proc.wait()), wait)
        except TimeoutError:
            if not self.stuck:
                log.error(
                    "llama-server pid %s is still there %g s after SIGKILL: stuck in the "
                    "kernel (a hung GPU driver or file system, state D in ps); going on "
                    "without it, and it may hold its port and its GPU memory until it dies",
                    self.pid,
                    _KILL_WAIT,
                )
            self.stuck = True
            return None
        return await self.wait()

    async def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM to the group, wait ``grace`` seconds, then SIGKILL, and reap (None for
        a process stuck after SIGKILL). Also after the process ended on its own: what is
        left of its group goes too."""
        if self._proc is None:
            return None
        deadline = time.monotonic() + grace
        signalled = self._proc.returncode is None
        if signalled and self._kill_sent:  # stuck, or as good as dead: no grace again
            self.kill()
        elif signalled:
            self._signal_group(signal.SIGTERM)
            self._signal_group(signal.SIGCONT)
            try:
                await asyncio.wait_for(self._proc.wait(), grace)
            except TimeoutError:
                log.warning(
                    "llama-server pid %s ignored SIGTERM for %.0fs: SIGKILL", self.pid, grace
                )
                self.kill()
        code = await self._reaped()
        if code is None:
            return None  # its group is left with it: the id is not free while it lives
        if not self._group_cleared:
            self._group_cleared = True
            # The leftovers of a process that ended on its own get a grace of their own.
            until = deadline if signalled else time.monotonic() + grace
            await _clear_group(self._proc.pid, until, signalled=signalled)
        if self._pump is not None and not self._pump.done():
            self._pump.cancel()
        return code


async def _clear_group(pgid: int, deadline: float, *, signalled: bool) -> None:
    """End what is left of a process group after its leader was reaped: SIGTERM (unless
    the stop sent it already: a second one makes llama-server quit at once, its shutdown
    cut short), until ``deadline``, then SIGKILL. A launcher script that runs llama-server
    as its child, not by ``exec``, can end first (or die alone), and llama-server,
    orphaned, held the port: the stop returned with it still running, and the restart
    found the port taken."""
    if not signalled:
        _group_signal(pgid, signal.SIGTERM)
    if not _group_signal(pgid, signal.SIGCONT):
        return  # the usual case: llama-server was the group, alone
    if await _group_gone(pgid, deadline):
        return
    log.warning("llama-server's process group %s outlived its leader: SIGKILL", pgid)
    _group_signal(pgid, signal.SIGKILL)  # stopped or not: no SIGCONT needed
    if not await _group_gone(pgid, time.monotonic() + _GROUP_KILL_WAIT):
        log.error("llama-server's process group %s outlived SIGKILL", pgid)


async def _group_gone(pgid: int, deadline: float) -> bool:
    while _group_members(pgid):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_GROUP_POLL)
    return True


_GROUP_POLL = 0.05  # seconds
# Seconds for a leader to be reaped after SIGKILL: freeing tens of GB of pinned memory and
# a CUDA context takes seconds, and "stuck in the kernel" must not be said of that.
_KILL_WAIT = 30.0
_STUCK_GLANCE = 1.0  # seconds: a process found stuck before, SIGKILLed again
_GROUP_KILL_WAIT = 2.0  # seconds: SIGKILL is not refused, only slow on a process in D state


def _group_signal(pgid: int, sig: signal.Signals) -> bool:
    """Signal a group; False when no process is left in it. Called once per group, as
    soon as its leader was reaped: while anything of it remains its id is not reused."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member that changed its user: not ours to end
        return True
    return True


def _group_members(pgid: int) -> list[int]:
    """The live processes of a group: its orphans end as zombies of whoever adopted them
    (the wrapper itself, where it is PID 1), which a signal no longer ends."""
    import psutil

    members = []
    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, OSError):
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                members.append(proc.pid)
    return members


_LOOK_EVERY = 0.25  # seconds; far below any silence timeout worth setting
_LOOK_SPAN = 2.0  # seconds of CPU, reads and memory weighed together by ``look``
# What counts as work over that span: a twentieth of a core (answering /health polls
# takes a few thousandths: 0.15 ms each, 20 a second), any read from storage (HTTP
# answers read none), a mebibyte more resident (a model paged in grows by far more).
_BUSY_CPU_SHARE = 0.05
_BUSY_RSS_BYTES = 1 << 20


def _worked(before: tuple[float, int, int], now: tuple[float, int, int], span: float) -> bool:
    return (
        now[0] - before[0] >= _BUSY_CPU_SHARE * span
        or now[1] > before[1]
        or now[2] - before[2] >= _BUSY_RSS_BYTES
    )


def _work_done(pid: int | None) -> tuple[float, int, int] | None:
    """CPU seconds, bytes read from storage and resident bytes of process ``pid`` (None if
    they cannot be read): any of them moves while a process works. Storage reads are not
    counted where the system does not say (``io_counters`` is missing on macOS)."""
    if pid is None:
        return None
    import psutil  # here, not at the top: tens of ms of import, off the worker's start path

    try:
        process = psutil.Process(pid)
        with process.oneshot():
            times = process.cpu_times()
            io = getattr(process, "io_counters", None)
            read = io().read_bytes if io is not None else 0
            return times.user + times.system, read, process.memory_info().rss
    except psutil.Error:
        return None
