"""The HTTP client against the real llama-server: events, usage, cancellation, errors."""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import orjson
import pytest

from orion_llamaccp.engine.client import LlamaClient
from orion_llamaccp.engine.sse import (
    ChunkEvents,
    SSEDecoder,
    TokenLayout,
    content_only,
    parse_chunk,
)
from orion_llamaccp.engine.supervisor import Supervisor
from orion_llamaccp.errors import ContextExceeded, EngineUnavailable, UpstreamError
from tests.support.freeze import FrozenThread
from tests.support.procs import free_port, wait_until_async
from tests.support.proxy import InLoopServer
from tests.support.workers import EngineProbe

HELLO = [{"role": "user", "content": "hello there"}]
# A generation that is not cut off: LONG tokens exactly, in a slot of metered_engine
LONG = 1900
LONG_BODY = {"messages": HELLO, "max_tokens": LONG, "ignore_eos": True, "temperature": 0}


async def test_streamed_chat_is_parsed_into_events(ready_engine: Supervisor) -> None:
    async with ready_engine.client.chat_stream(
        {"messages": HELLO, "max_tokens": 12, "seed": 1, "temperature": 0}
    ) as stream:
        events = [e async for e in stream]
    assert events[0].role == "assistant"
    text = "".join(e.content for e in events)
    finishes = [e.finish_reason for e in events if e.finish_reason]
    assert finishes == ["length"]
    usage = next(e.usage for e in events if e.usage)
    assert usage["completion_tokens"] == 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + 12
    timings = next(e.timings for e in events if e.timings)
    assert timings["predicted_n"] == 12
    assert len(text) > 0


async def _busy_slots(engine: Supervisor) -> list[dict]:
    return [s for s in await engine.client.slots() if s.get("is_processing")]


async def test_leaving_the_stream_early_cancels_the_generation(
    metered_engine: Supervisor,
) -> None:
    """Leaving the block after five tokens closes the connection, and that stops
    llama-server: its own counter shows it generated far fewer than the ``LONG`` tokens an
    answer read to its end has (``ignore_eos``: exactly that many), cut-off tokens included.
    """
    body = {**LONG_BODY, "seed": 1}
    seen = 0
    async with EngineProbe(metered_engine.client.base_url) as probe:
        before = await probe.settled()
        async with metered_engine.client.chat_stream(body) as stream:
            async for event in stream:
                seen += bool(event.content)
                if seen == 5:
                    break
        decoded = await probe.settled() - before
    assert seen == 5
    assert seen <= decoded < LONG // 2, f"{decoded} tokens generated despite the cancel"


async def _spare_open(engine: Supervisor, count: int = 1) -> None:
    """Until ``count`` spare connections (at least) are open and none is still opening."""
    pool = engine.client._streams
    assert pool is not None
    await wait_until_async(
        lambda: pool._opening == 0 and sum(not c.closed for c in pool.idle) >= count,
        timeout=5,
        what=f"{count} spare connection(s) open",
    )


async def test_a_request_sent_ahead_is_read_by_chat_stream_like_any_other(
    ready_engine: Supervisor,
) -> None:
    """``send`` writes the request before the caller yields (the worker's first step puts
    it on the wire ahead of its Redis calls); ``chat_stream(sent=...)`` reads its answer."""
    client = ready_engine.client
    body = {"messages": HELLO, "max_tokens": 8, "seed": 1, "temperature": 0}
    async with client.chat_stream(body) as stream:
        plain = [e async for e in stream]
    await _spare_open(ready_engine)  # opened when that response ended
    sent = client.send(body)
    assert sent is not None
    assert sent.conn.active and sent.conn.transport is not None  # written, no await yet
    async with client.chat_stream(body, sent) as stream:
        ahead = [e async for e in stream]
    assert "".join(e.content for e in ahead) == "".join(e.content for e in plain)
    assert [e.finish_reason for e in ahead if e.finish_reason] == ["length"]
    assert client._streams is not None and client._streams.connects_waited <= 1


async def test_a_request_sent_ahead_and_never_read_stops_llama_server(
    metered_engine: Supervisor,
) -> None:
    """A generation cancelled before it read its answer (a duplicate found at once) must
    not leave llama-server generating for nobody: ``drop`` closes the connection, and
    llama-server's own counter shows it stopped far short of the ``LONG`` tokens asked."""
    client = metered_engine.client
    async with client.chat_stream({"messages": HELLO, "max_tokens": 2}) as stream:
        _ = [e async for e in stream]
    await _spare_open(metered_engine)
    async with EngineProbe(client.base_url) as probe:
        before = await probe.settled()
        sent = client.send({**LONG_BODY, "seed": 1})
        assert sent is not None
        await wait_until_async(lambda: _busy(metered_engine), timeout=5, what="generating")
        sent.drop()
        assert sent.conn.closed  # what tells llama-server to stop (see the test above)
        decoded = await probe.settled() - before
    assert decoded < LONG // 2, f"{decoded} tokens generated for a dropped request"
    async with client.chat_stream({"messages": HELLO, "max_tokens": 3}) as stream:
        assert [e async for e in stream]  # and the client goes on serving


