"""A Redis demoted to a replica where it stands: a failover behind one address.

Managed Redis (a cloud's failover, Sentinel behind a virtual IP, a Kubernetes operator)
promotes a replica and moves the address to it, while connections already open stay with
the old primary, now a replica. Every write on them is refused with ``READONLY``, a reply
redis-py leaves the connection in use for: the worker would retry its claims, results and
stream reads on the same connection for good, answering nothing. Here such a reply ends the
connection and reads as a lost one, which every caller already retries on a new connection,
through the address, to the new primary. The first such reply closes every connection of
the pool, the pub/sub one included: a replica passes on what is published on its primary,
but a caller's PUBLISH counts only the new primary's subscribers, and would find none.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MasterDownError, ReadOnlyError

log = logging.getLogger(__name__)

# A replica that refuses writes, or reads too while its link to the primary is down.
_NOT_A_PRIMARY = (ReadOnlyError, MasterDownError)


class NotAPrimary(RedisConnectionError):
    """The Redis at this address is no primary any more: the connection was closed."""


# Replies of one failover reach many connections at once: the pool is reset once for them.
_RESET_EVERY_SEC = 1.0


class _FollowsFailover(AbstractConnection):
    pool: ConnectionPool  # set per client by ``follow_failovers``
    reset_at = -_RESET_EVERY_SEC

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except _NOT_A_PRIMARY as exc:
            await self.disconnect(nowait=True)
            await self._reset_the_pool()
            raise NotAPrimary(
                f"the Redis this connection reached is a replica now ({exc}): a failover; "
                f"reconnecting"
            ) from exc

    async def _reset_the_pool(self) -> None:
        kind = type(self)
        if time.monotonic() - kind.reset_at < _RESET_EVERY_SEC:
            return
        kind.reset_at = time.monotonic()
        log.warning("Redis at the bus address was replaced (a failover): reconnecting all")
        with contextlib.suppress(Exception):  # each connection reconnects as it is next used
            await self.pool.disconnect(inuse_connections=True)


def follow_failovers(client: aioredis.Redis) -> aioredis.Redis:
    """``client``, whose connections (and those its lanes make) close on a reply that
    says their Redis is no primary any more, whatever kind they are (TCP, TLS, UNIX)."""
    pool = client.connection_pool
    kind = pool.connection_class
    if not issubclass(kind, _FollowsFailover):
        pool.connection_class = type(kind.__name__, (_FollowsFailover, kind), {"pool": pool})
    return client
