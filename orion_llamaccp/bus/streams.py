"""Messages in over Redis Streams: a consumer-group reader, and a look-up of the copies
of a request still unanswered in the stream (``StreamCopies``).

It survives its broker: the consumer recreates its consumer group when a restarted Redis
lost it. It never holds more entries than it has free slots for: it reads at most as many
as are free, so the backlog waits in Redis, not in our memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from orion_llamaccp.bus.lane import Lane
from orion_llamaccp.bus.retry import TRANSIENT, Backoff
from orion_llamaccp.bus.slots import Slots
from orion_llamaccp.errors import describe
from orion_llamaccp.stopping import not_started, sleep_unless_stopped

if TYPE_CHECKING:  # replies pulls in the envelope models, which the worker needs only later
    from orion_llamaccp.bus.replies import Stage

log = logging.getLogger(__name__)

# KEYS[1] stream; ARGV: group, consumer, entry ids. Resets the idle time of the entries
# pending under this consumer (so nobody reclaims live work) and returns those pending
# under another: it reclaimed them while this one was stalled past the claim idle time.
# One script, not XPENDING then XCLAIM: a plain XCLAIM takes an entry back from whoever
# holds it, and two workers would generate the same request, taking it from each other.
# An entry pending nowhere is left alone: our own ack, or a Redis that lost it, in which
# case this worker's answer is the only one to come.
_REFRESH_OWN = """
local taken = {}
for i = 3, #ARGV do
  local held = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)[1]
  if held and held[2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  elseif held then
    taken[#taken + 1] = ARGV[i]
  end
end
return taken
"""

# KEYS[1] stream; ARGV: group, this consumer, entry ids. Takes again, as a new delivery
# (counted), those of the entries this consumer still holds, with their fields; one
# another consumer reclaimed meanwhile stays theirs (a plain XCLAIM would take it back).
# One deleted from the stream while pending (XCLAIM gives nothing, or nil before Redis
# 7) is acked, and its id returned apart: its request cannot be answered.
_TAKE_OWN = """
local taken, deleted = {}, {}
for i = 3, #ARGV do
  local held = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)[1]
  if held and held[2] == ARGV[2] then
    local got = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i])[1]
    if got then
      taken[#taken + 1] = got
    else
      redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
      deleted[#deleted + 1] = ARGV[i]
    end
  end
end
return {taken, deleted}
"""

# Whether stream id ``a`` comes before ``b``: by number (a string compare puts
# "9-0" after "10-0"), in Lua, for the scripts below.
_BEFORE = """
local function before(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
"""

# KEYS[1] stream. Deletes the entries that every consumer group has read and acked: those
# below the oldest entry still pending in some group, and up to the last one each group
# read. An ack alone leaves the entry (the request's whole envelope) in the stream for
# good. Both bounds count: ``XGROUP SETID`` (a replay) moves a group's last read back
# below an entry still pending, and the group has the entries between to read again.
# MINID keeps its bound, so a group's bound is the id just above its last read: the last
# request stayed in an idle stream otherwise.
_TRIM_ACKED = (
    _BEFORE
    + """
local function above(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  if #seq > 15 then return id end -- past a double's exact integers: keep that entry
  return ms .. '-' .. string.format('%d', tonumber(seq) + 1)
end
local floor = nil
for _, flat in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local group = {}
  for i = 1, #flat, 2 do group[flat[i]] = flat[i + 1] end
  local bound = above(group['last-delivered-id'])
  if tonumber(group['pending']) > 0 then
    local oldest = redis.call('XPENDING', KEYS[1], group['name'])[2]
    if before(oldest, bound) then bound = oldest end
  end
  if floor == nil or before(bound, floor) then floor = bound end
end
if floor == nil then return 0 end
return redis.call('XTRIM', KEYS[1], 'MINID', floor)
"""
)

# KEYS[1] stream; ARGV: group, idle ms, this consumer. Forgets the group's consumers with
# nothing pending that have not read for longer than the claim idle time: workers gone
# (each container re-created under a new name leaves one behind). Nothing is lost: a
# consumer with an entry pending is kept, and a live one that is forgotten is recreated
# by its next read.
_FORGET_GONE = """
local gone = 0
for _, flat in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local consumer = {}
  for i = 1, #flat, 2 do consumer[flat[i]] = flat[i + 1] end
  if tonumber(consumer['pending']) == 0 and tonumber(consumer['idle']) > tonumber(ARGV[2])
      and consumer['name'] ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], consumer['name'])
    gone = gone + 1
  end
end
return gone
"""


# KEYS[1] stream; ARGV: group, this consumer, idle ms. Marks every entry this consumer
# still holds as idle for the claim idle time, so that another worker's next XAUTOCLAIM
# takes it: a stopping worker's entries (its drain cut them off, or it left them for the
# engine) otherwise waited out the claim idle time (10 minutes by default) from their
# last refresh, in every rolling deploy. JUSTID: not counted as a delivery.
_HAND_BACK = """
local held = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1000, ARGV[2])
for _, entry in ipairs(held) do
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, entry[1], 'IDLE', ARGV[3], 'JUSTID')
end
return #held
"""


# KEYS[1] stream; ARGV: group, lowest id, most entries looked at, then the texts to look
# for. The values of the entries from the lowest id on (newest first, at most that many)
# that hold one of the texts and that the group has not acked: still unread (above its
# ``last-delivered-id``), or pending. None without the group: no worker reads the stream.
_UNACKED_COPIES = (
    _BEFORE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
local last = nil
for _, flat in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local group = {}
  for i = 1, #flat, 2 do group[flat[i]] = flat[i + 1] end
  if group['name'] == ARGV[1] then last = group['last-delivered-id'] end
end
if last == nil then return {} end
local found = {}
for _, entry in ipairs(redis.call('XREVRANGE', KEYS[1], '+', ARGV[2], 'COUNT', ARGV[3])) do
  local id, fields = entry[1], entry[2]
  for i = 2, #fields, 2 do
    local hit = false
    for n = 4, #ARGV do
      if string.find(fields[i], ARGV[n], 1, true) then hit = true break end
    end
    if hit then
      if before(last, id) or #redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1) > 0 then
        found[#found + 1] = fields[i]
      end
      break
    end
  end
end
return found
"""
)

