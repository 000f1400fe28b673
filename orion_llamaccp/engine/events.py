"""The events of one streamed chat answer, in batches, as the relay reads them.

One read from llama-server holds one event when tokens come at a human pace and many
under load. ``EventReader.take_runs`` turns the events of one read into one batch: the
texts of consecutive tokens as one ``list[str]`` (nearly every event; read without a
step of Python per token where the chunks keep llama-server's layout, see
``sse.TokenLayout``), anything else as ``ChunkEvents``. The relay loops over a batch
without awaiting, so a busy stream costs one wake-up per read, not one per token, and a
read of nothing but tokens can go to the relay without waking it at all (the sink of
``ChatStream.batches``). ``ChatStream`` also yields event by event, as ``ChunkEvents``
only, for every other caller.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable

from orion_llamaccp.engine.http_errors import chat_event
from orion_llamaccp.engine.sse import (
    DONE,
    TOKEN_EVENT,
    ChunkEvents,
    TokenLayout,
    content_only,
    events_of,
)
from orion_llamaccp.errors import UpstreamError

Delta = list[str] | ChunkEvents
"""The texts of consecutive tokens, or any other event of the stream."""

TextSink = Callable[[list[str]], None]
"""Takes the texts of consecutive tokens as they are read (``ChatStream.batches``)."""


class EventReader:
    """Reads one stream's events; a ``[DONE]`` before a finish reason, an error sent
    inside the stream, or a stream that ends without a finish reason raises, so a broken
    answer is never taken for a short one. One that breaks off after its finish reason
    is whole (its readers check ``finished``): only the usage or ``[DONE]`` was lost, and
    trying it again would cost a second generation and stream its chunks twice."""

    __slots__ = ("done", "finished", "layout")

    def __init__(self) -> None:
        self.finished = False
        self.done = False  # [DONE] was read: whatever follows is ignored
        self.layout: TokenLayout | None = None

    def token_texts(self, run: bytes) -> list[str] | None:
        """The texts of ``run`` if it is nothing but tokens of the layout known, else None
        (``take_runs`` then reads it: nothing has changed)."""
        layout = self.layout
        return layout.texts(run) if layout is not None else None

    def take_runs(self, runs: Iterable[bytes]) -> list[Delta]:
        """One batch from runs of whole events (``SSEDecoder.feed_run``)."""
        batch: list[Delta] = []
        for run in runs:
            texts = self.token_texts(run)
            if texts is None:
                self._take_run(run, batch)
                if self.done:
                    break
            else:
                _add_texts(batch, texts)
        return batch

    def _take_run(self, run: bytes, batch: list[Delta]) -> None:
        """A run with events other than tokens of the known layout: the answer's first
        read (the role, then tokens), its last (tokens, then the finish, usage and
        ``[DONE]``), or one where ``created`` ticked. The tokens between the first and
        the last token event are read in one parse if they are all tokens of one layout
        (learnt from the first of them), the rest event by event."""
        start = run.find(TOKEN_EVENT)
        layout = None
        if start == 0 or (start > 0 and run[start - 2 : start] == b"\n\n"):
            layout = self._layout_of(run[start + 6 : run.find(b"\n\n", start)])
        if layout is None:
            self._take(events_of(run), batch)
            return
        self.layout = layout
        stop = run.rfind(layout.last) + len(layout.last)
        texts = layout.texts(run[start:stop]) if stop > start else None
        if texts is None:
            self._take(events_of(run), batch)
            return
        self._take(events_of(run[:start]), batch)
        if self.done:
            return
        _add_texts(batch, texts)
        self._take(events_of(run[stop:]), batch)

    def take(self, payloads: Iterable[bytes]) -> list[Delta]:
        """One batch from ``data`` payloads, event by event."""
        batch: list[Delta] = []
        self._take(payloads, batch)
        return batch

    def _take(self, payloads: Iterable[bytes], batch: list[Delta]) -> None:
        texts = batch[-1] if batch and isinstance(batch[-1], list) else None
        token = None  # the last token chunk read: the layout to read the next runs with
        for data in payloads:
            text = content_only(data)
            if text is not None:
                if texts is None:
                    texts = []
                    batch.append(texts)
                texts.append(text)
                token = data
                continue
            texts = None
            events = chat_event(data, self.finished)
            if events is None:
                self.done = True
                break
            self.finished = self.finished or bool(events.finish_reason)
            batch.append(events)
        if token is not None:
            self.layout = self._layout_of(token)

    def _layout_of(self, token: bytes) -> TokenLayout | None:
        """The layout of a token chunk: the one known when its tail matches (``texts``
        checks every event of a run against it), else learnt from the chunk."""
        layout = self.layout
        if layout is not None and token.endswith(layout.tail):
            return layout
        return TokenLayout.learn(token)

    def end(self, rest: list[bytes]) -> list[Delta]:
        """The stream closed without ``[DONE]``: the events left unterminated, if its
        answer was complete."""
        batch = self.take([data for data in rest if data != DONE])
        if not self.finished:
            raise UpstreamError("stream from llama-server ended without a finish reason")
        return batch


def _add_texts(batch: list[Delta], texts: list[str]) -> None:
    """Texts join the batch's last list when it ends with one: a run stays one list."""
    if batch and isinstance(batch[-1], list):
        batch[-1].extend(texts)
    else:
        batch.append(texts)


class ChatStream:
    """One streamed answer: ``batches()`` for the relay, ``async for`` for everyone else."""

    def __init__(self, batches: Callable[[TextSink | None], AsyncIterator[list[Delta]]]) -> None:
        self._batches = batches

    def batches(self, sink: TextSink | None = None) -> AsyncIterator[list[Delta]]:
        """The answer's events, a batch per read.

        ``sink``: where the stream may hand the texts of a read's tokens instead, as the
        read arrives, when it holds nothing else and every earlier batch has been taken
        (so order is kept). At a GPU's pace each token comes in a read of its own, and
        this spares the reader a wake-up per token; a stream that cannot (the httpx
        path) puts them in its batches as before. Called from the connection's read
        callback: it must not block or raise.
        """
        return self._batches(sink)

    async def __aiter__(self) -> AsyncIterator[ChunkEvents]:
        async for batch in self._batches(None):
            for item in batch:
                if isinstance(item, list):
                    for text in item:
                        yield ChunkEvents(content=text)
                else:
                    yield item
