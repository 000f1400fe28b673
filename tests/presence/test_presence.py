"""Presence of real workers: heartbeats, announcements, discovery, liveness, fleet, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
import redis
import redis.asyncio as aioredis

from orion_llamaccp.bus.envelope import ServiceRef
from orion_llamaccp.bus.outbox import Outbox
from orion_llamaccp.client import BusClient
from tests.conftest import SpawnWorker
from tests.engine.conftest import PRELUDE
from tests.model.hub_server import Fault, LocalHub
from tests.support.procs import free_port, wait_until, wait_until_async
from tests.support.workers import BusRecorder, WorkerProc, metrics_once_counted

HI = [{"role": "user", "content": "hello there"}]
HEALTH_KEYS = {
    "service",
    "node",
    "version",
    "instance",
    "boot_id",
    "status",
    "last_seen_ts",
    "heartbeat_interval_sec",
    "details",
}


def beats(recorder: BusRecorder, instance: str) -> list[dict]:
    return [
        m.message["payload"]
        for m in recorder.on("orion:system:health")
        if m.message["payload"]["instance"] == instance
    ]


def announcements(
    recorder: BusRecorder, instance: str, channel: str = "orion:llm:profile:announce"
) -> list[dict]:
    return [m.message for m in recorder.on(channel) if m.message["payload"]["instance"] == instance]


HUB_PROFILE = """\
profiles:
  tiny:
    backend: llamacpp
    model_id: slow-random-llama
    llamacpp:
      model_root: "${{LLM_CACHE_DIR}}/gguf"
      hf_repo_id: org/slow-random
      hf_filename: slow.gguf
      host: 127.0.0.1
      port: {port}
      threads: 1
