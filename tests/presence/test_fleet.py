"""The fleet as ``ps`` and ``watch`` see it, from beats and announcements as they come and
as Redis keeps them (a real Redis; the messages are written as workers write them)."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from rich.console import Console

from orion_llamaccp.bus import keys
from orion_llamaccp.bus.envelope import HEALTH, PROFILE_ANNOUNCE, ServiceRef
from orion_llamaccp.bus.outbox import Outbox
from orion_llamaccp.bus.presence import Presence
from orion_llamaccp.cli.bus_cmds import fleet_table
from orion_llamaccp.fleet import Fleet


def _beat(instance: str, *, sent: datetime, status: str = "ok", **details: Any) -> bytes:
    """A worker's ``system.health.v1`` whose ``last_seen_ts`` says ``sent`` (its clock)."""
    payload = {
        "service": "orion-llamaccp",
        "instance": instance,
        "boot_id": "b",
        "status": status,
        "last_seen_ts": sent.isoformat(),
        "heartbeat_interval_sec": 10.0,
        "details": {"profile": "tiny", "state": "ready", "slots_total": 2, **details},
    }
    return orjson.dumps({"kind": HEALTH, "payload": payload})


def test_a_beat_is_dated_by_when_it_was_heard_not_by_the_worker_s_clock() -> None:
    """A worker whose clock runs an hour behind beats now: it is up. One whose clock runs
    ahead and that last beat 40 s ago (four intervals) is down. By ``last_seen_ts`` the
    first was shown down as it beat, the second up long after it died."""
    fleet = Fleet()
    now = datetime.now(UTC)
    fleet.ingest(_beat("behind", sent=now - timedelta(hours=1)))
    fleet.ingest(_beat("ahead", sent=now + timedelta(hours=1)), heard_at=time.time() - 40)
    down = {row["instance"]: row["down"] for row in fleet.rows()}
    assert down == {"ahead": True, "behind": False}


async def test_a_beat_loaded_from_redis_is_as_old_as_its_key(redis_url: str) -> None:
    """``ps`` starts from the liveness keys: a beat's age is how long ago Redis stored it
    (three intervals of life, less what is left), whatever its ``last_seen_ts`` says."""
    redis = aioredis.Redis.from_url(redis_url)
    skewed = datetime.now(UTC) - timedelta(hours=1)
    try:
        await redis.set(
            keys.liveness("orion-llamaccp", "fresh"), _beat("fresh", sent=skewed), ex=30
        )
        await redis.set(keys.liveness("orion-llamaccp", "old"), _beat("old", sent=skewed), px=5000)
        rows = {row["instance"]: row for row in (await Fleet().load(redis)).rows()}
    finally:
        await redis.aclose()
    assert rows["fresh"]["down"] is False and rows["fresh"]["beat_age_sec"] < 5
    assert rows["old"]["down"] is False and 24 <= rows["old"]["beat_age_sec"] <= 26


def test_a_message_of_the_wrong_shape_is_ignored_and_shown_as_text() -> None:
    """Anyone may publish on the health and announce channels: an interval of "ten" and
    a profile named like rich's markup stopped ``ps`` and ``watch`` with a traceback."""
    fleet = Fleet()
    now = datetime.now(UTC)
    fleet.ingest(_beat("odd", sent=now, profile="p[/x]", slots_busy="two"))
    odd = {
        "service": "orion-llamaccp",
        "instance": "odd",
        "model_id": "[bold]m[/bold]",
        "heartbeat_interval_sec": "ten",
        "slots": None,
    }
    fleet.ingest(orjson.dumps({"kind": PROFILE_ANNOUNCE, "payload": odd}))
    [row] = fleet.rows()
    assert (row["profile"], row["slots_busy"], row["interval"]) == ("p[/x]", None, 10.0)
    out = io.StringIO()
    Console(file=out, width=200).print(fleet_table(fleet.rows()))
    assert "p[/x]" in out.getvalue() and "[bold]m[/bold]" in out.getvalue()


def _presence(redis: aioredis.Redis, instance: str, state: str = "ready") -> Presence:
    """A worker's presence, its figures made up (the keys and messages are the real ones)."""

    async def details() -> dict[str, Any]:
        return {"profile": "tiny", "state": state, "slots_total": 2}

    async def announcement() -> dict[str, Any]:
        return {"service": "orion-llamaccp", "instance": instance, "profile": "tiny"}

    return Presence(
        redis=redis,
        outbox=Outbox(ServiceRef(name="orion-llamaccp", instance=instance)),
        interval=10.0,
        announce_interval=30.0,
        health_channel="orion:system:health",
        announce_channel="orion:llm:profile:announce",
        profile="tiny",
        snapshot=details,
        announcement=announcement,
    )


