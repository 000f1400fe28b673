"""A Redis demoted to a replica where it stands: a failover behind one address.

Managed Redis (a cloud's failover, Sentinel behind a virtual IP, a Kubernetes operator)
promotes a replica and moves the address to it, while connections already open stay with
the old primary, now a replica. Every write on them is refused with ``READONLY``, a reply
redis-py leaves the connection in use for: the worker would retry its claims, results and
stream reads on the same connection for good, answering nothing. Here such a reply ends the
connection and reads as a lost one, which every caller already retries on a new connection,
through the address, to the new primary.

A refusal on a connection opened since the last reset closes every live connection of
the client, its lanes' and the pub/sub one included: a replica passes on what is published
on its primary, but a caller's PUBLISH counts only the new primary's subscribers, and
would find none. (The pub/sub listener also checks, as it subscribes, that it reached a
primary: ``pubsub.PubSubListener``; the address may move later than the first refusal.)
A refusal on an older connection (one the reset missed) ends that connection alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Any, ClassVar

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MasterDownError, ReadOnlyError, ResponseError

log = logging.getLogger(__name__)


class NotAPrimary(RedisConnectionError):
    """The Redis at this address is no primary any more: the connection was closed."""


def refuses_as_a_replica(exc: BaseException) -> bool:
    """A reply that says the Redis is a replica: READONLY, MASTERDOWN, or either inside a
    script's error (before Redis 7 a write refused in a script came back as ``ERR Error
    running script ... -READONLY ...``)."""
    if isinstance(exc, ReadOnlyError | MasterDownError):
        return True
    text = str(exc)
    return isinstance(exc, ResponseError) and ("-READONLY " in text or "-MASTERDOWN " in text)


def says_replica(role: object) -> bool:
    """Whether a reply to ``ROLE`` names a replica. Anything else (an error reply, as where
    an ACL denies ROLE) counts as a primary: the check is a hint, never a reason to stop."""
    if not isinstance(role, list) or not role:
        return False
    said = role[0]
    return (said.decode() if isinstance(said, bytes) else str(said)) != "master"


class _FollowsFailover(AbstractConnection):
    live: ClassVar[weakref.WeakSet[_FollowsFailover]]  # set per client
    reset_at: ClassVar[float] = float("-inf")
    connected_at = float("-inf")

    async def _connect(self) -> None:
        await super()._connect()  # type: ignore[safe-super]
        self.connected_at = time.monotonic()
        type(self).live.add(self)

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except ResponseError as exc:
            if not refuses_as_a_replica(exc):
                raise
            fresh = self.connected_at > type(self).reset_at
            await self.disconnect(nowait=True)
            if fresh:
                await self._reset_all()
            raise NotAPrimary(
                f"the Redis this connection reached is a replica now ({exc}): a failover; "
                f"reconnecting"
            ) from exc

    async def _reset_all(self) -> None:
        kind = type(self)
        kind.reset_at = time.monotonic()
        log.warning("Redis at the bus address was replaced (a failover): reconnecting all")
        others = [conn for conn in list(kind.live) if conn is not self]
        # Each reconnects as it is next used; a command cut off meanwhile reads as a lost
        # connection, which its caller retries.
        await asyncio.gather(
            *(conn.disconnect(nowait=True) for conn in others), return_exceptions=True
        )


def follow_failovers(client: aioredis.Redis) -> aioredis.Redis:
    """``client``, whose connections (and those its lanes make) close on a reply that
    says their Redis is no primary any more, whatever kind they are (TCP, TLS, UNIX)."""
    pool = client.connection_pool
    kind = pool.connection_class
    if not issubclass(kind, _FollowsFailover):
        fields = {"live": weakref.WeakSet()}
        pool.connection_class = type(kind.__name__, (_FollowsFailover, kind), fields)
    return client
