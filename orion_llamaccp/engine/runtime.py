"""Run the engine for a profile: plan, make sure the model is on disk, supervise.

This is where the model layer and the engine meet: the supervisor is given a way to
verify and re-fetch the model when llama-server says the file is corrupt.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from orion_llamaccp.engine.devices import LIST_DEVICES, no_gpu_listed
from orion_llamaccp.engine.plan import ServicePlan, build_plan
from orion_llamaccp.engine.supervisor import EngineState, Supervisor, SupervisorPolicy
from orion_llamaccp.errors import EngineStartError
from orion_llamaccp.settings import Settings
from orion_llamaccp.stopping import unless_stopped

if TYPE_CHECKING:
    from orion_llamaccp.model.fetch import ResolvedModel
    from orion_llamaccp.model.progress import ProgressHook

log = logging.getLogger(__name__)

T = TypeVar("T")


async def prepare_model(plan: ServicePlan, progress: ProgressHook | None = None) -> ResolvedModel:
    """Download (if needed) and verify the profile's files, off the event loop.

    Cancelling this coroutine stops the download thread at its next chunk, so a SIGTERM
    during a 40 GB download does not wait for it to finish. A profile pinned to GPUs on a
    host where llama-server sees none fails as soon as it says so (``engine.devices``),
    not after the download.
    """
    from orion_llamaccp.model.fetch import ensure_model

    fetch = asyncio.ensure_future(_cancellable(ensure_model, plan, progress))
    if plan.launch.gpus_required is None or not _lists_devices(plan):
        return await fetch
    check = asyncio.ensure_future(no_gpu_listed(plan.launch, os.environ))
    try:
        await asyncio.wait({fetch, check}, return_when=asyncio.FIRST_COMPLETED)
        if check.done() and _said(check) and (diagnosis := check.result()):
            reason = "llama-server found no usable GPU for a profile that pins GPUs"
            raise EngineStartError(f"{reason}: {diagnosis}", diagnosis=str(diagnosis))
        return await fetch
    finally:
        for task in (fetch, check):
            task.cancel()  # a no-op once done
        await asyncio.gather(fetch, check, return_exceptions=True)


def _said(check: asyncio.Future[Any]) -> bool:
    """Whether the check ended with an answer (None included), not an error of its own."""
    return not check.cancelled() and check.exception() is None


def _lists_devices(plan: ServicePlan) -> bool:
    return plan.binary is not None and plan.binary.accepts(LIST_DEVICES)


async def _cancellable(
    fetch: Callable[..., ResolvedModel], plan: ServicePlan, progress: ProgressHook | None
) -> ResolvedModel:
    """``fetch`` in a thread that a cancel of the awaiting coroutine stops at its next chunk.

    A thread of its own, which the process does not wait for as it exits, not the loop's
    default executor, which it does: a read stalled mid-download (up to the stall timeout)
    or the hash of a 40 GB file held a stop's exit that long after its goodbye. Cancelled,
    the thread is told to stop and left behind; the download resumes from its partial
    file next time, and the OS drops the file's lock with the process.
    """
    cancel = threading.Event()
    fetched = _in_daemon_thread(
        fetch, plan.profile, plan.settings, progress=progress, cancel=cancel
    )
    try:
        return await asyncio.shield(fetched)
    except asyncio.CancelledError:
        cancel.set()
        # Nobody awaits the thread's outcome now: its "cancelled" error, had asyncio to
        # drop it unread, was logged as "Future exception was never retrieved".
        fetched.add_done_callback(_read_and_dropped)
        raise


def _read_and_dropped(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _in_daemon_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> asyncio.Future[T]:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def run() -> None:
        try:
            result = fn(*args, **kwargs)
        except StopIteration as exc:  # a future cannot hold one: it would never be settled
            done = functools.partial(future.set_exception, RuntimeError(repr(exc)))
        except BaseException as exc:  # whatever ends the thread, the awaiting coroutine hears
            done = functools.partial(future.set_exception, exc)
        else:
            done = functools.partial(future.set_result, result)
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            loop.call_soon_threadsafe(settle, done)

    threading.Thread(
        target=run, name=f"fetch-{getattr(fn, '__name__', 'model')}", daemon=True
    ).start()
    return future


def make_supervisor(
    plan: ServicePlan,
    *,
    policy: SupervisorPolicy | None = None,
    progress: ProgressHook | None = None,
    in_use: Callable[[], bool] | None = None,
    refetched: Callable[[ResolvedModel], None] | None = None,
) -> Supervisor:
    """A supervisor whose corrupt-model reaction goes through the model layer once;
    ``refetched`` hears of the model as it is after it (a new file, its sha256), as the
    first fetch's caller did: the worker's heartbeats went on showing the re-fetch's
    last progress, and the file from before."""
    from orion_llamaccp.model.fetch import refetch_corrupt

    async def on_corrupt() -> None:  # re-hashing a big GGUF takes minutes: a stop cancels it
        resolved = await _cancellable(refetch_corrupt, plan, progress)
        if refetched is not None:
            refetched(resolved)

    return Supervisor(
        plan.launch,
        environ=dict(os.environ),  # not the .env file's: its secrets are not llama-server's
        policy=policy or policy_from(plan.settings),
        on_corrupt=on_corrupt,
        in_use=in_use,
    )


def policy_from(settings: Settings) -> SupervisorPolicy:
    return SupervisorPolicy(
        silence_timeout=settings.engine_silence_timeout_sec,
        load_timeout=settings.engine_load_timeout_sec,
        health_interval=settings.engine_health_interval_sec,
        health_timeout=settings.engine_health_timeout_sec,
        progress_timeout=settings.engine_progress_timeout_sec,
        # After the generation's own deadline, which starts a moment later and says why.
        read_timeout=settings.request_timeout_sec + 30,
        crash_limit=settings.engine_crash_limit,
    )


async def run_engine(
    settings: Settings, stop: asyncio.Event, on_ready: Callable[[Supervisor], None]
) -> None:
    """Fetch and verify the model, start llama-server (``on_ready`` once it is) and keep it
    supervised until ``stop`` is set. A stop during a download or a load is obeyed at
    once; the engine's failure, at its start or once it gave up restarting, is raised:
    a process that only serves the engine must not linger after it."""
    plan = build_plan(settings)
    supervisor = make_supervisor(plan)

    async def serve() -> None:
        await prepare_model(plan)
        await supervisor.start()
        on_ready(supervisor)
        await supervisor.wait_for(EngineState.FAILED)
        raise supervisor.failure or EngineStartError("llama-server failed")

    try:
        await unless_stopped(stop, serve())
    finally:
        await supervisor.stop()
