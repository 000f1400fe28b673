"""The supervisor against the real llama-server: start, restart, fail, diagnose, stop.

Slow and hung loaders are imitated by a shell prelude that runs before the real binary
(``tests/support/llama_prelude.sh``); everything after the prelude is real llama-server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

import psutil
import pytest

from orion_llamaccp.engine.client import LlamaClient
from orion_llamaccp.engine.command import API_KEY_ENV, LaunchSpec
from orion_llamaccp.engine.diagnostics import Cause
from orion_llamaccp.engine.plan import socket_path
from orion_llamaccp.engine.supervisor import (
    EngineEvent,
    EngineState,
    Supervisor,
    _remove_stale_socket,
)
from orion_llamaccp.errors import EngineStartError, EngineUnavailable
from tests.engine.conftest import FAST, PRELUDE, LaunchFactory, assert_answers
from tests.support.procs import free_port, pid_alive, wait_until_async


def record(supervisor: Supervisor) -> list[EngineEvent]:
    events: list[EngineEvent] = []
    supervisor.add_listener(events.append)
    return events


async def test_readiness_is_noticed_from_llama_server_output_not_the_poll_timer(
    make_launch: LaunchFactory,
) -> None:
    """With a /health poll interval far longer than the test's patience, the engine is
    still found ready: what llama-server prints when it is done triggers the look."""
    policy = FAST.__class__(**{**FAST.__dict__, "poll_interval": 600.0})
    supervisor = Supervisor(make_launch(), environ=dict(os.environ), policy=policy)
    try:
        await asyncio.wait_for(supervisor.start(), timeout=60)
        assert supervisor.state is EngineState.READY
    finally:
        await supervisor.stop()


async def test_ready_reached_then_stopped_cleanly(make_launch: LaunchFactory) -> None:
    supervisor = Supervisor(make_launch(), environ=dict(os.environ), policy=FAST)
    events = record(supervisor)
    await supervisor.start()
    pid = supervisor.pid
    assert supervisor.state is EngineState.READY
    assert supervisor.props is not None and supervisor.props.total_slots == 2
    assert supervisor.props.n_ctx == 1024  # per slot: 2048 over 2 slots (-np splits the cache)
    await supervisor.stop()
    await supervisor.stop()  # twice is fine
    assert [e.state for e in events] == [
        EngineState.STARTING,
        EngineState.LOADING,
        EngineState.READY,
        EngineState.STOPPED,
    ]
    assert pid is not None and not pid_alive(pid)


async def test_slow_loader_that_keeps_printing_is_not_killed(
    make_launch: LaunchFactory, prelude_env
) -> None:
    policy = FAST.__class__(**{**FAST.__dict__, "silence_timeout": 1.0})
    supervisor = Supervisor(
        make_launch(binary=PRELUDE),
        policy=policy,
        environ=prelude_env(PRELUDE_LINES="10", PRELUDE_DELAY="0.3"),  # 3 s > silence_timeout
    )
    events = record(supervisor)
    await supervisor.start()
    try:
        assert supervisor.state is EngineState.READY
        assert supervisor.restarts == 0
        assert EngineState.RESTARTING not in [e.state for e in events]
    finally:
        await supervisor.stop()


async def test_a_loader_that_works_without_a_word_is_not_killed(
    make_launch: LaunchFactory, prelude_env
) -> None:
    """A warm-up run, or a large model paged in from a slow disk, can leave llama-server
    silent for minutes while it works: it was killed as hung once ``silence_timeout``
    passed without output (a crash loop, then ``failed``). Working on the CPU for 3 s, a
    second's silence allowed: it loads."""
    policy = FAST.__class__(**{**FAST.__dict__, "silence_timeout": 1.0, "crash_limit": 1})
    supervisor = Supervisor(
        make_launch(binary=PRELUDE), policy=policy, environ=prelude_env(PRELUDE_BUSY="3")
    )
    events = record(supervisor)
    await supervisor.start()
    try:
        assert supervisor.state is EngineState.READY
        assert EngineState.RESTARTING not in [e.state for e in events]
    finally:
        await supervisor.stop()


async def test_a_no_gpu_warning_read_after_the_health_is_ready_still_fails_the_start(
    make_launch: LaunchFactory, prelude_env
) -> None:
    """On a busy machine (round 27's CI) /health answered ready before the worker had read
    the lines llama-server printed while loading, "no usable GPU found" among them: the
    profile was served on the CPU as ready. Here its output reaches the reader a second
    late; the start waits for its "model loaded" line, and fails as it should."""
    launch = make_launch(gpus=[0], n_gpu_layers=99, binary=PRELUDE)
    assert launch.gpus_required == "0"
    late = Supervisor(launch, environ=prelude_env(PRELUDE_LATE_OUTPUT="1"))
    try:
        with pytest.raises(EngineStartError, match="no usable GPU"):
            await late.start()
    finally:
        await late.stop()


@pytest.mark.parametrize("layers", [99, None], ids=["layers-set", "layers-unset"])
async def test_a_profile_that_pins_gpus_is_not_served_on_the_cpu(
    make_launch: LaunchFactory, layers: int | None
) -> None:
    """llama.cpp that finds no usable GPU (a CPU build, as here; a container not given
    its GPUs; a pin to a GPU the host numbers otherwise) warns and serves on the CPU, many
    times slower: the worker said ``ready`` as if the profile were served. It fails at
    once now, saying why, and is not restarted; asking for no layers on the GPUs (the
    profile's ``n_gpu_layers: 0`` or its override) is serving on the CPU on purpose.
    A profile that leaves the layers to llama-server was still served on the CPU: only
    its ``--n-gpu-layers`` option says "no usable GPU found", and it was not given."""
    launch = make_launch(gpus=[0], probed=True, n_gpu_layers=layers)
    pinned = Supervisor(launch, environ=dict(os.environ))
    assert pinned.launch.gpus_required == "0"
    with pytest.raises(EngineStartError, match="no usable GPU") as failed:
        await pinned.start()
    assert "LLAMACPP_N_GPU_LAYERS_OVERRIDE=0" in str(failed.value)
    assert "runs layers on GPUs 0 " in str(failed.value)  # which pin it was
    assert pinned.state is EngineState.FAILED and pinned.restarts == 0
    await pinned.stop()
    on_purpose = Supervisor(make_launch(gpus=[0], n_gpu_layers=0), environ=dict(os.environ))
    assert on_purpose.launch.gpus_required is None
    await on_purpose.start()
    try:
        assert on_purpose.state is EngineState.READY
        assert any("no usable GPU" in line for line in on_purpose._proc.tail)  # said, all the same
    finally:
        await on_purpose.stop()


