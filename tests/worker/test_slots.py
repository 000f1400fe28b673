"""A slot given back by a job that is cancelled while it gives it back is not lost."""

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
