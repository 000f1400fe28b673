"""``run``: serve the selected profile until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import signal

from orion_llamaccp.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="serve the selected profile (LLM_PROFILE_NAME) on the bus")
    p.add_argument(
        "--engine-only",
        action="store_true",
        help="start llama-server and keep it ready, without joining the bus",
    )
    p.set_defaults(handler=cmd_run)


def install_stop_signals(stop: asyncio.Event) -> None:
    """Signal handlers only set an event; the serving code decides what stopping means."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


async def _engine_only(settings: Settings) -> int:
    from orion_llamaccp.engine.runtime import start_engine

    stop = asyncio.Event()
    install_stop_signals(stop)
    engine = await start_engine(settings)
    try:
        print(f"llama-server ready at {engine.launch.base_url} (pid {engine.pid})", flush=True)
        await stop.wait()
    finally:
        await engine.stop()
    return 0


async def _serve(settings: Settings) -> int:
    from orion_llamaccp.worker import serve

    stop = asyncio.Event()
    install_stop_signals(stop)
    return await serve(settings, stop)


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from orion_llamaccp.cli import run_async

    return run_async(_engine_only(settings) if args.engine_only else _serve(settings))
