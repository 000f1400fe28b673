"""The reference client (``BusClient``) against a real Redis.

Where the behaviour under test is the client's own (how it reads chunks, when it gives
up), the worker's side is played by a subscriber on the intake channel that publishes
the chunks and the result a worker would: a stand-in for the worker, not for Redis.
The tests with a real worker are in ``test_roundtrip.py`` and ``test_errors.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import orjson
import pytest
import redis
import redis.asyncio as aioredis

from orion_llamaccp.bus import keys
from orion_llamaccp.bus.codec import decode_envelope
from orion_llamaccp.bus.envelope import CHAT_CHUNK, CHAT_RESULT, ServiceRef
from orion_llamaccp.bus.failover import says_replica
from orion_llamaccp.bus.outbox import Outbox
from orion_llamaccp.client import TTL_MARGIN_SEC, BusClient, ChunkAssembler
from orion_llamaccp.errors import NoWorker
from tests.bus.conftest import SpawnWorker
from tests.support.procs import RedisServer, free_port, replica_of, wait_until_async
from tests.support.proxy import HoldingProxy
from tests.support.workers import BusRecorder, WorkerProc

HI = [{"role": "user", "content": "hello there"}]
PROFILE = "tiny"
Reply = Callable[[dict, aioredis.Redis], Awaitable[None]]


@contextlib.asynccontextmanager
async def standing_in(redis_url: str, reply: Reply) -> AsyncIterator[None]:
    """A subscriber on the tiny profile's intake that answers each request with ``reply``."""
    redis = aioredis.Redis.from_url(redis_url)
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(keys.intake_channel(PROFILE))

    async def serve() -> None:
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if message is not None:
                await reply(orjson.loads(message["data"]), redis)

    try:
        async with _in_the_background(serve()):
            yield
    finally:
        await pubsub.aclose()
        await redis.aclose()


@contextlib.asynccontextmanager
async def _in_the_background(work: Awaitable[None]) -> AsyncIterator[None]:
    task = asyncio.ensure_future(work)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


OUTBOX = Outbox(ServiceRef(name="stand-in"))


async def _chunk(redis: aioredis.Redis, channel: str, correlation: str, **payload: object) -> None:
    envelope = OUTBOX.envelope(CHAT_CHUNK, dict(payload), correlation_id=correlation)
    await redis.publish(channel, orjson.dumps(envelope))


async def test_a_retry_starts_the_answer_over_and_other_chunks_are_not_mixed_in_stand_in_worker(
    redis_url: str,
) -> None:
    """Chunks of attempt 1, then attempt 2 from its start (the worker retried after
    llama-server died): the caller is told of the restart, and the accepted chunks and
    text are attempt 2's alone (attempt 1's stayed in the list). A chunk of another
    request on the same ``stream_channel`` is not taken for this one's."""
    shared = "ui:session42:tokens"

    async def reply(request: dict, redis: aioredis.Redis) -> None:
        mine = request["correlation_id"]
        await _chunk(redis, shared, mine, seq=0, delta="Once", attempt=1)
        await _chunk(redis, shared, str(uuid.uuid4()), seq=1, delta=" else", attempt=1)
        await _chunk(redis, shared, mine, seq=1, delta=" upon", attempt=1)
        await _chunk(redis, shared, mine, seq=0, delta="Hello", attempt=2)
        await _chunk(redis, shared, mine, seq=1, delta=" there", attempt=2)
        result = OUTBOX.envelope(
            CHAT_RESULT, {"content": "Hello there"}, correlation_id=mine, reply_to=None
        )
        await redis.publish(request["reply_to"], orjson.dumps(result))

    deltas: list[str] = []
    restarts: list[int] = []
    async with standing_in(redis_url, reply), BusClient(redis_url) as bus:
        result = await bus.chat(
            HI,
            profile=PROFILE,
            stream=True,
            options={"stream_channel": shared},
            on_delta=deltas.append,
            on_restart=restarts.append,
            timeout=10,
        )
    assert deltas == ["Once", " upon", "Hello", " there"]
    assert restarts == [2]
    assert result.streamed_text == "Hello there" == result.content
    assert [(c["attempt"], c["seq"]) for c in result.chunks] == [(2, 0), (2, 1)]


