"""Who serves a message, and whether a request was already served.

- Pub/sub claims: every replica subscribed to the intake channel sees each message; the
  one that wins ``SET NX`` on the message's identity serves it, the others stay silent.
- Idempotency records: a request's key (its ``idempotency_key``, else its correlation id
  plus a digest of what it asks) holds first a running marker, leased and renewed by the
  worker generating it, then the stored result. A duplicate gets the stored result or
  waits for the running one; it never generates again. A marker whose owner died expires
  with its lease; a redelivery of the same message takes its own marker over at once. A
  pub/sub copy that streamed and then failed hands its marker over to the request's
  stream copy (``hand_over``), which takes it at once, under a new attempt; so does a
  stream entry left unanswered after it streamed, for a copy of it read later.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis

from orion_llamaccp.bus import keys
from orion_llamaccp.bus.envelope import ChatRequestPayload, Envelope
from orion_llamaccp.bus.lane import Lane
from orion_llamaccp.bus.replies import Stage, Stored
from orion_llamaccp.bus.retry import with_retry

# Compare-and-renew / compare-and-delete: only the running marker's owner may touch it.
# A stored result is never renewed: its owner may be a stalled worker whose message was
# answered meanwhile, and renewing would cut the result's TTL down to a lease.
_RENEW = """
local v = redis.call('GET', KEYS[1])
if v and cjson.decode(v)['owner'] == ARGV[1] and cjson.decode(v)['state'] == 'running' then
  return redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return 0
"""
_RELEASE = """
local v = redis.call('GET', KEYS[1])
if v and cjson.decode(v)['owner'] == ARGV[1] and cjson.decode(v)['state'] == 'running' then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# A running marker of this very message taken over (a redelivery: its worker died or
# stalled), or a request a copy handed over (``hand_over``), in one step. A GET and then
# a SET could land on the result its first worker stored meanwhile and put a lease in its
# place: the answer was lost to later resends. A handed marker's delivery stays in the
# running one it becomes (``handed_by``): a ``begin`` retried after its reply was lost
# finds its own marker, and must still learn it.
_TAKE_OVER = """
local v = redis.call('GET', KEYS[1])
if v then
  local r = cjson.decode(v)
  if r['state'] == 'handed' then
    local m = cjson.decode(ARGV[2])
    m['handed_by'] = r['delivery']
    redis.call('SET', KEYS[1], cjson.encode(m), 'EX', tonumber(ARGV[3]))
  elseif r['state'] == 'running' and r['owner'] == ARGV[1] then
    redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
  end
end
return v
"""
# The owner's running marker made a handed-over one (``Claims.hand_over``).
_HAND_OVER = """
local v = redis.call('GET', KEYS[1])
if v and cjson.decode(v)['owner'] == ARGV[1] and cjson.decode(v)['state'] == 'running' then
  return redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[3]))
end
return false
"""

