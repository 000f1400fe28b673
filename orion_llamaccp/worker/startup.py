"""Start-up: listen on the bus first, then build the worker.

A request published while the worker starts must wait in its inbox, not go unheard. So
``serve`` subscribes as soon as it knows the profile, and only then probes llama-server's
``--help`` and imports the rest of the worker (engine, HTTP client, handler: about half of
the start-up time). This module imports no more than subscribing needs.
"""

from __future__ import annotations

import asyncio
import contextlib

import redis.asyncio as aioredis

from orion_llamaccp.bus.intake import PubSubListener
from orion_llamaccp.engine.plan import plan_profile, select_profile
from orion_llamaccp.settings import Settings
from orion_llamaccp.worker.announce import Channels, channels_for


def connect(settings: Settings) -> aioredis.Redis:
    """The worker's Redis client. No silent retries inside redis-py: every retry is ours,
    and only where repeating a call is safe (see ``bus.retry``)."""
    timeout = settings.redis_socket_timeout_sec
    return aioredis.Redis.from_url(
        settings.bus_url.get_secret_value(),
        socket_timeout=timeout,
        socket_connect_timeout=min(timeout, 3.0),
        health_check_interval=15,
        retry_on_timeout=False,
        max_connections=512,
    )


def transports(settings: Settings) -> set[str]:
    return {t.strip() for t in settings.transports.split(",")}


class Intake:
    """The worker's pub/sub listener and the inbox it fills, startable before the worker.

    Messages wait in ``inbox`` until the worker reads them; ``stop`` ends the listening.
    """

    def __init__(self, settings: Settings, redis: aioredis.Redis, channels: Channels) -> None:
        self.inbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self.stop = asyncio.Event()
        names = (
            channels.intake if "pubsub" in transports(settings) else None,
            settings.cancel_channel,
            settings.discover_channel,
        )
        self.listener = PubSubListener(
            redis,
            [name for name in names if name],
            self._received,
            ping_interval=settings.pubsub_ping_sec,
            ping_timeout=3 * settings.pubsub_ping_sec,
        )
        self._task: asyncio.Task[None] | None = None

    def _received(self, channel: str, data: bytes) -> None:
        self.inbox.put_nowait((channel, data))

    def start(self) -> asyncio.Task[None]:
        """Start listening; a second call returns the same task."""
        if self._task is None:
            self._task = asyncio.create_task(self.listener.run(self.stop), name="pubsub")
        return self._task

    async def close(self) -> None:
        self.stop.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def serve(settings: Settings, stop: asyncio.Event) -> int:
    """``orion-llamaccp run``: listen, build the plan and the worker, serve until ``stop``."""
    # Before the bus: a profile that does not exist must fail alone, and names our channels.
    registry, profile = select_profile(settings)
    redis = connect(settings)
    intake = Intake(settings, redis, channels_for(settings, profile.name))
    listening = asyncio.ensure_future(intake.listener.subscribed.wait())
    intake.start()
    try:
        planning = asyncio.ensure_future(
            asyncio.to_thread(plan_profile, settings, registry, profile)
        )
        # The imports below would hold up the subscription: wait for it, unless the plan fails
        # (nothing to serve) or Redis is slow (``Worker.run`` waits longer, and retries go on).
        await asyncio.wait({listening, planning}, timeout=1.0, return_when=asyncio.FIRST_EXCEPTION)
        plan = await planning
        # Imported only now: it is most of the start-up time, and we listen already.
        from orion_llamaccp.worker.service import Worker

        return await Worker(settings, plan, redis, intake).run(stop)
    finally:
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening
        await intake.close()
        await redis.aclose()


__all__ = ["Intake", "connect", "serve"]