async def _restarted(request: dict, redis: aioredis.Redis) -> None:
    """Attempt 1 streams a word, attempt 2 the answer from its start."""
    mine, chunks = request["correlation_id"], request["reply_to"] + ":chunks"
    await _chunk(redis, chunks, mine, seq=0, delta="Once upon", attempt=1)
    await _chunk(redis, chunks, mine, seq=0, delta="Hello", attempt=2)
    await _chunk(redis, chunks, mine, seq=1, delta=" there", attempt=2)
    payload = {"content": "Hello there", "meta": {"attempt": 2}}
    result = OUTBOX.envelope(CHAT_RESULT, payload, correlation_id=mine, reply_to=None)
    await redis.publish(request["reply_to"], orjson.dumps(result))


@pytest.mark.parametrize("reader", ["reads_it_all", "goes_away"])
async def test_chat_stream_to_a_pipe_never_splices_two_attempts_stand_in_worker(
    redis_url: str, subprocess_env: dict, reader: str
) -> None:
    """``chat --stream`` with its output piped: a retry that started the answer over left
    the first attempt's text in front of the answer ("Once uponHello there", exit status
    0). Text written cannot be taken back: the command now fails, saying why. A reader
    that goes away (``| head``) ends it quietly, not with a traceback."""
    gone, stdout = os.pipe() if reader == "goes_away" else (-1, asyncio.subprocess.PIPE)
    if gone >= 0:
        os.close(gone)  # the reader, gone before the first byte
    async with standing_in(redis_url, _restarted):
        chat = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "orion_llamaccp", "chat", "hi", "--stream"),
            *("--profile", PROFILE, "--timeout", "20"),
            env=subprocess_env,
            stdout=stdout,
            stderr=asyncio.subprocess.PIPE,
        )
        if gone >= 0:
            os.close(stdout)
        out, err = await asyncio.wait_for(chat.communicate(), 60)
    assert chat.returncode == 1, err.decode()
    assert "Traceback" not in err.decode(), err.decode()
    if reader == "reads_it_all":
        assert out.decode() == "Once uponHello there"  # as it came: nothing appended
        assert "the output is not the answer; ask again" in err.decode(), err.decode()


async def test_chat_stream_to_a_terminal_shows_the_retry_once_stand_in_worker(
    redis_url: str, subprocess_env: dict
) -> None:
    """On a terminal the retry is shown as it happens (attempt 2's text after a line
    saying so), and the answer is not printed a second time: it was, with "the text above
    was not the answer's", after every retry."""
    leader, follower = pty.openpty()
    async with standing_in(redis_url, _restarted):
        chat = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "orion_llamaccp", "chat", "hi", "--stream"),
            *("--profile", PROFILE, "--timeout", "20"),
            env=subprocess_env,
            stdout=follower,
            stderr=asyncio.subprocess.PIPE,
        )
        os.close(follower)
        _, err = await asyncio.wait_for(chat.communicate(), 60)
    screen = b""
    with contextlib.suppress(OSError):  # EIO: the terminal's other end closed, all read
        while chunk := os.read(leader, 4096):
            screen += chunk
    os.close(leader)
    assert chat.returncode == 0, err.decode()
    assert screen.decode() == "Once uponHello there\r\n", screen  # a tty's newline
    assert "attempt 2 starts the answer over" in err.decode()
    assert "not the answer's" not in err.decode(), err.decode()


async def _answered(request: dict, redis: aioredis.Redis) -> None:
    """The answer in two chunks, its last without a newline (as a model's most often is)."""
    mine, chunks = request["correlation_id"], request["reply_to"] + ":chunks"
    await _chunk(redis, chunks, mine, seq=0, delta="Hello", attempt=1)
    await _chunk(redis, chunks, mine, seq=1, delta=" there", attempt=1)
    result = OUTBOX.envelope(
        CHAT_RESULT, {"content": "Hello there"}, correlation_id=mine, reply_to=None
    )
    await redis.publish(request["reply_to"], orjson.dumps(result))


@pytest.mark.parametrize("args", [(), ("--stream",)], ids=["whole", "streamed"])
async def test_chat_ends_the_answer_with_a_newline_stand_in_worker(
    redis_url: str, subprocess_env: dict, args: tuple[str, ...]
) -> None:
    """The answer was written without a final newline: the shell's prompt came right
    after its last word, and ``chat ... >> answers.txt`` ran two answers into one line."""
    async with standing_in(redis_url, _answered):
        chat = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "orion_llamaccp", "chat", "hi", *args),
            *("--profile", PROFILE, "--timeout", "20"),
            env=subprocess_env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(chat.communicate(), 60)
    assert chat.returncode == 0, err.decode()
    assert out.decode() == "Hello there\n"
    assert err.decode().startswith("--- "), err.decode()  # the newline is stdout's now