async def test_ps_reads_the_fleet_without_scanning_the_keyspace(redis_url: str) -> None:
    """``ps`` and ``watch`` (every 10 s) SCANned the whole keyspace twice: with a day of
    per-request guards under load, seconds per look. The workers' keys are found in their
    index; a host whose keys are gone (it stopped) leaves it at the next look."""
    redis = aioredis.Redis.from_url(redis_url)
    try:
        for instance in ("a", "b"):
            presence = _presence(redis, instance)
            await presence.heartbeat()
            await presence.announce()
        await redis.mset({f"orion:llamacpp:answered:{n}": 1 for n in range(2000)})
        await redis.delete(keys.liveness("orion-llamaccp", "b"), keys.registry("tiny", "b"))
        await redis.config_resetstat()
        rows = {row["instance"]: row for row in (await Fleet().load(redis)).rows()}
        stats = await redis.info("commandstats")
        indexed = await redis.smembers(keys.HOSTS_INDEX)
    finally:
        await redis.aclose()
    assert "cmdstat_scan" not in stats, stats.get("cmdstat_scan")
    assert list(rows) == ["a"] and rows["a"]["down"] is False, rows
    assert indexed == {
        keys.liveness("orion-llamaccp", "a").encode(),
        keys.registry("tiny", "a").encode(),
    }
    # A caller's own client that decodes replies (str, not bytes) reads the same: it
    # failed on the index's members (AttributeError: 'str' object has no attribute ...).
    decoding = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert [row["instance"] for row in (await Fleet().load(decoding)).rows()] == ["a"]
    finally:
        await decoding.aclose()


async def test_the_last_beat_of_a_worker_before_is_no_twin_but_one_beating_beside_is(
    redis_url: str,
) -> None:
    """A worker restarted under its id finds its predecessor's last beat under the key
    (kept three intervals; a Redis restored from a copy may hold one too): that beat is
    replaced once, and is no twin. A worker beating beside it is replaced again and
    again: the one started later gives way, once, and writes nothing more; the other
    only says so. (Real Redis, real beats; the workers' figures made up.)"""
    redis = aioredis.Redis.from_url(redis_url)
    gave_way: list[str] = []
    try:
        before = _presence(redis, "w")
        await before.heartbeat()
        first = _presence(redis, "w")
        await first.heartbeat()
        await _presence(redis, "w").heartbeat()  # a restored copy's beat, mid-life
        for _ in range(3):
            await first.heartbeat()
        assert not first.twin_seen and first.gave_way is None
        later = _presence(redis, "w")
        later.on_twin = gave_way.append
        for _ in range(3):
            await later.heartbeat()
            await first.heartbeat()
        await later.heartbeat()
        stays = orjson.loads(await redis.get(keys.liveness("orion-llamaccp", "w")))
    finally:
        await redis.aclose()
    assert len(gave_way) == 1 and "this one started later and stops" in gave_way[0]
    assert later.gave_way == gave_way[0] and await later.heartbeat() == {}
    assert first.twin_seen and first.gave_way is None
    assert stays["payload"]["boot_id"] == first.boot_id


async def test_a_worker_that_starts_drops_index_members_whose_key_is_gone(
    redis_url: str,
) -> None:
    """Workers re-created under new ids (container names) leave members behind; with no
    one running ``ps`` the index only grew. Each worker prunes it as it starts."""
    redis = aioredis.Redis.from_url(redis_url)
    gone = keys.liveness("orion-llamaccp", "re-created-long-ago")
    try:
        await redis.sadd(keys.HOSTS_INDEX, gone)
        presence, stop = _presence(redis, "w"), asyncio.Event()
        running = asyncio.create_task(presence.run(stop))
        while not presence.beats:
            await asyncio.sleep(0.01)
        stop.set()
        await running
        indexed = await redis.smembers(keys.HOSTS_INDEX)
    finally:
        await redis.aclose()
    assert indexed == {keys.liveness("orion-llamaccp", "w").encode()}, indexed


