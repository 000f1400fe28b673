"""``run``: serve the selected profile until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import signal

from orion_llamaccp.cli import positive
from orion_llamaccp.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="serve the selected profile (LLM_PROFILE_NAME) on the bus")
    p.add_argument(
        "--engine-only",
        action="store_true",
        help="start llama-server and keep it ready, without joining the bus",
    )
    p.set_defaults(handler=cmd_run)
    p = sub.add_parser("demo", help="serve, ask one streamed question over the bus, stop")
    p.add_argument("prompt", nargs="?", default="Tell me a short story about a lighthouse.")
    p.add_argument("--max-tokens", type=positive(int), default=96, help="tokens to generate (96)")
    p.set_defaults(handler=cmd_demo)


def install_stop_signals(stop: asyncio.Event, hurry: asyncio.Event | None = None) -> None:
    """Signal handlers only set events; the serving code decides what stopping means.
    The first SIGTERM or Ctrl-C sets ``stop`` (a drain), the next one ``hurry`` (cut the
    drain short: an operator who will not wait for it)."""
    loop = asyncio.get_running_loop()

    def stop_or_hurry() -> None:
        if stop.is_set() and hurry is not None:
            hurry.set()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_or_hurry)
    loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
    # SIGUSR1's dump is run by the event loop, so a loop that is stuck never gives it; the
    # interpreter writes this one to stderr from its own signal handler, stuck or not.
    with contextlib.suppress(RuntimeError, OSError):  # a stderr without a file descriptor
        faulthandler.register(signal.SIGUSR2, all_threads=True)


def dump_tasks() -> None:
    """SIGUSR1: log every asyncio task and where it waits (for a worker that seems stuck;
    SIGUSR2 gives every thread's stack, for one whose event loop is stuck itself)."""
    import io
    import logging

    out = io.StringIO()
    for task in asyncio.all_tasks():
        out.write(f"--- {task.get_name()}\n")
        task.print_stack(limit=12, file=out)
    logging.getLogger("orion_llamaccp.tasks").warning("asyncio tasks:\n%s", out.getvalue())


async def _engine_only(settings: Settings) -> int:
    from orion_llamaccp.engine.runtime import run_engine
    from orion_llamaccp.engine.supervisor import Supervisor

    def ready(engine: Supervisor) -> None:
        print(f"llama-server ready at {engine.launch.base_url} (pid {engine.pid})", flush=True)

    stop = asyncio.Event()
    install_stop_signals(stop)
    await run_engine(settings, stop, ready)
    return 0


async def _serve(settings: Settings) -> int:
    from orion_llamaccp.worker.startup import serve

    stop, hurry = asyncio.Event(), asyncio.Event()
    install_stop_signals(stop, hurry)
    return await serve(settings, stop, hurry)


async def _demo(settings: Settings, prompt: str, max_tokens: int) -> int:
    """Serve the profile in this process, ask one streamed question over the bus, stop."""
    import sys

    from orion_llamaccp.client import BusClient
    from orion_llamaccp.engine.plan import build_plan
    from orion_llamaccp.engine.supervisor import EngineState
    from orion_llamaccp.errors import BusError
    from orion_llamaccp.worker.service import Worker
    from orion_llamaccp.worker.startup import connect

    stop = asyncio.Event()
    redis = connect(settings)
    try:
        await redis.ping()  # the bus is what the demo shows: no model loads without it
        worker = Worker(settings, build_plan(settings), redis)
    except BaseException:
        await redis.aclose()
        raise
    serving = asyncio.create_task(worker.run(stop))
    try:
        print(
            f"starting {settings.profile_name} (downloading/loading if needed)...", file=sys.stderr
        )
        waiter = asyncio.create_task(
            worker.supervisor.wait_for(EngineState.READY, EngineState.FAILED)
        )
        await asyncio.wait({waiter, serving}, return_when=asyncio.FIRST_COMPLETED)
        if worker.supervisor.state is not EngineState.READY:
            return await serving if serving.done() else 1
        if not await worker.intake.listening(timeout=settings.redis_socket_timeout_sec * 3):
            raise BusError(
                f"lost Redis at {settings.bus_url_display} while the model loaded: no question "
                "can be asked over the bus"
            )
        print(f"> {prompt}", file=sys.stderr)
        async with BusClient(redis=redis) as bus:
            result = await bus.chat(
                [{"role": "user", "content": prompt}],
                profile=settings.profile_name,
                channel=worker.channels.intake,  # ORION_LLAMACPP_INTAKE_CHANNEL included
                cancel_channel=settings.cancel_channel,
                stream=True,
                options={"max_tokens": max_tokens},
                on_delta=lambda d: print(d, end="", flush=True),
            )
        print()
        usage = result.payload.get("usage", {})
        print(
            f"--- {result.payload.get('error') or 'ok'}: {usage.get('completion_tokens')} "
            f"tokens, first token after "
            f"{((result.first_chunk_at or result.done_at) - result.sent_at) * 1000:.0f} ms",
            file=sys.stderr,
        )
        return 0 if result.ok else 1
    finally:
        stop.set()
        await asyncio.gather(serving, return_exceptions=True)
        await redis.aclose()


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from orion_llamaccp.cli.bus_cmds import run_bus

    return run_bus(
        _demo(settings, args.prompt, args.max_tokens), settings, waiting_for="the worker in time"
    )


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from orion_llamaccp.cli import run_async

    return run_async(_engine_only(settings) if args.engine_only else _serve(settings))