async def test_chunks_of_another_attempt_than_the_answer_s_are_not_its_text_stand_in_worker(
    redis_url: str,
) -> None:
    """Attempt 1 streamed part of an answer, the worker retried, and attempt 2 answered
    without a chunk: the client gave attempt 1's text as the answer's streamed text (and
    ``chat --stream`` left it on the screen as the answer). A message that is not an
    envelope on a ``stream_channel`` shared with others ended the call with a decode
    error, and no cancel went out."""
    shared = "ui:session7:tokens"

    async def reply(request: dict, redis: aioredis.Redis) -> None:
        mine = request["correlation_id"]
        await _chunk(redis, shared, mine, seq=0, delta="Once", attempt=1)
        await redis.publish(shared, b"not an envelope")  # anyone's, on a shared channel
        payload = {"content": "", "meta": {"attempt": 2}}
        result = OUTBOX.envelope(CHAT_RESULT, payload, correlation_id=mine, reply_to=None)
        await redis.publish(request["reply_to"], orjson.dumps(result))

    async with standing_in(redis_url, reply), BusClient(redis_url) as bus:
        result = await bus.chat(
            HI, profile=PROFILE, stream=True, options={"stream_channel": shared}, timeout=10
        )
    assert result.ok and result.content == ""
    assert (result.streamed_text, result.chunks) == ("", [])


async def test_chunks_of_a_sibling_request_of_one_correlation_id_are_not_mixed_stand_in_worker(
    redis_url: str,
) -> None:
    """Two requests of one flow share its correlation id and one ``stream_channel``: the
    chunks of each are told apart by the request their causality chain links to. The
    client took the sibling's chunks for its own, and its streamed text mixed both."""
    shared = "ui:flow9:tokens"

    async def reply(request: dict, redis: aioredis.Redis) -> None:
        mine = decode_envelope(orjson.dumps(request))
        sibling = mine.model_copy(update={"created_at": mine.created_at - timedelta(seconds=1)})
        sent = ((mine, 0, "Hello"), (sibling, 0, "Bye"), (sibling, 1, " now"), (mine, 1, " there"))
        for whose, seq, delta in sent:  # the sibling's seq 1 first: taken, ours was dropped
            payload = {"seq": seq, "delta": delta, "attempt": 1}
            chunk = OUTBOX.envelope(CHAT_CHUNK, payload, request=whose)
            await redis.publish(shared, orjson.dumps(chunk))
        result = OUTBOX.envelope(CHAT_RESULT, {"content": "Hello there"}, request=mine)
        await redis.publish(request["reply_to"], orjson.dumps(result))

    async with standing_in(redis_url, reply), BusClient(redis_url) as bus:
        result = await bus.chat(
            HI, profile=PROFILE, stream=True, options={"stream_channel": shared}, timeout=10
        )
    assert result.streamed_text == "Hello there" == result.content, result.streamed_text


async def test_a_late_answer_on_a_reused_reply_to_is_not_taken_for_the_next_stand_in_worker(
    redis_url: str,
) -> None:
    """A caller's own ``reply_to`` used for one request after another: the first timed
    out, and its answer, late, came while the second waited, which took it for its own
    (the first message on ``reply_to`` was the answer, whoever's it was)."""
    inbox = f"svc:inbox:{uuid.uuid4()}"

    async def late(request: dict, redis: aioredis.Redis) -> None:
        await asyncio.sleep(1.0)
        content = f"the answer to {request['correlation_id']}"
        asked = decode_envelope(orjson.dumps(request))
        result = OUTBOX.envelope(CHAT_RESULT, {"content": content}, request=asked)
        await redis.publish(request["reply_to"], orjson.dumps(result))

    async with standing_in(redis_url, late), BusClient(redis_url) as bus:
        first = bus.request(HI, profile=PROFILE, reply_to=inbox)
        with pytest.raises(TimeoutError):
            await bus.chat(HI, profile=PROFILE, envelope=first, timeout=0.5)
        second = bus.request(HI, profile=PROFILE, reply_to=inbox)
        result = await bus.chat(HI, profile=PROFILE, envelope=second, timeout=10)
    assert result.content == f"the answer to {second['correlation_id']}", result.content