async def test_the_hosts_index_expires_a_day_after_the_last_beat(redis_url: str) -> None:
    """The hosts index lives a day past the fleet's last beat, each beat setting that day
    again: a fleet long gone leaves nothing behind, a running one never loses its index.
    No test read its time to live: a worker that never set it (an index kept for ever),
    or set it once, passed them all."""
    redis = aioredis.Redis.from_url(redis_url)
    try:
        presence = _presence(redis, "w")
        await presence.heartbeat()
        first = await redis.ttl(keys.HOSTS_INDEX)
        await redis.expire(keys.HOSTS_INDEX, 5)  # as if its day were nearly over
        await presence.heartbeat()
        renewed = await redis.ttl(keys.HOSTS_INDEX)
    finally:
        await redis.aclose()
    day = keys.HOSTS_INDEX_TTL_SEC
    assert day == 86_400 and day - 5 < first <= day, first
    assert day - 5 < renewed <= day, renewed


def test_a_worker_that_gave_up_is_listed_failed_with_its_reason() -> None:
    """Its last beat says ``failed`` and why (kept three intervals for ``ps``): the table
    showed "down" alone, and the JSON had no reason."""
    fleet = Fleet()
    now = datetime.now(UTC)
    fleet.ingest(_beat("gone", sent=now, state="failed", reason="model file missing"))
    fleet.ingest(_beat("fine", sent=now))
    rows = {row["instance"]: row for row in fleet.rows()}
    assert (rows["gone"]["state"], rows["gone"]["reason"]) == ("failed", "model file missing")
    assert rows["fine"]["reason"] is None
    out = io.StringIO()
    Console(file=out, width=200).print(fleet_table(fleet.rows()))
    assert "failed: model file missing" in out.getvalue()


def test_a_worker_going_away_is_listed_down_with_what_it_said() -> None:
    """A draining worker beats ``down`` and ``draining`` (it answers what it holds, takes
    nothing new): the table showed "down" alone, as for one that died. One that went
    silent while ready is "down", no more."""
    fleet = Fleet()
    now = datetime.now(UTC)
    fleet.ingest(_beat("leaving", sent=now, status="down", state="draining"))
    fleet.ingest(_beat("silent", sent=now), heard_at=time.time() - 40)
    out = io.StringIO()
    Console(file=out, width=200).print(fleet_table(fleet.rows()))
    rows = [line.split("│") for line in out.getvalue().splitlines() if line.startswith("│")]
    lines = {cells[3].strip(): cells[6] for cells in rows}  # instance: state
    assert "down: draining" in lines["leaving"], out.getvalue()
    assert "down" in lines["silent"] and "down:" not in lines["silent"], out.getvalue()


async def test_watch_forgets_a_host_redis_keeps_no_more(redis_url: str) -> None:
    """``watch`` kept every worker it ever saw: containers recreated under new ids piled
    up as "down" rows, where ``ps`` (which reads what Redis keeps) no longer lists them.
    A host down and gone from Redis is dropped at the next reload; one heard live stays,
    and so does one down whose announcement Redis still keeps (``ps`` lists it)."""
    fleet = Fleet()
    now = datetime.now(UTC)
    fleet.ingest(_beat("gone", sent=now), heard_at=time.time() - 40)  # four beats missed
    fleet.ingest(_beat("kept", sent=now), heard_at=time.time() - 40)
    fleet.ingest(_beat("live", sent=now))
    redis = aioredis.Redis.from_url(redis_url)
    try:
        await _presence(redis, "kept").announce()  # its registry entry, in the index
        await fleet.load(redis)
        fleet.forget_gone()
    finally:
        await redis.delete(keys.registry("tiny", "kept"))
        await redis.aclose()
    assert [row["instance"] for row in fleet.rows()] == ["kept", "live"]


def test_a_beat_read_back_from_its_key_is_taken_again_over_an_announcement() -> None:
    """A reload reads the announcement, then the beat already heard live, dated by its
    key's time to live a millisecond earlier: it was refused as older, and the row showed
    the announcement's state ("ready") over the beat's ("failed") until the next beat."""
    fleet = Fleet()
    now = datetime.now(UTC)
    heard = time.time()
    beat = _beat("w", sent=now, state="failed", reason="model file missing")
    fleet.ingest(beat, heard_at=heard)
    announcement = {"service": "orion-llamaccp", "instance": "w", "state": "ready"}
    fleet.ingest(orjson.dumps({"kind": PROFILE_ANNOUNCE, "payload": announcement}))
    fleet.ingest(beat, heard_at=heard - 0.001)  # the same beat, from its key
    [row] = fleet.rows()
    assert (row["state"], row["reason"]) == ("failed", "model file missing")
    fleet.ingest(_beat("w", sent=now, state="ready"), heard_at=heard - 10)  # an older beat
    assert fleet.rows()[0]["state"] == "failed"


