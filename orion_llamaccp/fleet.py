"""The fleet as an operator sees it: every llama.cpp host on the bus, alive or not.

Built from the same three sources a dashboard has: heartbeats (``system.health.v1``; of
the shared health channel's, only those of llama.cpp hosts), profile announcements, and
what is kept in Redis (liveness keys holding the last beat, registry hashes holding the
last announcement), so a view that just started is complete at once. A host that missed
three beats is down, whatever its last message said.

A beat's age is the viewer's own: when it was heard, or, for one loaded from its liveness
key, how long ago Redis stored it (the key's remaining time to live). The worker's own
``last_seen_ts`` is another machine's clock: a worker whose clock ran half a minute
behind was shown down while it beat, and one ahead stayed up after it died.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis

from orion_llamaccp.bus import keys
from orion_llamaccp.bus.envelope import HEALTH, PROFILE_ANNOUNCE
from orion_llamaccp.bus.presence import liveness_ttl, prune_hosts

MISSED_BEATS = 3

_REGISTRY_PREFIX = keys.REGISTRY_PATTERN.removesuffix("*")
_LIVENESS_PREFIX = keys.LIVENESS_PATTERN.removesuffix("*")


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
    intake_stream: str | None = None
    intakes: list[str] | None = None  # what it reads (pubsub, stream); None: not said
    reason: str | None = None  # why it failed, or what its engine last said

    def beat_age(self, now: float | None = None) -> float | None:
        return None if self.last_beat is None else max(0.0, (now or time.time()) - self.last_beat)

    def down(self, now: float | None = None) -> bool:
        age = self.beat_age(now)
        return age is None or age > MISSED_BEATS * self.interval or self.status == "down"

    def reads(self, stream: str) -> bool:
        """Whether it may read a request put on ``stream``: yes, where it did not say."""
        if self.intakes is None:  # a worker from before ``intakes``
            return True
        return "stream" in self.intakes and self.intake_stream in (None, stream)

    def row(self, now: float | None = None) -> dict[str, Any]:
        return {**asdict(self), "beat_age_sec": _round(self.beat_age(now)), "down": self.down(now)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _llamacpp_details(details: dict[str, Any]) -> bool:
    """A llama.cpp host's beat names the profile it serves and its slots (announce.py)."""
    return bool(details.get("profile")) and "slots_total" in details


def _name(key: bytes | str) -> str:
    return key.decode() if isinstance(key, bytes) else key


def _stored_at(raw: bytes | str, left_ms: int) -> float:
    """When a beat kept under its liveness key was stored, on this clock: its key lives
    ``liveness_ttl`` of the beat's interval from then (``presence.beat``)."""
    now = time.time()
    if left_ms < 0:  # no time to live: not one of ours as stored; as if just heard
        return now
    try:
        interval = orjson.loads(raw)["payload"]["heartbeat_interval_sec"]
        kept = liveness_ttl(_positive(interval, 10.0))
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return now
    return now - max(0.0, kept - left_ms / 1000)


def _text(value: Any) -> str | None:
    """A string of a message, or None: anyone may publish anything on these channels."""
    return value if isinstance(value, str) and value else None


def _count(value: Any, default: int | None) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _number(value: Any, default: float | None) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return default


def _positive(value: Any, default: float) -> float:
    number = _number(value, None)
    return number if number is not None and number > 0 else default


# A beat read back from its key is dated by the key's time to live: up to a few ms off
# the time the same beat was heard live.
SAME_BEAT_SEC = 0.05


