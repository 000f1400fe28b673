"""llama-server's stream decoded, without a server: HTTP framing, SSE, the token fast path."""

from __future__ import annotations

import random

import orjson
import pytest

from orion_llamaccp.engine import events
from orion_llamaccp.engine.events import EventReader
from orion_llamaccp.engine.http_errors import raise_for_response
from orion_llamaccp.engine.sse import (
    ChunkEvents,
    ProtocolError,
    ResponseDecoder,
    SSEDecoder,
    TokenLayout,
    content_only,
    events_of,
    lone_token,
    merge_tool_calls,
    parse_chunk,
)
from orion_llamaccp.errors import ContextExceeded, UpstreamError

HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
TEXTS = [
    " w",
    "x" * 300,  # longer than the bytes between two texts
    'a"}}],"created":1,"object":"chat.completion.chunk"}',
    "new\nline",
    "é😀",
    "\\",
]


def _chunk(delta: dict, finish: str | None = None, created: int = 1) -> bytes:
    """A chunk as llama-server lays it out."""
    return orjson.dumps(
        {
            "choices": [{"finish_reason": finish, "index": 0, "delta": delta}],
            "created": created,
            "id": "chatcmpl-x",
            "model": "m.gguf",
            "system_fingerprint": "b0",
            "object": "chat.completion.chunk",
        }
    )


def _run(*payloads: bytes) -> bytes:
    return b"".join(b"data: %b\n\n" % data for data in payloads)


def _flat(batch: list) -> list:
    """A batch with its runs of texts spelled out one text at a time."""
    return [item for entry in batch for item in (entry if isinstance(entry, list) else [entry])]


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
    assert batch[0] == ["hi", "hi"]  # consecutive tokens: one list of their texts
    assert isinstance(batch[1], ChunkEvents) and batch[1].finish_reason == "stop"
    assert len(batch) == 2 and reader.done and reader.finished
    with pytest.raises(UpstreamError, match="without a finish reason"):
        EventReader().take([token, b"[DONE]"])
    with pytest.raises(UpstreamError, match="ended without a finish reason"):
        EventReader().end([token])
    with pytest.raises(UpstreamError, match="mid-stream"):
        EventReader().take([b'{"error":{"code":500,"message":"boom"}}'])


def test_whole_chunks_read_in_one_split_decode_as_the_chunk_loop_does() -> None:
    """A read of whole chunks is unframed by one split (``_whole_chunks``); bodies whose
    data hold CRLFs and size-like lines must come out as the loop reads them, at any cut."""
    rng = random.Random(7)
    alphabet = [b"\r\n", b"\r", b"\n", b"0", b"a", b"f", b"1\r\n", b"data: x", b";"]
    for _ in range(300):
        datas = [
            b"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))
            for _ in range(rng.randint(1, 5))
        ]
        wire = HEAD + b"".join(b"%x\r\n%b\r\n" % (len(d), d) for d in datas) + b"0\r\n\r\n"
        cuts = sorted(rng.sample(range(len(HEAD), len(wire)), 3))
        decoder = ResponseDecoder()
        pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
        body = b"".join(decoder.feed(piece) for piece in pieces)
        assert (body, decoder.complete) == (b"".join(datas), True)


