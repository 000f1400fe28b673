"""Is llama-server's inference loop still moving? ``/health`` cannot tell.

``/health`` is answered by llama-server's HTTP threads, so it stays 200 while the inference
loop is stuck (a GPU kernel that never returns, a deadlock): requests then wait for nothing
until their own deadline. ``/slots`` is answered by the loop, or during a decode by the
thread the loop yields to, so it shows the two signs of a wedged loop:

- ``/slots`` gets no answer within ``timeout`` (the loop is stuck outside a decode);
- a slot is busy, yet no busy slot's counters (prompt tokens processed, tokens generated)
  moved for ``timeout`` (stuck inside one).

One decode longer than ``timeout`` (a huge prompt batch on a slow CPU) looks the same,
hence a generous default; 0 turns the check off. Time is counted as the watcher saw it
(``AwakeClock``): a worker paused together with its llama-server (a frozen container) finds
the same counters when it wakes, and that pause is not llama-server's fault.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orion_llamaccp.engine.client import LlamaClient
from orion_llamaccp.errors import EngineUnavailable, UpstreamError

log = logging.getLogger(__name__)

_NOT_SUPPORTED = 501  # llama-server started with --no-slots

Counters = tuple[tuple[Any, ...], ...]


def busy_counters(slots: list[dict[str, Any]]) -> Counters:
    """What changes while the busy slots make progress; empty when none is busy."""
    busy = []
    for slot in slots:
        if not slot.get("is_processing"):
            continue
        next_token = (slot.get("next_token") or [{}])[0]
        busy.append(
            (
                slot.get("id"),
                slot.get("id_task"),
                slot.get("n_prompt_tokens_processed"),
                next_token.get("n_decoded"),
            )
        )
    return tuple(busy)


class AwakeClock:
    """Seconds the watcher was awake to see: a step longer than ``cap`` counts as ``cap``,
    so a pause of the watcher itself is not counted against what it watches."""

    def __init__(self, cap: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.cap = cap
        self._clock = clock
        self._last = clock()
        self.now = 0.0

    def tick(self) -> float:
        now = self._clock()
        self.now += min(now - self._last, self.cap)
        self._last = now
        return self.now


@dataclass
class Stall:
    """Follows the busy slots' counters from one ``/slots`` answer to the next."""

    last: Counters = ()
    since: float = 0.0

    def seen(self, slots: list[dict[str, Any]], now: float) -> float:
        """Seconds the busy slots have made no progress: 0 while idle or moving."""
        counters = busy_counters(slots)
        if not counters or counters != self.last:
            self.last, self.since = counters, now
            return 0.0
        return now - self.since


async def wedged(
    client: LlamaClient,
    *,
    interval: float,
    timeout: float,
    in_use: Callable[[], bool] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> str | None:
    """Poll ``/slots`` every ``interval`` seconds while ``in_use`` says there is work;
    return why the loop is wedged, or None when it cannot be watched (``--no-slots``).
    Runs until cancelled otherwise. (A look at ``/slots`` counts as activity for
    llama-server's ``--sleep-idle-seconds``: an idle server is left alone.)"""
    awake = AwakeClock(cap=2 * interval, clock=clock)
    stall = Stall()
    while True:
        await asyncio.sleep(interval)
        awake.tick()
        if in_use is not None and not in_use():
            stall = Stall()
            continue
        try:
            slots = await _slots(client, awake, interval, timeout)
        except EngineUnavailable:  # not answering at all: the /health checks decide
            stall = Stall()
            continue
        except UpstreamError as exc:
            if exc.status == _NOT_SUPPORTED:
                log.warning("llama-server's /slots is off (--no-slots): a stuck loop goes unseen")
                return None
            continue
        except ValueError:  # not JSON: a passing fault, not a stuck loop
            continue
        if slots is None:
            return f"llama-server's inference loop did not answer /slots within {timeout:g}s"
        stalled = stall.seen(slots, awake.now)
        if stalled >= timeout:
            return f"llama-server's busy slots made no progress for {stalled:.0f}s"


async def _slots(
    client: LlamaClient, awake: AwakeClock, interval: float, timeout: float
) -> list[dict[str, Any]] | None:
    """``/slots``, or None when it does not answer within ``timeout`` seconds awake."""
    request = asyncio.ensure_future(client.slots(timeout=None))
    started = awake.now
    try:
        while not request.done():
            await asyncio.wait({request}, timeout=interval)
            if awake.tick() - started >= timeout and not request.done():
                return None
        return request.result()
    finally:
        request.cancel()