class Fleet:
    """Hosts keyed by (service, instance), updated from heartbeats and announcements."""

    def __init__(self) -> None:
        self.hosts: dict[tuple[str, str], Host] = {}
        self.stored: set[tuple[str, str]] = set()  # the hosts Redis kept at the last load

    def _host(self, service: str, instance: str) -> Host:
        key = (service, instance)
        if key not in self.hosts:
            self.hosts[key] = Host(service=service, instance=instance)
        return self.hosts[key]

    def ingest(self, data: bytes | str, heard_at: float | None = None) -> tuple[str, str] | None:
        """Take a heartbeat or an announcement envelope; ignore anything else, a message
        of the wrong shape included. ``heard_at``: when a beat was sent, on this clock
        (default: now, for one just heard). Returns the host it was about, if one of ours."""
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(message, dict) or not isinstance(message.get("payload"), dict):
            return None
        if message.get("kind") == HEALTH:
            return self._beat(message["payload"], time.time() if heard_at is None else heard_at)
        if message.get("kind") == PROFILE_ANNOUNCE:
            return self._announcement(message["payload"])
        return None

    def _beat(self, beat: dict[str, Any], heard_at: float) -> tuple[str, str] | None:
        key = (_text(beat.get("service")) or "?", _text(beat.get("instance")) or "?")
        details = beat.get("details") if isinstance(beat.get("details"), dict) else {}
        if key not in self.hosts and not _llamacpp_details(details):
            return None  # another Orion service: the health channel is everyone's
        host = self._host(*key)
        if host.last_beat is not None and heard_at < host.last_beat - SAME_BEAT_SEC:
            return key  # an older beat (a reload of the key behind one just heard)
        # The same beat read again from its key (dated by its TTL, a millisecond off) is
        # taken again: its state stands over an announcement read before it.
        host.last_beat = max(heard_at, host.last_beat or heard_at)
        host.node = _text(beat.get("node")) or host.node
        host.status = _text(beat.get("status"))
        host.interval = _positive(beat.get("heartbeat_interval_sec"), host.interval)
        host.profile = _text(details.get("profile")) or host.profile
        host.state = _text(details.get("state")) or host.state
        host.reason = _text(details.get("reason"))  # each beat says it, or that it is gone
        host.slots_busy = _count(details.get("slots_busy"), host.slots_busy)
        host.slots_total = _count(details.get("slots_total"), host.slots_total)
        host.tokens_per_sec = _number(details.get("tokens_per_sec_recent"), host.tokens_per_sec)
        host.requests_served = _count(details.get("requests_served"), host.requests_served)
        return key

    def _announcement(self, info: dict[str, Any]) -> tuple[str, str]:
        key = (_text(info.get("service")) or "?", _text(info.get("instance")) or "?")
        host = self._host(*key)
        host.node = _text(info.get("node")) or host.node
        host.profile = _text(info.get("profile")) or host.profile
        host.model = _text(info.get("model_id")) or host.model
        host.engine_url = _text(info.get("engine_url")) or host.engine_url
        host.intake_channel = _text(info.get("intake_channel")) or host.intake_channel
        host.intake_stream = _text(info.get("intake_stream")) or host.intake_stream
        intakes = info.get("intakes")
        if isinstance(intakes, list) and all(isinstance(i, str) for i in intakes):
            host.intakes = intakes
        host.slots_total = _count(info.get("slots"), host.slots_total)
        host.interval = _positive(info.get("heartbeat_interval_sec"), host.interval)
        host.state = _text(info.get("state")) or host.state
        return key

    async def load(self, redis: aioredis.Redis) -> Fleet:
        """Fill from what Redis keeps: announcements first, then the last beats, each
        dated by how long ago Redis stored it (its key's time to live left). The keys
        come from the workers' index (``keys.HOSTS_INDEX``), members whose key is gone
        dropped from it; without an index (workers from before it), from a SCAN."""
        # A caller's client may decode replies (``decode_responses=True``): str, not bytes.
        names = sorted(_name(m) for m in await redis.smembers(keys.HOSTS_INDEX))
        if not names:
            names = [
                _name(key)
                for pattern in (keys.REGISTRY_PATTERN, keys.LIVENESS_PATTERN)
                async for key in redis.scan_iter(match=pattern, count=200)
            ]
        announced = [n for n in names if n.startswith(_REGISTRY_PREFIX)]
        beats = [n for n in names if n.startswith(_LIVENESS_PREFIX)]
        async with redis.pipeline(transaction=False) as pipe:
            for name in announced:
                pipe.hget(name, "announcement")
            for name in beats:
                pipe.get(name).pttl(name)
            found = await pipe.execute()
        taken = [self.ingest(raw) for raw in found[: len(announced)] if raw]
        kept = found[len(announced) :]
        for raw, left_ms in zip(kept[::2], kept[1::2], strict=True):
            if raw:
                taken.append(self.ingest(raw, _stored_at(raw, left_ms)))
        self.stored = {key for key in taken if key is not None}
        if not all(found[: len(announced)] + kept[::2]):  # a member whose key is gone
            await prune_hosts(redis)
        return self

    def forget_gone(self, now: float | None = None) -> None:
        """Drop the hosts Redis no longer kept at the last ``load`` (their keys expired,
        three beats missed) and that are down: `watch` kept every worker it ever saw, the
        containers recreated under new ids piling up as "down", where `ps` shows them no
        more."""
        for key, host in list(self.hosts.items()):
            if key not in self.stored and host.down(now):
                del self.hosts[key]

    def no_stream_reader(self, profile: str, stream: str) -> str | None:
        """Why no worker of ``profile`` on the bus would read a request put on ``stream``,
        where each one up says what it reads; None when one may, or none is up (a durable
        request waits for a worker to come)."""
        now = time.time()
        live = [
            h for _, h in sorted(self.hosts.items()) if h.profile == profile and not h.down(now)
        ]
        if not live or any(host.reads(stream) for host in live):
            return None
        read = [
            f"{host.instance} reads the stream {host.intake_stream}"
            if "stream" in (host.intakes or ())
            else f"{host.instance} serves {', '.join(host.intakes or ()) or 'no intake'} only"
            for host in live
        ]
        return f"no worker of profile '{profile}' reads the stream {stream} ({'; '.join(read)})"

    def rows(self) -> list[dict[str, Any]]:
        now = time.time()
        return [host.row(now) for _, host in sorted(self.hosts.items())]
