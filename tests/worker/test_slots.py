"""Slots and their leases: a slot is given back exactly once, whatever cancels land."""

from __future__ import annotations

import asyncio
import time

from orion_llamaccp.bus.slots import SlotLease, Slots
from orion_llamaccp.worker.generation import _Turn


async def test_a_cancel_while_waiting_for_a_slot_takes_none_and_the_others_still_wake() -> None:
    """Every waiter wakes when a slot is given back; one cancelled meanwhile takes none,
    and the next one gets it."""
    slots = Slots(1)
    await slots.acquire()
    first = asyncio.create_task(slots.acquire())
    second = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)
    slots.release()
    assert not slots.try_acquire()  # free, but the queued ones go first
    first.cancel()  # woken, but cancelled before it ran
    await asyncio.gather(first, return_exceptions=True)
    await asyncio.wait_for(second, 1)
    assert slots.free == 0
    slots.release()
    assert slots.free == 1 and slots.try_acquire()


async def test_a_lease_stepped_aside_frees_its_slot_and_steps_back_when_one_is_free() -> None:
    """A request waiting for its ``not_before_ms`` lends its slot: another job takes it,
    and its ``step_back`` waits until a slot is free again. Given back from either state,
    the slot is counted once."""
    slots = Slots(1)
    await slots.acquire()
    lease = SlotLease(slots)
    lease.step_aside()
    assert slots.free == 1 and not lease.held
    assert slots.try_acquire()  # a new request runs in it
    back = asyncio.create_task(lease.step_back())
    await asyncio.sleep(0.01)
    assert not back.done()
    slots.release()
    await asyncio.wait_for(back, 1)
    assert lease.held and slots.free == 0
    lease.release()
    lease.release()
    assert slots.free == 1


async def test_a_lease_cancelled_while_stepping_back_holds_no_slot() -> None:
    slots = Slots(1)
    await slots.acquire()
    lease = SlotLease(slots)
    lease.step_aside()
    assert slots.try_acquire()
    back = asyncio.create_task(lease.step_back())
    await asyncio.sleep(0.01)
    back.cancel()
    await asyncio.gather(back, return_exceptions=True)
    slots.release()
    lease.release()  # aside: nothing to give back
    assert slots.free == 1 and not lease.held


async def test_a_suspect_s_turn_takes_its_slot_back_over_the_count_and_gives_back_one() -> None:
    """A suspect whose turn comes does not wait for a slot (a request beside it may be
    waiting for it): it runs over the count, and the count is whole again after."""
    slots = Slots(1)
    await slots.acquire()
    lease = SlotLease(slots)
    lease.step_aside()
    assert slots.try_acquire()  # taken meanwhile
    lease.take_back()
    assert slots.free == -1 and slots.busy == 2
    waiting = asyncio.create_task(slots.acquire())
    lease.release()
    await asyncio.sleep(0.01)
    assert not waiting.done()  # still one over: the one beside it holds the only slot
    slots.release()
    await asyncio.wait_for(waiting, 1)
    assert slots.free == 0


async def test_only_an_early_lease_is_given_back_when_its_generation_ends() -> None:
    """A pub/sub job's slot frees as llama-server is done with it; a stream entry's stays
    until it is acked, so that the worker holds no more entries than slots."""
    slots = Slots(2)
    await slots.acquire()
    await slots.acquire()
    pubsub, stream = SlotLease(slots, early=True), SlotLease(slots)
    pubsub.generation_ended()
    stream.generation_ended()
    assert slots.free == 1 and stream.held and not pubsub.held
    pubsub.release()
    assert slots.free == 1


async def test_a_suspect_waiting_for_its_turn_holds_no_slot_even_just_after_a_release() -> None:
    """``_Turn``: a suspect that must wait lends its slot. A lock just released is not yet
    taken by its next waiter (that one has not run): a suspect that came back for a
    second try in that moment saw it free, and waited behind the other one holding its
    slot, which with one slot left nothing to run the other in."""
    slots, lock = Slots(2), asyncio.Lock()
    await slots.acquire()
    await slots.acquire()
    first, second = SlotLease(slots), SlotLease(slots)
    deadline = time.monotonic() + 5
    turn = _Turn(lock, deadline, first)
    await turn.__aenter__()
    waiting = asyncio.create_task(_Turn(lock, deadline, second).__aenter__())
    await asyncio.sleep(0.01)
    assert slots.free == 1 and not second.held  # lent while it waits

    async def retry() -> None:  # its turn ends, and its next try comes in the same step
        await turn.__aexit__(None, None, None)
        await _Turn(lock, deadline, first).__aenter__()

    again = asyncio.create_task(retry())
    await asyncio.sleep(0.01)
    assert waiting.done() and second.held  # its turn: its slot back
    assert not again.done() and not first.held and slots.free == 1
    lock.release()
    await asyncio.wait_for(again, 1)
    assert first.held and slots.free == 0
