"""Start-up: the worker listens before it is built, and a request sent meanwhile is served."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from orion_llamaccp.client import BusClient
from orion_llamaccp.errors import ConfigError
from orion_llamaccp.settings import Settings
from orion_llamaccp.worker.announce import channels_for
from orion_llamaccp.worker.startup import Intake, connect, tell_failed_start
from tests.bus.conftest import SpawnWorker
from tests.engine.conftest import PRELUDE
from tests.support.procs import RedisServer, free_port, subscribers, wait_until_async
from tests.support.workers import BusRecorder, metrics_once_counted, worker_gauge

HI = [{"role": "user", "content": "hello there"}]
INTAKE = "orion:exec:request:LlamaCppHost:tiny"


async def _subscribers(redis_url: str, channel: str) -> int:
    client = aioredis.Redis.from_url(redis_url)
    try:
        return await subscribers(client, channel)
    finally:
        await client.aclose()


async def test_request_sent_while_the_worker_is_built_is_served(
    spawn_worker: SpawnWorker, bus: BusClient, redis_url: str, llama_server_bin: Path
) -> None:
    # Every run of the binary, `--help` included, first sleeps: the plan takes seconds.
    worker = spawn_worker(
        ready=False,
        LLAMA_SERVER_BIN=str(PRELUDE),
        REAL_LLAMA_SERVER=str(llama_server_bin),
        PRELUDE_SILENT="1.5",
    )
    await wait_until_async(
        lambda: _subscribers(redis_url, INTAKE), timeout=30, what="the intake subscribed"
    )
    assert worker.announcement() is None  # subscribed, but no worker announcing yet

    options = {"max_tokens": 2, "ignore_eos": True}  # unseeded: no early EOS to count
    result = await bus.chat(HI, profile="tiny", options=options, timeout=60)

    assert result.ok, result.payload
    assert result.payload["usage"]["completion_tokens"] == 2


async def test_requests_beyond_the_inbox_while_the_worker_is_built_are_refused_overloaded(
    spawn_worker: SpawnWorker,
    bus: BusClient,
    recorder: BusRecorder,
    redis_url: str,
    llama_server_bin: Path,
) -> None:
    """Nothing takes the inbox while the worker is built (seconds; a minute and more where
    llama-server's probes initialise CUDA), and it had no bound: every request heard then
    waited in memory, unanswered. Now ``ORION_LLAMACPP_INBOX_SIZE`` (3) wait and are
    served; the next 30 are answered ``overloaded`` (retryable) as soon as the worker is
    built, while llama-server still loads; the 2 beyond those are dropped and counted,
    and nothing else goes unanswered."""
    port = free_port()
    worker = spawn_worker(
        ready=False,
        parallel=1,
        LLAMA_SERVER_BIN=str(PRELUDE),
        REAL_LLAMA_SERVER=str(llama_server_bin),
        PRELUDE_SILENT="4",  # each run of the binary: the plan's probes, then the load
        ORION_LLAMACPP_INBOX_SIZE="3",
        METRICS_PORT=str(port),
    )
    await wait_until_async(
        lambda: _subscribers(redis_url, INTAKE), timeout=30, what="the intake subscribed"
    )
    options = {"max_tokens": 2}
    envelopes = [bus.request(HI, profile="tiny", options=options) for _ in range(35)]
    for envelope in envelopes:
        await bus.send(envelope, profile="tiny")
    assert worker.announcement() is None  # all sent before the worker was built

    worker.wait_ready()
    await metrics_once_counted(port, 33)
    replies = {envelope["reply_to"]: n for n, envelope in enumerate(envelopes)}
    answers = [(replies[m.channel], m.message) for m in recorder.messages if m.channel in replies]
    codes = {n: answer["payload"].get("error", "ok") for n, answer in answers}
    assert codes == {n: "ok" if n < 3 else "overloaded" for n in range(33)}
    assert [codes[n] for n, _ in answers][:30] == ["overloaded"] * 30  # not behind the load
    details = answers[0][1]["payload"]["details"]
    assert details["retryable"] is True
    assert "3 messages or 67108864 bytes waiting in the worker's inbox" in details["message"]
    assert worker_gauge(port, "orion_llamacpp_pubsub_dropped") == 2


async def test_requests_beyond_the_inbox_bytes_while_the_worker_is_built_are_refused_overloaded(
    spawn_worker: SpawnWorker,
    bus: BusClient,
    recorder: BusRecorder,
    redis_url: str,
    llama_server_bin: Path,
) -> None:
    """The inbox was bounded by count only, and a message may be 8 MiB: large requests
    heard while the worker is built held gigabytes. Now ``ORION_LLAMACPP_INBOX_BYTES``
    holds 3 of these (3 kB each, far within ``ORION_LLAMACPP_INBOX_SIZE``): those 3 are
    served; the next 3 (as many bytes) are answered ``overloaded`` as soon as the worker
    is built, while llama-server still loads; the 2 beyond those are dropped and
    counted, and nothing else goes unanswered."""
    options = {"max_tokens": 2}
    pad = {"pad": "x" * 3000}  # read by nobody: the prompt stays short
    envelopes = [bus.request(HI, profile="tiny", options=options, trace=pad) for _ in range(8)]
    size = max(len(orjson.dumps(envelope)) for envelope in envelopes)
    port = free_port()
    worker = spawn_worker(
        ready=False,
        parallel=1,
        LLAMA_SERVER_BIN=str(PRELUDE),
        REAL_LLAMA_SERVER=str(llama_server_bin),
        PRELUDE_SILENT="4",  # each run of the binary: the plan's probes, then the load
        ORION_LLAMACPP_INBOX_BYTES=str(3 * size),
        METRICS_PORT=str(port),
    )
    await wait_until_async(
        lambda: _subscribers(redis_url, INTAKE), timeout=30, what="the intake subscribed"
    )
    for envelope in envelopes:
        await bus.send(envelope, profile="tiny")
    assert worker.announcement() is None  # all sent before the worker was built

    worker.wait_ready()
    await metrics_once_counted(port, 6)
    replies = {envelope["reply_to"]: n for n, envelope in enumerate(envelopes)}
    answers = [(replies[m.channel], m.message) for m in recorder.messages if m.channel in replies]
    codes = {n: answer["payload"].get("error", "ok") for n, answer in answers}
    assert codes == {n: "ok" if n < 3 else "overloaded" for n in range(6)}
    assert [codes[n] for n, _ in answers][:3] == ["overloaded"] * 3  # not behind the load
    details = answers[0][1]["payload"]["details"]
    assert details["retryable"] is True
    assert f"{3 * size} bytes waiting in the worker's inbox" in details["message"], details
    assert worker_gauge(port, "orion_llamacpp_pubsub_dropped") == 2


def test_a_missing_binary_still_fails_the_run_at_once(subprocess_env: dict, tmp_path: Path) -> None:
    """Before anything waits on the bus: with no Redis to reach either, the binary is
    what the run names (a run that first waited for Redis would name Redis, or hang)."""
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    env = {**subprocess_env, "LLAMA_SERVER_BIN": str(tmp_path / "nope"), "ORION_BUS_URL": nobody}
    done = subprocess.run(
        [sys.executable, "-m", "orion_llamaccp", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1
    assert f"error: LLAMA_SERVER_BIN={tmp_path / 'nope'} does not exist" in done.stderr
    assert "Traceback" not in done.stderr
    # The error is the binary's; that Redis cannot be reached is logged, as it is so.
    [error] = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert "redis" not in error.lower(), done.stderr


def test_subscribing_imports_nothing_the_worker_needs_only_later() -> None:
    """What start-up imports before it subscribes is the time a request published then
    waits to be heard: the profile models, the engine and the handler come after (a
    module-level import in ``worker.announce`` once brought the first two back, 25 ms)."""
    later = [
        "orion_llamaccp.profiles.models",
        "orion_llamaccp.engine.command",
        "orion_llamaccp.engine.supervisor",
        "orion_llamaccp.worker.service",
        "orion_llamaccp.worker.pubsub_requests",
        "orion_llamaccp.bus.streams",
        "httpx",
    ]
    probe = (
        "import sys, orion_llamaccp.cli, orion_llamaccp.worker.startup; "
        f"print([m for m in {later!r} if m in sys.modules])"
    )
    found = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert found == "[]", found


async def test_a_worker_on_a_redis_that_evicts_keys_says_so_and_serves(
    spawn_worker: SpawnWorker, tmp_path: Path
) -> None:
    """``doctor`` failed such a Redis; ``run`` served it without a word, and at its memory
    limit it would drop request streams or the guards that answer each request once.
    The worker now says so in its log at the start, and serves on (an operator may
    accept the risk)."""
    args = ("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
    server = RedisServer(tmp_path / "redis", extra_args=args).start()
    try:
        worker = spawn_worker(ready=False, ORION_BUS_URL=server.url)  # heard on its Redis
        said = "Redis evicts keys at its memory limit (maxmemory-policy allkeys-lru)"
        await wait_until_async(lambda: said in worker.log(), timeout=30, what="the warning")
        await wait_until_async(
            lambda: "engine loading -> ready" in worker.log(), timeout=60, what="ready"
        )
        assert worker.proc.poll() is None
    finally:
        server.stop()


async def test_a_failed_start_on_a_hung_redis_names_the_timeout_in_its_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that cannot be built, on a Redis that hangs: telling the fleet runs out of
    its bound (3 s, within the socket timeout), a TimeoutError without text, and the
    warning said "could not tell the fleet of the failed start: " with nothing after it
    (an exception is always true: ``exc or type(exc).__name__`` never reached its name)."""
    server = RedisServer(tmp_path / "redis").start()
    settings = Settings(ORION_BUS_URL=server.url, LLM_PROFILE_NAME="tiyn")
    redis = connect(settings)
    intake = Intake(settings, redis, channels_for(settings, "tiyn"))  # nothing heard
    server.freeze()
    try:
        with caplog.at_level(logging.WARNING, logger="orion_llamaccp.worker.startup"):
            await tell_failed_start(settings, redis, intake, ConfigError("no profile 'tiyn'"))
    finally:
        server.thaw()
        await intake.close()
        await redis.aclose()
        server.stop()
    said = [r.getMessage() for r in caplog.records if r.name == "orion_llamaccp.worker.startup"]
    assert said == ["could not tell the fleet of the failed start: TimeoutError"], said