"""


@contextlib.contextmanager
def held_download(
    spawn_worker: SpawnWorker, model: Path, tmp_path: Path, name: str = "w1", **env: str
) -> Iterator[tuple[WorkerProc, Fault, int]]:
    """A worker whose model comes from a local Hub that holds the download half-way until
    ``hold.release`` is set; yields the worker, the hold and the file's size."""
    data = model.read_bytes()
    with LocalHub() as hub:
        hub.add("org/slow-random", "slow.gguf", data)
        hold = hub.fault("cdn", Fault("hold", after=len(data) // 2))
        registry = tmp_path / "hub-profiles.yaml"
        registry.write_text(HUB_PROFILE.format(port=free_port()))
        worker = spawn_worker(
            name,
            ready=False,
            parallel=1,
            ctx=16384,
            LLM_PROFILES_CONFIG_PATH=str(registry),
            HF_HUB_OFFLINE="0",
            HF_ENDPOINT=hub.endpoint,
            **env,
        )
        yield worker, hold, len(data)


async def downloading(recorder: BusRecorder, instance: str, count: int = 1) -> list[dict]:
    """Once ``count`` heartbeats of ``instance`` said ``downloading``: those beats."""

    def seen() -> list[dict]:
        found = [b for b in beats(recorder, instance) if b["details"]["state"] == "downloading"]
        return found if len(found) >= count else []

    found = await wait_until_async(seen, timeout=30, what=f"{count} beat(s) while downloading")
    assert isinstance(found, list)
    return found


async def test_heartbeats_keep_coming_during_a_download_and_a_generation(
    spawn_worker: SpawnWorker,
    recorder: BusRecorder,
    bus: BusClient,
    slow_model: Path,
    tmp_path: Path,
) -> None:
    """Beats keep coming, with the interval they claim, while a download is held mid-file
    and while a long generation streams: counted, not timed (the gaps between them are
    wall-clock figures, which a loaded CI machine stretches)."""
    with held_download(spawn_worker, slow_model, tmp_path, HEARTBEAT_INTERVAL_SEC="0.5") as (
        worker,
        hold,
        size,
    ):
        during_download = await downloading(recorder, worker.name, 8)
        assert hold.reached.wait(30)  # the first beat may come before the hold
        assert {b["status"] for b in during_download} == {"degraded"}
        progress = during_download[-1]["details"]["progress"]
        assert progress["phase"] == "downloading" and progress["filename"] == "slow.gguf"
        assert 0 < progress["bytes_done"] < size == progress["bytes_total"]
        hold.release.set()
        worker.wait_ready()
    before = len(beats(recorder, worker.name))
    # A generation longer than any machine finishes in the beats we need, cut off once they
    # are in: a fixed length would be too short on a fast machine or outrun the timeout
    # on a slow one.
    envelope = bus.request(HI, profile="tiny", options={"max_tokens": 16000, "ignore_eos": True})
    chat = asyncio.create_task(bus.chat(HI, profile="tiny", envelope=envelope, timeout=90))
    await wait_until_async(
        lambda: chat.done() or len(beats(recorder, worker.name)) - before >= 6,
        timeout=60,
        what="6 beats while generating",
    )
    assert not chat.done(), chat.result().payload
    during_generation = beats(recorder, worker.name)[before:]
    await bus.cancel(envelope["correlation_id"])
    assert (await chat).payload["error"] == "cancelled"
    assert len(during_generation) >= 6
    assert {b["details"]["state"] for b in during_generation} == {"ready"}
    assert {b["heartbeat_interval_sec"] for b in beats(recorder, worker.name)} == {0.5}


def health(env: dict, instance: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orion_llamaccp", "health", *args],
        env={**env, "INSTANCE_ID": instance},
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_health_is_the_worker_s_own_beat_healthy_while_downloading_and_gone_when_stopped(
    spawn_worker: SpawnWorker,
    subprocess_env: dict,
    recorder: BusRecorder,
    slow_model: Path,
    tmp_path: Path,
) -> None:
    """``health`` (the image's health check) reads the worker's own liveness key: no beat,
    unhealthy; downloading (a download held mid-file), healthy, where llama-server's
    ``/health`` says 503 all along, but not ``--ready``; ready, both; another instance's
    beat is not its own; stopped cleanly (the key removed), unhealthy again."""
    assert health(subprocess_env, "w1").returncode == 1
    with held_download(spawn_worker, slow_model, tmp_path) as (worker, hold, _):
        await downloading(recorder, "w1")
        assert hold.reached.wait(30)  # the first beat may come before the hold
        told = health(subprocess_env, "w1")
        assert told.returncode == 0, told.stdout + told.stderr
        assert told.stdout.startswith("healthy: orion-llamaccp w1: degraded (downloading)")
        assert health(subprocess_env, "w1", "--ready").returncode == 1
        hold.release.set()
        worker.wait_ready()
    wait_until(
        lambda: health(subprocess_env, "w1", "--ready").returncode == 0,
        timeout=30,
        what="healthy --ready once a beat says ready",
    )
    assert health(subprocess_env, "w2").returncode == 1
    assert worker.terminate() == 0
    gone = health(subprocess_env, "w1")
    assert gone.returncode == 1 and gone.stdout.startswith("unhealthy: no heartbeat"), gone


async def test_a_stop_during_a_stalled_download_exits_without_waiting_for_the_read(
    spawn_worker: SpawnWorker, recorder: BusRecorder, slow_model: Path, tmp_path: Path
) -> None:
    """SIGTERM while the download is held mid-file (no byte comes, and the stall timeout
    is a minute): the worker says goodbye and exits at once, exit status 0. Its download
    thread used to be the loop's, which the exit waited for: as long as the read stalled."""
    with held_download(
        spawn_worker, slow_model, tmp_path, ORION_LLAMACPP_DOWNLOAD_STALL_SEC="60"
    ) as (worker, hold, _):
        await downloading(recorder, "w1")
        assert hold.reached.wait(30)  # the first beat may come before the hold
        worker.signal(signal.SIGTERM)
        try:
            # Bounds the wait only: held, the read would end when the hub lets go (30 s).
            assert worker.proc.wait(15) == 0, worker.log()[-2000:]
        finally:
            hold.release.set()


async def test_a_profile_pinned_to_gpus_on_a_host_without_one_fails_before_its_download(
    spawn_worker: SpawnWorker, recorder: BusRecorder, slow_model: Path, tmp_path: Path
) -> None:
    """A GPU profile started where llama-server sees no GPU (a CPU build, as here; a
    container started without its GPUs): llama-server said "no usable GPU found" only as
    it loaded the model, after the whole download, hours for a big one. Its
    ``--list-devices`` answers at once: the worker fails while the download is held
    half-way, saying why, on the bus too."""
    data = await asyncio.to_thread(slow_model.read_bytes)
    registry = tmp_path / "hub-profiles.yaml"
    profile = HUB_PROFILE.format(port=free_port()) + "      n_gpu_layers: 99\n"
    profile = profile.replace("    model_id:", "    gpu: {device_ids: [0]}\n    model_id:")
    await asyncio.to_thread(registry.write_text, profile)
    with LocalHub() as hub:
        sha = hub.add("org/slow-random", "slow.gguf", data)
        hold = hub.fault("cdn", Fault("hold", after=len(data) // 2))
        try:
            worker = spawn_worker(
                ready=False,
                LLM_PROFILES_CONFIG_PATH=str(registry),
                HF_HUB_OFFLINE="0",
                HF_ENDPOINT=hub.endpoint,
            )
            await wait_until_async(
                lambda: worker.proc.poll() is not None, timeout=90, what="the worker to fail"
            )
            # Failed during the download: the hub (which holds it 30 s) sent half the file.
            assert hub.bytes_sent(sha) < len(data)
        finally:
            hold.release.set()
    assert worker.proc.returncode == 1, worker.log()[-2000:]
    assert "no usable GPU" in worker.log()
    [error] = [m.message["payload"] for m in recorder.kinds("system.error")]
    assert "no usable GPU" in error["details"]["message"], error
    assert "LLAMACPP_N_GPU_LAYERS_OVERRIDE=0" in error["details"]["message"], error


async def test_a_request_waiting_for_a_model_that_cannot_be_had_is_told_why(
    spawn_worker: SpawnWorker,
    recorder: BusRecorder,
    bus: BusClient,
    redis_url: str,
    slow_model: Path,
    tmp_path: Path,
) -> None:
    """A pub/sub request heard during the download waits for llama-server. The download
    then fails (the Hub answers 500 from then on): the request was answered "llama-server
    is draining", as if an operator had stopped the worker, by the stop that followed.
    It is told the failure now."""
    data = await asyncio.to_thread(slow_model.read_bytes)
    registry = tmp_path / "hub-profiles.yaml"
    await asyncio.to_thread(registry.write_text, HUB_PROFILE.format(port=free_port()))
    with LocalHub() as hub:
        hub.add("org/slow-random", "slow.gguf", data)
        stall = hub.fault("cdn", Fault("stall", after=len(data) // 2))
        worker = spawn_worker(
            ready=False,
            LLM_PROFILES_CONFIG_PATH=str(registry),
            HF_HUB_OFFLINE="0",
            HF_ENDPOINT=hub.endpoint,
            ORION_LLAMACPP_DOWNLOAD_DEADLINE_SEC="2",
        )
        await downloading(recorder, worker.name)
        request = bus.request(HI, profile="tiny", options={"max_tokens": 2})
        await bus.send(request, profile="tiny")
        raw = aioredis.Redis.from_url(redis_url)
        try:
            await wait_until_async(
                lambda: raw.exists(f"orion:llamacpp:claim:{request['id']}"), what="its claim"
            )
        finally:
            await raw.aclose()
        for stage in ("resolve", "cdn"):
            for _ in range(100):
                hub.fault(stage, Fault("status", status=500))
        stall.release.set()  # the connection drops; every try after it gets a 500
        await wait_until_async(
            lambda: worker.proc.poll() is not None, timeout=60, what="the worker to give up"
        )
    [answer] = recorder.on(request["reply_to"])
    payload = answer.message["payload"]
    assert payload["error"] == "engine_unavailable", payload
    message = payload["details"]["message"]
    assert message.startswith("llama-server is failed: "), message
    assert "draining" not in message and "slow.gguf" in message, message


async def test_a_lock_that_cannot_be_taken_fails_the_worker_with_the_reason(
    spawn_worker: SpawnWorker, recorder: BusRecorder, tmp_path: Path, subprocess_env: dict
) -> None:
    """The download's lock file cannot be created (a folder in its place here; under
    Docker, a cache the container's user may not write): the worker fails, saying so,
    where filelock's error, which no layer translated, ended in a traceback and a clean
    ``stopped`` on the bus, as if an operator had stopped it."""
    registry = tmp_path / "hub-profiles.yaml"
    registry.write_text(HUB_PROFILE.format(port=free_port()))
    cache = Path(subprocess_env["LLM_CACHE_DIR"])
    (cache / "gguf" / ".orion" / "locks" / "slow.gguf.lock").mkdir(parents=True)
    worker = spawn_worker(
        ready=False,
        LLM_PROFILES_CONFIG_PATH=str(registry),
        HF_HUB_OFFLINE="0",
        HF_ENDPOINT="http://127.0.0.1:9",  # never reached: the lock comes first
    )
    await wait_until_async(lambda: worker.proc.poll() is not None, what="the worker to exit")
    assert worker.proc.returncode == 1
    last = announcements(recorder, worker.name)[-1]["payload"]
    assert last["state"] == "failed" and "cannot take the lock" in last["reason"], last
    (error,) = [m.message["payload"] for m in recorder.on("orion:system:error")]
    assert "cannot take the lock" in error["details"]["message"]
    assert "Traceback" not in worker.log()


async def test_status_follows_real_engine_events(
    spawn_worker: SpawnWorker, recorder: BusRecorder, llama_server_bin: Path
) -> None:
    # A loading phase of ~2 s (a prelude before the real binary) so beats see the restart.
    worker = spawn_worker(
        LLAMA_SERVER_BIN=str(PRELUDE),
        REAL_LLAMA_SERVER=str(llama_server_bin),
        PRELUDE_LINES="20",
        PRELUDE_DELAY="0.1",
    )
    await wait_until_async(
        lambda: any(b["status"] == "ok" for b in beats(recorder, worker.name)), what="an ok beat"
    )
    os.kill(worker.engine_pid(), signal.SIGKILL)
    await wait_until_async(
        lambda: any(
            b["status"] == "degraded" and b["details"]["restarts"] == 1
            for b in beats(recorder, worker.name)
        ),
        timeout=15,
        what="a degraded beat",
    )
    await wait_until_async(
        lambda: beats(recorder, worker.name)[-1]["status"] == "ok",
        timeout=15,
        what="ok again after the restart",
    )
    worker.terminate()
    statuses = [b["status"] for b in beats(recorder, worker.name)]
    assert statuses[-1] == "down"
    farewell = announcements(recorder, worker.name)[-1]["payload"]
    assert (farewell["state"], farewell["engine_pid"]) == ("stopped", None), farewell
    first_ok = statuses.index("ok")
    degraded = statuses.index("degraded", first_ok)
    assert "ok" in statuses[degraded:]
    boot_ids = {b["boot_id"] for b in beats(recorder, worker.name)}
    assert len(boot_ids) == 1  # one process, one boot id, restarts of llama-server included


async def test_a_worker_that_cannot_start_says_failed_to_the_end(
    spawn_worker: SpawnWorker, recorder: BusRecorder, subprocess_env: dict
) -> None:
    """Its model missing (offline, nothing to download), the worker gives up: its last
    heartbeat and announcement say ``failed`` with the reason, where the stop that
    followed used to make them ``draining`` and then ``stopped``, as after an operator's
    stop; and its last beat stays under its liveness key (``health`` says why), where
    the exit removed it as a clean stop does."""
    worker = spawn_worker(ready=False, LLAMACPP_MODEL_PATH_OVERRIDE="missing.gguf")
    await wait_until_async(
        lambda: worker.proc.poll() is not None, timeout=30, what="the worker to exit"
    )
    assert worker.proc.returncode == 1
    last_beat = beats(recorder, worker.name)[-1]
    assert (last_beat["status"], last_beat["details"]["state"]) == ("down", "failed")
    states = [a["payload"]["state"] for a in announcements(recorder, worker.name)]
    assert "failed" in states and states[states.index("failed") :] == ["failed"] * len(
        states[states.index("failed") :]
    ), states
    last = announcements(recorder, worker.name)[-1]["payload"]
    assert "missing.gguf" in last["reason"] and last["engine_pid"] is None, last
    told = health(subprocess_env, worker.name)
    assert told.returncode == 1 and "down (failed)" in told.stdout, told
    assert "missing.gguf" in told.stdout
    # Its stream group never made: nothing to hand back, and no Redis error to read as a
    # second fault beside the real one (NOGROUP, at WARNING).
    assert "could not hand back" not in worker.log(), worker.log()[-2000:]


async def test_a_secret_in_a_model_s_file_name_is_masked_in_what_the_worker_publishes(
    spawn_worker: SpawnWorker, recorder: BusRecorder
) -> None:
    """A token that reached a model's file name (a path pasted with it) was masked in the
    logs and the reason, but went out as it stood in the announcement's ``model.file``
    and ``model.path`` and the download progress's ``filename``."""
    token = "hf_RecognizableToken0042"
    worker = spawn_worker(
        ready=False, HF_TOKEN=token, LLAMACPP_MODEL_PATH_OVERRIDE=f"/nonexistent/{token}.gguf"
    )
    await wait_until_async(
        lambda: worker.proc.poll() is not None, timeout=30, what="the worker to exit"
    )
    published = [m.data for m in recorder.from_service()]
    assert announcements(recorder, worker.name) and beats(recorder, worker.name)
    assert not [data for data in published if token.encode() in data]
    assert "***" in announcements(recorder, worker.name)[-1]["payload"]["model"]["file"]


NOT_TINY = "profiles:\n  other:\n    backend: vllm\n    model_id: some/model\n"
INTAKE = "orion:exec:request:LlamaCppHost:tiny"


def unbuildable_worker(spawn_worker: SpawnWorker, tmp_path: Path, name: str, **env: str) -> tuple:
    """A worker asked for ``tiny`` whose registry is a FIFO: it listens, then waits at the
    registry until ``give_registry`` writes one without ``tiny`` into it. Start-up
    subscribes before it reads the profile, so a request sent meanwhile is heard first."""
    fifo = tmp_path / f"registry-{name}.fifo"
    os.mkfifo(fifo)
    worker = spawn_worker(name, ready=False, LLM_PROFILES_CONFIG_PATH=str(fifo), **env)

    async def give_registry() -> None:
        await asyncio.to_thread(fifo.write_text, NOT_TINY)

    return worker, give_registry


async def subscribers(redis_url: str, channel: str, count: int) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:

        async def counted() -> bool:
            ((_, found),) = await client.pubsub_numsub(channel)
            return int(found) == count

        await wait_until_async(counted, timeout=30, what=f"{count} subscriber(s) on {channel}")
    finally:
        await client.aclose()


async def send_when_heard(bus: BusClient, recorder: BusRecorder) -> asyncio.Task:
    """A request on the intake channel, once the recorder (and so every subscriber) heard it."""
    asking = asyncio.create_task(bus.chat(HI, profile="tiny", timeout=60))
    await wait_until_async(lambda: recorder.on(INTAKE), timeout=10, what="the request sent")
    return asking


async def test_a_worker_that_cannot_be_built_answers_what_it_heard_and_says_why(
    spawn_worker: SpawnWorker,
    recorder: BusRecorder,
    bus: BusClient,
    tmp_path: Path,
    redis_url: str,
    subprocess_env: dict,
) -> None:
    """A profile not in the registry is found out after the worker listens: the request it
    heard meanwhile is answered ``engine_unavailable`` with the reason, and the fleet gets
    a ``down`` heartbeat (kept for ``health`` and ``ps``) and a ``system.error``, where
    the worker used to exit with nothing said on the bus and the request unanswered."""
    worker, give_registry = unbuildable_worker(spawn_worker, tmp_path, "broken")
    await subscribers(redis_url, INTAKE, 1)
    asking = await send_when_heard(bus, recorder)
    await give_registry()
    result = await asking
    assert result.payload["error"] == "engine_unavailable", result.payload
    assert "LLM PROFILE 'tiny' not found" in result.payload["details"]["message"]
    assert result.payload["meta"]["instance"] == "broken"
    await wait_until_async(lambda: worker.proc.poll() is not None, what="the worker to exit")
    assert worker.proc.returncode == 1
    assert "error: LLM PROFILE 'tiny' not found" in worker.log()
    (beat,) = beats(recorder, "broken")
    assert beat["status"] == "down" and beat["details"]["state"] == "failed", beat
    assert "'tiny' not found" in beat["details"]["reason"]
    (error,) = [m.message["payload"] for m in recorder.on("orion:system:error")]
    assert error["error"] == "engine_unavailable" and error["details"]["profile"] == "tiny"
    assert len(recorder.kinds("llm.chat.result")) == 1
    told = health(subprocess_env, "broken")
    assert told.returncode == 1, told
    assert told.stdout.startswith("unhealthy: orion-llamaccp broken: down (failed): LLM PROFILE")
    (row,) = _ps(subprocess_env)
    assert (row["instance"], row["state"], row["down"]) == ("broken", "failed", True), row


async def test_a_worker_that_cannot_be_built_answers_those_heard_beyond_its_inbox_too(
    spawn_worker: SpawnWorker, recorder: BusRecorder, bus: BusClient, tmp_path: Path, redis_url: str
) -> None:
    """A request heard with the inbox full (``ORION_LLAMACPP_INBOX_SIZE``) waits apart for
    its ``overloaded``; a worker that cannot be built answers it as it answers the others:
    with the reason it could not start."""
    _, give_registry = unbuildable_worker(
        spawn_worker, tmp_path, "broken", ORION_LLAMACPP_INBOX_SIZE="1"
    )
    await subscribers(redis_url, INTAKE, 1)
    first = await send_when_heard(bus, recorder)
    second = asyncio.create_task(bus.chat(HI, profile="tiny", timeout=60))
    await wait_until_async(lambda: len(recorder.on(INTAKE)) == 2, what="both requests sent")
    await give_registry()
    for result in await asyncio.gather(first, second):
        assert result.payload["error"] == "engine_unavailable", result.payload
        assert "LLM PROFILE 'tiny' not found" in result.payload["details"]["message"]
    assert len(recorder.kinds("llm.chat.result")) == 2


async def test_a_worker_that_cannot_be_built_answers_those_heard_beyond_its_inbox_bytes_too(
    spawn_worker: SpawnWorker, recorder: BusRecorder, bus: BusClient, tmp_path: Path, redis_url: str
) -> None:
    """Large requests (2 kB each): ``ORION_LLAMACPP_INBOX_BYTES`` holds one in the inbox
    and as many bytes wait apart for their ``overloaded``, so that a worker that cannot be
    built answers those two with the reason it could not start, and the third, beyond
    both, is dropped unanswered: bounded by count only, all three were held."""
    pad = {"pad": "x" * 2000}
    envelopes = [bus.request(HI, profile="tiny", trace=pad) for _ in range(3)]
    size = max(len(orjson.dumps(envelope)) for envelope in envelopes)
    worker, give_registry = unbuildable_worker(
        spawn_worker, tmp_path, "broken", ORION_LLAMACPP_INBOX_BYTES=str(size + size // 2)
    )
    await subscribers(redis_url, INTAKE, 1)
    asking = []
    for n, envelope in enumerate(envelopes[:2], start=1):  # in this order: the first waits
        asking.append(
            asyncio.create_task(bus.chat(HI, profile="tiny", envelope=envelope, timeout=60))
        )
        await wait_until_async(lambda n=n: len(recorder.on(INTAKE)) == n, what=f"request {n}")
    await bus.send(envelopes[2], profile="tiny")
    await wait_until_async(lambda: len(recorder.on(INTAKE)) == 3, what="the third request sent")
    await give_registry()
    for result in await asyncio.gather(*asking):
        assert result.payload["error"] == "engine_unavailable", result.payload
        assert "LLM PROFILE 'tiny' not found" in result.payload["details"]["message"]
    await wait_until_async(lambda: worker.proc.poll() is not None, what="the worker to exit")
    answered = {m.channel for m in recorder.kinds("llm.chat.result")}
    assert answered == {envelope["reply_to"] for envelope in envelopes[:2]}


async def test_a_worker_that_cannot_be_built_leaves_what_it_heard_to_a_replica(
    spawn_worker: SpawnWorker, recorder: BusRecorder, bus: BusClient, tmp_path: Path, redis_url: str
) -> None:
    """With a replica on the channel that heard the same request, the broken worker does
    not beat it to the answer with an error: the caller gets the replica's answer, once."""
    spawn_worker("healthy")
    broken, give_registry = unbuildable_worker(spawn_worker, tmp_path, "broken")
    await subscribers(redis_url, INTAKE, 2)
    asking = await send_when_heard(bus, recorder)
    await give_registry()
    await wait_until_async(lambda: broken.proc.poll() is not None, what="the broken one to exit")
    result = await asking
    assert result.ok and result.payload["meta"]["instance"] == "healthy", result.payload
    assert "claimed by a replica: left to it" in broken.log()
    assert len(recorder.kinds("llm.chat.result")) == 1
    (beat,) = beats(recorder, "broken")
    assert beat["status"] == "down"


async def test_the_announced_engine_url_is_the_advertised_one_when_set(
    spawn_worker: SpawnWorker,
) -> None:
    """A llama-server in a container is announced at the container's own view
    (``http://127.0.0.1:8080``), which no other host can use: ``ORION_LLAMACPP_ADVERTISE_URL``
    names the reachable one, its password masked."""
    plain = spawn_worker("plain").announcement()
    assert plain is not None and plain["engine_url"].startswith("http://127.0.0.1:"), plain
    told = spawn_worker(
        "told", ORION_LLAMACPP_ADVERTISE_URL="http://ops:pa55word@atlas.example:18080/"
    ).announcement()
    assert told is not None and told["engine_url"] == "http://ops:***@atlas.example:18080", told


async def test_every_heartbeat_is_exactly_system_health_v1(
    spawn_worker: SpawnWorker, recorder: BusRecorder
) -> None:
    worker = spawn_worker()
    await wait_until_async(lambda: len(beats(recorder, worker.name)) >= 3, what="3 beats")
    for beat in beats(recorder, worker.name):
        assert set(beat) == HEALTH_KEYS
        assert beat["service"] == "orion-llamaccp" and beat["instance"] == worker.name
        details = beat["details"]
        for key in (
            "profile",
            "model_id",
            "state",
            "slots_busy",
            "slots_total",
            "queue_local",
            "queue_stream_backlog",
            "requests_served",
            "requests_failed",
            "tokens_generated",
            "tokens_per_sec_recent",
            "uptime_sec",
        ):
            assert key in details, key


async def test_announcements_on_start_on_change_and_on_discovery(
    spawn_worker: SpawnWorker, recorder: BusRecorder, bus: BusClient
) -> None:
    worker = spawn_worker()
    states = [a["payload"]["state"] for a in announcements(recorder, worker.name)]
    assert "ready" in states
    ready = next(
        a["payload"]
        for a in announcements(recorder, worker.name)
        if a["payload"]["state"] == "ready"
    )
    assert ready["profile"] == "tiny" and ready["model_id"] == "tiny-random-llama"
    assert ready["slots"] == 2 and ready["intake_channel"].endswith(":tiny")
    # As launched: the registry says 2048, LLAMACPP_CTX_SIZE_OVERRIDE 8192 (spawn_worker).
    assert ready["ctx_size"] == 8192 and "--ctx-size" in ready["argv"]
    assert ready["argv"][ready["argv"].index("--ctx-size") + 1] == "8192"
    assert ready["model"]["file"] == "tiny.gguf" and ready["model"]["size_bytes"] > 0
    assert ready["argv"][0].endswith("llama-server") and "--port" in ready["argv"]
    os.kill(worker.engine_pid(), signal.SIGKILL)
    await wait_until_async(
        lambda: (
            "restarting" in [a["payload"]["state"] for a in announcements(recorder, worker.name)]
        ),
        timeout=10,
        what="an announcement of the restart",
    )
    worker.wait_ready()
    discover = bus.outbox.envelope("llm.profile.discover.v1", {}, reply_to="test:who-is-there")
    await bus.redis.publish("orion:llm:profile:discover", orjson.dumps(discover))
    answer = await wait_until_async(
        lambda: announcements(recorder, worker.name, "test:who-is-there"),
        what="an announcement in answer to discovery",
    )
    assert answer[0]["correlation_id"] == discover["correlation_id"]  # type: ignore[index]
    assert answer[0]["kind"] == "llm.profile.announce.v1"  # type: ignore[index]


async def test_a_discovery_reply_extends_the_requests_causality_chain(
    spawn_worker: SpawnWorker, recorder: BusRecorder, bus: BusClient
) -> None:
    worker = spawn_worker()
    earlier = bus.outbox.envelope("orion.ui.click", {})
    discover = bus.outbox.envelope("llm.profile.discover.v1", {}, reply_to="test:discovery-reply")
    discover["causality_chain"] = [
        {k: earlier[k] for k in ("correlation_id", "kind", "source", "created_at")}
    ]
    discover["trace"] = {"trace_id": "t-disc"}
    await bus.redis.publish("orion:llm:profile:discover", orjson.dumps(discover))
    answer = await wait_until_async(
        lambda: announcements(recorder, worker.name, "test:discovery-reply"),
        what="an announcement in answer to discovery",
    )
    reply = answer[0]  # type: ignore[index]
    assert reply["correlation_id"] == discover["correlation_id"]
    assert [link["kind"] for link in reply["causality_chain"]] == [
        "orion.ui.click",
        "llm.profile.discover.v1",
    ]
    assert reply["causality_chain"][-1]["correlation_id"] == discover["correlation_id"]
    assert reply["causality_chain"][-1]["source"]["name"] == bus.outbox.source.name
    assert reply["trace"] == {"trace_id": "t-disc"}
    # Its copy on the announce channel is a message of its own: ids are new per message.
    copies = await wait_until_async(
        lambda: [
            a
            for a in announcements(recorder, worker.name)
            if a["correlation_id"] == reply["correlation_id"]
        ],
        what="its copy on the announce channel",
    )
    assert [c["id"] != reply["id"] for c in copies] == [True], copies
    assert copies[0]["payload"] == reply["payload"]


async def test_liveness_key_expires_after_sigkill_and_goes_on_clean_stop(
    spawn_worker: SpawnWorker, redis_url: str
) -> None:
    """The killed worker's registry entry goes with its liveness key: it was kept for
    three announce intervals (3 minutes by default), saying ``ready`` to discovery."""
    killed = spawn_worker("killed", ANNOUNCE_INTERVAL_SEC="60")
    stopped = spawn_worker("stopped")
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = {
            name: f"orion:llamacpp:alive:orion-llamaccp:{name}" for name in ("killed", "stopped")
        }
        entry = "orion:llm:profile:registry:tiny:killed"
        for key in (*keys.values(), entry):
            await wait_until_async(lambda key=key: client.exists(key), what=key)
            assert 0 < await client.ttl(key) <= 3  # 3 x the 1 s interval
        stopped.terminate()
        assert not await client.exists(keys["stopped"])
        killed.signal(signal.SIGKILL)
        assert await client.exists(keys["killed"]) and await client.exists(entry)
        for key in (keys["killed"], entry):
            await wait_until_async(
                lambda key=key: _gone(client, key),
                timeout=5,
                what=f"the killed worker's {key} to expire",
            )
    finally:
        await client.aclose()


async def test_a_registry_entry_lost_is_announced_again_at_the_next_beat(
    spawn_worker: SpawnWorker, redis_url: str
) -> None:
    """With the entry's TTL that of the liveness key, an outage longer than it (or a
    Redis restarted empty) would leave discovery without it until the next periodic
    announcement, a minute by default."""
    worker = spawn_worker("w1", ANNOUNCE_INTERVAL_SEC="600")
    client = aioredis.Redis.from_url(redis_url)
    entry = "orion:llm:profile:registry:tiny:w1"
    try:
        await wait_until_async(lambda: client.exists(entry), what=entry)
        await client.delete(entry)
        await wait_until_async(lambda: client.exists(entry), timeout=10, what="it again")
        assert 0 < await client.ttl(entry) <= 3
        assert worker.state() == "ready"
    finally:
        await client.aclose()


async def _gone(client: aioredis.Redis, key: str) -> bool:
    return not await client.exists(key)


def test_ps_json_lists_two_real_workers(
    spawn_worker: SpawnWorker, subprocess_env: dict, redis_url: str
) -> None:
    spawn_worker("left")
    spawn_worker("right")

    def both_ready() -> list[dict]:
        # ps takes a host's state from its last heartbeat, which may predate `ready` by up
        # to one interval: wait for it rather than for a slow enough ps. Up (a beat within
        # three intervals) is waited for too: how old a beat is depends on the machine.
        found = _ps(subprocess_env)
        live = [r for r in found if r["state"] == "ready" and not r["down"]]
        return found if len(found) == len(live) == 2 else []

    found = wait_until(both_ready, timeout=10, what="two ready hosts in ps")
    rows = {row["instance"]: row for row in found}  # type: ignore[attr-defined]
    assert set(rows) == {"left", "right"}
    for row in rows.values():
        assert row["profile"] == "tiny"
        assert row["model"] == "tiny-random-llama" and row["slots_total"] == 2
        assert isinstance(row["beat_age_sec"], float) and row["beat_age_sec"] >= 0


def _ps(env: dict) -> list[dict]:
    done = subprocess.run(
        [sys.executable, "-m", "orion_llamaccp", "ps", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(done.stdout)


def test_two_workers_under_one_instance_id_the_later_one_stops_and_says_why(
    spawn_worker: SpawnWorker, subprocess_env: dict, recorder: BusRecorder
) -> None:
    """Two workers under one instance id (two containers given one ``NODE_NAME``, say)
    wrote one liveness key and one registry entry, so ``ps`` showed one host, and read
    the stream as one consumer, without a word. The one started later sees the other's
    beat in the key its own replaced, says so on the bus, and exits 1; the first serves
    on, alone in ``ps``."""
    first = spawn_worker("twin")
    later = spawn_worker("later", INSTANCE_ID="twin", ready=False)
    assert later.proc is not None
    assert later.proc.wait(60) == 1, later.log()[-3000:]
    said = "another worker beats under instance id 'twin'"
    errors = [m.message["payload"]["details"]["message"] for m in recorder.kinds("system.error")]
    assert any(said in e and "this one started later" in e for e in errors), errors
    wait_until(
        lambda: said in first.log() and "it started later" in first.log(),
        timeout=10,
        what="the first worker to say it saw the later one",
    )
    assert first.proc is not None and first.proc.poll() is None
    # Nothing of the later one's stop under the keys they shared: its farewell wrote
    # its "failed" over the first's registry entry, shown until the next announcement.
    assert first.state() == "ready"

    def alone_and_ready() -> list[dict]:
        found = _ps(subprocess_env)
        return found if [(r["instance"], r["state"]) for r in found] == [("twin", "ready")] else []

    wait_until(alone_and_ready, timeout=10, what="the first worker alone and ready in ps")


def test_a_metrics_port_it_cannot_have_fails_the_worker_on_the_bus(
    spawn_worker: SpawnWorker, recorder: BusRecorder
) -> None:
    """``METRICS_PORT`` taken by another process: the worker died of a traceback before
    its first beat, and the fleet never heard of it (a container restarting for ever).
    Now it fails as a failed start does: a ``failed`` beat with the reason, a
    ``system.error``, exit code 1."""
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", port))
        taken.listen()
        worker = spawn_worker(METRICS_PORT=str(port), ready=False)
        assert worker.proc is not None
        assert worker.proc.wait(60) == 1, worker.log()[-2000:]
    assert "Traceback" not in worker.log(), worker.log()[-3000:]
    said = f"METRICS_PORT={port} cannot be served"
    failed = [b for b in beats(recorder, "w1") if b["details"]["state"] == "failed"]
    assert failed and failed[-1]["details"]["reason"].startswith(said), failed
    errors = [m.message["payload"]["details"]["message"] for m in recorder.kinds("system.error")]
    assert any(e.startswith(said) for e in errors), errors


async def test_metrics_endpoint_is_scraped(spawn_worker: SpawnWorker, bus: BusClient) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    port = free_port()
    spawn_worker(METRICS_PORT=str(port))
    options = {"max_tokens": 5, "ignore_eos": True}
    for _ in range(2):
        assert (await bus.chat(HI, profile="tiny", options=options, timeout=30)).ok
    bad = bus.request(HI, profile="tiny", options={"max_tokens": -3})
    await bus.chat(HI, profile="tiny", envelope=bad, timeout=30)
    text = await metrics_once_counted(port, 3)
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def value(name: str, **labels: str) -> float:
        wanted = {"instance": "w1", "profile": "tiny", **labels}
        found = [s.value for s in samples if s.name == name and s.labels == wanted]
        assert len(found) == 1, (name, labels, [s for s in samples if s.name == name])
        return found[0]

    assert value("orion_llamacpp_requests_total", outcome="ok") == 2
    assert value("orion_llamacpp_requests_total", outcome="validation_failed") == 1
    assert value("orion_llamacpp_tokens_generated") == 10
    assert value("orion_llamacpp_time_to_first_token_seconds_count") == 2
    assert value("orion_llamacpp_request_duration_seconds_count") == 3
    assert value("orion_llamacpp_engine_state", state="ready") == 1
    assert value("orion_llamacpp_engine_state", state="loading") == 0
    assert value("orion_llamacpp_slots_total") == 2
    assert value("orion_llamacpp_engine_restarts") == 0
    assert value("orion_llamacpp_queue_depth") == 0
    # start-up's objects are out of the collector's sight once the engine is ready
    assert value("orion_llamacpp_gc_frozen_objects") > 10_000
    collections = [s for s in samples if s.name == "python_gc_collections_total"]
    assert {s.labels["generation"] for s in collections} == {"0", "1", "2"}
    assert value("orion_llamacpp_claims_lost") == 0  # alone on its channel
    # every family served is in the operator's list (docs/deployment.md, "Metrics")
    documented = (Path(__file__).parents[2] / "docs" / "deployment.md").read_text()
    served = {
        f.name
        for f in text_string_to_metric_families(text)
        if f.name.startswith("orion_") and not f.name.endswith("_created")  # the client's
    }
    names = re.findall(r"`(orion_[a-z_]+)[`{]", documented)
    listed = {*names, *(n.removesuffix("_total") for n in names)}  # a counter's family
    missing = sorted(served - listed)
    assert served and not missing, missing


@contextlib.contextmanager
def _watching(
    subprocess_env: dict, redis_url: str, **env: str
) -> Iterator[tuple[redis.Redis, Callable[..., str]]]:
    """``watch`` off a terminal, once it has subscribed to the heartbeats (however long it
    takes to start here): a client of the bus, and ``stop`` (SIGINT, or the signal given),
    which gives what it drew; off a terminal it draws its table once, as it stops."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "orion_llamaccp", "watch", "--refresh", "0.2"],
        env={**subprocess_env, "COLUMNS": "200", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def stop(sig: signal.Signals = signal.SIGINT) -> str:
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        return out

    client = redis.Redis.from_url(redis_url)
    try:
        wait_until(
            lambda: client.pubsub_numsub("orion:system:health")[0][1] == 1,
            timeout=30,
            what="watch subscribed to heartbeats",
        )
        yield client, stop
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_watch_draws_the_live_fleet(
    spawn_worker: SpawnWorker,
    subprocess_env: dict,
    recorder: BusRecorder,
    redis_url: str,
    sig: signal.Signals,
) -> None:
    """``watch`` is stopped once it has subscribed (its fleet loaded) and taken in two
    heartbeats of the host, not after a fixed sleep. A SIGTERM (a supervisor's,
    ``timeout``'s) ends it as Ctrl-C does: it was killed, exit 143, nothing drawn."""
    spawn_worker("watched")
    with _watching(subprocess_env, redis_url) as (_, stop):
        seen = len(beats(recorder, "watched"))
        wait_until(
            lambda: len(beats(recorder, "watched")) >= seen + 2,
            timeout=30,
            what="two heartbeats of the host since",
        )
        out = stop(sig)
    assert "watched" in out and "tiny-random-llama" in out and "ready" in out


def _beat(service: str, instance: str, details: dict) -> bytes:
    """A heartbeat as another service may send it: its time naive, which counts as UTC."""
    payload = {
        "service": service,
        "instance": instance,
        "boot_id": "b",
        "status": "ok",
        "last_seen_ts": datetime.now(UTC).replace(tzinfo=None).isoformat(),
        "heartbeat_interval_sec": 10.0,
        "details": details,
    }
    return Outbox(ServiceRef(name=service, instance=instance)).encode("system.health.v1", payload)


def test_watch_drops_a_host_that_said_goodbye_and_that_redis_keeps_no_more(
    subprocess_env: dict, redis_url: str
) -> None:
    """A worker's farewell beat (``down``) heard live, and nothing of it in Redis: at its
    next reload of the fleet (every 10 s) ``watch`` drops its row; a host heard live and
    well stays. ``Fleet.forget_gone`` was tested alone: a ``watch`` that never called it
    (every container ever recreated piling up as "down") passed every test."""
    details = {"profile": "tiny", "slots_total": 1, "state": "stopped"}
    farewell = orjson.loads(_beat("orion-llamaccp", "said-goodbye", details))
    farewell["payload"]["status"] = "down"
    live = _beat("orion-llamaccp", "still-here", {"profile": "tiny", "slots_total": 1})
    with _watching(subprocess_env, redis_url) as (client, stop):
        client.publish("orion:system:health", orjson.dumps(farewell))
        client.publish("orion:system:health", live)
        time.sleep(11)  # past its next reload, whenever in its 10 s that came
        out = stop()
    assert "still-here" in out and "said-goodbye" not in out, out


def test_watch_shows_only_llama_cpp_hosts_and_reads_naive_times_as_utc(
    subprocess_env: dict, redis_url: str
) -> None:
    ours = _beat("orion-llamaccp", "naive-host", {"profile": "tiny", "slots_total": 1})
    theirs = _beat("orion-gateway", "gateway-1", {"routes": 3})
    # 9 h east of UTC
    with _watching(subprocess_env, redis_url, TZ="Asia/Tokyo") as (client, stop):
        for _ in range(5):
            client.publish("orion:system:health", theirs)
            client.publish("orion:system:health", ours)
            time.sleep(0.2)  # a redraw between beats; nothing here is timed
        out = stop()
    assert "gateway" not in out
    rows = [line for line in out.splitlines() if "naive-host" in line]
    assert rows and "down" not in rows[-1], rows[-1:]


async def test_a_periodic_job_that_gets_no_answer_says_so_in_its_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A job cut off by its bound (Redis frozen: a beat never answered) raised a
    TimeoutError without text, and the log said "heartbeat failed: " and no more."""
    from orion_llamaccp.bus.presence import every

    stop = asyncio.Event()

    async def unanswered() -> None:
        await asyncio.sleep(3600)

    with caplog.at_level(logging.WARNING, logger="orion_llamaccp.bus.presence"):
        running = asyncio.create_task(every(0.1, unanswered, stop, "heartbeat"))
        await wait_until_async(lambda: caplog.records, what="a warning")
        stop.set()
        await running
    assert caplog.records[0].getMessage() == "heartbeat failed: no answer within 1 s"
