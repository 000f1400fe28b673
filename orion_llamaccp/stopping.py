"""Await one step unless a stop comes first: how every layer obeys a stop mid-step.

A download, a model check, a re-fetch or llama-server's load can take minutes, and a
SIGTERM must not wait for them. The step is cancelled and waited for, not abandoned:
what it holds (a lock file, a half-started process) is released before the caller
goes on with its own shutdown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable


async def unless_stopped(stop: asyncio.Event, step: Awaitable[object]) -> bool:
    """Await ``step``: True once it finished (what it raised is raised), False when
    ``stop`` was set first, ``step`` then cancelled and ended. A step that finished just
    as the stop came counts as finished."""
    task = asyncio.ensure_future(step)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return False
    task.result()
    return True
