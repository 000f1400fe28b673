"""Progress events: throttled for the bus, drawn for a terminal, never fatal."""

from __future__ import annotations

import io
import logging
import threading

import pytest
from rich.console import Console

from orion_llamaccp.model.progress import (
    LogProgress,
    ProgressEvent,
    Reporter,
    TerminalProgress,
    describe,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bytes_are_throttled_but_phase_changes_always_pass() -> None:
    clock, events = Clock(), []
    reporter = Reporter(events.append, interval=0.5, clock=clock)

    reporter.emit("checking", "m.gguf")
    reporter.emit("downloading", "m.gguf", done=0, total=1000)
    for done in range(100, 1000, 100):  # nine updates within 0.45 s
        clock.now += 0.05
        reporter.emit("downloading", "m.gguf", done=done, total=1000)
    clock.now += 0.5
    reporter.emit("downloading", "m.gguf", done=1000, total=1000)
    reporter.emit("ready", "m.gguf", done=1000, total=1000)

    assert [(e.phase, e.bytes_done) for e in events] == [
        ("checking", 0),
        ("downloading", 0),
        ("downloading", 1000),
        ("ready", 1000),
    ]
    assert events[2].rate_bps == pytest.approx(1000 / 0.95)


def test_a_new_attempt_is_announced_at_once() -> None:
    clock, events = Clock(), []
    reporter = Reporter(events.append, clock=clock)

    reporter.emit("downloading", "m.gguf", done=10, total=100, attempt=1)
    reporter.emit("downloading", "m.gguf", done=10, total=100, attempt=2)

    assert [e.attempt for e in events] == [1, 2]


def test_a_failing_hook_never_stops_the_download(caplog: pytest.LogCaptureFixture) -> None:
    def broken(event: ProgressEvent) -> None:
        raise RuntimeError("bus down")

    reporter = Reporter(broken)
    reporter.emit("checking", "m.gguf")
    reporter.emit("ready", "m.gguf")

    assert caplog.text.count("progress hook failed") == 2


def test_describe_and_fraction() -> None:
    event = ProgressEvent("downloading", "m.gguf", 5_000_000, 10_000_000, 2_000_000.0, 2)

    assert event.fraction == 0.5
    assert describe(event) == "downloading m.gguf 5.0 MB/10.0 MB at 2.0 MB/s (attempt 2)"
    assert describe(ProgressEvent("failed", "m.gguf", message="gone")) == "failed m.gguf: gone"


def test_log_progress_logs_each_phase_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    hook = LogProgress(logging.getLogger("test.progress"), every=3600)

    for done in (1, 2, 3):
        hook(ProgressEvent("downloading", "m.gguf", done, 10))
    hook(ProgressEvent("ready", "m.gguf", 10, 10))

    assert [r.getMessage().split()[0] for r in caplog.records] == ["downloading", "ready"]


def test_terminal_progress_draws_a_bar() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)

    with TerminalProgress(console) as bar:
        bar(ProgressEvent("downloading", "m.gguf", 500_000, 1_000_000, 1e6))
        bar(ProgressEvent("ready", "m.gguf", 1_000_000, 1_000_000))

    assert "m.gguf" in out.getvalue()
    assert "1.0/1.0 MB" in out.getvalue()


def test_a_held_event_never_reaches_the_hook_after_the_final_one() -> None:
    """A throttled event waits for the interval on a timer thread. Taken out by that
    thread just as the download ended, it reached the hook after ``ready``: a watcher of
    the bus saw "downloading 50 %" after "ready", and a bar drawn on a terminal went back.
    Here the timer's send is caught in the hook while ``ready`` is emitted: that send
    comes first, and ``ready`` waits for it."""
    main = threading.current_thread()
    seen: list[str] = []
    flushing, final_sent = threading.Event(), threading.Event()

    def hook(event: ProgressEvent) -> None:
        if event.phase == "downloading" and threading.current_thread() is not main:
            flushing.set()
            final_sent.wait(1.0)  # before the fix, ``ready`` went out meanwhile
        seen.append(event.phase)
        if event.phase == "ready":
            final_sent.set()

    reporter = Reporter(hook, interval=0.1)
    reporter.emit("downloading", "m.gguf", done=1, total=10)  # sent at once
    reporter.emit("downloading", "m.gguf", done=5, total=10)  # held for the timer
    assert flushing.wait(10)
    reporter.emit("ready", "m.gguf", done=10, total=10)
    final_sent.wait(10)
    assert seen == ["downloading", "downloading", "ready"]
