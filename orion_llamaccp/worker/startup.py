"""Start-up: listen on the bus first, then build the worker.

A request published while the worker starts must wait in its inbox, not go unheard. So
``serve`` subscribes first, and only then reads the profile, probes llama-server's
``--help`` and imports the rest of the worker (registry, engine, HTTP client, handler:
more than half of the start-up time). This module imports no more than subscribing needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import redis.asyncio as aioredis

from orion_llamaccp.bus.failover import follow_failovers
from orion_llamaccp.bus.pubsub import FIX_AUTH, PubSubListener
from orion_llamaccp.errors import ConfigError, OrionLlamaError, describe
from orion_llamaccp.settings import Settings
from orion_llamaccp.stopping import unless_stopped
from orion_llamaccp.worker.announce import Channels, channels_for, listened

log = logging.getLogger(__name__)
T = TypeVar("T")

# Bounds on what a worker that could not be built says before it exits (a Redis that is
# gone too must not hold the exit up): the fleet report, then the answers (leaving the
# channels, a replica's grace, the claims).
FLEET_REPORT_SEC = 3.0
ANSWERS_SEC = 10.0

# Requests heard beyond the inbox that wait for their ``overloaded`` answer, at most, for
# each message the inbox holds: a burst of thousands at once is still answered (the
# worker refuses a few thousand a second), a flood that outruns the refusals for longer
# is dropped (the caller's wait would have run out first).
OVERFLOW_PER_INBOX = 10
# Their bytes, at most, for each byte the inbox holds: as many, not ten times. The count's
# ratio is for bursts of short requests, a kilobyte each; bytes add up only where requests
# are large, and those are few, so that ``ORION_LLAMACPP_INBOX_BYTES`` of them still wait
# for their answer, and the worker holds about twice that in all (beyond it only a single
# larger request in each, and cancels).
OVERFLOW_BYTES_PER_INBOX_BYTE = 1


class Inbox(asyncio.Queue[tuple[str, bytes, Any]]):
    """The pub/sub messages heard and not yet taken, with their bytes (``nbytes``).

    Counted in ``_put`` and ``_get``, the hooks every way in and out of an
    ``asyncio.Queue`` goes through (as ``LifoQueue`` overrides them): the worker's intake,
    its drain and a failed start take messages out each its own way, and none of them
    need keep the count."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0

    def _put(self, item: tuple[str, bytes, Any]) -> None:
        super()._put(item)
        self.nbytes += len(item[1])

    def _get(self) -> tuple[str, bytes, Any]:
        item: tuple[str, bytes, Any] = super()._get()
        self.nbytes -= len(item[1])
        return item


class Overflow:
    """The requests heard beyond the inbox, as their messages, with their bytes
    (``nbytes``): a ``deque`` that only appends, pops from the left and clears."""

    def __init__(self) -> None:
        self._messages: deque[bytes] = deque()
        self.nbytes = 0

    def append(self, data: bytes) -> None:
        self._messages.append(data)
        self.nbytes += len(data)

    def popleft(self) -> bytes:
        data = self._messages.popleft()
        self.nbytes -= len(data)
        return data

    def clear(self) -> None:
        self._messages.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._messages)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._messages)


def connect(settings: Settings) -> aioredis.Redis:
    """The worker's Redis client. No silent retries inside redis-py: every retry is ours,
    and only where repeating a call is safe (see ``bus.retry``)."""
    timeout = settings.redis_socket_timeout_sec
    client = aioredis.Redis.from_url(
        settings.bus_url.get_secret_value(),
        socket_timeout=timeout,
        socket_connect_timeout=min(timeout, 3.0),
        health_check_interval=15,
        retry_on_timeout=False,
        max_connections=512,
    )
    return follow_failovers(client)