def test_llama_server_framing_cut_anywhere_decodes_whole() -> None:
    """Each event in its own chunk, as llama-server writes them: reads that end with a
    chunk, inside one, or with the last chunk take the one-split paths where they can."""
    events = [_run(_chunk({"content": text})) for text in TEXTS] + [_run(b"[DONE]")]
    chunks = b"".join(b"%x\r\n%b\r\n" % (len(event), event) for event in events)
    wire = HEAD + chunks + b"0\r\n\r\n"
    for cut in range(len(HEAD), len(wire)):
        for second_cut in (cut, (cut + len(wire)) // 2):
            decoder = ResponseDecoder()
            pieces = (wire[:cut], wire[cut:second_cut], wire[second_cut:])
            body = b"".join(decoder.feed(piece) for piece in pieces)
            assert (body, decoder.complete) == (b"".join(events), True)


def test_sse_runs_end_at_a_blank_line_and_keep_the_rest_for_the_next_read() -> None:
    decoder = SSEDecoder()
    assert decoder.feed_run(b"data: a\n\ndata: b") == b"data: a\n\n"
    assert decoder.feed_run(b"\r\n\r\ndata: c\n\n") == b"data: b\n\ndata: c\n\n"
    assert decoder.feed_run(b"data: d\n") == b""
    assert events_of(decoder.feed_run(b"\n")) == [b"d"]


def test_a_run_of_token_chunks_reads_in_one_parse_as_event_by_event() -> None:
    tokens = [_chunk({"content": text}) for text in TEXTS]
    layout = TokenLayout.learn(tokens[0])
    assert layout is not None
    assert layout.texts(_run(*tokens)) == TEXTS
    assert layout.texts(_run(tokens[1])) == TEXTS[1:2]
    escaped = _run(*tokens).replace(b"\xc3\xa9", b"\\u00e9")
    assert layout.texts(escaped) == TEXTS


@pytest.mark.parametrize(
    "odd",
    [
        _chunk({"role": "assistant", "content": None}),
        _chunk({"content": ""}),
        _chunk({}, "stop"),
        _chunk({"content": "x"}, created=2),  # llama-server's clock ticked
        _chunk({"content": "x"})[:-1] + b',"timings":{"predicted_n":1}}',
        b"[DONE]",
    ],
)
def test_a_run_with_any_other_event_is_read_event_by_event(odd: bytes) -> None:
    tokens = [_chunk({"content": text}) for text in TEXTS]
    layout = TokenLayout.learn(tokens[0])
    assert layout is not None
    for at in (0, 2, len(tokens)):
        run = _run(*tokens[:at], odd, *tokens[at:])
        assert layout.texts(run) is None
        whole = _outcome("take_runs", [_run(tokens[0]), run])
        by_event = _outcome("take", [tokens[0], *events_of(run)])
        assert whole == by_event


def _raw_token(text: bytes) -> bytes:
    """A token chunk whose text is ``text`` as it stands: escaped or not, valid or not."""
    return _chunk({"content": "@"}).replace(b'"@"', b'"%b"' % text)


def test_malformed_texts_that_parse_together_are_read_event_by_event() -> None:
    """Two texts whose events are not JSON (an escaped closing quote, then unescaped
    quotes) still make a two-string array when joined (``["\\",","a"]``): the run must
    fail as reading its events one by one fails, not yield ``['",', 'a']``."""
    first = _chunk({"content": "ok"})
    layout = TokenLayout.learn(first)
    assert layout is not None
    run = _run(_raw_token(b"\\"), _raw_token(b',"a'))
    assert layout.texts(run) is None
    by_event = _outcome("take", [first, *events_of(run)])
    assert by_event[0] == "raised"
    assert _outcome("take_runs", [_run(first), run]) == by_event


def test_a_run_of_token_chunks_never_reads_other_texts_than_event_by_event() -> None:
    """Texts made of quotes, backslashes, commas and escapes, valid JSON or not: the
    one-parse read gives up (None) or gives exactly what reading each event gives."""
    rng = random.Random(11)
    pieces = [b"a", b"\\", b'"', b",", b" ", b"\\u0022", b'\\"', b"]", b"\\n"]
    layout = TokenLayout.learn(_chunk({"content": "ok"}))
    assert layout is not None
    one_parse = 0
    for _ in range(20000):
        texts = [
            b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 4)))
            for _ in range(rng.randint(2, 4))
        ]
        run = _run(*map(_raw_token, texts))
        read = layout.texts(run)
        if read is None:
            continue
        one_parse += 1
        assert read == [content_only(data) for data in events_of(run)], texts
    assert one_parse > 1000  # the search reached the one-parse path, not only refusals