@pytest.mark.parametrize("state", ["draining", "stopped"])  # stopped: its farewell beat
async def test_a_worker_replacing_a_draining_one_under_its_id_does_not_give_way(
    redis_url: str, caplog: pytest.LogCaptureFixture, state: str
) -> None:
    """``INSTANCE_ID`` defaults to ``{node}:{profile}``: in a rolling deploy the new
    container beats under the key of the old one while it drains. A draining worker
    beats ``down``, and one going away is no twin: the new one serves on. (A draining
    beat said anything but ``down``, or taken for a twin's, stopped the new worker with
    "set INSTANCE_ID", and the drain then left no one serving; no test beat so.)"""
    caplog.set_level(logging.INFO, logger="orion_llamaccp")
    redis = aioredis.Redis.from_url(redis_url)
    said: list[str] = []
    try:
        leaving, arriving = _presence(redis, "w", state=state), _presence(redis, "w")
        arriving.on_twin = said.append
        await leaving.heartbeat()
        drained = orjson.loads(await redis.get(keys.liveness("orion-llamaccp", "w")))
        for _ in range(3):
            await arriving.heartbeat()
            await leaving.heartbeat()
    finally:
        await redis.aclose()
    assert drained["payload"]["status"] == "down", drained["payload"]
    assert not arriving.twin_seen and arriving.gave_way is None and said == []
    # The one leaving saw its replacement: told every operator of a rolling deploy, as an
    # error, to "set INSTANCE_ID" (and still did when the second sighting came with its
    # farewell beat, its drain done). It leaves its stream entries to it, and says so.
    assert leaving.twin_seen and leaving.gave_way is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "the worker replacing this one beats under instance id 'w'" in caplog.text


async def test_each_beat_renews_the_registry_entry_for_as_long_as_the_liveness_key(
    redis_url: str,
) -> None:
    """The registry entry lives as long as the liveness key (three intervals: 30 s here),
    renewed by every beat, whatever the announce interval: an entry given a longer life
    (left by an older version, or a periodic announcement far apart) is cut to it, and
    one gone is announced again at once."""
    redis = aioredis.Redis.from_url(redis_url)
    presence = _presence(redis, "renewed")
    entry = keys.registry("tiny", "renewed")
    try:
        await presence.announce()
        await redis.expire(entry, 3600)
        await presence.heartbeat()
        renewed = await redis.ttl(entry)
        assert not presence._pending_announce.is_set()
        await redis.delete(entry)
        await presence.heartbeat()
    finally:
        await redis.delete(entry, keys.liveness("orion-llamaccp", "renewed"))
        await redis.aclose()
    assert 20 < renewed <= 30, renewed
    assert presence._pending_announce.is_set()  # the entry lost: announced at once


def test_a_host_is_down_after_three_of_its_own_beat_intervals_missed() -> None:
    """Down is three missed beats of the host's own interval (its beats say it), the
    same life as its liveness key: one that beats every 2 s is down 7 s after its last
    beat, one that beats every 10 s is up 25 s after."""
    fleet = Fleet()
    now = datetime.now(UTC)
    quick = orjson.loads(_beat("quick", sent=now))
    quick["payload"]["heartbeat_interval_sec"] = 2.0
    heard = time.time()
    fleet.ingest(orjson.dumps(quick), heard_at=heard - 7)
    fleet.ingest(_beat("slow", sent=now), heard_at=heard - 25)
    quick["payload"]["instance"] = "quick-up"
    fleet.ingest(orjson.dumps(quick), heard_at=heard - 5)
    down = {row["instance"]: row["down"] for row in fleet.rows()}
    assert down == {"quick": True, "quick-up": False, "slow": False}


async def test_an_entry_written_anew_by_an_announcement_expires_with_the_liveness_key(
    redis_url: str,
) -> None:
    """A worker whose registry entry Redis lost (restarted empty) and that then stops
    writes the entry anew in its farewell announcement, after its last beat renewed
    nothing. Without a time to live of its own that entry stayed for good: ``ps`` listed
    the stopped worker, down, forever."""
    redis = aioredis.Redis.from_url(redis_url)
    presence = _presence(redis, "leaving")
    entry = keys.registry("tiny", "leaving")
    try:
        await presence.farewell()
        left = await redis.ttl(entry)
    finally:
        await redis.delete(entry)
        await redis.aclose()
    assert 0 < left <= 30, left


