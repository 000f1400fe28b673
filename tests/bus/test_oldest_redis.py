"""The worker on Redis 6.2, the oldest the README says it supports (built by `make
redis-oldest`). Every other test runs on the machine's Redis 7: a command, an argument or
a reply's shape that came with 7.0 would show only on an Orion bus still on 6.2, and one
did (XAUTOCLAIM's deleted entries: ``test_intake.py``'s ``redis-6.2`` cases)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import redis.asyncio as aioredis

from orion_llamaccp.bus import keys
from orion_llamaccp.client import BusClient
from tests.support.orion_contract import check_message
from tests.support.procs import wait_stream_acked, wait_until_async
from tests.support.workers import BusRecorder, WorkerProc

HI = [{"role": "user", "content": "hello there"}]


async def test_a_worker_on_redis_6_2_serves_streams_both_ways_and_says_so(
    oldest_redis_url: str, subprocess_env: dict, tmp_path: Path
) -> None:
    """Both intakes, streamed chunks, the result, the ack and the stream's trim, the
    heartbeat and the registry entry: each on Redis 6.2, every message held to the
    contract, and nothing in the worker's log that Redis refused."""
    url = oldest_redis_url
    env = {
        **subprocess_env,
        "ORION_BUS_URL": url,
        "HEARTBEAT_INTERVAL_SEC": "1",
        "ORION_LLAMACPP_STREAM_TRIM_SEC": "0.2",
    }
    recorder = BusRecorder(url)
    worker = WorkerProc(env, name="oldest", log_dir=tmp_path, redis_url=url).start()
    raw = aioredis.Redis.from_url(url)
    try:
        worker.wait_ready()
        async with BusClient(url) as bus:
            for via in ("pubsub", "stream", "stream"):
                options = {"stream": True, "max_tokens": 24, "temperature": 0}
                envelope = bus.request(HI, profile="tiny", options=options)
                result = await bus.chat(HI, profile="tiny", via=via, envelope=envelope, timeout=30)
                assert result.ok, result.payload
                assert result.payload["meta"]["transport"] == via
                chunks = [
                    m.message["payload"] for m in recorder.on(f"{envelope['reply_to']}:chunks")
                ]
                assert [c["seq"] for c in chunks] == list(range(len(chunks))) != []
                assert "".join(c["delta"] for c in chunks) == result.payload["content"]
                assert len(recorder.on(envelope["reply_to"])) == 1
        stream = keys.intake_stream("tiny")
        await wait_stream_acked(raw, stream, "llamacpp:tiny")

        async def trimmed() -> bool:  # every acked entry, the group's last read too
            return await raw.xlen(stream) == 0

        await wait_until_async(trimmed, timeout=10, what="the acked entries trimmed")
        await wait_until_async(
            lambda: recorder.kinds("system.health.v1"), timeout=10, what="a heartbeat"
        )
        assert worker.announcement() is not None
    finally:
        worker.close()
        recorder.close()
        await raw.aclose()
    published = recorder.from_service()
    assert published
    for message in published:
        check_message(message.data)
    log = worker.log()
    assert "ERR" not in log and "Traceback" not in log and "unknown command" not in log, log[-3000:]


def test_doctor_says_redis_6_2_will_do(oldest_redis_url: str, subprocess_env: dict) -> None:
    """``doctor`` refuses a Redis older than 6.2 (no ``SET ... GET``, no XAUTOCLAIM); the
    oldest it accepts must pass whole."""
    done = subprocess.run(
        [sys.executable, "-m", "orion_llamaccp", "doctor"],
        env={**subprocess_env, "ORION_BUS_URL": oldest_redis_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    [line] = [line for line in done.stdout.splitlines() if line.split()[1:2] == ["redis"]]
    assert line.startswith("ok") and line.endswith("answers (Redis 6.2.14)"), line