def _opened() -> tuple[ResponseDecoder, SSEDecoder]:
    decoder = ResponseDecoder()
    assert decoder.feed(HEAD) == b""
    return decoder, SSEDecoder()


def _long_way(read: bytes, decoder: ResponseDecoder, sse: SSEDecoder, layout: TokenLayout) -> tuple:
    """What the framing, the SSE runs and the layout make of ``read``, and what they
    hold over for the next read."""
    try:
        texts = layout.texts(sse.feed_run(decoder.feed(read)))
    except ProtocolError:
        texts = "protocol error"
    return texts, decoder._buffer, decoder._mode, sse._buffer


def test_a_lone_token_chunk_reads_as_the_framing_and_the_runs_read_it() -> None:
    """``lone_token``, the read of one chunk holding one token (a GPU's pace): given reads
    that are such a chunk or nearly (texts of quotes, backslashes, escapes and line
    breaks; a size line off by one, in capitals, with an extension; two events in one
    chunk; a chunk cut short or with the next one's start; a chunk of another layout, or
    of another head with the same tail; bytes held over from the read before), it gives
    up (None, nothing changed) or reads exactly the one text the long way reads."""
    rng = random.Random(13)
    pieces = [b"a", b"\\", b'"', b",", b" ", b"\\u0022", b'\\"', b"\\n", b"\n", b"\r\n", b"\n\n"]
    layout = TokenLayout.learn(_chunk({"content": "ok"}))
    assert layout is not None
    ticked = _chunk({"content": "x"}, created=2)
    read_alone = 0
    for _ in range(20000):
        text = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 4)))
        event = _run(_raw_token(text))
        if rng.random() < 0.1:
            event += _run(_raw_token(rng.choice(pieces)))  # two in one chunk
        if rng.random() < 0.1:  # another layout; a finish as long as null, the same tail
            event = _run(rng.choice((ticked, _chunk({"content": "x"}, "ab"))))
        size = len(event) + (rng.choice((-1, 1)) if rng.random() < 0.1 else 0)
        line = rng.choice((b"%x", b"%X", b"%x;ext=1")) % size
        read = b"%b\r\n%b\r\n" % (line, event)
        if rng.random() < 0.1:
            read = rng.choice((read[: rng.randrange(len(read))], read + b"5\r\nda"))
        decoder, sse = _opened()
        if rng.random() < 0.1:  # held over: part of a chunk, or of an event
            sse.feed_run(decoder.feed(rng.choice((b"1a\r\ndata: ", b"6\r\ndata: \r\n"))))
        before = (decoder._buffer, decoder._mode, sse._buffer)
        text_read = lone_token(read, decoder, sse, layout)
        if text_read is None:
            assert (decoder._buffer, decoder._mode, sse._buffer) == before
            continue
        read_alone += 1
        assert _long_way(read, decoder, sse, layout) == ([text_read], b"", before[1], b""), read
    assert read_alone > 1000  # the search reached the read, not only refusals


def test_a_token_as_llama_server_sends_it_is_read_alone() -> None:
    decoder, sse = _opened()
    layout = TokenLayout.learn(_chunk({"content": "ok"}))
    assert layout is not None
    for text in TEXTS:
        event = _run(_chunk({"content": text}))
        read = b"%x\r\n%b\r\n" % (len(event), event)
        assert lone_token(read, decoder, sse, layout) == text
    empty = _run(_chunk({"content": ""}))  # not a token: its read goes the long way
    assert lone_token(b"%x\r\n%b\r\n" % (len(empty), empty), decoder, sse, layout) is None