async def test_silent_hung_loader_is_detected_and_killed(
    make_launch: LaunchFactory, prelude_env
) -> None:
    policy = FAST.__class__(**{**FAST.__dict__, "silence_timeout": 1.0, "crash_limit": 1})
    supervisor = Supervisor(
        make_launch(binary=PRELUDE), policy=policy, environ=prelude_env(PRELUDE_SILENT="60")
    )
    with pytest.raises(EngineStartError, match="hung while loading"):
        await supervisor.start()
    assert supervisor.state is EngineState.FAILED
    assert supervisor._proc is not None and not pid_alive(supervisor._proc.pid)
    await supervisor.stop()


async def test_a_load_hung_while_its_http_threads_answer_health_is_found_silent(
    make_launch: LaunchFactory, model_dir: Path
) -> None:
    """llama-server answers /health (503 "Loading model") from its HTTP threads while its
    loader is blocked (here on a FIFO no one writes, as on a dead mount): our polls cost
    it a few clock ticks of CPU a minute, each was counted as work, and the silence watch
    never fired; the engine said ``loading`` up to the load timeout (an hour)."""
    os.mkfifo(model_dir / "hung.gguf")
    fields = {**FAST.__dict__, "silence_timeout": 6.0, "load_timeout": 120.0, "crash_limit": 1}
    supervisor = Supervisor(
        make_launch(model_path="hung.gguf"), policy=FAST.__class__(**fields), environ={}
    )
    loading = asyncio.create_task(supervisor.start())
    try:
        await wait_until_async(
            lambda: _answers_loading(supervisor), timeout=30, what="503 Loading model"
        )
        with pytest.raises(EngineStartError, match="no output, no health and no work"):
            await asyncio.wait_for(loading, 60)
    finally:
        loading.cancel()
        await supervisor.stop()
    assert supervisor._proc is not None and not pid_alive(supervisor._proc.pid)


async def _answers_loading(supervisor: Supervisor) -> bool:
    try:
        return not (await supervisor.client.health(timeout=1.0)).ready
    except EngineUnavailable:
        return False


async def test_a_llama_server_killed_by_a_signal_is_said_by_its_name(
    make_launch: LaunchFactory, prelude_env
) -> None:
    """It was "exited with code -4", five times over as a crash loop, for a build that
    cannot run on this CPU."""
    policy = FAST.__class__(**{**FAST.__dict__, "crash_limit": 1})
    supervisor = Supervisor(
        make_launch(binary=PRELUDE), policy=policy, environ=prelude_env(PRELUDE_SIGNAL="ILL")
    )
    with pytest.raises(EngineStartError, match=r"was killed by SIGILL \(an instruction this CPU"):
        await supervisor.start()
    await supervisor.stop()


async def test_a_load_that_works_on_without_end_is_hung_at_the_load_timeout(
    make_launch: LaunchFactory, prelude_env
) -> None:
    """A load that spins on the CPU without a word (a GPU sync that never returns) looks
    like a silent warm-up: CPU time counts as work, so the silence watch never called it
    hung, and the engine stayed ``loading`` for good."""
    fields = {**FAST.__dict__, "silence_timeout": 1.0, "load_timeout": 3.0, "crash_limit": 1}
    supervisor = Supervisor(
        make_launch(binary=PRELUDE),
        policy=FAST.__class__(**fields),
        environ=prelude_env(PRELUDE_BUSY="60"),
    )
    with pytest.raises(EngineStartError, match="not ready after 3s although it kept working"):
        await supervisor.start()
    assert supervisor.state is EngineState.FAILED
    assert supervisor._proc is not None and not pid_alive(supervisor._proc.pid)
    await supervisor.stop()


async def test_sigkill_while_ready_restarts_and_serves_again(ready_engine: Supervisor) -> None:
    events = record(ready_engine)
    first = ready_engine.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    await wait_until_async(
        lambda: ready_engine.state is EngineState.RESTARTING, timeout=10, what="restarting"
    )
    await ready_engine.wait_for(EngineState.READY, timeout=30)
    assert ready_engine.restarts == 1
    assert ready_engine.pid != first
    assert "was killed by SIGKILL (not by us" in (events[0].reason or "")
    await assert_answers(ready_engine, max_tokens=4)


async def test_wedged_server_is_detected_and_restarted(ready_engine: Supervisor) -> None:
    """Restarted at ``health_failures`` checks failed in a row, not one later (each check
    one more health interval and timeout of requests sent to a server that hangs)."""
    events = record(ready_engine)
    first = ready_engine.pid
    assert first is not None
    os.kill(first, signal.SIGSTOP)
    await wait_until_async(
        lambda: ready_engine.state is EngineState.RESTARTING, timeout=10, what="wedge detected"
    )
    await ready_engine.wait_for(EngineState.READY, timeout=30)
    assert ready_engine.pid != first and not pid_alive(first)
    said = f"stopped answering /health ({FAST.health_failures} checks failed): wedged"
    assert said in (events[0].reason or ""), events[0]


async def test_health_failures_apart_from_each_other_restart_nothing(
    make_launch: LaunchFactory,
) -> None:
    """``/health`` is given up on after so many failures in a row, not in all: here a
    llama-server paused for 0.9 s (a check or two of 0.5 s time out) and then let run for a
    second, five times over, with a limit of three. A count kept across the successes in
    between restarted a server that was answering (a mutant that never reset it
    survived every test)."""
    policy = dataclasses.replace(FAST, health_failures=3)
    supervisor = Supervisor(make_launch(), environ=dict(os.environ), policy=policy)
    await supervisor.start()
    try:
        pid = supervisor.pid
        assert pid is not None
        for _ in range(5):
            os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(0.9)
            os.kill(pid, signal.SIGCONT)
            await asyncio.sleep(1.0)
        assert (supervisor.state, supervisor.restarts, supervisor.pid) == (
            EngineState.READY,
            0,
            pid,
        )
        await assert_answers(supervisor)
    finally:
        await supervisor.stop()


def never_starting(make_launch: LaunchFactory, tmp_path: Path, **knobs: object) -> LaunchSpec:
    """A launch whose llama-server cannot be started (no binary there), at every try: a
    crash loop of lives that printed nothing, for no reason a restart is spared for."""
    return make_launch(binary=tmp_path / "no-llama-server", **knobs)