def test_a_host_only_announced_and_never_heard_beating_is_down() -> None:
    """An announcement says ``ready`` but is no sign of life: a killed worker's entry
    can outlive its last beat, and ``watch`` hears announcements too. A host with no
    beat is down ("last beat: never"), not listed up on its announcement's word."""
    fleet = Fleet()
    announcement = {"service": "orion-llamaccp", "instance": "mute", "state": "ready"}
    fleet.ingest(orjson.dumps({"kind": PROFILE_ANNOUNCE, "payload": announcement}))
    [row] = fleet.rows()
    assert (row["state"], row["beat_age_sec"], row["down"]) == ("ready", None, True)


def test_a_reason_a_host_no_longer_gives_is_not_shown_after_it_recovered() -> None:
    """Each beat gives what the engine last said, or nothing once it is over: a host
    whose llama-server restarted and serves again was listed by ``ps --json`` with the
    crash as its reason for as long as it lived, had the old reason been kept."""
    fleet = Fleet()
    now = datetime.now(UTC)
    fleet.ingest(_beat("w", sent=now, state="restarting", reason="llama-server exited 139"))
    assert fleet.rows()[0]["reason"] == "llama-server exited 139"
    fleet.ingest(_beat("w", sent=now, state="ready"))
    [row] = fleet.rows()
    assert (row["state"], row["reason"]) == ("ready", None)


async def test_ps_takes_a_host_s_state_from_its_last_beat_over_its_announcement(
    redis_url: str,
) -> None:
    """The registry entry keeps the last announcement, which may be older than the last
    beat (an announcement that failed, a periodic one a minute apart): ``ps`` showed a
    host that beats ``failed`` as ``ready`` had it read the announcement last."""
    redis = aioredis.Redis.from_url(redis_url)
    announced = {"service": "orion-llamaccp", "instance": "w", "profile": "tiny", "state": "ready"}
    beat = _beat("w", sent=datetime.now(UTC), state="failed", reason="model file missing")
    try:
        await redis.hset(
            keys.registry("tiny", "w"),
            "announcement",
            orjson.dumps({"kind": PROFILE_ANNOUNCE, "payload": announced}),
        )
        await redis.set(keys.liveness("orion-llamaccp", "w"), beat, ex=30)
        [row] = (await Fleet().load(redis)).rows()
    finally:
        await redis.aclose()
    assert (row["state"], row["reason"]) == ("failed", "model file missing")


def _announced(instance: str, **said: Any) -> bytes:
    payload = {"service": "orion-llamaccp", "instance": instance, "profile": "tiny", **said}
    return orjson.dumps({"kind": PROFILE_ANNOUNCE, "payload": payload})


def test_a_stream_no_worker_up_reads_is_said_from_what_they_announce() -> None:
    """Workers of a profile that all say they do not read a stream (pub/sub only, or
    another stream): a request put there waits for one to come, and ``chat --via stream``
    waited its whole timeout. One that says nothing of it (a worker from before
    ``intakes``), or none up at all, is no reason to refuse."""
    ours = keys.intake_stream("tiny")
    fleet = Fleet()
    assert fleet.no_stream_reader("tiny", ours) is None  # none up: the request may wait
    now = datetime.now(UTC)
    fleet.ingest(_beat("w1", sent=now))
    fleet.ingest(_announced("w1", intakes=["pubsub"], intake_stream=ours))
    fleet.ingest(_beat("w2", sent=now))
    fleet.ingest(_announced("w2", intakes=["pubsub", "stream"], intake_stream="orion:other"))
    fleet.ingest(_beat("gone", sent=now), heard_at=time.time() - 60)  # down: not counted
    fleet.ingest(_announced("gone", intakes=["pubsub", "stream"], intake_stream=ours))
    assert fleet.no_stream_reader("tiny", ours) == (
        f"no worker of profile 'tiny' reads the stream {ours} "
        "(w1 serves pubsub only; w2 reads the stream orion:other)"
    )
    assert fleet.no_stream_reader("tiny", "orion:other") is None
    assert fleet.no_stream_reader("other", ours) is None
    fleet.ingest(_beat("old", sent=now))
    fleet.ingest(_announced("old", intake_stream=ours))  # says nothing of its intakes
    assert fleet.no_stream_reader("tiny", ours) is None