def _framed(events: list[bytes]) -> bytes:
    """``events`` as llama-server sends them: each its own chunk, then the last chunk."""
    return HEAD + b"".join(b"%x\r\n%b\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"


def _read_through(wire: bytes, cuts: list[int]) -> tuple:
    """``wire`` read in pieces through the worker's path (framing, SSE runs, the
    reader): what the reader made of it, or what it raised."""
    decoder, sse, reader = ResponseDecoder(), SSEDecoder(), EventReader()
    batch: list = []
    try:
        for start, stop in zip([0, *cuts], [*cuts, len(wire)], strict=True):
            read = wire[start:stop]
            if reader.layout is not None and not reader.done:  # as the connection reads
                text = lone_token(read, decoder, sse, reader.layout)
                if text is not None:
                    batch.append([text])
                    continue
            run = sse.feed_run(decoder.feed(read))
            if run and not reader.done:
                batch += reader.take_runs([run])
        if not reader.done:
            batch += reader.end(sse.flush())
    except UpstreamError as exc:
        return ("raised", str(exc))
    return (_flat(batch), reader.done, reader.finished)


def _by_event(events: list[bytes]) -> tuple:
    """What reading every event of the body alone makes of it."""
    datas = events_of(b"".join(events))
    reader = EventReader()
    try:
        batch = reader.take(datas)
        if not reader.done:
            batch += reader.end([])
    except UpstreamError as exc:
        return ("raised", str(exc))
    return (_flat(batch), reader.done, reader.finished)


def test_a_stream_read_in_random_pieces_decodes_as_event_by_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker's whole decoding path (framing, runs, one parse per run of tokens),
    fed an answer in random pieces, reads what reading every event alone reads: with
    any event before, between and after the tokens, two events in one chunk, an event
    cut over two chunks, a token of another layout or another finish of the same
    length, and malformed JSON."""
    one_parse = 0
    texts = TokenLayout.texts

    def counted(layout: TokenLayout, run: bytes) -> list[str] | None:
        nonlocal one_parse
        read = texts(layout, run)
        one_parse += read is not None and len(read) > 1
        return read

    monkeypatch.setattr(TokenLayout, "texts", counted)
    rng = random.Random(5)
    role = _run(_chunk({"role": "assistant", "content": None}))
    finish = _run(_chunk({}, "length"))
    tail = [_run(b'{"choices":[],"created":1,"usage":{"completion_tokens":3}}'), _run(b"[DONE]")]
    tokens = [_run(_chunk({"content": text})) for text in TEXTS]
    odd = [  # each a list of chunks
        [_run(_chunk({"content": "x"}, created=2))],
        [_run(_chunk({"content": ""}))],
        [_run(_chunk({"content": "x"}, "ab"))],  # a finish as long as null: bytes differ
        [_run(_raw_token(b"\\")), _run(_raw_token(b',"a'))],  # malformed, parse together
        [_run(_raw_token(b"\\")) + _run(_raw_token(b',"a'))],  # the same in one chunk
        [tokens[0] + tokens[1]],  # two in one chunk
        [_run(_chunk({"reasoning_content": "r"}))],
        [b": keep-alive\n\n"],
    ]
    for _ in range(400):
        middle = [rng.choice(tokens) for _ in range(rng.randint(1, 12))]
        if rng.random() < 0.5:
            at = rng.randint(0, len(middle))
            middle[at:at] = rng.choice(odd)
        events = [role, *middle, finish, *tail]
        if rng.random() < 0.3:  # one event cut over two chunks
            at = rng.randrange(len(events))
            half = len(events[at]) // 2
            events[at : at + 1] = [events[at][:half], events[at][half:]]
        wire = _framed(events)
        cuts = sorted(rng.sample(range(len(HEAD), len(wire)), rng.randint(0, 3)))
        assert _read_through(wire, cuts) == _by_event(events), (events, cuts)
    assert one_parse > 200  # runs of tokens took the one parse, not only the fallbacks


def _outcome(method: str, data: list[bytes]) -> tuple:
    """What a new reader's ``take`` or ``take_runs`` made of ``data``, or what it raised."""
    reader = EventReader()
    try:
        batch = getattr(reader, method)(data)
    except UpstreamError as exc:
        return ("raised", str(exc))
    return (_flat(batch), reader.done, reader.finished)


def test_event_reader_reads_runs_as_it_reads_events_and_learns_the_layout_again() -> None:
    tokens = [_chunk({"content": text}) for text in TEXTS]
    later = [_chunk({"content": text}, created=2) for text in TEXTS]
    runs = [
        _run(_chunk({"role": "assistant", "content": None}), tokens[0]),
        _run(*tokens),  # one parse: the layout came with the first run
        _run(*later),  # the clock ticked: event by event, then the new layout
        _run(*later[::-1]),
        _run(_chunk({}, "length"), b"[DONE]"),
    ]
    reader = EventReader()
    batches = [reader.take_runs([run]) for run in runs]
    assert _flat([e for b in batches for e in b]) == _flat(
        EventReader().take([data for run in runs for data in events_of(run)])
    )
    assert batches[1] == [TEXTS] and batches[3] == [TEXTS[::-1]]
    assert reader.done and reader.finished


def test_a_first_and_a_last_read_take_their_tokens_in_one_parse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An answer's first read starts with the role chunk and its last ends with the
    finish, usage and ``[DONE]``; at a capacity benchmark's pace one read can hold the
    whole answer. The tokens between are still read in one parse, the rest event by
    event, and the batch is what reading every event alone makes of it."""
    role = _chunk({"role": "assistant", "content": None})
    tokens = [_chunk({"content": text}) for text in TEXTS] * 3
    usage = b'{"choices":[],"created":1,"usage":{"completion_tokens":18}}'
    whole = _run(role, *tokens, _chunk({}, "length"), usage, b"[DONE]")
    by_event = _outcome("take", events_of(whole))
    read_alone = []

    def token_alone(data: bytes) -> str | None:
        text = content_only(data)
        if text is not None:
            read_alone.append(text)
        return text

    monkeypatch.setattr(events, "content_only", token_alone)
    assert _outcome("take_runs", [whole]) == by_event
    assert read_alone == []  # no token was read on its own
    assert by_event[0][1 : 1 + len(tokens)] == TEXTS * 3


def test_tool_calls_streamed_in_pieces_are_put_back_together() -> None:
    """llama-server streams a tool call as OpenAI does: its id, type and name first, then
    its arguments a few characters at a time, each piece under the call's ``index``; two
    calls interleave. The result must carry each call whole (it carried the pieces)."""
    deltas = [
        [{"index": 0, "id": "c1", "type": "function", "function": {"name": "weather"}}],
        [{"index": 0, "function": {"arguments": '{"city": '}}],
        [{"index": 1, "id": "c2", "type": "function", "function": {"name": "time"}}],
        [{"index": 0, "function": {"arguments": '"Paris"}'}}],
        [{"index": 1, "function": {"arguments": "{}"}}],
    ]
    calls: list[dict] = []
    for delta in deltas:
        chunk = {"choices": [{"index": 0, "delta": {"tool_calls": delta}, "finish_reason": None}]}
        events = parse_chunk(orjson.dumps(chunk))
        assert events.tool_calls is not None
        merge_tool_calls(calls, events.tool_calls)
    assert calls == [
        {
            "id": "c1",
            "type": "function",
            "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
        },
        {"id": "c2", "type": "function", "function": {"name": "time", "arguments": "{}"}},
    ]
    assert orjson.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}


def test_what_a_break_inside_a_chunk_held_back_is_handed_over_without_its_framing() -> None:
    """A read that ends inside a chunk leaves that chunk, and any whole one before it whose
    data does not end an event, waiting in the decoder. The connection breaking there, the
    events in them (an answer's finish, say) are still whole: ``cut_short`` gives their
    bytes, chunk framing taken out."""
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    first = b'data: {"a":1}\n\n'
    finish = b'data: {"choices":[{"finish_reason":"stop"}]}\n\n'
    rest = finish[10:] + b'data: {"usage":{}}\n\n'
    decoder = ResponseDecoder()
    body = decoder.feed(
        head
        + b"%x\r\n%s\r\n" % (len(first), first)
        + b"%x\r\n%s\r\n" % (10, finish[:10])  # an event across two chunks (a proxy's)
        + b"%x\r\n%s" % (len(rest), rest[:-8])  # cut inside the third
    )
    assert body == first and not decoder.complete
    assert decoder.cut_short() == finish + rest[len(finish) - 10 : -8]


def test_llama_cpp_s_error_line_mid_stream_is_read_and_a_4xx_is_not_retried() -> None:
    """llama.cpp sends an error found after the response began as ``error: {...}``, a
    line of its own with no ``data:``. It was skipped, the ``[DONE]`` after it read as a
    stream cut short (retryable): a request llama-server refused was retried to the
    stream's limit, then dead-lettered as retryable. A 4xx refuses it for good; a
    context-size error is ``ContextExceeded``; a 5xx may be retried."""
    token = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
    refused = b'error: {"code":400,"message":"bad grammar","type":"invalid_request_error"}\n\n'
    decoder = SSEDecoder()
    payloads = decoder.feed(token + refused + b"data: [DONE]\n\n")
    with pytest.raises(UpstreamError, match="bad grammar") as error:
        EventReader().take(payloads)
    assert (error.value.status, error.value.retryable) == (400, False)
    context = b'error: {"code":400,"message":"too long","type":"exceed_context_size_error"}\n\n'
    with pytest.raises(ContextExceeded):
        EventReader().take(SSEDecoder().feed(context))
    crashed = b'error: {"code":500,"message":"boom","type":"server_error"}\n\n'
    with pytest.raises(UpstreamError) as error:
        EventReader().take(SSEDecoder().feed(crashed))
    assert (error.value.status, error.value.retryable) == (500, True)


@pytest.mark.parametrize("status", [401, 403, 404, 408, 429])
def test_an_answer_that_says_nothing_of_the_request_may_be_retried(status: int) -> None:
    """A wrong API key (a rotation), a timeout, too many requests, a route not there yet:
    none says the request is bad, so none is answered ``validation_failed`` for good nor
    dead-lettered; said before the stream began or inside it. (No test sent any of these:
    a rule taking every 4xx for a refusal survived.)"""
    body = orjson.dumps({"error": {"code": status, "message": "not now", "type": "x"}})
    with pytest.raises(UpstreamError) as answered:
        raise_for_response(status, body)
    assert (answered.value.status, answered.value.retryable) == (status, True)
    line = b"error: " + orjson.dumps({"code": status, "message": "not now"}) + b"\n\n"
    with pytest.raises(UpstreamError) as midstream:
        EventReader().take(SSEDecoder().feed(line))
    assert (midstream.value.status, midstream.value.retryable) == (status, True)
    with pytest.raises(UpstreamError) as refused:  # a plain 4xx: refused for good
        raise_for_response(422, body)
    assert refused.value.retryable is False


def test_a_feature_llama_server_was_not_started_with_is_refused_not_retried() -> None:
    """501 is llama-server's "not supported" (embeddings, infill, image input on a server
    started without them): retried as any 5xx, it was tried again up to the delivery
    limit, then dead-lettered as retryable, where no retry on this profile can help."""
    said = {"code": 501, "message": "image input is not supported", "type": "not_supported_error"}
    with pytest.raises(UpstreamError) as answered:
        raise_for_response(501, orjson.dumps({"error": said}))
    assert (answered.value.status, answered.value.retryable) == (501, False)
    with pytest.raises(UpstreamError) as midstream:
        EventReader().take(SSEDecoder().feed(b"error: " + orjson.dumps(said) + b"\n\n"))
    assert (midstream.value.status, midstream.value.retryable) == (501, False)