class Intake:
    """The worker's pub/sub listener and the inbox it fills, startable before the worker.

    Messages wait in ``inbox`` until the worker reads them; ``stop`` ends the listening.
    ``prepare``, once the worker sets it, runs on each message as it is read, in the
    listener's own step, and what it returns waits in the inbox beside the message (the
    worker writes the request to llama-server there: a hop through the inbox and a step of
    the worker's intake task sooner).

    The listener reads whatever Redis sends (left unread, Redis would drop the connection,
    cancels and all), and before the worker is built, or under a flood, nothing takes the
    messages as fast. So a request heard while ``ORION_LLAMACPP_INBOX_SIZE`` messages wait
    in the inbox, or that would put more than ``ORION_LLAMACPP_INBOX_BYTES`` there, waits
    in ``overflow`` instead, to be answered ``overloaded`` as soon as the worker can
    (``PubSubRequests.refuse_overflow``), up to ``OVERFLOW_PER_INBOX`` times as many and
    ``OVERFLOW_BYTES_PER_INBOX_BYTE`` times as many bytes: a request beyond both is
    dropped (counted in ``dropped``, said in the log), so that the worker's memory stays
    bounded, by bytes too (a flood of 8 MiB requests held gigabytes within the counts).
    Each takes one message whatever its size when it holds none: a request larger than
    the byte bound still waits, alone. Cancels and discovery requests always reach the
    inbox: they count in its messages and bytes (a request after them may find it full),
    and are never refused.
    """

    def __init__(self, settings: Settings, redis: aioredis.Redis, channels: Channels) -> None:
        self.inbox = Inbox()
        self.limit = settings.inbox_size
        self.byte_limit = settings.inbox_bytes
        self.overflow = Overflow()
        self.overflow_limit = OVERFLOW_PER_INBOX * self.limit
        self.overflow_byte_limit = OVERFLOW_BYTES_PER_INBOX_BYTE * self.byte_limit
        self.overflowing = asyncio.Event()  # set when a request joins ``overflow``
        self.dropped = 0
        self._dropping = False  # said in the log once a flood: until ``overflow`` empties
        self._requests = channels.intake
        self.prepare: Callable[[str, bytes], Any] | None = None
        self.stop = asyncio.Event()
        self.listener = PubSubListener(
            redis,
            [name for name in listened(settings, channels) if name],
            self._received,
            ping_interval=settings.pubsub_ping_sec,
            ping_timeout=3 * settings.pubsub_ping_sec,
            bus=settings.bus_url_display,
        )
        self._task: asyncio.Task[None] | None = None

    def _received(self, channel: str, data: bytes) -> None:
        if channel == self._requests and not self._room_in_inbox(len(data)):
            self._beyond(data)
            return
        prepared = None
        if self.prepare is not None:
            try:
                prepared = self.prepare(channel, data)
            except Exception:  # the message itself must still reach the worker
                log.exception("preparing a message on %s failed", channel)
        self.inbox.put_nowait((channel, data, prepared))

    def _room_in_inbox(self, size: int) -> bool:
        inbox = self.inbox
        if inbox.empty():
            return True
        return inbox.qsize() < self.limit and inbox.nbytes + size <= self.byte_limit

    def _room_in_overflow(self, size: int) -> bool:
        overflow = self.overflow
        if not overflow:
            return True
        return (
            len(overflow) < self.overflow_limit
            and overflow.nbytes + size <= self.overflow_byte_limit
        )

    def _beyond(self, data: bytes) -> None:
        if self._room_in_overflow(len(data)):
            if not self.overflow:  # under a flood it stays about full: one line, not one a drop
                self._dropping = False
            self.overflow.append(data)
            self.overflowing.set()
            return
        self.dropped += 1
        if not self._dropping:
            self._dropping = True
            log.warning(
                "%d pub/sub messages (%d bytes) wait in the inbox and %d requests (%d bytes) "
                "for their overloaded answer: further requests are dropped unanswered until "
                "those go (ORION_LLAMACPP_INBOX_SIZE, ORION_LLAMACPP_INBOX_BYTES; "
                "orion_llamacpp_pubsub_dropped counts them)",
                self.inbox.qsize(),
                self.inbox.nbytes,
                len(self.overflow),
                self.overflow.nbytes,
            )

    async def listening(self, timeout: float) -> bool:
        """Subscribed yet? Waits up to ``timeout``; the listener goes on trying after it."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.listener.subscribed.wait(), timeout)
        return self.listener.subscribed.is_set()

    def start(self) -> asyncio.Task[None]:
        """Start listening; a second call returns the same task."""
        if self._task is None:
            self._task = asyncio.create_task(self.listener.run(self.stop), name="pubsub")
        return self._task

    async def close(self) -> None:
        self.stop.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def serve(settings: Settings, stop: asyncio.Event, hurry: asyncio.Event | None = None) -> int:
    """``orion-llamaccp run``: listen, build the plan and the worker, serve until ``stop``."""
    redis = connect(settings)
    # The channels of the profile asked for: a profile that does not exist is found out
    # right after, said on the bus (``tell_failed_start``), and the command exits with it.
    intake = Intake(settings, redis, channels_for(settings, settings.profile_name))
    intake.start()
    try:
        # Anything imported below would hold up the subscription. A Redis that is down only
        # delays the start by this much: the listener goes on trying, and the worker waits.
        if not await intake.listening(timeout=1.0) and intake.listener.refused is not None:
            raise ConfigError(
                f"Redis at {settings.bus_url_display} refused the credentials "
                f"({intake.listener.refused}): {FIX_AUTH}"
            )
        from orion_llamaccp.engine.binary import Children, probing_with
        from orion_llamaccp.engine.plan import plan_profile, select_profile

        try:
            registry, profile = select_profile(settings)
            # llama-server's --help and --version (up to 90 s where they initialise CUDA
            # on many GPUs), and a stop obeyed meanwhile: the first SIGTERM waited them out.
            # The thread is left behind; the processes it runs are not.
            children = Children()
            in_context = probing_with(children)
            planning = _in_a_thread(plan_profile, settings, registry, profile, context=in_context)
            if not await unless_stopped(stop, planning):
                children.kill()
                log.info("stopped before the worker was built")
                return 0
            plan = planning.result()
        except OrionLlamaError as exc:
            if stop.is_set():  # the probe failed as the stop came
                log.info("stopped before the worker was built (%s)", settings.redact(str(exc)))
                return 0
            await tell_failed_start(settings, redis, intake, exc)
            raise
        from orion_llamaccp.worker.service import Worker

        return await Worker(settings, plan, redis, intake).run(stop, hurry)
    finally:
        await intake.close()
        await redis.aclose()


def _in_a_thread(
    function: Callable[..., T], *args: object, context: contextvars.Context | None = None
) -> asyncio.Future[T]:
    """``function(*args)`` in a daemon thread of its own: a stop need not wait for it (the
    default executor's threads are joined as the process exits, however long they take).
    Run in ``context``, or a copy of the caller's."""
    context = context or contextvars.copy_context()
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            outcome: tuple[T | None, BaseException | None] = (context.run(function, *args), None)
        except BaseException as exc:  # handed to the loop, which raises it where awaited
            outcome = (None, exc)
        with contextlib.suppress(RuntimeError):  # the loop closed: stopped meanwhile
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=work, name=f"{function.__name__}", daemon=True).start()
    return done


async def tell_failed_start(
    settings: Settings, redis: aioredis.Redis, intake: Intake, error: OrionLlamaError
) -> None:
    """Before a worker that could not be built exits: the fleet told, and the requests it
    heard answered (``worker/failed_start.py``), each within a bound, whatever Redis does:
    the start-up error itself is what must reach the operator, and soon."""
    from orion_llamaccp.worker.failed_start import FailedStart

    failed = FailedStart(settings, redis, intake, settings.redact(str(error)))
    try:
        await failed.tell_fleet(timeout=FLEET_REPORT_SEC)
    except Exception as exc:
        log.warning("could not tell the fleet of the failed start: %s", describe(exc))
    try:
        async with asyncio.timeout(ANSWERS_SEC):
            answered = await failed.answer_heard()
    except Exception as exc:
        log.warning("could not answer the requests heard: %s", describe(exc))
    else:
        log.debug("failed start: %d request(s) heard answered", answered)


__all__ = ["Inbox", "Intake", "Overflow", "connect", "serve", "tell_failed_start"]
