"""Progress of getting a model onto disk: events for the bus, a bar for the terminal.

Callers time out blind when a 40 GB download says nothing for half an hour. The fetch code
reports through one ``ProgressHook``; the bus layer publishes the events (wrapping the hook
with ``loop.call_soon_threadsafe``, since it is called from the download's worker thread),
the CLI draws a bar. ``Reporter`` throttles what reaches the hook: at most one event per
interval while bytes flow, and always the first event of a new phase or attempt.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

log = logging.getLogger(__name__)

Phase = Literal["checking", "downloading", "verifying", "ready", "failed"]


@dataclass(frozen=True)
class ProgressEvent:
    """One step of one file: ``bytes_total`` is ``None`` while unknown."""

    phase: Phase
    filename: str
    bytes_done: int = 0
    bytes_total: int | None = None
    rate_bps: float = 0.0
    attempt: int = 1
    message: str = ""

    @property
    def fraction(self) -> float | None:
        if not self.bytes_total:
            return None
        return min(1.0, self.bytes_done / self.bytes_total)


ProgressHook = Callable[[ProgressEvent], None]


class Reporter:
    """Turns many byte counts into few events; a failing hook never stops a download.

    A throttled event is not lost: the latest one is sent when the interval is up, so a
    download that stalls right after a burst still reports how far it got.
    """

    def __init__(
        self,
        hook: ProgressHook | None,
        *,
        interval: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._hook = hook
        self._interval = interval
        self._clock = clock
        self._last: ProgressEvent | None = None
        self._last_at = 0.0
        self._rate_from: tuple[float, int] = (0.0, 0)
        # Held across every send too: a held event the timer thread took out just before
        # the final one (``ready``, ``failed``) would otherwise reach the hook after it.
        self._lock = threading.RLock()
        self._pending: ProgressEvent | None = None
        self._timer: threading.Timer | None = None

    def emit(
        self,
        phase: Phase,
        filename: str,
        *,
        done: int = 0,
        total: int | None = None,
        attempt: int = 1,
        message: str = "",
    ) -> None:
        now = self._clock()
        last = self._last
        fresh = last is None or (last.phase, last.filename, last.attempt) != (
            phase,
            filename,
            attempt,
        )
        if fresh:
            self._rate_from = (now, done)
        event = ProgressEvent(phase, filename, done, total, self._rate(now, done), attempt, message)
        if not fresh and phase in ("downloading", "verifying"):
            wait = self._interval - (now - self._last_at)
            if wait > 0:
                self._hold(event, wait)
                return
        with self._lock:
            self._pending = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._last, self._last_at = event, now
            self._send(event)

    def _hold(self, event: ProgressEvent, wait: float) -> None:
        with self._lock:
            self._pending = event
            if self._timer is None:
                self._timer = threading.Timer(wait, self._flush)
                self._timer.daemon = True
                self._timer.start()

    def _flush(self) -> None:
        with self._lock:
            event, self._pending, self._timer = self._pending, None, None
            if event is not None:
                self._last, self._last_at = event, self._clock()
                self._send(event)

    def _rate(self, now: float, done: int) -> float:
        since, base = self._rate_from
        elapsed = now - since
        return (done - base) / elapsed if elapsed > 0 else 0.0

    def _send(self, event: ProgressEvent) -> None:
        if self._hook is None:
            return
        try:
            self._hook(event)
        except Exception:
            log.exception("progress hook failed on %s; carrying on", event.phase)


class LogProgress:
    """A hook that logs phase changes and, while downloading, a line every ``every`` s."""

    def __init__(self, logger: logging.Logger = log, every: float = 10.0) -> None:
        self._log = logger
        self._every = every
        self._last: tuple[str, str, int] | None = None
        self._last_at = 0.0

    def __call__(self, event: ProgressEvent) -> None:
        key = (event.phase, event.filename, event.attempt)
        now = time.monotonic()
        if key == self._last and now - self._last_at < self._every:
            return
        self._last, self._last_at = key, now
        self._log.info("%s", describe(event))


def describe(event: ProgressEvent) -> str:
    """One human line for an event."""
    size = f" {size_text(event.bytes_done)}" + (
        f"/{size_text(event.bytes_total)}" if event.bytes_total else ""
    )
    rate = f" at {size_text(int(event.rate_bps))}/s" if event.rate_bps > 0 else ""
    retry = f" (attempt {event.attempt})" if event.attempt > 1 else ""
    note = f": {event.message}" if event.message else ""
    if event.phase in ("downloading", "verifying"):
        return f"{event.phase} {event.filename}{size}{rate}{retry}{note}"
    return f"{event.phase} {event.filename}{retry}{note}"


def size_text(count: int) -> str:
    """A byte count for people: MB, or GB from a tenth of one."""
    return f"{count / 1e9:.2f} GB" if count >= 100_000_000 else f"{count / 1e6:.1f} MB"


class TerminalProgress:
    """A rich progress bar per file on stderr; use as a context manager and as the hook."""

    def __init__(self, console: Console | None = None) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
            transient=False,
        )
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> TerminalProgress:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def __call__(self, event: ProgressEvent) -> None:
        task = self._tasks.get(event.filename)
        label = f"{event.phase:<11} {event.filename}"
        if task is None:
            task = self._progress.add_task(label, total=event.bytes_total)
            self._tasks[event.filename] = task
        completed = event.bytes_done
        if event.phase == "ready" and event.bytes_total:
            completed = event.bytes_total
        self._progress.update(task, description=label, total=event.bytes_total, completed=completed)