async def test_a_request_too_big_to_decode_gets_its_error_at_once(
    spawn_worker: SpawnWorker, bus: BusClient
) -> None:
    """The answer to a request the worker cannot decode links a request of its own making
    (it could not read the real one): matched to its request by the causality chain, it
    was taken for another's, and the caller waited out its whole timeout."""
    spawn_worker(ORION_LLAMACPP_MAX_MESSAGE_BYTES="2000")
    big = [{"role": "user", "content": "x" * 4000}]
    result = await asyncio.wait_for(bus.chat(big, profile=PROFILE, timeout=60), 30)
    assert result.payload["error"] == "validation_failed", result.payload
    assert "exceeds the limit of 2000" in result.payload["details"]["message"]


async def test_a_pub_sub_request_no_worker_hears_fails_at_once(redis_url: str) -> None:
    """A profile nobody serves (a typo): ``NoWorker`` at once, naming the channel, where
    the caller used to wait out its whole timeout (300 s by default)."""
    async with BusClient(redis_url) as bus:
        with pytest.raises(NoWorker, match="LlamaCppHost:tyni"):
            await asyncio.wait_for(bus.chat(HI, profile="tyni", timeout=300), 5)


async def test_a_request_only_a_pattern_subscriber_hears_fails_at_once(redis_url: str) -> None:
    """A bus monitor subscribed to ``orion:*`` hears every request: it counted as a
    receiver, so a request no worker serves waited out the caller's timeout."""
    monitor = aioredis.Redis.from_url(redis_url)
    watching = monitor.pubsub()
    await watching.psubscribe("orion:*")
    try:
        async with BusClient(redis_url) as bus:
            with pytest.raises(NoWorker, match="LlamaCppHost:tyni"):
                await asyncio.wait_for(bus.chat(HI, profile="tyni", timeout=300), 5)
    finally:
        await watching.aclose()
        await monitor.aclose()


@contextlib.asynccontextmanager
async def _reading_the_stream(redis_url: str, reply: Reply) -> AsyncIterator[None]:
    """A reader of the tiny profile's intake stream that answers each entry with
    ``reply`` (a plain XREAD from its start: no group)."""
    redis = aioredis.Redis.from_url(redis_url)
    stream = keys.intake_stream(PROFILE)

    async def serve() -> None:
        last: bytes | str = "0-0"
        while True:
            for _, entries in await redis.xread({stream: last}, block=1000) or []:
                for entry_id, fields in entries:
                    last = entry_id
                    await reply(orjson.loads(fields[b"envelope"]), redis)

    try:
        async with _in_the_background(serve()):
            yield
    finally:
        await redis.aclose()


def _answering(heard: list[dict]) -> Reply:
    async def reply(request: dict, redis: aioredis.Redis) -> None:
        heard.append(request)
        answer = OUTBOX.envelope(
            CHAT_RESULT, {"content": "hi"}, correlation_id=request["correlation_id"], reply_to=None
        )
        await redis.publish(request["reply_to"], orjson.dumps(answer))

    return reply


async def _fail_over(proxy: HoldingProxy, old: RedisServer, new: RedisServer) -> None:
    """What a managed Redis does: ``new``, a replica of ``old``, is promoted, ``old`` is
    demoted under it, and the address moves; connections already open stay with ``old``."""
    promoted, demoted = aioredis.Redis.from_url(new.url), aioredis.Redis.from_url(old.url)
    try:
        await promoted.replicaof("NO", "ONE")
        await replica_of(demoted, new)
        proxy.upstream_port = new.port
    finally:
        await promoted.aclose()
        await demoted.aclose()


