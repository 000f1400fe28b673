"""An async HTTP client for one llama-server: health, props, slots, streamed chat.

Connection failures become ``EngineUnavailable``; llama-server's error answers are
translated by ``http_errors``; a stream that breaks off or ends without a finish reason is
an ``UpstreamError``, never a silent short answer. Leaving ``chat_stream``'s context early
closes the connection, which is how llama-server is told to stop generating.

The JSON endpoints go through httpx. ``chat_stream``, the per-token hot path, runs on the
keep-alive connections of ``engine.stream``; with a custom httpx ``transport`` (tests) or a
non-``http`` URL, streaming goes through httpx too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from orion_llamaccp.engine.events import ChatStream, Delta, EventReader
from orion_llamaccp.engine.http_errors import raise_for_response
from orion_llamaccp.engine.sse import SSEDecoder
from orion_llamaccp.engine.stream import StreamConnection, StreamPool, stream_batches
from orion_llamaccp.errors import EngineUnavailable, UpstreamError, describe


@dataclass(frozen=True)
class Health:
    status: int
    message: str = ""

    @property
    def ready(self) -> bool:
        return self.status == 200


@dataclass(frozen=True)
class Props:
    n_ctx: int
    total_slots: int
    model_path: str
    build_info: str
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Props:
        # Per slot, in the default generation settings: llama-server's /props has no
        # n_ctx of its own (one read there first was never found, a mutant of the order
        # survived every test).
        settings = data.get("default_generation_settings") or {}
        return cls(
            n_ctx=int(settings.get("n_ctx") or 0),
            total_slots=int(data.get("total_slots") or 1),
            model_path=str(data.get("model_path") or ""),
            build_info=str(data.get("build_info") or ""),
            raw=data,
        )


@dataclass
class Sent:
    """A streamed chat request already on the wire (``LlamaClient.send``), waiting for
    ``chat_stream`` to read its answer. One that is never read must be ``drop``-ped: its
    connection is closed, which stops llama-server generating for nobody, and handed back
    to its pool, which forgets it and opens the next request's connection ahead."""

    payload: bytes
    conn: StreamConnection
    pool: StreamPool
    taken: bool = False

    def drop(self) -> None:
        if not self.taken:
            self.taken = True
            self.pool.finish(self.conn)  # unfinished: closed


def _stream_payload(body: dict[str, Any]) -> bytes:
    return orjson.dumps({**body, "stream": True, "stream_options": {"include_usage": True}})


class LlamaClient:
    """One llama-server at ``base_url``; ``transport`` lets tests swap the network.

    ``unix_socket``: a path where the same llama-server listens too; every request then
    goes there instead of to the TCP port (``base_url`` still names the server: its
    ``Host``). A connect and each read cost less than over TCP on loopback.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        read_timeout: float = 600.0,
        max_connections: int = 256,
        unix_socket: str | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url
        self.read_timeout = read_timeout
        self.unix_socket = unix_socket
        own_network = transport is None
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=64)
        if own_network and unix_socket:  # a transport of our own: it takes the limits
            transport = httpx.AsyncHTTPTransport(uds=unix_socket, limits=limits)
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            transport=transport,
            timeout=httpx.Timeout(5.0, read=read_timeout),
            limits=limits,
        )
        url = urlsplit(base_url)
        self._streams = (
            StreamPool(
                url.hostname or "127.0.0.1",
                url.port or 80,
                path=url.path.rstrip("/") + "/v1/chat/completions",
                api_key=api_key,
                connect_timeout=5.0,
                read_timeout=read_timeout,
                unix_socket=unix_socket,
            )
            if url.scheme == "http" and own_network
            else None
        )

    async def aclose(self) -> None:
        if self._streams is not None:
            self._streams.close()
        await self._http.aclose()

    async def __aenter__(self) -> LlamaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def health(self, timeout: float = 5.0) -> Health:
        """``/health``: 200 ready, 503 loading; a connection failure raises."""
        try:
            response = await self._http.get("/health", timeout=timeout)
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"llama-server /health: {describe(exc)}") from exc
        return Health(response.status_code, response.text[:200])

    async def _get_json(self, path: str, timeout: Any = httpx.USE_CLIENT_DEFAULT) -> Any:
        try:
            response = await self._http.get(path, timeout=timeout)
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"llama-server {path}: {describe(exc)}") from exc
        if response.status_code != 200:
            raise_for_response(response.status_code, response.content)
        return orjson.loads(response.content)

    async def props(self, timeout: Any = httpx.USE_CLIENT_DEFAULT) -> Props:
        """``/props``; the stream pool learns from it how many requests may start at once."""
        props = Props.from_json(await self._get_json("/props", timeout))
        if self._streams is not None:
            self._streams.slots = props.total_slots
        return props

    async def slots(self, timeout: Any = httpx.USE_CLIENT_DEFAULT) -> list[dict[str, Any]]:
        """``/slots``: answered by the inference loop, so it may wait for it (``timeout``
        None: as long as it takes)."""
        data = await self._get_json("/slots", timeout)
        return data if isinstance(data, list) else []

    def send(self, body: dict[str, Any]) -> Sent | None:
        """Write a streamed chat request now, without yielding to the event loop, when a
        connection is open ahead; None when there is none (``chat_stream`` sends it then)."""
        if self._streams is None:
            return None
        payload = _stream_payload(body)
        conn = self._streams.send(payload)
        return None if conn is None else Sent(payload, conn, self._streams)

    @asynccontextmanager
    async def chat_stream(
        self, body: dict[str, Any], sent: Sent | None = None
    ) -> AsyncIterator[ChatStream]:
        """Stream ``/v1/chat/completions``; exiting the block early cancels the generation.

        ``sent``: the same request, already written by ``send``; its answer is read here.
        """
        streams = self._streams
        if streams is None:
            async with self._httpx_stream(_stream_payload(body)) as events:
                yield events
            return
        if sent is not None:
            sent.taken = True
            conn = await streams.open(sent.payload, sent.conn)
        else:
            conn = await streams.open(_stream_payload(body))
        try:
            yield ChatStream(partial(stream_batches, conn))
        finally:
            streams.finish(conn)

    @asynccontextmanager
    async def _httpx_stream(self, payload: bytes) -> AsyncIterator[ChatStream]:
        request = self._http.build_request(
            "POST",
            "/v1/chat/completions",
            content=payload,
            headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
        )
        try:
            response = await self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise EngineUnavailable(
                f"cannot reach llama-server: {describe(exc)}",
                reached=not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout),
            ) from exc
        try:
            if response.status_code != 200:
                raise_for_response(response.status_code, await response.aread())
            yield ChatStream(lambda _: _batches(response))  # no sink: texts come in batches
        finally:
            await response.aclose()


async def _batches(response: httpx.Response) -> AsyncIterator[list[Delta]]:
    """The httpx path: a batch per read (the response is read to its end, so that its
    connection is reused)."""
    decoder = SSEDecoder()
    reader = EventReader()
    try:
        async for raw in response.aiter_raw():
            if reader.done:
                continue
            batch = reader.take_runs((decoder.feed_run(raw),))
            if batch:
                yield batch
        if reader.done:
            return
    except httpx.HTTPError as exc:
        if reader.finished:  # the answer was whole: [DONE] (or usage) was lost
            return
        raise UpstreamError(
            f"stream from llama-server broke off: {describe(exc)}", broken=True
        ) from exc
    rest = reader.end(decoder.flush())
    if rest:
        yield rest