async def test_crash_loop_ends_in_failed_with_its_cause(
    make_launch: LaunchFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each try is logged with its cause; the block of llama-server's last lines only
    where it printed some (here it was never started: an empty block each try)."""
    launch = never_starting(make_launch, tmp_path)
    supervisor = Supervisor(launch, environ=dict(os.environ), policy=FAST)
    events = record(supervisor)
    with pytest.raises(EngineStartError) as err:
        await supervisor.start()
    assert supervisor.state is EngineState.FAILED
    assert "crash loop: 3 failures" in str(err.value)
    assert "llama-server could not be started" in str(err.value)
    assert [e.state for e in events].count(EngineState.RESTARTING) == FAST.crash_limit - 1
    said = "could not be started"
    tries = [r.getMessage() for r in caplog.records if said in r.getMessage()]
    assert len(tries) >= FAST.crash_limit and not any("last lines" in t for t in tries), tries
    await supervisor.stop()


async def test_a_port_another_server_listens_on_fails_the_start_at_once(
    make_launch: LaunchFactory,
) -> None:
    """Something already listens on the profile's port: the start was tried five times
    (about 8 s of backoff in a worker) before "crash loop: ... port is already taken".
    No restart frees another's port: it fails at the first look, saying what to do."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        supervisor = Supervisor(make_launch(port=port), environ=dict(os.environ), policy=FAST)
        events = record(supervisor)
        with pytest.raises(EngineStartError) as err:
            await asyncio.wait_for(supervisor.start(), timeout=30)
    assert str(err.value).startswith("llama-server's port is already taken: "), err.value
    assert f"127.0.0.1:{port}" in str(err.value) and "LLAMACPP_PORT_OVERRIDE" in str(err.value)
    assert EngineState.RESTARTING not in [e.state for e in events], events
    assert supervisor.restarts == 0 and supervisor.state is EngineState.FAILED
    await supervisor.stop()


async def test_a_port_taken_after_the_look_is_told_by_llama_server_and_fails_at_once(
    make_launch: LaunchFactory,
) -> None:
    """The port is free when looked at and taken when llama-server binds it (another
    server started between the two; here one bound and not yet listening, which a
    connect does not find): llama-server's own "couldn't bind" is the diagnosis, and
    the start fails at once, not after the crash limit."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # bound, not listening: the look finds nothing
        port = taken.getsockname()[1]
        supervisor = Supervisor(make_launch(port=port), environ=dict(os.environ), policy=FAST)
        events = record(supervisor)
        with pytest.raises(EngineStartError) as err:
            await asyncio.wait_for(supervisor.start(), timeout=30)
    assert EngineState.RESTARTING not in [e.state for e in events], events
    assert "crash loop" not in str(err.value), err.value
    assert err.value.diagnosis and "is already taken" in err.value.diagnosis, err.value
    assert f"couldn't bind HTTP server socket, hostname: 127.0.0.1, port: {port}" in str(
        err.value.diagnosis
    )
    await supervisor.stop()


async def test_each_restart_of_a_crash_loop_waits_longer_up_to_the_backoff_cap(
    make_launch: LaunchFactory, tmp_path: Path
) -> None:
    """Failures in a row wait longer and longer before the next start, up to
    ``backoff_max``: a backoff stuck at its first delay started a broken llama-server
    again and again at once (its model read from disk, its GPU taken each time) until
    the crash limit. The wait each restart announces is the one it waits."""
    policy = dataclasses.replace(FAST, backoff_initial=0.1, backoff_max=0.3, crash_limit=5)
    launch = never_starting(make_launch, tmp_path)
    supervisor = Supervisor(launch, environ=dict(os.environ), policy=policy)
    events = record(supervisor)
    with pytest.raises(EngineStartError, match="crash loop: 5 failures"):
        await asyncio.wait_for(supervisor.start(), timeout=60)
    await supervisor.stop()
    said = [e.reason or "" for e in events if e.state is EngineState.RESTARTING]
    delays = [re.findall(r"restart #\d+ in ([0-9.]+)s$", reason) for reason in said]
    assert delays == [["0.1"], ["0.2"], ["0.3"], ["0.3"]], said


async def test_a_crash_loop_slower_than_the_crash_window_still_ends_in_failed(
    make_launch: LaunchFactory, tmp_path: Path
) -> None:
    """The limit was so many deaths within the crash window (five in five minutes): a
    model that loads for two minutes and then dies never had them, and was restarted for
    good, reloading each time and ``restarting`` on the bus forever. Here every life ends
    outside a window made tiny; counted in a row since a life that stayed ready, the
    failures end it all the same."""
    policy = dataclasses.replace(FAST, crash_window=0.001)
    launch = never_starting(make_launch, tmp_path)
    supervisor = Supervisor(launch, environ=dict(os.environ), policy=policy)
    with pytest.raises(EngineStartError) as err:
        await asyncio.wait_for(supervisor.start(), timeout=30)
    assert "crash loop: 3 failures in a row" in str(err.value)
    assert supervisor.restarts == FAST.crash_limit - 1
    await supervisor.stop()


async def test_a_life_that_stayed_ready_for_a_crash_window_starts_the_count_again(
    make_launch: LaunchFactory,
) -> None:
    """Deaths apart from each other by a life ready for a whole window are not a loop:
    with a limit of two, two such deaths are two restarts, not a failure."""
    policy = dataclasses.replace(FAST, crash_window=0.5, crash_limit=2)
    supervisor = Supervisor(make_launch(), environ=dict(os.environ), policy=policy)
    await supervisor.start()
    try:
        for restarts in (1, 2):
            await asyncio.sleep(0.6)  # ready for longer than the window
            pid = supervisor.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            await wait_until_async(
                lambda pid=pid: supervisor.pid != pid,
                timeout=30,
                what="restarted",
            )
            await supervisor.wait_for(EngineState.READY, EngineState.FAILED, timeout=30)
            assert supervisor.state is EngineState.READY, supervisor.failure
            assert supervisor.restarts == restarts
    finally:
        await supervisor.stop()


async def test_lives_ready_for_less_than_a_crash_window_count_in_a_row(
    make_launch: LaunchFactory,
) -> None:
    """Deaths farther apart than the crash window (a restart backoff longer than it), each
    after a life ready for less than it: a loop all the same, failed at the limit of two.
    A life merely ready, however briefly, started the count again (a mutant that dropped
    the "for a whole window" survived every test), and such a loop restarted for good."""
    policy = dataclasses.replace(
        FAST, crash_window=1.0, crash_limit=2, backoff_initial=1.5, backoff_max=1.5
    )
    supervisor = Supervisor(make_launch(), environ=dict(os.environ), policy=policy)
    await supervisor.start()
    try:
        for _ in range(2):
            await supervisor.wait_for(EngineState.READY, timeout=30)
            await asyncio.sleep(0.2)  # ready, for far less than the window
            pid = supervisor.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            await wait_until_async(
                lambda p=pid: supervisor.pid != p or supervisor.failure,
                timeout=30,
                what="the death seen",
            )
        await supervisor.wait_for(EngineState.FAILED, timeout=30)
    finally:
        await supervisor.stop()
    assert supervisor.restarts == 1
    assert "crash loop: 2 failures in a row" in str(supervisor.failure), supervisor.failure


async def test_out_of_memory_once_ready_is_restarted_not_fatal(
    make_launch: LaunchFactory, prelude_env
) -> None:
    """Out of memory while loading cannot be fixed by a restart (fail at once, with the
    advice); once the life was ready, it is a request's (a large image, another process
    on the card) and failed the worker for good. Now it is restarted, under the crash
    limit."""
    supervisor = Supervisor(
        make_launch(binary=PRELUDE),
        environ=prelude_env(PRELUDE_LAST_WORDS="CUDA error: out of memory"),
        policy=FAST,
    )
    events = record(supervisor)
    await supervisor.start()
    try:
        server = psutil.Process(supervisor.pid).children()[0]  # the prelude's llama-server
        server.kill()
        await wait_until_async(
            lambda: EngineState.RESTARTING in [e.state for e in events],
            timeout=30,
            what="a restart",
        )
        restarting = next(e for e in events if e.state is EngineState.RESTARTING)
        assert "out of memory" in (restarting.reason or "")  # said, not taken for fatal
        assert await supervisor.wait_for(EngineState.READY, EngineState.FAILED, timeout=30) is (
            EngineState.READY
        ), supervisor.failure
    finally:
        await supervisor.stop()


async def test_a_llama_server_already_on_the_port_is_not_taken_for_ours(
    ready_engine: Supervisor, make_launch: LaunchFactory
) -> None:
    """Another llama-server answers on the profile's port (two profiles on one host, both
    on the default 8080): ours could not bind and exited, while the other's ``/health``
    and ``/props`` made the engine ``ready``, serving the other's model, five times over
    before the crash limit. Now it is never ready, and says why."""
    port = ready_engine.launch.port
    supervisor = Supervisor(make_launch(port=port), environ=dict(os.environ), policy=FAST)
    events = record(supervisor)
    with pytest.raises(EngineStartError) as err:
        await supervisor.start()
    assert EngineState.READY not in [e.state for e in events]
    assert "port is already taken" in str(err.value), err.value
    assert f":{port}" in str(err.value), err.value
    await supervisor.stop()
    await assert_answers(ready_engine)  # the other one was left alone


# Not llama-server: a stand-in for whatever else may answer on the port, slow to answer
# /health (3 s), so that the answer comes after ours has exited.
_OTHER_SERVER = """
import http.server, os, sys, time

class Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/health":
            time.sleep(3)
        body = b'{"status": "ok"}' if self.path == "/health" else b"{}"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

open(sys.argv[2], "w").write(str(os.getpid()))
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Answer).serve_forever()
"""

# A launcher that hands its port to another process (in a session of its own: not in our
# process group) and exits once that one listens.
_HANDS_OVER = """#!/usr/bin/env bash
while [ "$#" -gt 0 ] && [ "$1" != --port ]; do shift; done
port="$2"
setsid "{python}" "{other}" "$port" "{pidfile}" &
until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do sleep 0.05; done
sleep 1
exit 0
"""


async def test_health_answered_by_another_process_after_ours_exited_is_not_ready(
    make_launch: LaunchFactory, tmp_path: Path
) -> None:
    """Ours exited while loading, and a 200 on ``/health`` came from whatever else took
    the port (here a launcher that handed it over, then exited): not ours, so not ready.
    The 200 was asked for while ours still ran and answered after it exited; without the
    check of ours still running at the answer (a mutant that dropped it passed every
    test), the engine went ``ready`` on the other's ``/props``."""
    other, pidfile = tmp_path / "other.py", tmp_path / "other.pid"
    other.write_text(_OTHER_SERVER)
    launcher = tmp_path / "launcher.sh"
    launcher.write_text(_HANDS_OVER.format(python=sys.executable, other=other, pidfile=pidfile))
    launcher.chmod(0o755)
    policy = dataclasses.replace(FAST, health_timeout=10.0, crash_limit=1)
    supervisor = Supervisor(make_launch(binary=launcher), environ=dict(os.environ), policy=policy)
    events = record(supervisor)
    try:
        with pytest.raises(EngineStartError) as err:
            await asyncio.wait_for(supervisor.start(), 60)
    finally:
        await supervisor.stop()
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
    assert EngineState.READY not in [e.state for e in events], events
    assert "llama-server exited with code 0 while loading" in str(err.value), err.value