# A claim taken again: one this worker holds (its TTL renewed: a resend of a message
# without an id, whose answered claim is about to lapse), or one that lapsed since the
# ``SET NX`` failed (in the same step, or every replica could find it gone and give up).
_CLAIM_AGAIN = """
local v = redis.call('GET', KEYS[1])
if v == false then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
  return 1
end
if v == ARGV[1] then
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
  return 1
end
return 0
"""
# An answered claim kept ARGV[2] seconds more, or given up (0), if it is still ours: it may
# have lapsed and gone to another replica for a later send.
_ANSWERED = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then return redis.call('DEL', KEYS[1]) end
return redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
"""
# Compare-and-delete of answered claims (``Claims.give_back``): only those still ours.
_GIVE_BACK = """
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then n = n + redis.call('DEL', key) end
end
return n
"""
# How long a message without an id stays claimed once answered. Every replica hears each
# pub/sub message, and one whose read or claim lags (a backed-up inbox, a stalled process,
# a claim retried through a Redis blip: up to 5 s) must still find it claimed, or it
# answers it again. The same bytes sent again in this time go to the replica that
# answered them (it finds its own claim), not to the others.
ANSWERED_CLAIM_SEC = 10
# What a worker that cannot serve a request waits before it claims it: a replica that heard
# the same request and can serve it claims within a few ms of reading it, and its claim goes
# in first (a request one replica can serve is not answered with another's error).
REPLICA_GRACE_SEC = 1.0
# How long ``give_back`` remembers an answered claim: its EXPIRE may land well after the
# answer was staged (a commit retried through a Redis outage); giving back one that
# lapsed meanwhile is harmless.
_ANSWERED_KEPT_SEC = 6 * ANSWERED_CLAIM_SEC


def idempotency_key(envelope: Envelope, chat: ChatRequestPayload) -> str:
    """The caller's ``idempotency_key``, else correlation id + digest of the request.

    Orion keeps one correlation id for a whole flow, which may ask several different
    questions; only a resend of the same question is a duplicate.
    """
    explicit = envelope.work.get("idempotency_key")
    if explicit:
        return f"key:{explicit}"
    body = chat.model_dump(mode="json", include={"messages", "options", "attachments"})
    digest = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()[:24]
    return f"corr:{envelope.correlation_id}:{digest}"


@dataclass(frozen=True)
class Record:
    state: str  # "new" (we own it now), "running" (someone else), "done"
    owner: str | None = None
    payload: dict[str, Any] | None = None
    # "new" from a handed-over marker: the delivery whose copy streamed before it gave
    # the request up (``Claims.hand_over``).
    handed_by: str | None = None


class Claims:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        profile: str,
        dedup_ttl: int,
        lease_sec: int = 30,
        retry_for: float = 60.0,
        lane: Lane | None = None,
    ) -> None:
        self.redis = redis
        self.profile = profile
        self.dedup_ttl = dedup_ttl
        self.lease_sec = lease_sec
        self.retry_for = retry_for
        self.lane = lane or Lane(redis)  # the claim and the record stand before a first token
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._take_over = redis.register_script(_TAKE_OVER)
        self._hand_over = redis.register_script(_HAND_OVER)
        self._claim_again = redis.register_script(_CLAIM_AGAIN)
        self._give_back = redis.register_script(_GIVE_BACK)
        self.answered_sec = min(ANSWERED_CLAIM_SEC, dedup_ttl)
        self.leaving = False  # out of the channel: answered claims are given up at once
        # Messages without an id answered here, with when (monotonic).
        self._answered: dict[str, float] = {}

    async def claim_message(self, message_key: str, instance: str) -> bool:
        """Pub/sub: True for the one replica that may serve this message.

        A retried claim that had in fact succeeded finds its own instance in the key.
        """
        redis_key = keys.claim(message_key)

        async def claim() -> bool:
            if await self.lane.call("SET", redis_key, instance, "NX", "EX", self.dedup_ttl):
                return True
            again = await self._claim_again(keys=[redis_key], args=[instance, self.dedup_ttl])
            return bool(again)

        return await with_retry("claiming a message", claim, retry_for=5.0)

    def stage_answered(self, message_key: str, instance: str) -> Stage:
        """Shorten a message's claim to ``ANSWERED_CLAIM_SEC`` as it is answered: for a
        message without an id, whose claim key is its content, so that the same bytes sent
        later (a legacy caller's retry) are a new request any replica may claim. Kept for
        the dedup TTL, the claim held them for the replica that answered, and for none if
        it had left (a drain, exactly when a retry comes). A worker that is ``leaving``
        (out of the channel) gives the claim up at once, and gives back those it answered
        before (``give_back``). Sent whole (``EVAL``): ``Publisher.commit`` reloads only
        its own scripts."""
        seconds = 0 if self.leaving else self.answered_sec
        if seconds:
            now = time.monotonic()
            self._answered.pop(message_key, None)  # kept in the order they were answered
            self._answered[message_key] = now
            while next(iter(self._answered.values())) < now - _ANSWERED_KEPT_SEC:
                del self._answered[next(iter(self._answered))]
        return ("EVAL", _ANSWERED, 1, keys.claim(message_key), instance, seconds)

    async def give_back(self, instance: str) -> int:
        """Leaving: release the claims of messages answered lately that ``instance``
        still holds, for a resend to find a replica that stays; returns how many. A
        replica that hears such a message only now answers it a second time: the price of
        not losing the resend."""
        self.leaving = True
        held = [keys.claim(k) for k in self._answered]
        self._answered.clear()
        if not held:
            return 0
        return int(await self._give_back(keys=held, args=[instance]))

    async def subscribers(self, channel: str) -> int:
        """How many clients listen on ``channel`` (replicas, on an intake channel)."""
        counts = await self.redis.pubsub_numsub(channel)
        return int(counts[0][1]) if counts else 0

    async def begin(self, key: str, owner: str) -> Record:
        """Start serving ``key``, or learn who did. ``owner`` identifies this message.

        A marker already owned by this message is ours: a redelivery of a message whose
        worker died, or a retry of our own ``SET`` that had succeeded. One message is never
        served twice at once (pub/sub claims it once; a stream entry is only reclaimed
        when its holder stopped refreshing it), so taking it over is safe.
        """
        return await with_retry(
            "claiming a request", lambda: self._begin(key, owner), retry_for=self.retry_for
        )

    async def _begin(self, key: str, owner: str) -> Record:
        redis_key = keys.dedup(self.profile, key)
        marker = orjson.dumps({"state": "running", "owner": owner})
        if await self.lane.call("SET", redis_key, marker, "NX", "EX", self.lease_sec):
            return Record("new", owner)
        raw = await self._take_over(keys=[redis_key], args=[owner, marker, self.lease_sec])
        if raw is None:  # expired between the two calls
            return await self._begin(key, owner)
        record = orjson.loads(raw)
        if record.get("state") == "done":
            return Record("done", record.get("owner"), record.get("payload"))
        if record.get("state") == "handed":  # taken over by the script
            return Record("new", owner, handed_by=record.get("delivery"))
        if record.get("owner") == owner:  # taken over by the script
            return Record("new", owner, handed_by=record.get("handed_by"))
        return Record("running", record.get("owner"))

    async def renew(self, key: str, owner: str) -> bool:
        """Extend ``owner``'s running marker; False when it holds none (expired, taken over
        by a twin after it expired, or finished: the message was answered)."""
        return bool(
            await self._renew(keys=[keys.dedup(self.profile, key)], args=[owner, self.lease_sec])
        )

    def finished(self, key: str, owner: str, payload: dict[str, Any]) -> Stored:
        """The stored result for duplicates, to go with the result itself
        (``Publisher.stage_result``), or alone (``stage``) for a request with no reply."""
        value = orjson.dumps({"state": "done", "owner": owner, "payload": payload})
        return keys.dedup(self.profile, key), value, self.dedup_ttl

    @staticmethod
    def stage(record: Stored) -> Stage:
        redis_key, value, ttl = record
        return ("SET", redis_key, value, "EX", ttl)

    async def hand_over(self, key: str, owner: str, delivery: str, ttl: int) -> bool:
        """Give ``owner``'s running marker up to the next copy of ``delivery`` to come,
        which must generate under a new attempt: this one's chunks went out under its
        attempt's number, and under that number the copy's first chunks were dropped as
        repeats and the rest continued this one's text. Kept ``ttl`` seconds (what an
        attempt's ``seq`` guard is kept: the time such a copy could come in), taken over
        by the first request to ``begin`` on it. False when ``owner`` held none."""
        marker = orjson.dumps({"state": "handed", "owner": owner, "delivery": delivery})
        redis_key = keys.dedup(self.profile, key)
        return bool(await self._hand_over(keys=[redis_key], args=[owner, marker, ttl]))

    async def release(self, key: str, owner: str) -> None:
        """Give up a running marker (the request failed): a resend may run again."""
        await self._release(keys=[keys.dedup(self.profile, key)], args=[owner])
