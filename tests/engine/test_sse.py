"""llama-server's stream decoded, without a server: HTTP framing, SSE, the token fast path."""

from __future__ import annotations

import orjson
import pytest

from orion_llamaccp.engine.events import EventReader
from orion_llamaccp.engine.sse import (
    ChunkEvents,
    ProtocolError,
    ResponseDecoder,
    SSEDecoder,
    content_only,
    parse_chunk,
)
from orion_llamaccp.errors import UpstreamError

HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_chunked_body_split_anywhere_with_an_extension_and_trailers() -> None:
    wire = HEAD + b"5\r\nhello\r\n6;name=value\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n"
    for cut in range(len(HEAD), len(wire)):
        decoder = ResponseDecoder()
        body = decoder.feed(wire[:cut]) + decoder.feed(wire[cut:])
        assert (body, decoder.complete, decoder.status) == (b"hello world", True, 200)


def test_bad_chunk_size_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="bad chunk size"):
        ResponseDecoder().feed(HEAD + b"zz\r\nhello\r\n")


def test_sse_read_with_many_events_and_one_of_several_lines() -> None:
    decoder = SSEDecoder()
    plain = b"".join(b'data: {"n":%d}\n\n' % n for n in range(3))
    assert decoder.feed(plain) == [b'{"n":0}', b'{"n":1}', b'{"n":2}']
    mixed = plain + b"data: a\ndata: b\n\n: keep-alive\n\nevent: x\ndata: c\n\ndata: [DONE]\n\n"
    assert decoder.feed(mixed) == [
        b'{"n":0}',
        b'{"n":1}',
        b'{"n":2}',
        b"a\nb",
        b"c",
        b"[DONE]",
    ]


@pytest.mark.parametrize(
    "chunk",
    [
        {"content": 'a"}}],"created":1,"object":"chat.completion.chunk"}'},  # the markers
        {"content": 'back\\slash, "quotes", new\nline, tab\t, é, 😀'},
        {"content": "日本語 ✓"},
    ],
)
def test_token_fast_path_is_not_fooled_by_the_text(chunk: dict) -> None:
    data = orjson.dumps(
        {
            "choices": [{"finish_reason": None, "index": 0, "delta": chunk}],
            "created": 1,
            "id": "chatcmpl-x",
            "model": "m.gguf",
            "system_fingerprint": "b0",
            "object": "chat.completion.chunk",
        }
    )
    assert content_only(data) == chunk["content"] == parse_chunk(data).content
    escaped = data.replace(b"\xc3\xa9", b"\\u00e9").replace(b"\xf0\x9f\x98\x80", b"\\ud83d\\ude00")
    assert content_only(escaped) == chunk["content"] == parse_chunk(escaped).content


@pytest.mark.parametrize(
    "choice",
    [
        {"finish_reason": None, "index": 0, "delta": {"role": "assistant", "content": None}},
        {"finish_reason": None, "index": 0, "delta": {"content": ""}},
        {"finish_reason": None, "index": 0, "delta": {"reasoning_content": "hmm"}},
        {"finish_reason": "length", "index": 0, "delta": {}},
    ],
)
def test_token_fast_path_leaves_every_other_chunk_to_the_full_parse(choice: dict) -> None:
    data = orjson.dumps(
        {
            "choices": [choice],
            "created": 1,
            "id": "chatcmpl-x",
            "model": "m.gguf",
            "system_fingerprint": "b0",
            "object": "chat.completion.chunk",
        }
    )
    assert content_only(data) is None
    assert content_only(data[:-1] + b',"timings":{"predicted_n":1}}') is None


def test_event_reader_batches_a_read_and_stops_at_done() -> None:
    token = (
        b'{"choices":[{"finish_reason":null,"index":0,"delta":{"content":"hi"}}],"created":1,'
        b'"id":"c","model":"m","system_fingerprint":"b0","object":"chat.completion.chunk"}'
    )
    finish = b'{"choices":[{"finish_reason":"stop","index":0,"delta":{}}]}'
    reader = EventReader()
    batch = reader.take([token, token, finish, b"[DONE]", token])
    assert batch[:2] == ["hi", "hi"]
    assert isinstance(batch[2], ChunkEvents) and batch[2].finish_reason == "stop"
    assert len(batch) == 3 and reader.done and reader.finished
    with pytest.raises(UpstreamError, match="without a finish reason"):
        EventReader().take([token, b"[DONE]"])
    with pytest.raises(UpstreamError, match="ended without a finish reason"):
        EventReader().end([token])
    with pytest.raises(UpstreamError, match="mid-stream"):
        EventReader().take([b'{"error":{"code":500,"message":"boom"}}'])