async def _busy(engine: Supervisor) -> bool:
    return bool(await _busy_slots(engine))


async def test_prompt_longer_than_context_is_context_exceeded(ready_engine: Supervisor) -> None:
    messages = [{"role": "user", "content": "word " * 3000}]
    with pytest.raises(ContextExceeded) as err:
        async with ready_engine.client.chat_stream({"messages": messages}) as stream:
            async for _ in stream:
                pass
    assert err.value.retryable is False


async def test_server_killed_mid_stream_is_an_error_not_a_short_answer(
    ready_engine: Supervisor,
) -> None:
    body = {"messages": HELLO, "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
    pid = ready_engine.pid
    assert pid is not None
    killed = False
    with pytest.raises(UpstreamError):
        async with ready_engine.client.chat_stream(body) as stream:
            async for event in stream:
                if event.content and not killed:
                    killed = True
                    os.kill(pid, signal.SIGKILL)
    assert killed


def test_sse_decoder_handles_split_chunks_comments_and_crlf() -> None:
    decoder = SSEDecoder()
    payload = b'data: {"choices":[{"delta":{"content":"a"},"finish_reason":null}]}'
    assert decoder.feed(b": keep-alive\n\n" + payload[:10]) == []
    assert decoder.feed(payload[10:] + b"\r\n\r\ndata: [DONE]\n\n") == [payload[6:], b"[DONE]"]
    assert parse_chunk(payload[6:]).content == "a"
    assert decoder.feed(b'data: {"x":1}') == []
    assert decoder.flush() == [b'{"x":1}']


def test_mid_stream_error_payload_is_typed() -> None:
    events = parse_chunk(b'{"error":{"code":500,"message":"boom","type":"server_error"}}')
    assert events.error == {"code": 500, "message": "boom", "type": "server_error"}


async def _raw_payloads(engine: Supervisor, body: dict) -> list[bytes]:
    decoder = SSEDecoder()
    payloads: list[bytes] = []
    async with httpx.AsyncClient(base_url=engine.client.base_url) as http:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            async for raw in response.aiter_raw():
                payloads += decoder.feed(raw)
    return payloads


async def test_token_fast_path_reads_real_llama_server_chunks_as_the_full_parse_does(
    ready_engine: Supervisor,
) -> None:
    """``content_only`` relies on llama-server's layout of a token's chunk: if a new
    llama-server writes it differently, this fails instead of the fast path going quiet."""
    body = {"messages": HELLO, "max_tokens": 24, "temperature": 0, "seed": 3}
    plain = await _raw_payloads(ready_engine, body)
    timed = await _raw_payloads(ready_engine, {**body, "timings_per_token": True})
    assert plain[-1] == timed[-1] == b"[DONE]"
    for data in plain[:-1] + timed[:-1]:
        text = content_only(data)
        if text is not None:
            assert parse_chunk(data) == ChunkEvents(content=text)
    plain_tokens = [
        data
        for data in plain[:-1]
        if (event := parse_chunk(data)).content and event == ChunkEvents(content=event.content)
    ]
    assert len(plain_tokens) >= 10  # (a random model's token may decode to no text yet)
    assert [data for data in plain if content_only(data) is not None] == plain_tokens
    assert not [data for data in timed if content_only(data) is not None]  # all carry timings
    # ... and so does TokenLayout, which reads a run of them in one parse: the tokens of
    # one second (``created``) of the answer, learnt from any one of them
    by_second: dict[int, list[bytes]] = {}
    for data in plain_tokens:
        by_second.setdefault(orjson.loads(data)["created"], []).append(data)
    run = max(by_second.values(), key=len)
    layout = TokenLayout.learn(run[-1])
    assert layout is not None and len(run) >= 5
    texts = layout.texts(b"".join(b"data: %b\n\n" % data for data in run))
    assert texts == [parse_chunk(data).content for data in run]


async def test_requests_find_a_connection_opened_ahead(ready_engine: Supervisor) -> None:
    """llama-server closes the connection after each streamed response; only the first
    request of a worker may wait for a TCP connect, the others take a spare."""
    client = ready_engine.client
    pool = client._streams
    assert pool is not None
    for n in range(5):
        if n:
            await _spare_open(ready_engine)
        async with client.chat_stream({"messages": HELLO, "max_tokens": 3}) as stream:
            assert [e async for e in stream]
    assert pool.connects_waited <= 1
    assert pool.connects >= 5  # llama-server did close every streamed connection
    assert pool.server_closes  # ... and the pool learnt not to put them back


async def test_requests_that_arrive_together_each_find_a_connection_open(
    ready_engine: Supervisor,
) -> None:
    """One spare per slot not streaming: two requests written in the same step (what a
    worker does with two messages that arrived together) both go out at once, neither
    waits for a connect; and the connections open never exceed slots + 1."""
    client = ready_engine.client
    pool = client._streams
    assert pool is not None and pool.slots == 2  # learnt from /props
    body = {"messages": HELLO, "max_tokens": 4, "seed": 1, "temperature": 0}
    async with client.chat_stream(body) as stream:  # spares are opened as a response ends
        _ = [e async for e in stream]
    for _ in range(3):
        await _spare_open(ready_engine, count=2)
        assert sum(not c.closed for c in pool.idle) == 2
        waited = pool.connects_waited
        sent = [client.send(body), client.send(body)]
        assert all(s is not None for s in sent)
        assert pool.spares == 1 and pool._opening == 0  # none opened while they stream

        async def read(s: object) -> str:
            async with client.chat_stream(body, s) as stream:  # type: ignore[arg-type]
                return "".join([e.content async for e in stream])

        first, second = await asyncio.gather(*(read(s) for s in sent))
        assert first == second
        assert pool.connects_waited == waited
        assert sum(not c.closed for c in pool.idle) + pool._opening <= pool.slots + 1


async def test_a_request_llama_server_took_and_died_with_is_told_from_one_it_never_got(
    ready_engine: Supervisor,
) -> None:
    """``EngineUnavailable.reached``: whether the request may have been in llama-server
    when it went away (and may be why), which the worker counts per request. Its main
    thread stopped, llama-server takes the request but sends no head before it dies."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    pid = ready_engine.pid
    assert pid is not None
    with FrozenThread(pid):

        async def ask() -> None:
            async with ready_engine.client.chat_stream(body):
                pass

        asked = asyncio.create_task(ask())
        await asyncio.sleep(0.3)
        assert not asked.done()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(EngineUnavailable) as took:
            await asked
    assert took.value.reached, took.value
    async with LlamaClient(f"http://127.0.0.1:{free_port()}") as nobody:
        with pytest.raises(EngineUnavailable) as never:
            async with nobody.chat_stream(body):
                pass
    assert not never.value.reached, never.value


class _CuttingProxy(InLoopServer):
    """In front of llama-server: passes its answer through up to the first ``end`` after
    ``marker`` (``\\n\\n``: the event's end; ``\\n\\n\\r\\n``: its HTTP chunk's), then
    resets the connection, as a llama-server killed there would. Nothing real cuts an
    answer at an exact event."""

    def __init__(self, upstream_port: int, marker: bytes, end: bytes = b"\n\n\r\n") -> None:
        self.upstream_port, self.marker, self.end = upstream_port, marker, end
        self.cuts = 0

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def requests() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)

        pump = asyncio.create_task(requests())
        seen, sent = b"", 0
        try:
            while data := await up_reader.read(65536):
                seen += data
                at = seen.find(self.marker)
                end = seen.find(self.end, at) if at >= 0 else -1
                if end < 0:  # held back from the marker on, until the cut's place is read
                    stop = len(seen) if at < 0 else at
                    writer.write(seen[sent:stop])
                    sent = max(sent, stop)
                    continue
                writer.write(seen[sent : end + len(self.end)])
                await writer.drain()
                self.cuts += 1
                writer.transport.abort()
                return
        finally:
            pump.cancel()
            up_writer.close()


@pytest.mark.parametrize("cut", ["after-the-event", "after-its-http-chunk"])
@pytest.mark.parametrize("path", ["stream-pool", "httpx"])
async def test_an_answer_cut_after_its_finish_reason_is_whole_not_a_failure(
    ready_engine: Supervisor, path: str, cut: str
) -> None:
    """Cut after the finish event, only the usage (llama-server writes it in the same
    HTTP chunk) or just ``[DONE]`` is lost: the answer is whole, and calling it a failure
    would cost the request a second generation (and its caller every chunk twice). Cut
    after its first token, it is a failure (``broken``)."""
    body = {"messages": HELLO, "max_tokens": 12, "seed": 1, "temperature": 0}
    async with ready_engine.client.chat_stream(body) as stream:
        whole = [e async for e in stream]
    port = ready_engine.launch.port
    transport = httpx.AsyncHTTPTransport() if path == "httpx" else None
    end = b"\n\n" if cut == "after-the-event" else b"\n\n\r\n"
    proxy = _CuttingProxy(port, b'"finish_reason":"length"', end)
    async with (
        proxy as url,
        LlamaClient(url, transport=transport) as client,
        client.chat_stream(body) as stream,
    ):
        kept = [e async for e in stream]
    assert proxy.cuts == 1
    assert [e.finish_reason for e in kept if e.finish_reason] == ["length"]
    assert "".join(e.content for e in kept) == "".join(e.content for e in whole)
    # llama-server writes the finish and the usage events in one HTTP chunk
    assert any(e.usage for e in kept) == (cut == "after-its-http-chunk")

    before = _CuttingProxy(port, b'"content":"')
    async with before as url, LlamaClient(url, transport=transport) as client:
        with pytest.raises(UpstreamError) as broken:
            async with client.chat_stream(body) as stream:
                async for _ in stream:
                    pass
    assert before.cuts == 1 and broken.value.broken
