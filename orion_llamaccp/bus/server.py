"""What the worker needs of its Redis: a version new enough, and no eviction of keys.

``doctor`` fails on either; ``run`` says it in its log at the start (it served an evicting
Redis without a word, losing durable requests later, at its memory limit).
"""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

# SET ... GET (each beat's liveness key) and XAUTOCLAIM (stream redelivery) came with 6.2:
# on an older Redis every beat fails after its PUBLISH, so the fleet hears beats while
# `health` and `ps` find nothing.
REDIS_MIN_VERSION = (6, 2)


def redis_too_old(version: str) -> str | None:
    """Why a Redis of ``version`` (INFO's ``redis_version``) cannot serve the worker."""
    try:
        found = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return None  # a fork's own numbering: not ours to judge
    if found >= REDIS_MIN_VERSION:
        return None
    least = ".".join(map(str, REDIS_MIN_VERSION))
    return (
        f"Redis {version} is older than {least}, which the worker needs (SET ... GET for "
        f"its liveness key, XAUTOCLAIM for the stream intake): upgrade Redis"
    )


def evicts(info: dict[str, Any]) -> str | None:
    """Why a Redis that evicts keys at its memory limit cannot serve: the request
    streams (``allkeys-*``) and the exactly-once guards (``volatile-*``, they expire)
    would be dropped, losing durable requests or answering some twice."""
    policy = str(info.get("maxmemory_policy", "noeviction"))
    if not info.get("maxmemory") or policy == "noeviction":
        return None
    return (
        f"Redis evicts keys at its memory limit (maxmemory-policy {policy}): durable "
        f"requests and the guards that answer each once could be dropped; set "
        f"maxmemory-policy noeviction (or maxmemory 0)"
    )


def unfit(info: dict[str, Any]) -> list[str]:
    """Why a Redis whose ``INFO server`` and ``INFO memory`` say ``info`` cannot serve."""
    said = (redis_too_old(str(info.get("redis_version", "?"))), evicts(info))
    return [problem for problem in said if problem]


async def warn_if_unfit(redis: aioredis.Redis) -> list[str]:
    """Log a WARNING for each reason the bus's Redis cannot serve durably; those said.
    An ``INFO`` that is denied (an ACL) or fails checks nothing: serving goes on."""
    try:
        info = {**await redis.info("server"), **await redis.info("memory")}
    except (RedisError, OSError) as exc:
        log.debug("Redis not checked (INFO: %s)", exc)
        return []
    problems = unfit(info)
    for problem in problems:
        log.warning("%s", problem)
    return problems
