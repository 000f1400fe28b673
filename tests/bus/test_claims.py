"""Pub/sub claims against a real Redis: what a worker that leaves gives back."""

from __future__ import annotations

import uuid

import redis.asyncio as aioredis

from orion_llamaccp.bus import keys
from orion_llamaccp.bus.claims import ANSWERED_CLAIM_SEC, Claims


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
