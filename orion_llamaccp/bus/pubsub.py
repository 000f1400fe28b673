"""Messages in over pub/sub: one connection for all our channels.

It survives its broker: the listener pings on its own connection and, when no pong comes
back in time (a frozen or half-dead Redis that redis-py would keep waiting on), tears the
connection down, reconnects and subscribes again.

The worker subscribes before it builds the rest of itself (``worker.startup``), so this
module imports no more than listening needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, NoPermissionError

from orion_llamaccp.bus.failover import NotAPrimary, says_replica
from orion_llamaccp.bus.retry import TRANSIENT, Backoff
from orion_llamaccp.errors import describe
from orion_llamaccp.stopping import sleep_unless_stopped

if TYPE_CHECKING:
    from redis.asyncio.client import PubSub

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], None]
FIX_AUTH = "fix the user name or password in ORION_BUS_URL"


class PubSubListener:
    """Subscribes ``channels`` and hands each message to ``handler(channel, data)``."""

    def __init__(
        self,
        redis: aioredis.Redis,
        channels: list[str],
        handler: MessageHandler,
        *,
        ping_interval: float = 2.0,
        ping_timeout: float = 6.0,
        bus: str = "",
    ) -> None:
        self.redis = redis
        self.channels = channels
        self.handler = handler
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.bus = bus  # the URL, its password masked: said while Redis was never reached
        self.ever_subscribed = False
        self.subscribed = asyncio.Event()
        self.reconnects = 0
        self.refused: AuthenticationError | None = None  # the credentials, last we tried
        self.backoff = Backoff()
        self._pubsub: PubSub | None = None  # the session's, while one runs
        # Channels whose UNSUBSCRIBE the session has not read the reply to yet; ``_left``
        # is set once there are none (or the session ended: its connection is gone).
        self._leaving: set[str] = set()
        self._left = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Listen until ``stop``. Nothing but our own cancellation ends it: the worker goes
        on beating "ready" whatever happens here, so a listener that stopped on an error
        it did not foresee (a Redis that refuses the SUBSCRIBE: an ACL without the
        channel) would leave it deaf, silently and for good. It says why and tries again."""
        while not stop.is_set():
            try:
                await self._session(stop)
                continue
            except AuthenticationError as exc:  # a ConnectionError to redis-py: not a blip
                self.refused = exc
                level, said = logging.ERROR, f"Redis refused our credentials ({exc}): {FIX_AUTH}"
            except (*TRANSIENT, ConnectionAbortedError) as exc:
                level, said = logging.WARNING, f"pub/sub connection lost ({exc})"
                if not self.ever_subscribed:  # no connection lost: none was ever made
                    at = f" at {self.bus}" if self.bus else ""
                    said = f"cannot reach Redis{at} ({exc}): check ORION_BUS_URL"
            except Exception as exc:
                level, said = logging.ERROR, f"pub/sub listening failed: {describe(exc)}"
            self.subscribed.clear()
            self.reconnects += 1
            delay = self.backoff.take()
            log.log(level, "%s; reconnecting in %.1fs", said, delay)
            await sleep_unless_stopped(stop, delay)

    def drop(self, *channels: str) -> None:
        """Not to be subscribed to again (a reconnect), whether or not a ``leave``
        reaches Redis: the part of it a stop that gives up on Redis still needs."""
        self.channels = [name for name in self.channels if name not in channels]

    async def leave(self, *channels: str) -> None:
        """Stop listening on ``channels`` and keep the others (also after a reconnect). A
        draining worker leaves its intake but keeps hearing cancels.

        Returns once the session has read the UNSUBSCRIBE's reply, so every message Redis
        sent on those channels before it has been handed over: a draining worker answers
        them all, where it used to stop while the last ones were still on the wire. The
        UNSUBSCRIBE goes out beside the session's read: a write and a read of one
        connection do not get in each other's way. Should it fail, the connection is
        broken, and the session subscribes again without them.
        """
        self.drop(*channels)
        pubsub = self._pubsub
        if pubsub is None:  # between sessions: the next one subscribes without them
            return
        self._leaving.update(channels)
        self._left.clear()
        with contextlib.suppress(*TRANSIENT, TimeoutError):
            async with asyncio.timeout(self.ping_timeout):
                # A session still subscribing unsubscribes them itself once its SUBSCRIBE
                # is answered (``_session``): what Redis sent on them meanwhile is waited
                # for too. Returning at once, the drain went on past its inbox.
                if self.subscribed.is_set():
                    await pubsub.unsubscribe(*channels)
                await self._left.wait()

    async def _session(self, stop: asyncio.Event) -> None:
        # Subscription replies come through: an UNSUBSCRIBE's tells ``leave`` that every
        # message before it has been handed over.
        self._pubsub = pubsub = self.redis.pubsub()
        try:
            await _on_a_primary(pubsub)
            wanted = list(self.channels)
            await pubsub.subscribe(*wanted)
            # Its first reply: a refusal (an ACL without one of the channels) is raised
            # here, before the session counts as going. It used to come at the first read,
            # after the pause was reset: ten tries a second, for good.
            first = await self._first_reply(pubsub)
            if left := [name for name in wanted if name not in self.channels]:
                await pubsub.unsubscribe(*left)  # ``leave`` ran while we subscribed
            # ``leave`` waits for the replies of those; the others it named were never
            # subscribed in this session (dropped before it took its list): none comes.
            self._leaving.intersection_update(left)
            if not self._leaving:
                self._left.set()
            self.subscribed.set()
            self.ever_subscribed = True
            self.refused = None
            self.backoff.reset()
            # The first time is the owner's to report (the worker does once it is built);
            # subscribing again after a lost connection is news.
            level = logging.INFO if self.reconnects else logging.DEBUG
            log.log(level, "subscribed to %s", ", ".join(self.channels))
            self._take(first)
            last_pong = last_ping = time.monotonic()
            while not stop.is_set():
                message = await pubsub.get_message(timeout=min(1.0, self.ping_interval))
                now = time.monotonic()
                if message is not None:
                    last_pong = now  # any traffic proves the connection alive
                    self._take(message)
                if now - last_pong > self.ping_timeout:
                    raise ConnectionAbortedError(
                        f"no answer to PING on the pub/sub connection for {now - last_pong:.1f}s"
                    )
                if now - last_ping >= self.ping_interval:
                    last_ping = now
                    await asyncio.wait_for(pubsub.ping(), self.ping_timeout)
        finally:
            self.subscribed.clear()
            self._pubsub = None
            self._leaving.clear()  # the next session subscribes without them
            self._left.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pubsub.aclose(), 1.0)

    async def _first_reply(self, pubsub: PubSub) -> dict:
        """The session's first message (its SUBSCRIBE's reply, or Redis's refusal of it,
        raised), within the PING timeout."""
        async with asyncio.timeout(self.ping_timeout):
            while True:
                if (message := await pubsub.get_message(timeout=1.0)) is not None:
                    return message

    def _take(self, message: dict) -> None:
        if message["type"] == "message":
            self._dispatch(message)
        elif message["type"] == "unsubscribe":
            self._unsubscribed(message["channel"])

    def _unsubscribed(self, channel: bytes | str) -> None:
        self._leaving.discard(channel.decode() if isinstance(channel, bytes) else channel)
        if not self._leaving:
            self._left.set()

    def _dispatch(self, message: dict) -> None:
        channel = message["channel"]
        channel = channel.decode() if isinstance(channel, bytes) else channel
        data = message["data"]
        try:
            self.handler(channel, data if isinstance(data, bytes) else str(data).encode())
        except Exception:  # a bad message must never stop the listener
            log.exception("pub/sub handler failed on %s", channel)


async def _on_a_primary(pubsub: PubSub) -> None:
    """Raise ``NotAPrimary`` where the pub/sub connection reached a replica: after a
    failover the address may still lead to the old primary for a while, and subscribed
    there the worker would hear requests (a replica passes them on) while callers'
    PUBLISH on the new primary counts no subscriber. ROLE before SUBSCRIBE: subscribed,
    a connection takes no other command. Unchecked where an ACL denies ROLE."""
    await pubsub.connect()
    connection = pubsub.connection
    assert connection is not None
    try:
        await connection.send_command("ROLE")
        role = await connection.read_response()
    except NoPermissionError:
        return
    if says_replica(role):
        await connection.disconnect()  # back in the pool, it would lead there again
        raise NotAPrimary("the pub/sub connection reached a replica (a failover): again")
