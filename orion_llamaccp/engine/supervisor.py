"""The llama-server lifecycle as a state machine with one owner.

    starting -> loading -> ready -> restarting -> starting ...
                                 -> draining -> stopped
               (any)   -> failed   (crash loop, or a fault that a restart cannot fix)

One task (``_run``) owns the state and the child process; everything else only reads the
state or asks for a change (``begin_drain``, ``stop``). State changes
are emitted as ``EngineEvent``s to listeners the supervisor knows nothing about: the bus
layer turns them into heartbeats and announcements.

Readiness has no short fixed timeout: while llama-server keeps printing (a 70B model
loading for minutes) or working without a word (a warm-up run, a model paged in from a slow
disk), the deadline moves; a server silent and idle for ``silence_timeout`` is declared
hung, and one not ready after ``load_timeout`` (an hour) however it works.
Once ready, it is restarted when it dies, stops answering ``/health``, or its inference
loop stops moving while ``/health`` still says 200 (``liveness``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit

from tenacity import wait_exponential

from orion_llamaccp.engine import liveness
from orion_llamaccp.engine.client import LlamaClient, Props
from orion_llamaccp.engine.command import LaunchSpec
from orion_llamaccp.engine.diagnostics import Cause, Diagnosis, exit_said
from orion_llamaccp.engine.process import LlamaProcess
from orion_llamaccp.errors import (
    EngineStartError,
    EngineUnavailable,
    OrionLlamaError,
    UpstreamError,
)
from orion_llamaccp.stopping import unless_stopped

log = logging.getLogger(__name__)
# How long a ready llama-server's load lines may take to be read (a build that does not
# print "model loaded" costs this much at each start, once).
_LOAD_LINES_SEC = 2.0
_MIN_POLL_GAP = 0.01


class EngineState(StrEnum):
    STARTING = "starting"
    LOADING = "loading"
    READY = "ready"
    RESTARTING = "restarting"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


# States where llama-server takes no more work: a request waiting for one of them to end
# waits for nothing.
OUT_OF_SERVICE = (EngineState.DRAINING, EngineState.FAILED, EngineState.STOPPED)

# States a drain replaces: the supervisor's own steps while llama-server runs or restarts.
_ALIVE = frozenset(
    {EngineState.STARTING, EngineState.LOADING, EngineState.READY, EngineState.RESTARTING}
)


# Faults that a plain restart cannot fix: fail at once instead of looping. A port taken
# by another server is one: the worker tried five times (8 s) before the same message.
FATAL = frozenset(
    {
        Cause.UNKNOWN_FLAG,
        Cause.BAD_FLAG_VALUE,
        Cause.OUT_OF_MEMORY,
        Cause.PORT_IN_USE,
        Cause.MODEL_NOT_FOUND,
        Cause.NO_GPU,
    }
)


@dataclass(frozen=True)
class EngineEvent:
    state: EngineState
    previous: EngineState | None
    reason: str | None
    restarts: int
    pid: int | None
    at: float


@dataclass(frozen=True)
class SupervisorPolicy:
    silence_timeout: float = 120.0
    load_timeout: float = 3600.0  # 0: a load that keeps working may take any time
    health_interval: float = 2.0
    health_timeout: float = 5.0
    health_failures: int = 3
    progress_timeout: float = 300.0  # 0: the inference loop is not watched (``liveness``)
    read_timeout: float = 600.0  # the longest wait for a byte of an answer (a first token)
    poll_interval: float = 0.05
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    crash_limit: int = 5
    crash_window: float = 300.0
    stop_grace: float = 5.0


Listener = Callable[[EngineEvent], None]
CorruptHandler = Callable[[], Awaitable[None]]


class _Crashed(Exception):
    """A life that ended; ``fatal``: for a reason of ours that no restart fixes, with no
    line of llama-server's to diagnose (it was never started)."""

    def __init__(
        self,
        reason: str,
        diagnosis: Diagnosis | None = None,
        tail: str = "",
        *,
        fatal: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.diagnosis = diagnosis
        self.tail = tail
        self.fatal = fatal


class Supervisor:
    """Starts llama-server, keeps it ready, restarts it when it dies, stops it cleanly."""

    def __init__(
        self,
        launch: LaunchSpec,
        *,
        environ: Mapping[str, str],
        policy: SupervisorPolicy | None = None,
        on_corrupt: CorruptHandler | None = None,
        in_use: Callable[[], bool] | None = None,
    ) -> None:
        self.launch = launch
        self.policy = policy or SupervisorPolicy()
        self.client = LlamaClient(
            launch.base_url,
            api_key=launch.api_key,
            read_timeout=self.policy.read_timeout,
            unix_socket=launch.unix_socket,
        )
        # Whether llama-server has work. One that may sleep (--sleep-idle-seconds) has its
        # loop watched only then, since each look keeps it awake; any other is watched
        # while idle too, so that a loop stuck between requests is restarted before the
        # next request finds it so.
        self._in_use = in_use if launch.sleeps_when_idle else None
        self.state = EngineState.STOPPED
        # When it last stopped being ready (monotonic): a request's wait for llama-server
        # counts from then at the earliest (``Generator.engine_ready``).
        self.unready_since = time.monotonic()
        self.props: Props | None = None
        self.restarts = 0
        # Which llama-server process this is, from 1: a request that was in one when it
        # died sees it change (``worker.generation`` counts such deaths per request).
        self.life = 0
        self.boot = uuid.uuid4().hex  # with ``life``: a llama-server no other worker's is
        self.failure: OrionLlamaError | None = None
        self._environ = environ
        self._on_corrupt = on_corrupt
        self._refetched = False
        self._listeners: list[Listener] = []
        self._proc: LlamaProcess | None = None
        self._task: asyncio.Task[None] | None = None
        self._state_changed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._draining = asyncio.Event()  # for good once set; it also ends a restart backoff
        # Failures since a life that stayed ready for a crash window: a model that loads
        # for two minutes and then dies never has five deaths within five minutes, and
        # five quick deaths are five in a row all the same.
        self._unsteady = 0
        self._ready_at: float | None = None
        self._backoff = wait_exponential(
            multiplier=self.policy.backoff_initial,
            min=self.policy.backoff_initial,
            max=self.policy.backoff_max,
        )

    # ------------------------------------------------------------------ observation

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    @property
    def pid(self) -> int | None:
        """The running llama-server's; None when none runs (a stopped worker's last
        announcement named a process long gone)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def ready(self) -> bool:
        return self.state is EngineState.READY

    def _set(self, state: EngineState, reason: str | None = None) -> None:
        if self._draining.is_set() and state in _ALIVE:  # a drain ends only in stopped or failed
            state = EngineState.DRAINING
        if state is self.state and reason is None:
            return
        previous, self.state = self.state, state
        if previous is EngineState.READY:
            self.unready_since = time.monotonic()
        event = EngineEvent(state, previous, reason, self.restarts, self.pid, time.time())
        log.info("engine %s -> %s%s", previous, state, f": {reason}" if reason else "")
        self._state_changed.set()
        self._state_changed = asyncio.Event()
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a listener must never break the engine
                log.exception("engine listener failed")

    async def left(self, life: int, timeout: float) -> None:
        """Wait until llama-server ``life`` is no longer the one serving (it died, or the
        engine is not ready), or ``timeout``. Its exit is seen within milliseconds, not at
        once: a request that broke off waits here before another takes its place, so that
        one is not sent to a server already dead."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self.life == life and self.state is EngineState.READY:
                    await self._state_changed.wait()

    async def wait_for(self, *states: EngineState, timeout: float | None = None) -> EngineState:
        """Wait until the state is one of ``states``; returns it."""
        async with asyncio.timeout(timeout):
            while self.state not in states:
                await self._state_changed.wait()
        return self.state

    # ------------------------------------------------------------------ control

    async def start(self) -> None:
        """Start supervising and return once ready; raise ``EngineStartError`` if it failed."""
        if self._task is not None:
            raise RuntimeError("supervisor already started")
        self._set(EngineState.STARTING)
        self._task = asyncio.create_task(self._run(), name="llama-server-supervisor")
        state = await self.wait_for(EngineState.READY, EngineState.FAILED, EngineState.STOPPED)
        if state is not EngineState.READY:
            raise self.failure or EngineStartError("llama-server stopped before it was ready")

    def expect_start(self) -> None:
        """``start`` will follow (after the model check or download): from now on, callers
        wait for readiness instead of being told that llama-server is stopped."""
        if self._task is None and self.state is EngineState.STOPPED:
            self._set(EngineState.STARTING)

    def give_up(self, error: OrionLlamaError) -> None:
        """The start will not come (the model could not be had): ``failed``, with ``error``
        as the reason, for those waiting for readiness; they were told ``draining`` by
        the stop that followed. Only before a start: once started, the states are its."""
        if self._task is None and self.state is EngineState.STARTING:
            self.failure = error
            self._set(EngineState.FAILED, str(error))

    def begin_drain(self) -> None:
        """Stop being ``ready`` (no new work); llama-server keeps running for in-flight work.

        For good: a llama-server that dies during the drain is not restarted, and nothing
        the supervisor does afterwards announces it ready again (in-flight stream work is
        then left pending for another worker instead of waiting for a reload).
        """
        if self.state in _ALIVE:
            self._draining.set()
            self._set(EngineState.DRAINING, "graceful stop")

    async def stop(self) -> None:
        """Stop llama-server and the supervisor; safe to call twice."""
        self._stopping.set()
        if self._task is not None:
            # Waited for, not awaited: a caller that gives up on the stop gets its cancel,
            # and the owner task still stops llama-server instead of being cut off mid-way.
            await asyncio.wait({self._task})
        elif self._proc is not None:
            await self._proc.stop(self.policy.stop_grace)
        await self.client.aclose()
        _remove_stale_socket(self.launch.unix_socket)
        if self.state is not EngineState.FAILED:
            self._set(EngineState.STOPPED)

    # ------------------------------------------------------------------ the owner task

    async def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    await self._one_life()
                except _Crashed as crash:
                    if self._proc is not None:  # what its death left of its group goes now
                        await self._proc.stop(self.policy.stop_grace)
                    if not await self._after_crash(crash):
                        return
        except Exception as exc:  # a surprise must still end in FAILED, never hang in LOADING
            log.exception("llama-server supervisor failed")
            tail = self._proc.tail_text() if self._proc else ""
            self._fail(f"supervisor failed: {type(exc).__name__}: {exc}", None, tail)
        finally:
            if self._proc is not None:
                await self._proc.stop(self.policy.stop_grace)

    async def _one_life(self) -> None:
        self._set(EngineState.STARTING)
        self.life += 1
        self._ready_at = None
        if (last := self._proc) is not None and last.stuck and last.returncode is None:
            # Its socket still takes connections: "port taken" would blame someone else.
            raise _Crashed(
                f"llama-server pid {last.pid} of the last start is still stuck in the kernel "
                "(state D: a hung GPU driver or file system), holding its port and its GPU "
                "memory: see dmesg and nvidia-smi"
            )
        if await _listening(self.launch.base_url):
            # Ours would fail to bind, while the other answered /health and /props in its
            # name: ready, serving whatever model that one runs. The previous life's group
            # is gone by now (``_run``): another server holds it. One that binds between
            # this look and llama-server's own bind is told by llama-server (PORT_IN_USE).
            raise _Crashed(
                f"llama-server's port is already taken: something answers at "
                f"{self.launch.base_url} before llama-server was started; stop it or set "
                "LLAMACPP_PORT_OVERRIDE",
                fatal=True,
            )
        _remove_stale_socket(self.launch.unix_socket)  # one that died left it: no bind
        self._proc = proc = LlamaProcess(self.launch, environ=self._environ)
        try:
            await proc.start()
        except OSError as exc:  # no binary, not executable, no pids left: the crash limit decides
            raise self._crash(proc, f"llama-server could not be started: {exc}") from exc
        self._set(EngineState.LOADING)
        await self._until_ready(proc)
        if self._stopping.is_set():
            return
        try:
            # Bounded as /health is: the client's default is a generation's read timeout
            # (10 minutes), for a llama-server that took the connection and said nothing.
            self.props = await self.client.props(timeout=max(self.policy.health_timeout, 5.0))
        except (EngineUnavailable, UpstreamError) as exc:  # died or broke right after /health
            raise await self._killed(
                proc, f"llama-server was healthy but /props failed: {exc}"
            ) from exc
        proc.quiet = True
        self._ready_at = time.monotonic()
        self._set(EngineState.READY)  # stays DRAINING if a drain began meanwhile (``_set``)
        await self._watch(proc)

    async def _refuse_the_cpu(self, proc: LlamaProcess) -> None:
        """Raise when llama-server said it found no usable GPU for a profile pinned to
        GPUs: it would serve, on the CPU, many times slower, which is not what was asked."""
        if proc.no_gpu is not None:
            await proc.killed()
            reason = "llama-server found no usable GPU for a profile that pins GPUs"
            raise _Crashed(reason, proc.no_gpu, proc.tail_text())

    async def _until_ready(self, proc: LlamaProcess) -> None:
        """Poll /health until 200; the deadline moves with every byte llama-server prints
        and whenever it is seen working (``LlamaProcess.look``), up to ``load_timeout``
        from the start, which does not move."""
        policy = self.policy
        started = time.monotonic()
        while not self._stopping.is_set():
            if proc.returncode is not None:
                await proc.wait()
                raise self._crash(proc, f"llama-server {exit_said(proc.returncode)} while loading")
            if policy.load_timeout and time.monotonic() - started > policy.load_timeout:
                raise await self._killed(
                    proc,
                    f"llama-server hung while loading: not ready after "
                    f"{policy.load_timeout:.0f}s although it kept working (load_timeout)",
                )
            await self._refuse_the_cpu(proc)
            proc.look()
            silent = time.monotonic() - proc.last_sign_of_life
            if silent > policy.silence_timeout:
                raise await self._killed(
                    proc,
                    f"llama-server hung while loading: no output, no health and no work "
                    f"(CPU, disk reads, memory) for {silent:.0f}s (silence_timeout)",
                )
            proc.output.clear()
            polled = time.monotonic()
            with contextlib.suppress(EngineUnavailable):
                health = await self.client.health(timeout=policy.health_timeout)
                if health.ready and proc.returncode is None:  # else not ours that answered
                    # Its load's lines may still be in the pipe, unread: a "no usable GPU
                    # found" among them went unseen on a busy machine, the profile served
                    # on the CPU as ready (round 27's CI). Read up to its "model loaded".
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(proc.loaded.wait(), _LOAD_LINES_SEC)
                    await self._refuse_the_cpu(proc)
                    return
            # llama-server says when it is done loading ("server is listening", "all slots
            # are idle"): what it prints is worth a look at once, not at the next tick, but
            # no more than once per _MIN_POLL_GAP (its loading dots come a few at a time).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.output.wait(), policy.poll_interval)
            await asyncio.sleep(max(0.0, polled + _MIN_POLL_GAP - time.monotonic()))

    async def _watch(self, proc: LlamaProcess) -> None:
        """While ready: return on stop; raise ``_Crashed`` when it dies or stops answering."""
        policy = self.policy
        failures = 0
        exited = asyncio.create_task(proc.wait())
        stop = asyncio.create_task(self._stopping.wait())
        progress = self._watch_progress()
        try:
            while not self._stopping.is_set():
                done, _ = await asyncio.wait(
                    {exited, stop} | ({progress} if progress else set()),
                    timeout=policy.health_interval,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if exited in done:
                    raise self._crash(proc, f"llama-server {exit_said(proc.returncode or 0)}")
                if self._stopping.is_set():
                    return
                if progress in done:
                    if reason := self._wedged_by(progress):
                        raise await self._killed(proc, f"{reason}: wedged")
                    progress = None
                failures = 0 if await self._healthy() else failures + 1
                if failures >= policy.health_failures:
                    reason = f"llama-server stopped answering /health ({failures} checks failed)"
                    raise await self._killed(proc, f"{reason}: wedged")
        finally:
            for task in (exited, stop, progress):
                if task:
                    task.cancel()

    def _watch_progress(self) -> asyncio.Task[str | None] | None:
        timeout = self.policy.progress_timeout
        if not timeout:
            return None
        probe = liveness.wedged(
            self.client, interval=self.policy.health_interval, timeout=timeout, in_use=self._in_use
        )
        return asyncio.create_task(probe, name="llama-server-progress")

    @staticmethod
    def _wedged_by(progress: asyncio.Task[str | None]) -> str | None:
        """Why the watch says llama-server is wedged; None when it ended without a
        verdict (``--no-slots``, or a surprise in ``/slots``, which must not fail the
        engine: that is left to ``/health``)."""
        if progress.cancelled():
            return None
        if (error := progress.exception()) is not None:
            log.error("the inference-loop watch failed, now off: %r", error)
            return None
        return progress.result()

    async def _killed(self, proc: LlamaProcess, reason: str) -> _Crashed:
        await proc.killed()
        return self._crash(proc, reason)

    async def _healthy(self) -> bool:
        try:
            return (await self.client.health(timeout=self.policy.health_timeout)).ready
        except EngineUnavailable:
            return False

    def _refetch_may_fix(self, diagnosis: Diagnosis) -> bool:
        """A model file cut short or damaged, or gone (a cache cleaned under a running
        worker): fetched again, once. A file llama-server cannot open that is none of the
        model's (a LoRA in extra_args) is not: its re-fetch hashed every model file first,
        minutes at 70 GB, on every start, before the same failure."""
        if self._on_corrupt is None:
            return False
        if diagnosis.cause is Cause.CORRUPT_MODEL:
            return True
        return diagnosis.cause is Cause.MODEL_NOT_FOUND and any(
            not os.path.exists(path) for path in self.launch.model_files
        )

    def _crash(self, proc: LlamaProcess, reason: str) -> _Crashed:
        return _Crashed(reason, proc.final_diagnosis(), proc.tail_text())

    async def _after_crash(self, crash: _Crashed) -> bool:
        """Decide: refetch, restart with backoff, or fail. Returns False to stop the loop."""
        if self._stopping.is_set():
            return False
        if self._draining.is_set():
            log.warning("llama-server ended during the drain (%s): not restarted", crash.reason)
            return False
        diagnosis = crash.diagnosis
        reason = f"{crash.reason}: {diagnosis}" if diagnosis else crash.reason
        # No block for a llama-server that printed nothing (a port taken before its start)
        said = f"\n--- last lines of llama-server ---\n{crash.tail}" if crash.tail.strip() else ""
        log.error("%s%s", reason, said)
        if diagnosis and self._refetch_may_fix(diagnosis) and not self._refetched:
            self._refetched = True
            self._set(EngineState.RESTARTING, f"{reason}; verifying and re-fetching the model")
            try:
                # a re-fetch may hash or download gigabytes: a SIGTERM does not wait for it
                refetched = await unless_stopped(self._stopping, self._on_corrupt())
            except Exception as exc:  # the model layer says why; that is the failure
                return self._fail(f"{reason}; re-fetch failed: {exc}", diagnosis, crash.tail)
            return refetched and not self._draining.is_set()
        # Fatal only before the life was ready: once its flags and model have worked, out of
        # memory is a request's (a large image, another process on the card), and a line
        # left in the tail from the load is no cause; the crash limit decides then.
        if crash.fatal or (
            diagnosis
            and (
                diagnosis.cause is Cause.CORRUPT_MODEL
                or (diagnosis.cause in FATAL and self._ready_at is None)
            )
        ):
            return self._fail(reason, diagnosis, crash.tail)
        failures, loop = self._count_crash()
        if failures >= self.policy.crash_limit:
            return self._fail(f"crash loop: {loop}; last: {reason}", diagnosis, crash.tail)
        self.restarts += 1
        delay = self._backoff(_Attempt(failures))
        self._set(EngineState.RESTARTING, f"{reason}; restart #{self.restarts} in {delay:.1f}s")
        await self._backoff_wait(delay)
        if self._draining.is_set():  # it began during the wait: a drain is for good
            log.warning("drain began during the restart backoff: llama-server not restarted")
            return False
        return not self._stopping.is_set()

    def _count_crash(self) -> tuple[int, str]:
        """This crash counted in a row since a life that stayed ready for a whole crash
        window, and what the count says. (Deaths within the window were counted apart
        too, once: every one of them is also in a row since such a life, so that count
        was never the larger and decided nothing.)"""
        window = self.policy.crash_window
        steady = self._ready_at is not None and time.monotonic() - self._ready_at >= window
        self._unsteady = 1 if steady else self._unsteady + 1
        return self._unsteady, (
            f"{self._unsteady} failures in a row, none ready for {window:.0f}s in between"
        )

    async def _backoff_wait(self, delay: float) -> None:
        """Sleep ``delay`` seconds, or less if a stop or a drain begins meanwhile."""
        waits = {asyncio.ensure_future(e.wait()) for e in (self._stopping, self._draining)}
        try:
            await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    def _fail(self, reason: str, diagnosis: Diagnosis | None, tail: str) -> bool:
        self.failure = EngineStartError(
            reason, diagnosis=str(diagnosis) if diagnosis else None, tail=tail
        )
        self._set(EngineState.FAILED, reason)
        return False


@dataclass
class _Attempt:
    """The one attribute tenacity's wait strategies read from a retry state."""

    attempt_number: int


async def _listening(url: str) -> bool:
    """Whether something accepts connections at ``url``'s host and port."""
    parsed = urlsplit(url)
    try:
        async with asyncio.timeout(1.0):
            _, writer = await asyncio.open_connection(parsed.hostname, parsed.port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _remove_stale_socket(path: str | None) -> None:
    """Remove the UNIX socket file at ``path`` if nothing listens there: one left by a
    llama-server that died (a file of another kind is left for llama-server's bind to
    report). One that answers is another worker's on the same port, whose TCP port
    check refuses this start: its socket stays."""
    if path is None:
        return
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            probe.connect(path)  # on a local socket: accepted or refused at once
    except ConnectionRefusedError:
        with contextlib.suppress(OSError):
            os.unlink(path)
    except OSError:
        return