async def test_a_client_follows_a_failover_behind_its_address_stand_in_worker(
    tmp_path: Path,
) -> None:
    """A failover behind the address: the client's idle connections still led to the old
    primary, now a replica, until the process restarted. A chat's PUBLISH there counted
    no subscriber (``NoWorker``): one that no one heard on a replica now goes out once
    more on new connections (and is heard once; a request no worker hears is published
    once: ``test_chat_asks_on_the_intake_channel_the_environment_names``). An XADD there
    was refused (``READONLY``) at every call: the refusal now closes every connection,
    and the chat sends again on new ones.
    Back and forth: a failover for each."""
    first, second = (RedisServer(tmp_path / name).start() for name in ("first", "second"))
    proxy = HoldingProxy(first.port).start()
    heard: list[dict] = []
    try:
        follower = aioredis.Redis.from_url(second.url)
        await replica_of(follower, first)
        await follower.aclose()
        async with BusClient(proxy.url) as bus:
            async with standing_in(first.url, _answering(heard)):
                assert (await bus.chat(HI, profile=PROFILE, timeout=10)).ok
            await _fail_over(proxy, first, second)
            async with standing_in(second.url, _answering(heard)):  # its PUBLISH's connection
                asked = await bus.chat(HI, profile=PROFILE, timeout=10)
            assert asked.content == "hi" and len(heard) == 2, heard

            await asyncio.gather(*(bus.redis.ping() for _ in range(3)))  # idle, to `second`
            await _fail_over(proxy, second, first)
            async with _reading_the_stream(first.url, _answering(heard)):  # its XADD's
                asked = await bus.chat(HI, profile=PROFILE, via="stream", timeout=10)
            assert asked.content == "hi" and len(heard) == 3, heard
    finally:
        proxy.close()
        first.stop()
        second.stop()


async def test_the_timeout_bounds_a_redis_that_answers_nothing(tmp_path: Path) -> None:
    """A frozen Redis (SIGSTOP) accepts the connection and answers nothing: the call ends
    at its timeout. Subscribing and publishing used to run outside it, for ever."""
    server = RedisServer(tmp_path / "frozen").start()
    try:
        async with BusClient(server.url) as bus:
            await bus.redis.ping()  # connected before the freeze
            server.freeze()
            call = asyncio.create_task(bus.chat(HI, profile=PROFILE, timeout=1))
            done, _ = await asyncio.wait({call}, timeout=20)  # else it hangs: cut short
            call.cancel()
            server.thaw()
            assert call in done, "the call outlived its timeout"
            assert isinstance(call.exception(), TimeoutError), call.exception()
    finally:
        server.stop()


def test_the_assembler_takes_the_next_seq_of_the_newest_attempt_only() -> None:
    """A gap (``seq`` 2 after 0: a chunk lost) is not text: deltas with holes went to
    ``on_delta`` (no test held the assembler to its order)."""
    assembler = ChunkAssembler()
    assert assembler.add({"attempt": 1, "seq": 0, "delta": "Once"}) == "Once"
    assert assembler.add({"attempt": 1, "seq": 2, "delta": " lost"}) is None  # a gap
    assert assembler.add({"attempt": 1, "seq": 0, "delta": "Once"}) is None  # a repeat
    assert assembler.add({"attempt": 1, "seq": 1, "delta": " upon"}) == " upon"
    assert assembler.add({"attempt": 2, "seq": 0, "delta": "Hi"}) == "Hi"  # started over
    assert assembler.add({"attempt": 1, "seq": 2, "delta": " a"}) is None  # the old one's
    assert (assembler.text, assembler.attempt) == ("Hi", 2)


def _pipe_closed(delta: str) -> None:
    raise BrokenPipeError(32, "Broken pipe")


GIVING_UP = {
    "timeout": TimeoutError,
    "cancel": asyncio.CancelledError,
    "on_delta_raises": BrokenPipeError,
}


@pytest.mark.parametrize("how", list(GIVING_UP))
async def test_a_caller_that_gives_up_cancels_its_request(
    spawn_worker: SpawnWorker, recorder: BusRecorder, redis_url: str, how: str
) -> None:
    """A caller whose timeout passes, who is cancelled (Ctrl-C), or whose ``on_delta``
    raises (``chat --stream | head``: a closed pipe) cancels the request: the worker
    stops generating, and answers ``cancelled`` to no one in particular. It used to
    generate on for nobody, holding a slot (for the last, it still did)."""
    spawn_worker(slow=True, parallel=1)
    long = {"max_tokens": 6000, "ignore_eos": True}
    async with BusClient(redis_url) as bus:
        envelope = bus.request(HI, profile=PROFILE, options={**long, "stream": True})
        call = asyncio.create_task(
            bus.chat(
                HI,
                profile=PROFILE,
                envelope=envelope,  # its own correlation id: cancelling it is safe
                cancel_on_give_up=True,
                timeout=2 if how == "timeout" else 60,
                on_delta=_pipe_closed if how == "on_delta_raises" else None,
            )
        )
        chunks = envelope["reply_to"] + ":chunks"
        while not recorder.on(chunks):
            await asyncio.sleep(0.05)
        if how == "cancel":
            call.cancel()
        with pytest.raises(GIVING_UP[how]):
            await call
        for _ in range(200):
            if recorder.on(envelope["reply_to"]):
                break
            await asyncio.sleep(0.05)
    answer = recorder.on(envelope["reply_to"])[0].message["payload"]
    assert answer["error"] == "cancelled", answer


