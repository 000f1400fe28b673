"""Claims and idempotency records against a real Redis: what a worker that leaves
gives back, what a redelivery takes over."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
import redis.asyncio as aioredis

from orion_llamaccp.bus import keys
from orion_llamaccp.bus.claims import _TAKE_OVER, ANSWERED_CLAIM_SEC, Claims
from orion_llamaccp.bus.lane import Lane
from tests.support.procs import RedisServer, wait_until_async
from tests.support.proxy import HoldingProxy


async def test_an_answered_claim_is_kept_a_while_if_still_ours_and_given_back_on_leaving(
    redis: aioredis.Redis,
) -> None:
    """An answered message's claim is kept ``ANSWERED_CLAIM_SEC`` (a lagging replica must
    find it held), but not one that lapsed and another replica took since, whose claim
    the answer's stage must leave alone. Leaving, the worker frees those it still holds,
    not one of a request it is still generating, and gives up later ones as it answers."""
    claims = Claims(redis, profile="tiny", dedup_ttl=600)
    mine, retaken, running, late = (f"sha256:test-{uuid.uuid4().hex}" for _ in range(4))
    try:
        for key in (mine, retaken, running, late):
            assert await claims.claim_message(key, "a")
        await redis.set(keys.claim(retaken), "b", ex=600)  # lapsed, and taken by "b"
        for key in (mine, retaken):
            await redis.execute_command(*claims.stage_answered(key, "a"))
        assert 0 < await redis.ttl(keys.claim(mine)) <= ANSWERED_CLAIM_SEC
        assert await redis.ttl(keys.claim(retaken)) > ANSWERED_CLAIM_SEC  # b's, untouched
        assert await redis.ttl(keys.claim(running)) > ANSWERED_CLAIM_SEC
        assert await claims.give_back("a") == 1
        assert await redis.get(keys.claim(mine)) is None
        assert await redis.get(keys.claim(retaken)) == b"b"
        assert await redis.get(keys.claim(running)) == b"a"
        await redis.execute_command(*claims.stage_answered(late, "a"))  # answered leaving
        assert await redis.get(keys.claim(late)) is None
        assert await claims.give_back("a") == 0  # given back once
    finally:
        await redis.delete(*(keys.claim(k) for k in (mine, retaken, running, late)))


async def test_a_claim_taken_again_by_its_holder_is_renewed(redis: aioredis.Redis) -> None:
    """The same bytes sent again while their answered claim runs out: the replica holding
    it takes it again, for the dedup TTL, or it could lapse during the new generation and
    go to a replica that heard the first send late. Another replica still loses it."""
    claims = Claims(redis, profile="tiny", dedup_ttl=600)
    key = f"sha256:test-{uuid.uuid4().hex}"
    try:
        assert await claims.claim_message(key, "a")
        await redis.execute_command(*claims.stage_answered(key, "a"))
        assert await redis.ttl(keys.claim(key)) <= ANSWERED_CLAIM_SEC
        assert not await claims.claim_message(key, "b")
        assert await claims.claim_message(key, "a")
        assert await redis.ttl(keys.claim(key)) > ANSWERED_CLAIM_SEC
    finally:
        await redis.delete(keys.claim(key))


class _ResultLandsAfterEachRead(Lane):
    """A Lane that stores a request's result right after each GET it sends: the result
    commit of a stalled first worker landing between a take-over's read and its write."""

    def __init__(self, redis: aioredis.Redis, stored: tuple[str, bytes]) -> None:
        super().__init__(redis)
        self.redis, self.stored, self.landed = redis, stored, 0

    async def call(self, *args: Any, alone: bool = False) -> Any:
        reply = await super().call(*args, alone=alone)
        if args[0] == "GET":
            await self.redis.set(*self.stored)
            self.landed += 1
        return reply


