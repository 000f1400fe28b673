"""A stuck inference loop behind a healthy ``/health``, against the real llama-server.

The wedge is real: llama-server's main thread (its inference loop, and every decode) is
stopped by ptrace while its HTTP threads run on (``tests/support/freeze.py``), as with a
GPU kernel that never returns. ``Stall`` and ``AwakeClock`` are checked on their own too,
with a clock the test moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
from pathlib import Path

import httpx
import pytest

from orion_llamaccp.engine import liveness
from orion_llamaccp.engine.client import LlamaClient
from orion_llamaccp.engine.liveness import AwakeClock, Stall
from orion_llamaccp.engine.supervisor import EngineEvent, EngineState, Supervisor
from tests.engine.conftest import FAST, LaunchFactory, assert_answers
from tests.support.freeze import FrozenThread
from tests.support.procs import pid_alive, wait_until_async
from tests.support.proxy import InLoopServer

WATCHED = dataclasses.replace(FAST, progress_timeout=1.0)


async def _started(launch: LaunchFactory, **knobs: object) -> Supervisor:
    supervisor = Supervisor(launch(**knobs), environ=dict(os.environ), policy=WATCHED)
    await supervisor.start()
    return supervisor


async def _restarted(supervisor: Supervisor, events: list[EngineEvent]) -> str:
    await wait_until_async(
        lambda: supervisor.state is EngineState.RESTARTING, timeout=20, what="a restart"
    )
    await supervisor.wait_for(EngineState.READY, timeout=30)
    return next(e.reason or "" for e in events if e.state is EngineState.RESTARTING)


async def test_a_stuck_loop_is_restarted_though_health_says_200(
    make_launch: LaunchFactory,
) -> None:
    supervisor = await _started(make_launch)
    events: list[EngineEvent] = []
    supervisor.add_listener(events.append)
    first = supervisor.pid
    assert first is not None
    try:
        with FrozenThread(first) as frozen:
            assert (await supervisor.client.health()).ready  # what /health alone would see
            reason = await _restarted(supervisor, events)
        assert frozen.exited and not pid_alive(first)
        assert "did not answer /slots within 1s: wedged" in reason  # the timeout, as set
        assert supervisor.pid != first and supervisor.restarts == 1
        await assert_answers(supervisor, max_tokens=4)
    finally:
        await supervisor.stop()


async def test_a_loop_stuck_between_requests_is_restarted_before_the_next_one_comes(
    make_launch: LaunchFactory,
) -> None:
    """No request holds a slot (the worker's ``in_use`` says so), and llama-server may not
    sleep (no ``--sleep-idle-seconds``): its loop is watched all the same, so a loop stuck
    while idle is restarted then, not after the next request waited out the timeout."""
    supervisor = Supervisor(
        make_launch(), environ=dict(os.environ), policy=WATCHED, in_use=lambda: False
    )
    await supervisor.start()
    events: list[EngineEvent] = []
    supervisor.add_listener(events.append)
    first = supervisor.pid
    assert first is not None
    try:
        with FrozenThread(first):
            reason = await _restarted(supervisor, events)
        assert "did not answer /slots" in reason and supervisor.restarts == 1
        await assert_answers(supervisor, max_tokens=4)
    finally:
        await supervisor.stop()


async def _frozen_in_a_decode(pid: int, url: str) -> FrozenThread:
    """The main thread stopped inside a decode: ``/slots`` still answers then (the loop
    hands such reads to another thread while it decodes), with counters that never move."""
    async with httpx.AsyncClient(base_url=url) as http:
        for _ in range(50):
            frozen = FrozenThread(pid).__enter__()
            try:
                slots = (await http.get("/slots", timeout=0.5)).json()
                if any(s["is_processing"] for s in slots):
                    return frozen
            except httpx.TimeoutException:
                pass  # stopped between two decodes: let it go and try again
            frozen.__exit__()
            await asyncio.sleep(0.01)
    raise AssertionError("never stopped inside a decode")


async def test_a_decode_that_never_ends_is_restarted(
    make_launch: LaunchFactory, model_dir: Path, slow_model: Path
) -> None:
    shutil.copy(slow_model, model_dir / "slow.gguf")
    supervisor = await _started(make_launch, model_path="slow.gguf", ctx_size=32768)
    events: list[EngineEvent] = []
    supervisor.add_listener(events.append)
    first = supervisor.pid
    assert first is not None
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12_000}
    try:
        async with supervisor.client.chat_stream(body) as stream:
            await anext(aiter(stream))
            frozen = await _frozen_in_a_decode(first, supervisor.launch.base_url)
            try:
                reason = await _restarted(supervisor, events)
            finally:
                frozen.__exit__()
        assert frozen.exited
        assert "busy slots made no progress for " in reason and ": wedged" in reason
    finally:
        await supervisor.stop()


async def test_a_long_prompt_and_generation_are_not_taken_for_a_stuck_one(
    make_launch: LaunchFactory, model_dir: Path, slow_model: Path
) -> None:
    """Busy for several progress timeouts in a row, reading a long prompt batch by batch,
    then generating, but moving: left alone. Its generation is read for ``3.5 x`` the
    timeout from its first token, whatever this CPU's pace, then left (which cancels it):
    counted from the request, the prompt alone filled the read here, and a watch blind
    to the tokens generated (killing every generation longer than the timeout) passed.
    Batches of 256 tokens: one decode must stay well under the timeout (a 2,048-token
    batch of this model takes about as long as the 1 s timeout here, and would rightly
    count as a stall)."""
    shutil.copy(slow_model, model_dir / "slow.gguf")
    supervisor = await _started(
        make_launch, model_path="slow.gguf", ctx_size=32768, batch_size=256, ubatch_size=256
    )
    body = {  # about 20 s of generation here: far more than it is read for, on any CPU
        "messages": [{"role": "user", "content": " ".join(["hello there"] * 800)}],
        "max_tokens": 28_000,
        "ignore_eos": True,
    }
    loop = asyncio.get_running_loop()
    left_running = False
    started: float | None = None
    try:
        async with supervisor.client.chat_stream(body) as stream:
            async for _ in stream:
                if started is None:  # the prompt is read: generating from here
                    started = loop.time()
                elif loop.time() - started > 3.5 * WATCHED.progress_timeout:
                    left_running = True
                    break
        assert left_running, "the generation ended before it was read for long enough"
        assert supervisor.restarts == 0 and supervisor.state is EngineState.READY
    finally:
        await supervisor.stop()


def test_a_stall_is_counted_from_the_last_change_of_the_busy_slots() -> None:
    busy = [{"id": 0, "id_task": 7, "is_processing": True, "n_prompt_tokens_processed": 9}]
    stall = Stall()
    assert stall.seen([{"id": 0, "is_processing": False}], 0.0) == 0.0  # idle: never stalled
    assert stall.seen(_decoded(busy, 1), 1.0) == 0.0
    assert stall.seen(_decoded(busy, 1), 3.5) == 2.5
    assert stall.seen(_decoded(busy, 2), 4.0) == 0.0  # moved
    assert stall.seen(_decoded(busy, 2), 5.0) == 1.0
    assert stall.seen([{"id": 0, "is_processing": False}], 9.0) == 0.0


def _decoded(slots: list[dict], n: int) -> list[dict]:
    return [{**s, "next_token": [{"n_decoded": n}]} for s in slots]


def test_the_watcher_s_own_pause_is_not_counted() -> None:
    """A frozen container wakes with llama-server's counters where they were: only the
    time the watcher was awake to see them counts."""
    now = [100.0]
    clock = AwakeClock(cap=1.0, clock=lambda: now[0])
    now[0] += 0.5
    assert clock.tick() == 0.5
    now[0] += 300.0  # paused
    assert clock.tick() == 1.5
    now[0] += 0.5
    assert clock.tick() == 2.0


async def test_without_slots_the_loop_goes_unwatched_and_says_so(
    make_launch: LaunchFactory, caplog: pytest.LogCaptureFixture
) -> None:
    supervisor = await _started(make_launch, extra_args=["--no-slots"])
    try:
        await wait_until_async(
            lambda: "a stuck loop goes unseen" in caplog.text, timeout=10, what="the warning"
        )
        await asyncio.sleep(3 * WATCHED.health_interval)
        assert supervisor.state is EngineState.READY and supervisor.restarts == 0
    finally:
        await supervisor.stop()


@pytest.mark.parametrize("in_use", [False, None], ids=["idle-left-alone", "always-watched"])
async def test_an_idle_llama_server_is_not_looked_at_so_it_may_sleep(
    make_launch: LaunchFactory, caplog: pytest.LogCaptureFixture, in_use: bool | None
) -> None:
    """A look at /slots counts as activity for --sleep-idle-seconds: watched while it has
    no work, llama-server never sleeps (the second case shows it). One that may sleep is
    watched only while a request holds a slot."""
    caplog.set_level(logging.DEBUG, logger="orion_llamaccp.llama_server")
    supervisor = Supervisor(
        make_launch(extra_args=["--sleep-idle-seconds", "1"]),
        environ=dict(os.environ),
        policy=WATCHED,
        in_use=None if in_use is None else lambda: in_use,
    )
    await supervisor.start()
    try:
        if in_use is None:  # three times its idle time, looked at all along: still awake
            await asyncio.sleep(3)
            assert "entering sleeping state" not in caplog.text
        else:
            await wait_until_async(
                lambda: "entering sleeping state" in caplog.text,
                timeout=30,
                what="llama-server asleep",
            )
        assert supervisor.state is EngineState.READY and supervisor.restarts == 0
    finally:
        await supervisor.stop()


class _FailingSlots(InLoopServer):
    """In front of llama-server: its first ``/slots`` answered 500 by this proxy, the
    second 200 with a body that is not JSON (a proxy's or a load balancer's page), every
    other request passed through. llama-server itself fails ``/slots`` no such way on
    demand; a gateway between a worker and a remote llama-server does."""

    FAULTS = (
        (b"500 Internal Server Error", b'{"error": {"code": 500, "message": "a hiccup"}}'),
        (b"200 OK", b"<html>a gateway's page</html>"),
    )

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.faults = list(self.FAULTS)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"GET /slots") and self.faults:
            status, body = self.faults.pop(0)
            writer.write(
                b"HTTP/1.1 %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (status, len(body), body)
            )
            await writer.drain()
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        up_writer.write(head)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_a_slots_that_fails_for_a_while_leaves_the_loop_watched(
    ready_engine: Supervisor,
) -> None:
    """``/slots`` answered 500, then a page that is not JSON: passing faults, which
    neither turn the watch off (only ``--no-slots``, a 501, does) nor count as a stuck
    loop; the loop frozen after them is found wedged all the same. No test made
    ``/slots`` fail so: a watch that went off at the first failure (a stuck loop unseen
    for the rest of the process's life) passed every test."""
    pid = ready_engine.pid
    assert pid is not None
    proxy = _FailingSlots(ready_engine.launch.port)
    async with proxy as url, LlamaClient(url) as client:
        watch = asyncio.create_task(liveness.wedged(client, interval=0.2, timeout=1.0))
        await wait_until_async(
            lambda: not proxy.faults or watch.done(), timeout=10, what="both faults served"
        )
        await asyncio.sleep(0.5)  # answered as it is once more: a look past the faults
        assert not watch.done(), watch
        with FrozenThread(pid):
            verdict = await asyncio.wait_for(watch, 20)
    assert verdict is not None and "did not answer /slots within 1s" in verdict, verdict
