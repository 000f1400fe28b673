"""The events of one streamed chat answer, in batches, as the relay reads them.

One read from llama-server holds one event when tokens come at a human pace and many
under load. ``EventReader.take`` turns the ``data:`` payloads of one read into one batch:
a token's text as a plain ``str`` (nearly every event; no object is built for it, see
``sse.content_only``), anything else as ``ChunkEvents``. The relay loops over a batch
without awaiting, so a busy stream costs one wake-up per read, not one per token.
``ChatStream`` also yields event by event, as ``ChunkEvents`` only, for every other caller.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

from orion_llamaccp.engine.http_errors import chat_event
from orion_llamaccp.engine.sse import DONE, ChunkEvents, content_only
from orion_llamaccp.errors import UpstreamError

Delta = str | ChunkEvents
"""A token's text, or any other event of the stream."""


class EventReader:
    """Reads one stream's payloads; a ``[DONE]`` before a finish reason, an error sent
    inside the stream, or a stream that ends without a finish reason raises, so a broken
    answer is never taken for a short one."""

    __slots__ = ("done", "finished")

    def __init__(self) -> None:
        self.finished = False
        self.done = False  # [DONE] was read: whatever follows is ignored

    def take(self, payloads: Iterable[bytes]) -> list[Delta]:
        batch: list[Delta] = []
        append = batch.append
        for data in payloads:
            text = content_only(data)
            if text is not None:
                append(text)
                continue
            events = chat_event(data, self.finished)
            if events is None:
                self.done = True
                break
            self.finished = self.finished or bool(events.finish_reason)
            append(events)
        return batch

    def end(self, rest: list[bytes]) -> list[Delta]:
        """The stream closed without ``[DONE]``: the events left unterminated, if its
        answer was complete."""
        batch = self.take([data for data in rest if data != DONE])
        if not self.finished:
            raise UpstreamError("stream from llama-server ended without a finish reason")
        return batch


class ChatStream:
    """One streamed answer: ``batches()`` for the relay, ``async for`` for everyone else."""

    def __init__(self, batches: AsyncIterator[list[Delta]]) -> None:
        self._batches = batches

    def batches(self) -> AsyncIterator[list[Delta]]:
        return self._batches

    async def __aiter__(self) -> AsyncIterator[ChunkEvents]:
        async for batch in self._batches:
            for item in batch:
                yield ChunkEvents(content=item) if isinstance(item, str) else item