async def test_llama_server_settings_in_the_environment_are_not_inherited(
    make_launch: LaunchFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """``LLAMA_API_KEY`` and ``LLAMA_ARG_*`` in the wrapper's environment (a shell, a base
    image) are llama-server's own flags. Inherited, a stray key made it refuse the
    worker (401 on ``/props``: a crash loop), and a stray ``LLAMA_ARG_N_PREDICT`` cut
    every answer short, where the profile and ``command`` said neither. They are left
    out, and named in the log (without their values)."""
    environ = {**os.environ, "LLAMA_API_KEY": "stray-key", "LLAMA_ARG_N_PREDICT": "1"}
    supervisor = Supervisor(make_launch(), environ=environ, policy=FAST)
    try:
        with caplog.at_level(logging.INFO, logger="orion_llamaccp.llama_server"):
            await supervisor.start()
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        async with supervisor.client.chat_stream({**body, "ignore_eos": True}) as stream:
            usage = [e async for e in stream][-1].usage
        assert usage is not None and usage["completion_tokens"] == 4, usage
    finally:
        await supervisor.stop()
    said = [r.getMessage() for r in caplog.records if "not passed on" in r.getMessage()]
    assert said and "LLAMA_API_KEY, LLAMA_ARG_N_PREDICT" in said[0], said
    assert "stray-key" not in caplog.text


async def test_unknown_flag_fails_at_once_with_clear_error(make_launch: LaunchFactory) -> None:
    supervisor = Supervisor(
        make_launch(extra_args=["--n-parallel", "2"]), environ=dict(os.environ), policy=FAST
    )
    with pytest.raises(EngineStartError) as err:
        await supervisor.start()
    assert supervisor.restarts == 0
    assert "does not know a flag" in str(err.value)
    assert "--n-parallel" in str(err.value)
    await supervisor.stop()


async def test_a_flag_value_llama_server_refuses_fails_at_once_with_clear_error(
    make_launch: LaunchFactory,
) -> None:
    """A known flag with a value llama-server cannot read (``--batch-size notanumber`` in
    ``extra_args``): no restart can fix it, so no crash loop of five tries ending in "crash
    loop" without a hint, as before."""
    supervisor = Supervisor(
        make_launch(extra_args=["--batch-size", "notanumber"]),
        environ=dict(os.environ),
        policy=FAST,
    )
    with pytest.raises(EngineStartError) as err:
        await supervisor.start()
    assert supervisor.restarts == 0
    assert "refused the value of a flag" in str(err.value), err.value
    assert '"--batch-size"' in str(err.value)
    await supervisor.stop()


def _truncate(path: Path) -> bytes:
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    return good


@pytest.mark.parametrize("damage", ["cut short", "gone"])
async def test_a_corrupt_or_gone_model_is_fetched_again_once_then_served(
    make_launch: LaunchFactory, model_dir: Path, damage: str
) -> None:
    """A model file cut short, or removed after the worker checked it (a cache cleaned
    under a running worker, a volume remounted): fetched again once, then served."""
    if damage == "gone":
        good = (model_dir / "tiny.gguf").read_bytes()
        (model_dir / "tiny.gguf").unlink()
    else:
        good = _truncate(model_dir / "tiny.gguf")
    calls: list[int] = []

    async def refetch() -> None:
        calls.append(1)
        (model_dir / "tiny.gguf").write_bytes(good)

    supervisor = Supervisor(
        make_launch(), environ=dict(os.environ), policy=FAST, on_corrupt=refetch
    )
    await supervisor.start()
    try:
        assert calls == [1]
        assert supervisor.state is EngineState.READY
    finally:
        await supervisor.stop()


async def test_corrupt_model_that_stays_corrupt_is_a_clear_error(
    make_launch: LaunchFactory, model_dir: Path
) -> None:
    _truncate(model_dir / "tiny.gguf")
    calls: list[int] = []

    async def refetch() -> None:
        calls.append(1)

    supervisor = Supervisor(
        make_launch(), environ=dict(os.environ), policy=FAST, on_corrupt=refetch
    )
    with pytest.raises(EngineStartError) as err:
        await supervisor.start()
    assert calls == [1]
    assert "corrupt" in str(err.value) and "re-download" in str(err.value)
    assert err.value.diagnosis is not None
    assert "not within the file bounds" in str(err.value)
    await supervisor.stop()


async def test_missing_model_fails_without_restart_storm(
    make_launch: LaunchFactory, model_dir: Path
) -> None:
    (model_dir / "tiny.gguf").unlink()
    supervisor = Supervisor(make_launch(), environ=dict(os.environ), policy=FAST)
    with pytest.raises(EngineStartError) as err:
        await supervisor.start()
    assert supervisor.restarts == 0
    # Said as what it is: llama-server's "failed to open GGUF file" read as a corrupt file.
    assert "cannot open the model file" in str(err.value), err.value
    assert "corrupt" not in str(err.value)
    await supervisor.stop()


async def test_a_file_llama_server_cannot_open_that_is_not_the_model_s_is_not_refetched(
    make_launch: LaunchFactory, model_dir: Path
) -> None:
    """A LoRA in extra_args that is not there: fetching the model again cannot help, and
    it hashed every model file first (minutes at 70 GB) on every start before failing."""
    calls: list[int] = []

    async def refetch() -> None:
        calls.append(1)

    launch = make_launch(extra_args=["--lora", str(model_dir / "missing-lora.gguf")])
    supervisor = Supervisor(launch, environ=dict(os.environ), policy=FAST, on_corrupt=refetch)
    with pytest.raises(EngineStartError) as err:
        await supervisor.start()
    assert calls == [] and supervisor.restarts == 0
    assert "missing-lora.gguf" in str(err.value)
    await supervisor.stop()


async def test_drain_then_stop(ready_engine: Supervisor) -> None:
    events = record(ready_engine)
    ready_engine.begin_drain()
    assert ready_engine.state is EngineState.DRAINING
    pid = ready_engine.pid
    await ready_engine.stop()
    assert [e.state for e in events] == [EngineState.DRAINING, EngineState.STOPPED]
    assert pid is not None and not pid_alive(pid)


async def test_llama_server_dying_during_a_drain_is_not_restarted_nor_announced_ready(
    ready_engine: Supervisor,
) -> None:
    events = record(ready_engine)
    ready_engine.begin_drain()
    pid = ready_engine.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await wait_until_async(lambda: not pid_alive(pid), timeout=10, what="llama-server gone")
    await asyncio.sleep(1.5)  # a restart (backoff, load) would have begun by now
    assert ready_engine.state is EngineState.DRAINING
    assert ready_engine.restarts == 0 and ready_engine.pid is None  # none runs, none new
    await ready_engine.stop()
    assert [e.state for e in events] == [EngineState.DRAINING, EngineState.STOPPED]


async def test_a_drain_begun_while_the_model_loads_is_never_announced_ready(
    make_launch: LaunchFactory, prelude_env
) -> None:
    """A worker told to stop while llama-server loads: the load goes on, but the engine
    stays ``draining``. Announced ``ready`` as the load ended, the leaving worker was
    offered new requests, and its start returned as if it served."""
    supervisor = Supervisor(
        make_launch(binary=PRELUDE),
        policy=FAST,
        environ=prelude_env(PRELUDE_LINES="10", PRELUDE_DELAY="0.1"),
    )
    events = record(supervisor)
    starting = asyncio.create_task(supervisor.start())
    try:
        await wait_until_async(lambda: supervisor.state is EngineState.LOADING, what="loading")
        supervisor.begin_drain()
        await wait_until_async(lambda: supervisor.props is not None, timeout=60, what="loaded")
        assert supervisor.state is EngineState.DRAINING
    finally:
        await supervisor.stop()
    with pytest.raises(EngineStartError, match="stopped before it was ready"):
        await starting
    assert EngineState.READY not in [e.state for e in events], events


async def test_a_drain_after_the_engine_failed_leaves_it_failed_with_its_cause(
    make_launch: LaunchFactory,
) -> None:
    """A worker whose llama-server failed to start still drains when told to stop. The
    drain is for a running engine only: one that made ``failed`` into ``draining`` and then
    ``stopped`` announced a clean stop, and the cause (here a flag llama-server does not
    know) was gone from the worker's last word."""
    supervisor = Supervisor(
        make_launch(extra_args=["--n-parallel", "2"]), environ=dict(os.environ), policy=FAST
    )
    with pytest.raises(EngineStartError):
        await supervisor.start()
    events = record(supervisor)
    supervisor.begin_drain()
    await supervisor.stop()
    assert supervisor.state is EngineState.FAILED and events == []
    assert "--n-parallel" in str(supervisor.failure)


async def test_a_request_in_a_dead_llama_server_is_let_go_at_its_death_not_the_next_start(
    make_launch: LaunchFactory,
) -> None:
    """``left``: a request that broke off waits until the llama-server it was in is no
    longer the one serving, then is retried. The death itself lets it go (the engine is
    no longer ready), not the next life's start, which a restart backoff and a model load
    put seconds or minutes later; and the next life is told from the one that died. The
    engine left service at the death, which is when a request waiting for it counts its
    patience from (``unready_since``), not from when the engine was built."""
    policy = dataclasses.replace(FAST, backoff_initial=3.0, backoff_max=3.0)
    supervisor = Supervisor(make_launch(), environ=dict(os.environ), policy=policy)
    await supervisor.start()
    try:
        life, pid = supervisor.life, supervisor.pid
        assert pid is not None
        waiting = asyncio.create_task(supervisor.left(life, timeout=60))
        await asyncio.sleep(0.1)
        assert not waiting.done()  # its llama-server still serves
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        await waiting
        assert (supervisor.state, supervisor.life) == (EngineState.RESTARTING, life)
        assert supervisor.unready_since >= killed_at
        await supervisor.wait_for(EngineState.READY, timeout=30)
        assert supervisor.life == life + 1
    finally:
        await supervisor.stop()


def test_diagnosis_order_prefers_corrupt() -> None:
    from orion_llamaccp.engine.diagnostics import diagnose_all

    lines = [
        "llama_model_load_from_file_impl: failed to load model",
        "error loading model: tensor 'x' data is not within the file bounds",
    ]
    diagnosis = diagnose_all(lines)
    assert diagnosis is not None and diagnosis.cause is Cause.CORRUPT_MODEL


async def test_a_stop_given_up_by_its_caller_raises_and_still_stops_llama_server(
    ready_engine: Supervisor,
) -> None:
    """A caller that stops waiting for ``stop()`` (a ``wait_for``, a second signal) gets
    its cancel, and the stop goes on without it: llama-server does not outlive it."""
    pid = ready_engine.pid
    stopping = asyncio.create_task(ready_engine.stop())
    await asyncio.sleep(0)  # it is waiting for the owner task now
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    await wait_until_async(lambda: pid is not None and not pid_alive(pid), what="gone")


async def test_stop_while_loading_leaves_nothing(make_launch: LaunchFactory, prelude_env) -> None:
    supervisor = Supervisor(
        make_launch(binary=PRELUDE),
        policy=FAST,
        environ=prelude_env(PRELUDE_LINES="100", PRELUDE_DELAY="0.1"),
    )
    task = asyncio.create_task(supervisor.start())
    await wait_until_async(lambda: supervisor.state is EngineState.LOADING, what="loading")
    pid = supervisor.pid
    await supervisor.stop()
    with pytest.raises(EngineStartError):
        await task
    assert pid is not None and not pid_alive(pid)


def test_known_fatal_messages_are_diagnosed() -> None:
    from orion_llamaccp.engine.diagnostics import diagnose

    cases = {
        "error loading model: missing tensor 'blk.0.attn_q.weight'": Cause.CORRUPT_MODEL,
        "error loading model: wrong number of tensors; expected 291, got 290": Cause.CORRUPT_MODEL,
        "error: invalid argument: --n-parallel": Cause.UNKNOWN_FLAG,
        'error while handling argument "--batch-size": stoi': Cause.BAD_FLAG_VALUE,
        'error while handling environment variable "LLAMA_ARG_BATCH": stoi': Cause.BAD_FLAG_VALUE,
        "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9000 MiB on device 0: "
        "cudaMalloc failed: out of memory": Cause.OUT_OF_MEMORY,
        "start: couldn't bind HTTP server socket, port: 8080": Cause.PORT_IN_USE,
        "bind: Address already in use": Cause.PORT_IN_USE,
        "gguf_init_from_reader: failed to read key-value pairs": Cause.CORRUPT_MODEL,
        "gguf_init_from_file_impl: failed to seek to beginning of data": Cause.CORRUPT_MODEL,
        "gguf_init_from_reader: bad GGUF version: 7": Cause.CORRUPT_MODEL,
        "gguf_init_from_file: failed to open '/m.gguf': No such file or directory": (
            Cause.MODEL_NOT_FOUND
        ),
        "ERROR: Invalid Argument: --n-parallel": Cause.UNKNOWN_FLAG,  # any case
    }
    for line, cause in cases.items():
        diagnosis = diagnose(line)
        assert diagnosis is not None and diagnosis.cause is cause, line
    assert diagnose("srv  load_model: loading model '/m.gguf'") is None
    oom = diagnose("cudaMalloc failed: out of memory")
    assert oom is not None and "n_gpu_layers" in oom.advice and "ctx_size" in oom.advice


def test_the_most_specific_cause_in_a_tail_wins_whatever_its_place() -> None:
    """A corrupt model's load ends in lines that read like other failures too (an
    allocation that failed, a generic error); the corrupt model must win, since it is
    what gets the file checked and fetched again, in whichever order the lines came."""
    from orion_llamaccp.engine.diagnostics import diagnose_all

    tail = [
        "error: invalid argument: --x",
        "cudaMalloc failed: out of memory",
        "error loading model: missing tensor 'blk.0.attn_q.weight'",
    ]
    for lines in (tail, tail[::-1], tail[1:] + tail[:1]):
        found = diagnose_all(lines)
        assert found is not None and found.cause is Cause.CORRUPT_MODEL, lines
    found = diagnose_all(["cudaMalloc failed: out of memory", "error: invalid argument: --x"])
    assert found is not None and found.cause is Cause.UNKNOWN_FLAG


def test_an_exit_is_said_by_its_code_or_by_the_signal_that_ended_it() -> None:
    from orion_llamaccp.engine.diagnostics import exit_said

    assert exit_said(0) == "exited with code 0"
    assert exit_said(3) == "exited with code 3"
    assert exit_said(-200) == "was killed by signal 200"  # none the system names
    assert exit_said(-15) == "was killed by SIGTERM"
    assert exit_said(-9).startswith("was killed by SIGKILL (not by us")


@pytest.mark.parametrize("key", ["k-123456", "sk-Secr,et456", '"quoted",and"more'])
async def test_api_key_is_passed_to_llama_server_and_used_by_the_client(
    make_launch: LaunchFactory, model_dir: Path, llama_server_bin: Path, key: str
) -> None:
    """The key reaches llama-server whole: it reads its variable as a comma-separated
    list of keys, where a key with a comma used to become two, neither the worker's
    (401 on ``/props``: a crash loop)."""
    import httpx

    from orion_llamaccp.engine.binary import probe
    from orion_llamaccp.engine.command import build_launch
    from orion_llamaccp.model.paths import plan_files
    from orion_llamaccp.profiles.registry import parse_profile
    from orion_llamaccp.settings import Overrides
    from tests.support.procs import free_port

    profile = parse_profile(
        "keyed",
        {
            "backend": "llamacpp",
            "llamacpp": {
                "model_path": "tiny.gguf",
                "port": free_port(),
                "threads": 1,
                "api_key_env": "TEST_KEY",
            },
        },
    )
    files = plan_files(profile, None, {"LLM_CACHE_DIR": str(model_dir)})
    launch = build_launch(
        profile,
        Overrides(),
        files,
        binary=probe(llama_server_bin),
        binary_path=str(llama_server_bin),
        environ={"TEST_KEY": key},
    )
    assert key not in " ".join(launch.argv)
    supervisor = Supervisor(launch, environ=dict(os.environ), policy=FAST)
    await supervisor.start()
    try:
        await assert_answers(supervisor, max_tokens=2)
        async with httpx.AsyncClient(base_url=launch.base_url) as bare:
            refused = await bare.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            )
            assert refused.status_code == 401
            first = key.replace('"', "").split(",")[0]  # what the key used to become
            half = await bare.get("/props", headers={"Authorization": f"Bearer {first}"})
        assert half.status_code == (401 if "," in key else 200)
    finally:
        await supervisor.stop()