# How far before a request's ``created_at`` its copies in the stream are looked for (the
# sender's clock against Redis's, which numbers the entries), and how many entries at
# most: a refusal must not cost Redis a scan of a long backlog.
COPIES_SKEW_MS = 30_000
COPIES_LOOKED_AT = 1000


class StreamCopies:
    """Entries of the intake stream not yet answered that carry a given message: the
    durable copy of a request sent on both intakes (``ChatHandler.fail``)."""

    def __init__(self, redis: aioredis.Redis, *, stream: str, group: str) -> None:
        self.stream = stream
        self.group = group
        self._script = redis.register_script(_UNACKED_COPIES)

    async def unacked(self, texts: list[str], since_ms: int) -> list[bytes]:
        """The values holding one of ``texts`` of the entries added from ``since_ms`` on
        (Redis's clock, less ``COPIES_SKEW_MS``) that the group has not acked."""
        lowest = max(0, since_ms - COPIES_SKEW_MS)
        args = [self.group, str(lowest), COPIES_LOOKED_AT, *texts]
        return list(await self._script(keys=[self.stream], args=args))


@dataclass
class StreamEntry:
    entry_id: str
    fields: dict[bytes, bytes]
    deliveries: int
    reclaimed: bool = False
    prepared: Any = None  # what ``prepare`` made of it, for its handler
    taken_over: bool = False  # another worker reclaimed it from us (its handler is cancelled)


EntryHandler = Callable[[StreamEntry], Awaitable[None]]
EntryPreparer = Callable[[StreamEntry], None]


