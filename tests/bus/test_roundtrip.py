"""Round trips through a real worker process: pub/sub and streams, streamed chunks."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from orion_llamaccp.client import BusClient
from tests.bus.conftest import SpawnWorker
from tests.support.procs import wait_stream_acked, wait_until_async
from tests.support.workers import BusRecorder

HI = [{"role": "user", "content": "hello there"}]
PROFILE = "tiny"
CUTTING_LAUNCHER = Path(__file__).parent.parent / "support" / "cutting_launcher.py"


async def test_pubsub_round_trip(
    spawn_worker: SpawnWorker, bus: BusClient, recorder: BusRecorder
) -> None:
    spawn_worker()
    envelope = bus.request(
        HI, profile=PROFILE, options={"max_tokens": 8, "seed": 3}, trace={"trace_id": "t-123"}
    )
    result = await bus.chat(HI, profile=PROFILE, envelope=envelope, timeout=30)
    assert result.ok, result.payload
    payload = result.payload
    assert payload["usage"]["completion_tokens"] == 8
    assert payload["usage"]["total_tokens"] == payload["usage"]["prompt_tokens"] + 8
    assert payload["model_used"] == "tiny-random-llama"
    assert payload["meta"]["served_by"] == "orion-llamaccp"
    assert payload["meta"]["finish_reason"] == "length"
    assert payload["meta"]["timings"]["predicted_n"] == 8
    assert payload["meta"]["attempt"] == 1
    reply = result.envelope
    assert str(reply.correlation_id) == envelope["correlation_id"]
    assert reply.reply_to is None
    assert [str(link.correlation_id) for link in reply.causality_chain] == [
        envelope["correlation_id"]
    ]
    assert reply.causality_chain[-1].kind == "llm.chat.request"
    assert reply.trace == {"trace_id": "t-123"}
    await asyncio.sleep(0.3)  # a second answer would be in by now
    assert len(recorder.on(envelope["reply_to"])) == 1


async def test_stream_round_trip_acks_the_entry(
    spawn_worker: SpawnWorker, bus: BusClient, redis_url: str
) -> None:
    spawn_worker()
    result = await bus.chat(
        HI, profile=PROFILE, via="stream", options={"max_tokens": 5}, timeout=30
    )
    assert result.ok, result.payload
    assert result.payload["meta"]["transport"] == "stream"
    client = aioredis.Redis.from_url(redis_url)
    try:
        await wait_stream_acked(client, "orion:stream:llamacpp:tiny:request", "llamacpp:tiny")
    finally:
        await client.aclose()


async def test_streamed_chunks_are_gapless_then_one_result(
    spawn_worker: SpawnWorker, bus: BusClient, recorder: BusRecorder
) -> None:
    spawn_worker()
    for via in ("pubsub", "stream"):
        envelope = bus.request(
            HI, profile=PROFILE, options={"stream": True, "max_tokens": 200, "temperature": 0}
        )
        result = await bus.chat(HI, profile=PROFILE, via=via, envelope=envelope, timeout=30)
        assert result.ok, result.payload
        await asyncio.sleep(0.2)  # a late chunk or a second answer would be in by now
        chunks = [m.message["payload"] for m in recorder.on(envelope["reply_to"] + ":chunks")]
        assert [c["seq"] for c in chunks] == list(range(len(chunks)))
        assert {c["attempt"] for c in chunks} == {1}
        assert "".join(c["delta"] for c in chunks) == result.payload["content"]
        results = recorder.on(envelope["reply_to"])
        assert len(results) == 1
        last_chunk_at = max(m.at for m in recorder.on(envelope["reply_to"] + ":chunks"))
        assert results[0].at >= last_chunk_at


async def test_stream_channel_option_and_coalescing(
    spawn_worker: SpawnWorker, bus: BusClient, recorder: BusRecorder
) -> None:
    spawn_worker(ORION_LLAMACPP_COALESCE_MS="50")
    channel = "test:my-chunks"
    envelope = bus.request(
        HI,
        profile=PROFILE,
        options={"stream": True, "stream_channel": channel, "max_tokens": 400, "temperature": 0},
    )
    result = await bus.chat(HI, profile=PROFILE, envelope=envelope, timeout=30)
    chunks = [m.message["payload"] for m in recorder.on(channel)]
    assert chunks and "".join(c["delta"] for c in chunks) == result.payload["content"]
    # 400 tokens at thousands per second in 50 ms windows: far fewer chunks than tokens.
    assert len(chunks) < result.payload["usage"]["completion_tokens"] / 4
    assert recorder.on(envelope["reply_to"] + ":chunks") == []


async def test_legacy_chat_dict_and_input_aliases(
    spawn_worker: SpawnWorker, redis_url: str, recorder: BusRecorder
) -> None:
    import orjson

    spawn_worker()
    client = aioredis.Redis.from_url(redis_url)
    try:
        legacy = {
            "event": "chat",
            "reply_channel": "test:legacy-reply",
            "correlation_id": "6f1c1a8e-0c55-4b8e-9a61-1f0f6d3b7a10",
            "payload": {"messages": HI, "options": {"max_tokens": 3}},
        }
        aliased = {
            "schema": "orion.envelope",
            "schema_version": "2.0.0",
            "event": "llm.chat.request",
            "corr_id": "0b7d0c3e-3b43-4c2c-8d6e-6a1d2f9c0e11",
            "service": {"service": "old-caller"},
            "ts": "2026-01-01T00:00:00",
            "reply_to": "test:aliased-reply",
            "payload": {"messages": HI, "options": {"max_tokens": 3}},
        }
        for message in (legacy, aliased):
            await client.publish("orion:exec:request:LlamaCppHost:tiny", orjson.dumps(message))
    finally:
        await client.aclose()

    async def answered() -> bool:
        return bool(recorder.on("test:legacy-reply")) and bool(recorder.on("test:aliased-reply"))

    for _ in range(200):
        if await answered():
            break
        await asyncio.sleep(0.05)
    legacy_reply = recorder.on("test:legacy-reply")[0].message
    aliased_reply = recorder.on("test:aliased-reply")[0].message
    assert legacy_reply["correlation_id"] == "6f1c1a8e-0c55-4b8e-9a61-1f0f6d3b7a10"
    assert "content" in legacy_reply["payload"], legacy_reply["payload"]
    assert aliased_reply["correlation_id"] == "0b7d0c3e-3b43-4c2c-8d6e-6a1d2f9c0e11"
    assert aliased_reply["causality_chain"][-1]["source"]["name"] == "old-caller"
    assert "content" in aliased_reply["payload"], aliased_reply["payload"]


@pytest.mark.parametrize("via", ["pubsub", "stream"])
async def test_a_legacy_dict_sent_twice_is_answered_twice(
    spawn_worker: SpawnWorker, redis_url: str, recorder: BusRecorder, via: str
) -> None:
    """A legacy dict has no id: the same question sent again is the same bytes. Each send
    is a request of its own and gets its own answer, streamed or not. The second got
    none: both sends' guards were keyed on the bytes' hash, so the first answer's guard
    dropped the second's result (or its first chunk, which stopped it)."""
    spawn_worker()
    client = aioredis.Redis.from_url(redis_url)
    try:
        for streaming in (False, True):
            channel = f"test:legacy-again:{via}:{streaming}"
            legacy = {
                "event": "chat",
                "reply_channel": channel,
                "payload": {"messages": HI, "options": {"max_tokens": 3, "stream": streaming}},
            }
            for sends in (1, 2):
                data = orjson.dumps(legacy)
                if via == "pubsub":
                    await client.publish("orion:exec:request:LlamaCppHost:tiny", data)
                else:
                    await client.xadd("orion:stream:llamacpp:tiny:request", {"envelope": data})
                await wait_until_async(
                    lambda: len(recorder.on(channel)) >= sends,  # noqa: B023
                    timeout=20,
                    what=f"answer {sends}",
                )
            await asyncio.sleep(0.3)  # a third answer would arrive now
            answers = [m.message["payload"] for m in recorder.on(channel)]
            assert len(answers) == 2 and all("content" in a for a in answers), answers
            if streaming:
                assert recorder.on(channel + ":chunks"), "no chunks"
    finally:
        await client.aclose()


