"""The fleet as an operator sees it: every llama.cpp host on the bus, alive or not.

Built from the same three sources a dashboard has: heartbeats (``system.health.v1``; of
the shared health channel's, only those of llama.cpp hosts), profile announcements, and
what is kept in Redis (liveness keys holding the last beat, registry hashes holding the
last announcement), so a view that just started is complete at once. A host that missed
three beats is down, whatever its last message said.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import orjson
import redis.asyncio as aioredis

from orion_llamaccp.bus import keys
from orion_llamaccp.bus.envelope import HEALTH, PROFILE_ANNOUNCE, as_utc

MISSED_BEATS = 3


@dataclass
class Host:
    service: str
    instance: str
    node: str | None = None
    profile: str | None = None
    model: str | None = None
    state: str | None = None
    status: str | None = None
    slots_busy: int | None = None
    slots_total: int | None = None
    tokens_per_sec: float | None = None
    requests_served: int | None = None
    last_beat: float | None = None
    interval: float = 10.0
    engine_url: str | None = None
    intake_channel: str | None = None

    def beat_age(self, now: float | None = None) -> float | None:
        return None if self.last_beat is None else max(0.0, (now or time.time()) - self.last_beat)

    def down(self, now: float | None = None) -> bool:
        age = self.beat_age(now)
        return age is None or age > MISSED_BEATS * self.interval or self.status == "down"

    def row(self, now: float | None = None) -> dict[str, Any]:
        return {**asdict(self), "beat_age_sec": _round(self.beat_age(now)), "down": self.down(now)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _llamacpp_details(details: dict[str, Any]) -> bool:
    """A llama.cpp host's beat names the profile it serves and its slots (announce.py)."""
    return bool(details.get("profile")) and "slots_total" in details


def _timestamp(value: Any) -> float:
    """Seconds since the epoch; a naive time counts as UTC (the contract), not local."""
    return as_utc(datetime.fromisoformat(str(value))).timestamp()


class Fleet:
    """Hosts keyed by (service, instance), updated from heartbeats and announcements."""

    def __init__(self) -> None:
        self.hosts: dict[tuple[str, str], Host] = {}

    def _host(self, service: str, instance: str) -> Host:
        key = (service, instance)
        if key not in self.hosts:
            self.hosts[key] = Host(service=service, instance=instance)
        return self.hosts[key]

    def ingest(self, data: bytes | str) -> None:
        """Take a heartbeat or an announcement envelope; ignore anything else."""
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(message, dict) or not isinstance(message.get("payload"), dict):
            return
        if message.get("kind") == HEALTH:
            self._beat(message["payload"])
        elif message.get("kind") == PROFILE_ANNOUNCE:
            self._announcement(message["payload"])

    def _beat(self, beat: dict[str, Any]) -> None:
        key = (str(beat.get("service")), str(beat.get("instance")))
        details = beat.get("details") if isinstance(beat.get("details"), dict) else {}
        if key not in self.hosts and not _llamacpp_details(details):
            return  # another Orion service: the health channel is everyone's
        host = self._host(*key)
        host.node = beat.get("node") or host.node
        host.status = beat.get("status")
        host.interval = float(beat.get("heartbeat_interval_sec") or host.interval)
        try:
            host.last_beat = _timestamp(beat["last_seen_ts"])
        except (KeyError, ValueError):
            host.last_beat = time.time()
        host.profile = details.get("profile", host.profile)
        host.state = details.get("state", host.state)
        host.slots_busy = details.get("slots_busy", host.slots_busy)
        host.slots_total = details.get("slots_total", host.slots_total)
        host.tokens_per_sec = details.get("tokens_per_sec_recent", host.tokens_per_sec)
        host.requests_served = details.get("requests_served", host.requests_served)

    def _announcement(self, info: dict[str, Any]) -> None:
        host = self._host(str(info.get("service")), str(info.get("instance")))
        host.node = info.get("node") or host.node
        host.profile = info.get("profile") or host.profile
        host.model = info.get("model_id") or host.model
        host.engine_url = info.get("engine_url") or host.engine_url
        host.intake_channel = info.get("intake_channel") or host.intake_channel
        host.slots_total = info.get("slots", host.slots_total)
        host.interval = float(info.get("heartbeat_interval_sec") or host.interval)
        host.state = info.get("state") or host.state

    async def load(self, redis: aioredis.Redis) -> Fleet:
        """Fill from what Redis keeps: announcements first, then the last beats."""
        async for key in redis.scan_iter(match=keys.REGISTRY_PATTERN, count=200):
            raw = await redis.hget(key, "announcement")
            if raw:
                self.ingest(raw)
        async for key in redis.scan_iter(match=keys.LIVENESS_PATTERN, count=200):
            raw = await redis.get(key)
            if raw:
                self.ingest(raw)
        return self

    def rows(self) -> list[dict[str, Any]]:
        now = time.time()
        return [host.row(now) for _, host in sorted(self.hosts.items())]