async def test_a_stream_request_given_up_before_a_worker_came_is_not_generated_later(
    spawn_worker: SpawnWorker, bus: BusClient, recorder: BusRecorder
) -> None:
    """``chat --via stream`` with no worker running times out; its entry waits in the
    stream, and the cancel sent on giving up reaches no one. The worker that came eleven
    minutes later (in the review) generated it for no one. The request lives as long as
    its caller waits (``ttl_ms``) now: it is answered ``expired``, not generated."""
    with pytest.raises(TimeoutError):
        await bus.chat(HI, profile=PROFILE, via="stream", options={"max_tokens": 2}, timeout=1)
    await asyncio.sleep(1.1 + TTL_MARGIN_SEC)  # past its life, as the minutes in the review
    spawn_worker()
    await wait_until_async(
        lambda: [m for m in recorder.from_service() if b"llm.chat.result" in m.data],
        timeout=30,
        what="the entry answered",
    )
    [answer] = [m.message for m in recorder.from_service() if b"llm.chat.result" in m.data]
    assert answer["payload"].get("error") == "expired", answer["payload"]
    assert "not generated" in answer["payload"]["details"]["message"]


async def test_a_caller_s_own_correlation_id_is_cancelled_only_when_asked_stand_in_worker(
    redis_url: str,
) -> None:
    """Given up on (its timeout), a call cancels the request it made itself; one sent with
    the caller's envelope (whose correlation id a whole flow may share) is cancelled only
    with ``cancel_on_give_up=True``."""

    async def silent(request: dict, redis: aioredis.Redis) -> None:
        return None

    async with standing_in(redis_url, silent), BusClient(redis_url) as bus:
        cancels = bus.redis.pubsub(ignore_subscribe_messages=True)
        await cancels.subscribe("orion:llamacpp:cancel")

        async def cancelled(**chat: object) -> list[str]:
            with pytest.raises(TimeoutError):
                await bus.chat(HI, profile=PROFILE, timeout=0.5, **chat)  # type: ignore[arg-type]
            heard = []
            while (message := await cancels.get_message(timeout=0.5)) is not None:
                heard.append(orjson.loads(message["data"])["payload"]["correlation_id"])
            return heard

        flow = bus.request(HI, profile=PROFILE)
        assert await cancelled(envelope=flow) == []
        assert await cancelled(envelope=flow, cancel_on_give_up=True) == [flow["correlation_id"]]
        assert len(await cancelled()) == 1  # its own envelope
        await cancels.aclose()


async def test_a_caller_whose_send_times_out_cancels_what_may_have_landed(
    spawn_worker: SpawnWorker, recorder: BusRecorder, redis_server: RedisServer
) -> None:
    """A request's PUBLISH may reach Redis while its reply does not reach the caller (a
    slow link; a Redis that froze after it ran the command): the call that timed out
    there sent no cancel, and the worker generated on for no one, holding its slot."""
    spawn_worker(slow=True, parallel=1)
    proxy = HoldingProxy(redis_server.port).start()
    try:
        async with BusClient(proxy.url) as bus:
            long = {"max_tokens": 6000, "ignore_eos": True, "stream": True}
            envelope = bus.request(HI, profile=PROFILE, options=long)
            proxy.arm(keys.intake_channel(PROFILE).encode())  # the PUBLISH's reply held
            with pytest.raises(TimeoutError):
                await bus.chat(
                    HI, profile=PROFILE, envelope=envelope, cancel_on_give_up=True, timeout=3
                )
            assert proxy.held == 1
            proxy.release()
        answers = await wait_until_async(
            lambda: recorder.on(envelope["reply_to"]), timeout=20, what="the answer"
        )
    finally:
        proxy.close()
    assert answers[0].message["payload"]["error"] == "cancelled", answers[0].message