async def test_reply_to_is_kept_exactly_as_sent(
    spawn_worker: SpawnWorker, bus: BusClient, recorder: BusRecorder
) -> None:
    spawn_worker()
    reply_to = "test:padded-reply "  # the caller listens on this channel, blank included
    envelope = bus.request(HI, profile=PROFILE, options={"max_tokens": 3}, reply_to=reply_to)
    result = await bus.chat(HI, profile=PROFILE, envelope=envelope, timeout=30)
    assert result.ok, result.payload
    await asyncio.sleep(0.2)  # a second answer would be in by now
    assert len(recorder.on(reply_to)) == 1
    assert recorder.on(reply_to.strip()) == []


async def test_a_stream_channel_equal_to_reply_to_is_not_used(
    spawn_worker: SpawnWorker, bus: BusClient, recorder: BusRecorder
) -> None:
    spawn_worker()
    reply_to = "test:rpc-reply"
    envelope = bus.request(
        HI,
        profile=PROFILE,
        options={"stream": True, "stream_channel": reply_to, "max_tokens": 20},
        reply_to=reply_to,
    )
    result = await bus.chat(HI, profile=PROFILE, envelope=envelope, timeout=30)
    assert result.ok, result.payload
    await asyncio.sleep(0.2)  # a second message on reply_to would be in by now
    # Orion's rpc_request takes the first message on reply_to as the answer.
    assert [m.message["kind"] for m in recorder.on(reply_to)] == ["llm.chat.result"]
    chunks = [m.message["payload"] for m in recorder.on(reply_to + ":chunks")]
    assert "".join(c["delta"] for c in chunks) == result.payload["content"]
    assert result.streamed_text == result.payload["content"]