async def test_llama_server_routine_lines_drop_to_debug_once_ready(
    ready_engine: Supervisor, caplog: pytest.LogCaptureFixture
) -> None:
    """About ten lines a request from llama-server were each an INFO write to our stderr;
    once it serves they go to DEBUG, while anything that looks like trouble stays INFO."""
    proc = ready_engine._proc
    assert proc is not None and proc.quiet
    caplog.set_level(logging.DEBUG, logger="orion_llamaccp.llama_server")
    proc._line("[llama-server]", b"slot release: id  0 | task 7 | stop processing")
    proc._line("[llama-server]", b"srv  send_error: task id = 9, error: out of context")
    levels = [(r.levelno, r.getMessage().split("|")[0]) for r in caplog.records]
    assert levels == [
        (logging.DEBUG, "[llama-server] slot release: id  0 "),
        (logging.INFO, "[llama-server] srv  send_error: task id = 9, error: out of context"),
    ]


async def test_binary_that_cannot_be_started_ends_in_failed_not_a_hang(
    make_launch: LaunchFactory, tmp_path: Path
) -> None:
    """An OSError from the spawn used to kill the owner task and leave ``start`` waiting."""
    supervisor = Supervisor(
        make_launch(binary=tmp_path / "no-such-llama-server"), environ=dict(os.environ), policy=FAST
    )
    events = record(supervisor)
    with pytest.raises(EngineStartError, match="could not be started"):
        await asyncio.wait_for(supervisor.start(), timeout=60)
    assert supervisor.state is EngineState.FAILED
    assert "crash loop" in str(supervisor.failure)
    assert [e.state for e in events].count(EngineState.RESTARTING) == FAST.crash_limit - 1
    await supervisor.stop()