class StreamConsumer:
    """A consumer-group reader that takes only as many entries as it has slots for.

    ``handler`` is called with a slot already held for the entry; it must release it.
    ``prepare``, if given, is called on every entry as it is read, in order, before any
    handler of the entries read with it runs: those of one read, and of the reads that
    follow it at once without blocking (the worker writes their requests to llama-server
    there, so that entries sent together reach it together).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        stream: str,
        group: str,
        consumer: str,
        slots: Slots,
        handler: EntryHandler,
        ready: Callable[[], Awaitable[None]],
        claim_idle_ms: int,
        block_ms: int = 1000,
        lane: Lane | None = None,
        prepare: EntryPreparer | None = None,
        defer_own: Callable[[], bool] | None = None,
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.slots = slots
        self.handler = handler
        self.ready = ready
        self.claim_idle_ms = claim_idle_ms
        self.block_ms = block_ms
        self.prepare = prepare
        # True while a worker before us under our consumer name drains: our own pending
        # entries are then its, in flight, except those it handed back (``_HAND_BACK``).
        self.defer_own = defer_own or (lambda: False)
        self._own_deferred = False
        # The read that wakes on a new entry stands before its first token.
        self.lane = lane or Lane(redis)
        self.in_flight: dict[str, tuple[StreamEntry, asyncio.Task[None]]] = {}
        # Read, and waiting for a slot that a pub/sub request took while the read was out:
        # pending under this consumer, so refreshed as the entries in flight are.
        self.awaiting_slot: dict[str, StreamEntry] = {}
        # Where the next reclaim looks on from: XAUTOCLAIM looks at ten entries per one
        # asked for, and each look from the start saw the same live ones.
        self._reclaim_from = "0-0"
        self._unnamed_deleted = False  # Redis 6.2 claimed us deleted entries (``_autoclaim``)
        self.started = asyncio.Event()
        self.backoff = Backoff()
        self._tasks: set[asyncio.Task[None]] = set()
        self._refresh_own = redis.register_script(_REFRESH_OWN)
        self._trim_acked = redis.register_script(_TRIM_ACKED)
        self._forget_gone = redis.register_script(_FORGET_GONE)
        self._take_own = redis.register_script(_TAKE_OWN)
        self._hand_back = redis.register_script(_HAND_BACK)

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            log.info("created consumer group %s on %s", self.group, self.stream)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.ensure_group()
                await self._drain_own_pending(stop)
                self.started.set()
                self.backoff.reset()
                await self._loop(stop)
                continue
            except (*TRANSIENT, ResponseError) as exc:
                level, said = logging.WARNING, f"({exc})"
            except Exception as exc:  # as the listener's: nothing unforeseen stops the intake
                level, said = logging.ERROR, f"unexpectedly ({describe(exc)})"
            delay = self.backoff.take()
            log.log(
                level, "stream intake on %s failed %s; retrying in %.1fs", self.stream, said, delay
            )
            await sleep_unless_stopped(stop, delay)

    async def _free_slots(self, stop: asyncio.Event) -> int:
        """Wait for a ready engine and a free slot; how many slots are free (none taken).

        Slots are taken per entry after the read, not reserved across the blocking read:
        a pub/sub request arriving meanwhile must not wait for our XREADGROUP to time out.
        A slot seen free may be taken again before this task runs, and the count may even
        go below zero (a suspect's turn: ``SlotLease.take_back``): it looks until one is.
        """
        await self.ready()
        while self.slots.free <= 0 and not stop.is_set():
            waiter = asyncio.create_task(self.slots.wait_free())
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
        return 0 if stop.is_set() else self.slots.free

    async def _dispatch_all(self, entries: list[StreamEntry]) -> None:
        with self._awaiting(entries):
            for entry in entries:
                await self._take(entry)
                self._spawn(entry)

    @contextlib.contextmanager
    def _awaiting(self, entries: list[StreamEntry]) -> Iterator[None]:
        """``entries``, read and pending under this consumer, kept fresh until each has
        its slot (``_take``): those behind one that waits for a slot wait too, and were
        reclaimed by an idle worker after the claim idle time, and generated twice."""
        self.awaiting_slot.update((entry.entry_id, entry) for entry in entries)
        try:
            yield
        finally:
            for entry in entries:
                self.awaiting_slot.pop(entry.entry_id, None)

    async def _take(self, entry: StreamEntry) -> None:
        """A slot and ``prepare`` for the entry; its handler is not started yet."""
        self.awaiting_slot[entry.entry_id] = entry
        try:
            await self.slots.acquire()
        finally:
            self.awaiting_slot.pop(entry.entry_id, None)
        if entry.taken_over:  # while it waited: the other worker answers it
            return
        if self.prepare is not None:
            try:
                self.prepare(entry)
            except Exception:  # its handler meets the same problem, and answers it
                log.exception("preparing stream entry %s failed", entry.entry_id)

    async def _loop(self, stop: asyncio.Event) -> None:
        next_claim = next_own = 0.0
        while not stop.is_set():
            free = await self._free_slots(stop)
            if free == 0:
                return
            entries: list[StreamEntry] = []
            if self._own_deferred and time.monotonic() >= next_own:  # a predecessor drains
                next_own = time.monotonic() + 1.0
                await self._drain_own_pending(stop)
            if time.monotonic() >= next_claim:
                next_claim = time.monotonic() + max(self.claim_idle_ms / 4000, 0.2)
                entries = await self._autoclaim(free)
            if entries:
                await self._dispatch_all(entries)
            if self._unnamed_deleted:  # Redis 6.2's (``_autoclaim``): ours, pending
                self._unnamed_deleted = False
                await self._drain_own_pending(stop)  # acked and said there (``_TAKE_OWN``)
            elif not entries:
                await self._read_together(free)

    async def _read_together(self, free: int) -> None:
        """New entries: a blocking read, then reads that do not block for as long as they
        find more and slots are free. Each entry is taken (and prepared) as it is read;
        their handlers start after the last read, or if a read fails.

        Callers that send together send a little apart (about 0.05 ms per XADD from
        redis-py). Had the first entry's handler started at once, its steps would run
        before the next read's reply is read, and the entries behind it would reach
        llama-server that much later (``bench.intake --burst``: four sent together spread
        0.41-0.65 ms apart at the upstream before, 0.23-0.37 ms after).
        """
        taken: list[StreamEntry] = []
        try:
            got = await self._read_new(free)
            while got:
                with self._awaiting(got):
                    for entry in got:
                        if self.slots.free <= 0:  # a pub/sub request took it meanwhile:
                            self._start(taken)  # the entries held must not wait for its end
                        await self._take(entry)
                        taken.append(entry)
                free = self.slots.free
                if free <= 0:
                    break
                got = await self._read_new(free, block=False)
        finally:
            self._start(taken)  # delivered to us, slots held, requests written: handled

    def _start(self, taken: list[StreamEntry]) -> None:
        for entry in taken:
            self._spawn(entry)
        taken.clear()

    async def _read_new(self, count: int, block: bool = True) -> list[StreamEntry]:
        wait = ("BLOCK", min(self.block_ms, max(int(self.claim_idle_ms / 4), 100))) if block else ()
        reply = await self.lane.call(
            "XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", count, *wait,
            "STREAMS", self.stream, ">", alone=True,
        )  # fmt: skip
        return [
            StreamEntry(_text(eid), _pairs(fields), 1)
            for _, items in reply or []
            for eid, fields in items
        ]

    async def _autoclaim(self, count: int) -> list[StreamEntry]:
        """Entries another (dead) consumer left pending for longer than ``claim_idle_ms``."""
        reply = await self.redis.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            min_idle_time=self.claim_idle_ms,
            start_id=self._reclaim_from,
            count=count,
        )
        self._reclaim_from = _text(reply[0])  # "0-0" once it has looked at them all
        # Our own entries too, after a stall past the claim idle time that the refresh did
        # not end first: they are still being handled here, not left by anyone.
        mine = self.in_flight.keys() | self.awaiting_slot.keys()
        claimed = [
            (eid, fields)
            for eid, fields in reply[1]
            if fields is not None and _text(eid) not in mine
        ]
        # Redis 7 drops a deleted entry from the pending list and names it in a third
        # element. 6.2 gives it as a nil, its id lost, and leaves it pending, ours now:
        # unacked, every worker reclaimed it in turn for good. ``_loop`` looks for it.
        self._unnamed_deleted |= any(eid is None for eid, _ in reply[1])
        for deleted in reply[2] if len(reply) > 2 else []:
            self._said_deleted(_text(deleted))
            await self.redis.xack(self.stream, self.group, deleted)
        entries = []
        for eid, fields in claimed:
            entry_id = _text(eid)
            entries.append(
                StreamEntry(entry_id, fields, await self._deliveries(entry_id), reclaimed=True)
            )
        if entries:
            log.warning("reclaimed %d stream entries left pending by other consumers", len(entries))
        return entries

    async def _drain_own_pending(self, stop: asyncio.Event) -> None:
        """On start, and after a reconnect: this consumer's own unfinished entries first
        (a restart's leftovers, an entry left pending while Redis was away). Those still
        handled here are left alone: read again (``XREADGROUP ... 0``), each counted one
        more delivery, and a long generation through a few Redis blips was over the
        delivery limit at its next redelivery, answered without a try.

        While a worker before us under our name drains (a rolling deploy: ``defer_own``),
        those it still generates are its: taken here, they were generated twice. Only
        those it handed back (idle past the claim idle time) are taken, and this pass runs
        again each second until it is gone (``_loop``)."""
        after = "-"
        self._own_deferred = deferring = self.defer_own()
        idle = self.claim_idle_ms if deferring else None
        while not stop.is_set():
            free = await self._free_slots(stop)
            if free == 0:
                return
            pending = await self.redis.xpending_range(
                self.stream, self.group, after, "+", free, consumername=self.consumer, idle=idle
            )
            if not pending:
                return
            after = "(" + _text(pending[-1]["message_id"])
            mine = self.in_flight.keys() | self.awaiting_slot.keys()
            left = [i for p in pending if (i := _text(p["message_id"])) not in mine]
            if not left:
                continue
            taken, deleted = await self._take_own(
                keys=[self.stream], args=[self.group, self.consumer, *left]
            )
            for entry_id in deleted:
                self._said_deleted(_text(entry_id))
            entries = []
            for eid, flat in taken:
                entry_id = _text(eid)
                fields = dict(zip(flat[::2], flat[1::2], strict=True))
                deliveries = await self._deliveries(entry_id)
                entries.append(StreamEntry(entry_id, fields, deliveries, reclaimed=True))
            await self._dispatch_all(entries)

    def _said_deleted(self, entry_id: str) -> None:
        """An entry whose envelope is gone (the producer's MAXLEN, an XDEL): no one to
        answer. It was dropped without a word, and the caller's timeout was all it saw."""
        log.warning(
            "stream entry %s of %s was deleted while pending: its request cannot be "
            "answered (does the producer trim the stream with MAXLEN?)",
            entry_id,
            self.stream,
        )

    async def _deliveries(self, entry_id: str) -> int:
        info = await self.redis.xpending_range(
            self.stream, self.group, min=entry_id, max=entry_id, count=1
        )
        return int(info[0]["times_delivered"]) if info else 1

    def _spawn(self, entry: StreamEntry) -> None:
        task = asyncio.create_task(self._handle(entry), name=f"stream-{entry.entry_id}")
        self.in_flight[entry.entry_id] = (entry, task)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, entry: StreamEntry) -> None:
        try:
            await self.handler(entry)  # taken over meanwhile: it gives the slot back at once
        finally:
            self.in_flight.pop(entry.entry_id, None)

    async def keep_claims_fresh(self) -> None:
        """Reset the idle time of our in-flight entries so nobody reclaims live work, and
        give up those another worker took over (``_REFRESH_OWN``): this worker was stalled
        (frozen, paused) past the claim idle time, and the other one answers them."""
        if not self.in_flight and not self.awaiting_slot:
            return
        args = [self.group, self.consumer, *self.in_flight, *self.awaiting_slot]
        for taken in await self._refresh_own(keys=[self.stream], args=args):
            held = self.in_flight.get(_text(taken))
            if held is not None:
                self._give_up(*held)
            elif (waiting := self.awaiting_slot.get(_text(taken))) is not None:
                waiting.taken_over = True

    def _give_up(self, entry: StreamEntry, task: asyncio.Task[None]) -> None:
        log.warning(
            "stream entry %s was taken over by another worker while this one was stalled "
            "past the claim idle time (%d ms): giving it up, the other one answers it",
            entry.entry_id,
            self.claim_idle_ms,
        )
        entry.taken_over = True
        if not not_started(task):  # else its handler finds it taken over as it starts;
            task.cancel()  # cancelled before its first step, it would never give its slot back

    async def hand_back(self) -> int:
        """Leaving: every entry still ours made another worker's to take at once
        (``_HAND_BACK``); how many."""
        args = [self.group, self.consumer, self.claim_idle_ms]
        try:
            return int(await self._hand_back(keys=[self.stream], args=args))
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # no group yet (a worker that never started): none
                return 0
            raise

    async def trim_acked(self) -> int:
        """Delete the entries every group is done with (``_TRIM_ACKED``); how many."""
        return int(await self._trim_acked(keys=[self.stream]))

    async def forget_gone_consumers(self) -> int:
        """Drop the group's consumers that are gone (``_FORGET_GONE``); how many."""
        args = [self.group, self.claim_idle_ms, self.consumer]
        return int(await self._forget_gone(keys=[self.stream], args=args))

    async def ack(self, entry_id: str) -> None:
        await self.redis.xack(self.stream, self.group, entry_id)

    def stage_ack(self, entry_id: str) -> Stage:
        """The ack as a stage, to follow the result in the same round trip."""
        return ("XACK", self.stream, self.group, entry_id)

    @property
    def tasks(self) -> set[asyncio.Task[None]]:
        return self._tasks


def _pairs(flat: list[Any]) -> dict[Any, Any]:
    """An entry's fields as the server sends them (name, value, name, value, ...)."""
    it = iter(flat)
    return dict(zip(it, it, strict=True))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