async def test_the_client_reads_chunks_on_the_stream_channel_it_asked_for(
    spawn_worker: SpawnWorker, bus: BusClient
) -> None:
    spawn_worker()
    deltas: list[str] = []
    result = await bus.chat(
        HI,
        profile=PROFILE,
        stream=True,
        options={"stream_channel": "test:client-chunks", "max_tokens": 12},
        on_delta=deltas.append,
        timeout=30,
    )
    assert result.ok, result.payload
    assert deltas and "".join(deltas) == result.payload["content"]
    assert result.streamed_text == result.payload["content"]


async def test_the_client_works_on_a_redis_that_decodes_responses(
    spawn_worker: SpawnWorker, redis_url: str
) -> None:
    spawn_worker()
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        async with BusClient(redis=redis) as bus:
            deltas: list[str] = []
            result = await bus.chat(
                HI,
                profile=PROFILE,
                stream=True,
                options={"max_tokens": 6},
                on_delta=deltas.append,
                timeout=30,
            )
    finally:
        await redis.aclose()
    assert result.ok, result.payload
    assert "".join(deltas) == result.payload["content"]


async def test_a_request_with_an_attachment_by_sha256_is_answered(
    spawn_worker: SpawnWorker, bus: BusClient
) -> None:
    """Images by sha256 reference cannot be fetched here (the contract names no store):
    the request is answered from its text, and the result says how many attachments
    were left out (``meta.attachments_ignored``), where it used to say nothing."""
    spawn_worker()
    envelope = bus.request(HI, profile=PROFILE, options={"max_tokens": 3})
    envelope["payload"]["attachments"] = [{"sha256": "ab" * 32}, {"sha256": "cd" * 32}]
    result = await bus.chat(HI, profile=PROFILE, envelope=envelope, timeout=30)
    assert result.ok, result.payload
    assert result.payload["usage"]["completion_tokens"] == 3
    assert result.payload["meta"]["attachments_ignored"] == 2
    plain = await bus.chat(HI, profile=PROFILE, options={"max_tokens": 3}, timeout=30)
    assert "attachments_ignored" not in plain.payload["meta"], plain.payload


def test_chat_asks_on_the_intake_channel_the_environment_names(
    spawn_worker: SpawnWorker, subprocess_env: dict, recorder: BusRecorder
) -> None:
    """``ORION_LLAMACPP_INTAKE_CHANNEL`` moves the worker's intake: ``chat`` (and
    ``demo``) with the same environment ask there. They used to ask on the default
    channel, where no worker listened. ``--profile`` naming another profile asks on
    that one's channel, not on the override (its worker would answer for the wrong
    model)."""
    custom = {"ORION_LLAMACPP_INTAKE_CHANNEL": "orion:custom:in"}
    spawn_worker(**custom)

    def chat(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "orion_llamaccp", "chat", "hi", *args],
            env={**subprocess_env, **custom},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    done = chat("--max-tokens", "3")
    assert done.returncode == 0, done.stderr
    assert "3 completion tokens" in done.stderr, done.stderr
    asked = len(recorder.on("orion:custom:in"))
    other = chat("--profile", "other", "--timeout", "2")  # the overrides are tiny's
    assert other.returncode == 1, other.stderr
    assert len(recorder.on("orion:exec:request:LlamaCppHost:other")) == 1
    assert len(recorder.on("orion:custom:in")) == asked


async def test_an_answer_that_lost_its_usage_is_whole_and_says_its_usage_is_estimated(
    spawn_worker: SpawnWorker, bus: BusClient, llama_server_bin
) -> None:
    """llama-server reached through a network that breaks right after an answer's finish
    event (``tests/support/cutting_launcher.py``: a proxy cuts answers to the marked
    requests there): the answer is whole, its usage the tokens relayed with the prompt's
    unknown (0), and ``meta.usage_estimated`` says so; an answer with llama-server's own
    usage has no such flag. No test looked at the flag: a worker that never set it, or
    set it on every answer, passed them all."""
    spawn_worker(
        LLAMA_SERVER_BIN=str(CUTTING_LAUNCHER),
        REAL_LLAMA_SERVER=str(llama_server_bin),
        ORION_LLAMACPP_ENGINE_UNIX_SOCKET="0",  # through the proxy on the port
    )
    options = {"max_tokens": 6, "seed": 3}
    whole = await bus.chat(HI, profile=PROFILE, options=options, timeout=30)
    cut_off = [{"role": "user", "content": "CUT-AFTER-FINISH hello"}]
    cut = await bus.chat(cut_off, profile=PROFILE, options=options, timeout=30)
    assert whole.ok and cut.ok, (whole.payload, cut.payload)
    assert "usage_estimated" not in whole.payload["meta"], whole.payload["meta"]
    assert whole.payload["usage"]["prompt_tokens"] > 0, whole.payload
    assert cut.payload["meta"]["usage_estimated"] is True, cut.payload["meta"]
    assert cut.payload["meta"]["finish_reason"] == "length"
    assert cut.payload["usage"] == {"prompt_tokens": 0, "completion_tokens": 6, "total_tokens": 6}
