"""Slots and their leases: given back exactly once, whatever cancels land meanwhile."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from orion_llamaccp.bus.intake import SlotLease, Slots
from orion_llamaccp.worker.inflight import InFlight
from orion_llamaccp.worker.service import Worker


async def test_a_release_cancelled_while_it_waits_for_the_lock_still_gives_the_slot_back() -> None:
    """``Slots.release`` waits for the slots' lock; a cancel landing there (the drain's,
    or a caller's for a job that ended without an answer) used to cut it short, and the
    slot stayed taken for the life of the worker."""
    slots = Slots(1)
    await slots.acquire()
    lease = SlotLease(slots)
    owner = SimpleNamespace(inflight=InFlight())
    await slots._changed.acquire()  # the lock busy: a release must wait for it
    giving_back = asyncio.create_task(Worker._give_back(owner, lease.release))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    giving_back.cancel()
    await asyncio.gather(giving_back, return_exceptions=True)
    assert giving_back.cancelled()
    slots._changed.release()
    await asyncio.gather(*owner.inflight.pending())
    assert slots.free == 1
    await lease.release()  # given back once only
    assert slots.free == 1


async def test_a_lease_stepped_aside_frees_its_slot_and_takes_one_again_when_one_is_free() -> None:
    """A suspect waiting its turn (``_Turn``) lends its slot: another job takes it, and
    the suspect's ``step_back`` waits until a slot is free again. Given back from either
    state, the slot is counted once."""
    slots = Slots(1)
    await slots.acquire()
    lease = SlotLease(slots)
    await lease.step_aside()
    assert slots.free == 1 and not lease.held
    assert slots.try_acquire()  # a new request runs in it
    back = asyncio.create_task(lease.step_back())
    await asyncio.sleep(0.01)
    assert not back.done()
    await slots.release()
    await asyncio.wait_for(back, 1)
    assert lease.held and slots.free == 0
    await lease.release()
    await lease.release()
    assert slots.free == 1


async def test_a_lease_cancelled_while_stepping_back_holds_no_slot() -> None:
    slots = Slots(1)
    await slots.acquire()
    lease = SlotLease(slots)
    await lease.step_aside()
    assert slots.try_acquire()
    back = asyncio.create_task(lease.step_back())
    await asyncio.sleep(0.01)
    back.cancel()
    await asyncio.gather(back, return_exceptions=True)
    await slots.release()
    await lease.release()  # aside: nothing to give back
    assert slots.free == 1 and not lease.held


async def test_only_an_early_lease_is_given_back_when_its_generation_ends() -> None:
    """A pub/sub job's slot frees as llama-server is done with it; a stream entry's stays
    until it is acked, so that the worker holds no more entries than slots."""
    slots = Slots(2)
    await slots.acquire()
    await slots.acquire()
    pubsub, stream = SlotLease(slots, early=True), SlotLease(slots)
    await pubsub.generation_ended()
    await stream.generation_ended()
    assert slots.free == 1 and stream.held and not pubsub.held
    await pubsub.release()
    assert slots.free == 1