def test_a_request_the_contract_would_reject_is_refused_by_the_client() -> None:
    """A caller's own correlation id that is not a UUID went out as given: Orion's decoder
    rejects the message (and the worker answers it only as a validation failure), so
    the caller waited for a reply it would not understand. Refused before it is sent,
    as a ``ttl_ms`` that is not a whole number is; a UUID in another spelling is kept,
    in its canonical one."""
    client = BusClient("redis://127.0.0.1:1/0")  # nothing is sent: no Redis needed
    with pytest.raises(ValueError, match="correlation_id must be a UUID"):
        client.request([{"role": "user", "content": "hi"}], correlation_id="order-42")
    with pytest.raises(ValueError, match="ttl_ms must be a whole number"):
        client.request([{"role": "user", "content": "hi"}], ttl_ms=1.5)  # type: ignore[arg-type]
    braced = "{12345678-1234-5678-1234-567812345678}"
    made = client.request([{"role": "user", "content": "hi"}], correlation_id=braced)
    assert made["correlation_id"] == "12345678-1234-5678-1234-567812345678"


async def test_what_the_client_sends_is_what_the_contract_allows(
    bus: BusClient, recorder: BusRecorder
) -> None:
    """The shipped client's requests, cancels and work-queue entries, checked by the same
    strict models as the worker's messages (the recorder checks only the worker's)."""
    from orion_llamaccp.client import work_queue_entry
    from tests.support.orion_contract import check_message
    from tests.support.procs import wait_until_async

    options = {"stream": True, "max_tokens": 3, "stream_channel": "test:chunks"}
    envelope = bus.request(
        [{"role": "user", "content": "hi"}], profile="tiny", options=options, ttl_ms=5000
    )
    check_message(orjson.dumps(envelope))
    entry = work_queue_entry(envelope)
    assert set(entry) == {
        "schema_version", "envelope", "enqueued_at_ms", "kind", "correlation_id",
        "reply_to", "source",
    }  # fmt: skip
    check_message(entry["envelope"])
    await bus.cancel(envelope["correlation_id"])
    [cancel] = await wait_until_async(
        lambda: recorder.on("orion:llamacpp:cancel"), timeout=5, what="the cancel"
    )
    assert check_message(cancel.data).kind == "llm.chat.cancel"


async def test_a_bus_user_denied_role_is_served_and_heard(
    tmp_path: Path, subprocess_env: dict
) -> None:
    """A managed Redis's ACL may deny ``ROLE`` (a user given the pub/sub and stream
    commands and no more). Both failover checks ask it (the worker's listener before it
    subscribes, the client's PUBLISH on the same connection): a denial counts as a
    primary, never as an error. Neither path was tested with a denial."""
    server = RedisServer(tmp_path / "acl").start()
    admin = aioredis.Redis.from_url(server.url)
    await admin.acl_setuser(
        "caller",
        enabled=True,
        passwords=["+not-role"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-role"],
    )
    await admin.aclose()
    user_url = f"redis://caller:not-role@127.0.0.1:{server.port}/0"
    env = {
        **subprocess_env,
        "ORION_BUS_URL": user_url,
        "LLAMACPP_PORT_OVERRIDE": str(free_port()),
        "HEARTBEAT_INTERVAL_SEC": "1",
    }
    worker = WorkerProc(env, name="acl", log_dir=tmp_path, redis_url=server.url).start()
    try:
        worker.wait_ready()
        async with BusClient(user_url) as bus:
            with pytest.raises(redis.exceptions.NoPermissionError):
                await bus.redis.execute_command("ROLE")  # the user really is denied it
            result = await bus.chat(HI, profile=PROFILE, options={"max_tokens": 2}, timeout=30)
        assert result.ok, result.payload
        assert result.payload["meta"]["transport"] == "pubsub"
    finally:
        worker.close()
        server.stop()
    assert "NOPERM" not in worker.log() and "Traceback" not in worker.log(), worker.log()[-2000:]


def test_role_replies_read_as_a_replica_only_where_they_name_one() -> None:
    """``ROLE``'s first element, as bytes or decoded; an error reply (an ACL's denial)
    or anything else counts as a primary: the check must never be a reason to stop."""
    assert says_replica([b"slave", b"10.0.0.1", 6379, b"connected", 1])
    assert says_replica(["replica-of-a-fork"])
    assert not says_replica([b"master", 0, []]) and not says_replica(["master", 0, []])
    denied = redis.exceptions.NoPermissionError("NOPERM this user has no permissions to ROLE")
    assert not says_replica(denied) and not says_replica(None) and not says_replica([])