async def test_a_take_over_never_replaces_the_result_stored_meanwhile(
    redis: aioredis.Redis,
) -> None:
    """A redelivered entry's worker takes over its running record (same owner: the entry).
    Read then written in two steps, a result its first worker stored in between was
    replaced by a running lease, which lapsed: the answer was gone for later resends, and
    the second worker, renewing its own lease, never learned the request was answered."""
    key, owner = f"key:test-{uuid.uuid4().hex}", "req@1-0"
    redis_key = keys.dedup("tiny", key)
    done = orjson.dumps({"state": "done", "owner": owner, "payload": {"content": "42"}})
    lane = _ResultLandsAfterEachRead(redis, (redis_key, done))
    claims = Claims(redis, profile="tiny", dedup_ttl=600, lane=lane)
    try:
        await redis.set(redis_key, orjson.dumps({"state": "running", "owner": owner}), ex=30)
        record = await claims.begin(key, owner)
        stored = orjson.loads(await redis.get(redis_key))
        if lane.landed:  # a read apart from the write: the result must have stayed
            assert stored["state"] == "done"
        else:  # read and written in one step: nothing lands between
            assert record.state == "new" and stored == {"state": "running", "owner": owner}
            assert await redis.ttl(redis_key) > 0
    finally:
        await redis.delete(redis_key)


async def test_a_marker_handed_over_goes_to_the_next_request_that_begins_on_it(
    redis: aioredis.Redis,
) -> None:
    """A pub/sub copy that streamed and then failed hands its running marker over to its
    stream copy (``Claims.hand_over``), which takes it at once and learns whose delivery
    streamed before it: released instead, the copy generated under the attempt whose
    chunks had gone out. Only the marker's owner hands it over; handed over, it is no
    longer the owner's to renew or release, and it is kept while an attempt's ``seq``
    guard is (the lease would have let a copy still in the backlog in after it)."""
    claims = Claims(redis, profile="tiny", dedup_ttl=600)
    key = f"key:test-{uuid.uuid4().hex}"
    redis_key = keys.dedup("tiny", key)
    try:
        assert (await claims.begin(key, "req")).state == "new"
        assert not await claims.hand_over(key, "another", "req:d", 3600)
        assert await claims.hand_over(key, "req", "req:d", 3600)
        assert claims.lease_sec < await redis.ttl(redis_key) <= 3600
        assert not await claims.renew(key, "req")
        await claims.release(key, "req")
        record = await claims.begin(key, "req@1-0")
        assert (record.state, record.handed_by) == ("new", "req:d")
        assert orjson.loads(await redis.get(redis_key))["owner"] == "req@1-0"
        assert (await claims.begin(key, "req@2-0")).state == "running"  # the first's now
    finally:
        await redis.delete(redis_key)


async def test_a_begin_retried_after_it_took_a_handed_marker_over_still_learns_who_handed_it(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    """The take-over of a handed marker ran in Redis, and its reply was lost (a socket
    timeout: a proxy holds it back here). ``begin`` retries, and finds the marker its own
    running one: it must still say whose delivery streamed before it, or the stream copy
    generates under the attempt whose chunks went out (its first chunks dropped as
    repeats, the rest spliced onto the pub/sub copy's text), as if released."""
    key = f"key:test-{uuid.uuid4().hex}"
    handing = Claims(redis, profile="tiny", dedup_ttl=600)
    assert (await handing.begin(key, "req")).state == "new"
    assert await handing.hand_over(key, "req", "req:d", 3600)
    proxy = HoldingProxy(redis_server.port).start()
    held = aioredis.Redis.from_url(proxy.url, socket_timeout=0.5)
    try:
        claims = Claims(held, profile="tiny", dedup_ttl=600, retry_for=30)
        await redis.script_load(_TAKE_OVER)  # EVALSHA: the script's digest on the wire
        proxy.arm(claims._take_over.sha.encode())
        beginning = asyncio.create_task(claims.begin(key, "req@1-0"))
        await wait_until_async(lambda: proxy.held == 1, timeout=10, what="the reply held")
        proxy.arm(b"no such bytes")  # the retry's new connection goes through
        record = await beginning
        assert (record.state, record.handed_by) == ("new", "req:d")
        assert (await claims.begin(key, "req@1-0")).handed_by == "req:d"  # once more
    finally:
        proxy.close()
        await held.aclose()
        await redis.delete(keys.dedup("tiny", key))