async def test_props_refused_after_health_is_a_crash_not_a_hang(
    make_launch: LaunchFactory,
) -> None:
    """/health needs no API key, /props does: a client with the wrong key sees a healthy
    llama-server whose /props fails. Each try is a crash, and the crash loop ends it."""
    launch = dataclasses.replace(make_launch(), env={API_KEY_ENV: "right"}, api_key="wrong")
    supervisor = Supervisor(launch, environ=dict(os.environ), policy=FAST)
    events = record(supervisor)
    with pytest.raises(EngineStartError, match="/props failed"):
        await asyncio.wait_for(supervisor.start(), timeout=60)
    assert supervisor.state is EngineState.FAILED
    assert [e.state for e in events].count(EngineState.RESTARTING) == FAST.crash_limit - 1
    await supervisor.stop()
    pids = {e.pid for e in events if e.pid is not None}
    assert len(pids) == FAST.crash_limit and not any(pid_alive(pid) for pid in pids)


async def test_a_llama_server_that_hangs_right_after_its_first_200_is_not_waited_for(
    make_launch: LaunchFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``/props`` is bounded as ``/health`` is: a llama-server that stops answering right
    after its first 200 (really paused, by SIGSTOP, as that answer comes back) left the
    engine ``loading`` for the client's read timeout, ten minutes, before a restart. Here
    it is killed and the start fails (a crash limit of one) saying what hung."""
    supervisor = Supervisor(
        make_launch(), environ=dict(os.environ), policy=dataclasses.replace(FAST, crash_limit=1)
    )
    health, paused = supervisor.client.health, []

    async def then_pause(timeout: float = 5.0):  # the real /health; then the real signal
        answer = await health(timeout=timeout)
        if answer.ready and not paused and supervisor.pid is not None:
            os.kill(supervisor.pid, signal.SIGSTOP)
            paused.append(supervisor.pid)
        return answer

    monkeypatch.setattr(supervisor.client, "health", then_pause)
    try:
        with pytest.raises(EngineStartError, match="healthy but /props failed"):
            await asyncio.wait_for(supervisor.start(), timeout=60)
    finally:
        await supervisor.stop()
    assert len(paused) == 1 and not pid_alive(paused[0])


async def test_a_bug_injected_in_the_owner_task_ends_in_failed(
    make_launch: LaunchFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fault is injected (a bug of ours, not llama-server's): the state still ends
    FAILED, ``start`` raises, ``stop`` returns, and llama-server is gone."""
    supervisor = Supervisor(make_launch(), environ=dict(os.environ), policy=FAST)

    async def broken_props(**_: object) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(supervisor.client, "props", broken_props)
    with pytest.raises(EngineStartError, match="RuntimeError: injected"):
        await asyncio.wait_for(supervisor.start(), timeout=60)
    assert supervisor.state is EngineState.FAILED
    pid = supervisor.pid
    await supervisor.stop()
    assert supervisor.state is EngineState.FAILED
    assert pid is not None and not pid_alive(pid)


async def test_drain_begun_during_the_restart_backoff_is_not_undone_by_a_restart(
    make_launch: LaunchFactory,
) -> None:
    policy = FAST.__class__(**{**FAST.__dict__, "backoff_initial": 5.0, "backoff_max": 5.0})
    supervisor = Supervisor(make_launch(), environ=dict(os.environ), policy=policy)
    await supervisor.start()
    events = record(supervisor)
    pid = supervisor.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await supervisor.wait_for(EngineState.RESTARTING, timeout=30)  # now in the backoff
    supervisor.begin_drain()
    assert supervisor._task is not None
    # The owner task ends without a restart (before the fix: a new llama-server, and on).
    await asyncio.wait_for(asyncio.shield(supervisor._task), timeout=30)
    assert supervisor.state is EngineState.DRAINING
    assert supervisor.pid is None and supervisor.restarts == 1  # none runs, none new
    assert [e.state for e in events] == [EngineState.RESTARTING, EngineState.DRAINING]
    await supervisor.stop()
    assert supervisor.state is EngineState.STOPPED


@pytest.mark.parametrize(("unified", "per_slot"), [(True, 2048), (False, 1024), (None, 1024)])
async def test_kv_unified_shares_the_context_between_slots_or_slices_it(
    make_launch: LaunchFactory, unified: bool | None, per_slot: int
) -> None:
    """``llamacpp.kv_unified``: one KV buffer for every slot (each may use the whole
    context) or a slice each; unset, llama-server's own choice (a slice, with the number
    of slots set). Read back from llama-server's ``/props``, which the announcement quotes
    as ``n_ctx_per_slot``."""
    launch = make_launch(ctx_size=2048, parallel=2, kv_unified=unified)
    switch = {True: "--kv-unified", False: "--no-kv-unified", None: None}[unified]
    assert [a for a in launch.argv if "kv-unified" in a] == ([switch] if switch else [])
    supervisor = Supervisor(launch, environ=dict(os.environ), policy=FAST)
    await supervisor.start()
    try:
        assert supervisor.props is not None
        assert (supervisor.props.n_ctx, supervisor.props.total_slots) == (per_slot, 2)
    finally:
        await supervisor.stop()


async def test_the_worker_talks_to_llama_server_over_its_unix_socket(
    make_launch: LaunchFactory,
) -> None:
    """llama-server listens on its TCP port and on a UNIX socket. A socket file left at
    the path by an earlier one is removed before the start (it would not bind); the
    client talks over the socket, which a client whose URL names a port where nothing
    listens shows (its props, a streamed chat, the spare connections of its pool); the
    TCP port still answers everyone else; the file is gone after the stop."""
    port = free_port()
    path = socket_path("127.0.0.1", port)
    assert path is not None
    with socket.socket(socket.AF_UNIX) as stale:  # bound, then closed: a file, no listener
        stale.bind(path)
    launch = make_launch(port=port, unix_socket=path)
    assert launch.unix_socket == path and f"127.0.0.1,{path}" in launch.argv
    supervisor = Supervisor(launch, environ=dict(os.environ), policy=FAST)
    try:
        await supervisor.start()
        assert supervisor.state is EngineState.READY
        nowhere = f"http://127.0.0.1:{free_port()}"
        async with LlamaClient(nowhere, unix_socket=path) as client:
            assert (await client.props()).total_slots == 2
            async with client.chat_stream(
                {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            ) as stream:
                assert [e async for e in stream][-1].usage is not None
            pool = client._streams
            assert pool is not None
            await wait_until_async(lambda: bool(pool.idle), timeout=10, what="a spare opened")
            assert {c.transport.get_extra_info("peername") for c in pool.idle} == {path}
        await assert_answers(supervisor)  # the supervisor's own client, over the socket too
        assert supervisor.client.unix_socket == path
        async with LlamaClient(launch.base_url) as tcp:  # TCP, for other hosts and tools
            assert (await tcp.props()).total_slots == 2
    finally:
        await supervisor.stop()
    assert not await asyncio.to_thread(Path(path).exists)


async def test_two_llama_servers_on_one_port_of_two_addresses_each_get_their_socket(
    make_launch: LaunchFactory,
) -> None:
    """Two workers of one user on one host may serve the same port on two addresses
    (loopback and a LAN address, say). Their sockets were named by the port alone: the
    second llama-server found the first's socket at its path and could not start."""
    port = free_port()
    supervisors = []
    try:
        for host in ("127.0.0.1", "127.0.0.2"):
            path = socket_path(host, port)
            assert path is not None
            launch = make_launch(port=port, host=host, unix_socket=path)
            supervisors.append(Supervisor(launch, environ=dict(os.environ), policy=FAST))
            await supervisors[-1].start()
            assert supervisors[-1].state is EngineState.READY
        for supervisor in supervisors:
            await assert_answers(supervisor)  # each over its own socket
            assert supervisor.client.unix_socket == supervisor.launch.unix_socket
        assert len({s.launch.unix_socket for s in supervisors}) == 2
    finally:
        for supervisor in supervisors:
            await supervisor.stop()


def test_only_a_socket_nobody_listens_on_is_removed(tmp_path: Path) -> None:
    """Before a start and after a stop the supervisor removes a socket file left at its
    path only if nothing listens there: one that answers belongs to another worker on
    the same port (whose TCP check refuses this start), and removing it would cut that
    worker off from its llama-server. A file of another kind is left alone."""
    path = str(tmp_path / "e.sock")
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(path)
        live.listen()
        _remove_stale_socket(path)
        assert Path(path).exists()  # another worker's: kept
    _remove_stale_socket(path)  # closed: nobody listens
    assert not Path(path).exists()
    Path(path).write_text("not a socket")
    _remove_stale_socket(path)
    assert Path(path).exists()
