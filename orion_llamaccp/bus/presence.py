"""Presence on the bus: heartbeats, profile announcements, discovery, a Redis registry.

Heartbeats run on their own fixed schedule (``t0 + k * interval``, not "sleep after
work"), so the period Orion's monitor sees is the one we claim, whatever else the worker
is doing: a download, a long generation, a slow Redis call. Every periodic job runs under
``every``: a failure is logged and the next tick comes on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import orjson
import redis.asyncio as aioredis

from orion_llamaccp.bus import keys
from orion_llamaccp.bus.envelope import HEALTH, PROFILE_ANNOUNCE, Envelope, SystemHealthV1
from orion_llamaccp.bus.outbox import Outbox
from orion_llamaccp.bus.scripts import PRUNE_HOSTS
from orion_llamaccp.errors import describe
from orion_llamaccp.stopping import GOODBYES_SEC, Budget

log = logging.getLogger(__name__)

Snapshot = Callable[[], Awaitable[dict[str, Any]]]

# Engine state -> heartbeat status. Downloading counts as "degraded": alive, not serving.
STATUS = {
    "ready": "ok",
    "downloading": "degraded",
    "starting": "degraded",
    "loading": "degraded",
    "restarting": "degraded",
    "draining": "down",
    "stopped": "down",
    "failed": "down",
}


async def every(
    interval: float,
    job: Callable[[], Awaitable[None]],
    stop: asyncio.Event,
    name: str,
    *,
    first_delay: float = 0.0,
) -> None:
    """Run ``job`` at ``t0 + k * interval`` until ``stop``; log failures and carry on."""
    loop = asyncio.get_running_loop()
    start = loop.time() + first_delay
    tick = 0
    while not stop.is_set():
        wait = start + tick * interval - loop.time()
        if wait > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
            if stop.is_set():
                return
        bound = max(interval, 1.0)
        try:
            await asyncio.wait_for(job(), timeout=bound)
        except TimeoutError:  # its own text is empty: "heartbeat failed: " said nothing
            log.warning("%s failed: no answer within %g s", name, bound)
        except Exception as exc:
            log.warning("%s failed: %s", name, describe(exc))
        tick += 1
        behind = loop.time() - (start + tick * interval)
        if behind > interval:  # skip missed ticks instead of bursting to catch up
            tick += int(behind // interval) + 1


def liveness_ttl(interval: float) -> int:
    """Seconds a beat is kept under its liveness key: three intervals, whole seconds."""
    return max(int(interval * 3 + 0.999), 1)


async def beat(
    redis: aioredis.Redis,
    outbox: Outbox,
    *,
    boot_id: str,
    interval: float,
    channel: str,
    details: dict[str, Any],
) -> tuple[dict[str, Any], bytes | None]:
    """One ``system.health.v1`` of ``outbox``'s service on ``channel``, its status from
    ``details["state"]``, also kept under the service's liveness key for three intervals
    (``ps``, ``health``). Returns the payload, and the beat it replaced under that key."""
    service = outbox.source
    payload = SystemHealthV1(
        service=service.name,
        node=service.node,
        version=service.version,
        instance=str(service.instance),
        boot_id=boot_id,
        status=STATUS.get(str(details.get("state")), "degraded"),
        last_seen_ts=datetime.now(UTC),
        heartbeat_interval_sec=interval,
        details=details,
    ).model_dump(mode="json")
    message = outbox.encode(HEALTH, payload)
    ttl = liveness_ttl(interval)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.publish(channel, message)
        alive = keys.liveness(service.name, str(service.instance))
        pipe.set(alive, message, ex=ttl, get=True)
        pipe.sadd(keys.HOSTS_INDEX, alive)
        pipe.expire(keys.HOSTS_INDEX, keys.HOSTS_INDEX_TTL_SEC)
        _, replaced, *_ = await pipe.execute()
    return payload, replaced


async def prune_hosts(redis: aioredis.Redis) -> int:
    """Drop the hosts index's members whose key is gone; how many it dropped. Readers
    run it when they find one gone, and each worker once as it starts: the index of a
    fleet whose workers come and go under new ids (container names) would only grow."""
    return int(await redis.eval(PRUNE_HOSTS, 1, keys.HOSTS_INDEX))


def other_boot(replaced: bytes | None, boot_id: str) -> dict[str, Any] | None:
    """The beat ours replaced under our instance id's key, where it is another boot's
    (None: ours, nothing, or not a beat)."""
    try:
        payload = orjson.loads(replaced)["payload"] if replaced else None
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    if not isinstance(payload, dict) or payload.get("boot_id") in (None, boot_id):
        return None
    return payload


class Presence:
    """Heartbeats and announcements of one worker; ``snapshot`` supplies live figures."""

    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        outbox: Outbox,
        interval: float,
        announce_interval: float,
        health_channel: str,
        announce_channel: str,
        profile: str,
        snapshot: Snapshot,
        announcement: Snapshot,
        on_twin: Callable[[str], None] | None = None,
    ) -> None:
        self.redis = redis
        self.outbox = outbox
        self.interval = interval
        self.announce_interval = announce_interval
        self.health_channel = health_channel
        self.announce_channel = announce_channel
        self.profile = profile
        self.snapshot = snapshot
        self.announcement = announcement
        self.boot_id = str(uuid.uuid4())
        self.booted_at = time.time()
        self.on_twin = on_twin
        self.twin_seen = False  # another worker under our id: said once
        self.gave_way: str | None = None  # why this one stops for it
        self._other: tuple[str, int] = ("", 0)  # another boot, and its beats we replaced
        # Until when a worker before us under our id is known to be draining (its beats)
        self._predecessor_until = 0.0
        self.beats = 0
        self.announcements = 0
        self._pending_announce = asyncio.Event()

    @property
    def instance(self) -> str:
        return str(self.outbox.source.instance)

    async def heartbeat(self) -> dict[str, Any]:
        if self.gave_way is not None:  # the key is the other worker's
            return {}
        details = {**await self.snapshot(), "booted_at": self.booted_at}
        payload, replaced = await beat(
            self.redis,
            self.outbox,
            boot_id=self.boot_id,
            interval=self.interval,
            channel=self.health_channel,
            details=details,
        )
        self.beats += 1
        other = other_boot(replaced, self.boot_id)
        self._note_predecessor(other)
        await self._keep_registry_entry()
        if not self.twin_seen and (twin := self._live_other(other)):
            # Ours says ``down`` as it drains, and in its farewell (``stopped``).
            self._twin_found(twin, leaving=payload.get("status") == "down")
        return payload

    def predecessor_draining(self) -> bool:
        """Whether a worker that this one replaces under its instance id (a rolling
        deploy) still drains: the entries pending under the consumer name they share
        are its to finish, or to hand back (``StreamConsumer.defer_own``)."""
        return time.monotonic() < self._predecessor_until

    def _note_predecessor(self, other: dict[str, Any] | None) -> None:
        """Each beat of ours replaces the one before under the key: a draining worker's
        beat between two of ours (``other``) says it drains on (it beats as often as we
        do); its farewell, or three intervals without a beat of its, that it is gone."""
        if other is None:
            return
        details = other.get("details")
        draining = isinstance(details, dict) and details.get("state") == "draining"
        self._predecessor_until = time.monotonic() + 3 * self.interval if draining else 0.0

    async def _keep_registry_entry(self) -> None:
        """The registry entry lives as long as the liveness key, renewed by each beat;
        one gone meanwhile (a Redis restarted empty, an outage longer than its TTL) is
        announced again now, not at the next periodic announcement."""
        registry = keys.registry(self.profile, self.instance)
        kept = await self.redis.expire(registry, liveness_ttl(self.interval))
        if not kept and self.announcements:
            self.announce_soon()

    def _live_other(self, other: dict[str, Any] | None) -> dict[str, Any] | None:
        """Another boot's beat, the second of its that ours replaced: a worker that beats
        beside us. One is not enough: a worker before us leaves its last beat under the
        key (for three intervals), and so may a Redis restored from a copy. (Its beats
        need not alternate with ours: one that beats less often is found out too.) One
        going away is no twin: a worker that replaces another (same id) while it drains."""
        if other is None or other.get("status") == "down":
            return None
        boot = str(other["boot_id"])
        seen = self._other[1] + 1 if self._other[0] == boot else 1
        self._other = (boot, seen)
        return other if seen >= 2 else None

    def _twin_found(self, twin: dict[str, Any], *, leaving: bool = False) -> None:
        """Two workers under one instance id share a liveness key (``ps`` shows one of
        them), a registry entry and a stream consumer name. The one started later gives
        way (both see the other, and order their starts alike). ``leaving``: this one
        is going away (draining, or its last beat), and the other is its replacement in
        a rolling deploy (the default ``INSTANCE_ID`` is the node's and the profile's):
        no fault, said as such."""
        self.twin_seen = True  # either way the entries under our consumer name are shared
        if leaving:
            log.info(
                "the worker replacing this one beats under instance id %r (boot %s): a "
                "rolling deploy; what is left pending under the id is its to resume",
                self.instance,
                twin["boot_id"],
            )
            return
        details = twin.get("details") if isinstance(twin.get("details"), dict) else {}
        booted = details.get("booted_at")
        theirs = (booted if isinstance(booted, int | float) else 0.0, str(twin["boot_id"]))
        younger = (self.booted_at, self.boot_id) > theirs
        said = (
            f"another worker beats under instance id {self.instance!r} "
            f"(node {twin.get('node')!r}, boot {twin['boot_id']}): set INSTANCE_ID (or "
            "NODE_NAME) so that each worker has its own; "
            + ("this one started later and stops" if younger else "it started later")
        )
        log.error("%s", said)
        if younger:
            self.gave_way = said
            if self.on_twin is not None:
                self.on_twin(said)

    async def announce(self, request: Envelope | None = None) -> dict[str, Any]:
        """``request``: a discovery request, answered on its ``reply_to`` as a reply (its
        correlation id, its causality chain plus a link to it) and on the announce channel."""
        if self.gave_way is not None:  # the registry entry is the other worker's
            return {}
        payload = await self.announcement()
        message = self.outbox.encode(PROFILE_ANNOUNCE, payload, request=request)
        reply_to = request.reply_to if request is not None else None
        registry = keys.registry(self.profile, self.instance)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.publish(reply_to or self.announce_channel, message)
            if reply_to:  # a message of its own: an envelope's id is new for every message
                message = self.outbox.encode(PROFILE_ANNOUNCE, payload, request=request)
                pipe.publish(self.announce_channel, message)
            pipe.hset(registry, mapping={"announcement": message, "updated_at": time.time()})
            # Gone with the liveness key, not minutes later: a killed worker's entry said
            # `ready` to whoever discovers engines for three announce intervals.
            pipe.expire(registry, liveness_ttl(self.interval))
            pipe.sadd(keys.HOSTS_INDEX, registry)
            await pipe.execute()
        self.announcements += 1
        return payload

    def announce_soon(self) -> None:
        """Ask for an announcement now (engine state changed); coalesces bursts."""
        self._pending_announce.set()

    async def _announcer(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            waiter = asyncio.create_task(self._pending_announce.wait())
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
            if stop.is_set():
                return
            self._pending_announce.clear()
            try:
                await self.announce()
            except Exception as exc:
                log.warning("announcement failed: %s", exc)

    async def run(self, stop: asyncio.Event) -> None:
        """Beat, announce on change and periodically, until ``stop``."""
        await asyncio.gather(
            self._prune(),
            every(self.interval, self.heartbeat, stop, "heartbeat"),
            every(
                self.announce_interval,
                self.announce,
                stop,
                "announcement",
                first_delay=self.announce_interval,
            ),
            self._announcer(stop),
        )

    async def _prune(self) -> None:
        """Housekeeping beside the first beat, not before it."""
        try:
            await prune_hosts(self.redis)
        except Exception as exc:
            log.warning("could not prune the hosts index: %s", exc)

    async def farewell(self, *, keep_liveness: bool = False, budget: Budget | None = None) -> None:
        """A last beat and announcement, then (a clean stop) remove our liveness key, all
        within ``budget`` (the stop's, where the worker has spent some already)."""
        budget = budget or Budget(GOODBYES_SEC)
        with contextlib.suppress(Exception):
            await budget.spend("the last beat", self.heartbeat())
        with contextlib.suppress(Exception):
            await budget.spend("the last announcement", self.announce())
        if keep_liveness:
            return
        alive = keys.liveness(self.outbox.source.name, self.instance)
        with contextlib.suppress(Exception):
            await budget.spend("removing the liveness key", self.redis.delete(alive))
