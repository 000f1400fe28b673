"""An async HTTP client for one llama-server: health, props, slots, streamed chat.

httpx errors are translated here, once: connection failures and 503 become
``EngineUnavailable``, a broken or unfinished stream becomes ``UpstreamError``, a prompt too
long for the context becomes ``ContextExceeded``. Leaving ``chat_stream``'s context early
closes the connection, which is how llama-server is told to stop generating.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from orion_llamaccp.engine.sse import DONE, ChunkEvents, SSEDecoder, parse_chunk
from orion_llamaccp.errors import ContextExceeded, EngineUnavailable, UpstreamError

_CONTEXT_MARKERS = ("exceed_context_size", "exceeds the available context", "context size")


@dataclass(frozen=True)
class Health:
    status: int
    message: str = ""

    @property
    def ready(self) -> bool:
        return self.status == 200

    @property
    def loading(self) -> bool:
        return self.status == 503


@dataclass(frozen=True)
class Props:
    n_ctx: int
    total_slots: int
    model_path: str
    build_info: str
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Props:
        settings = data.get("default_generation_settings") or {}
        return cls(
            n_ctx=int(data.get("n_ctx") or settings.get("n_ctx") or 0),
            total_slots=int(data.get("total_slots") or 1),
            model_path=str(data.get("model_path") or ""),
            build_info=str(data.get("build_info") or ""),
            raw=data,
        )


def _error_message(body: bytes) -> tuple[str, str]:
    try:
        data = orjson.loads(body)
        error = data.get("error", data) if isinstance(data, dict) else {}
        return str(error.get("message", body[:300])), str(error.get("type", ""))
    except (orjson.JSONDecodeError, AttributeError):
        return body[:300].decode(errors="replace"), ""


def raise_for_response(status: int, body: bytes) -> None:
    """Translate an HTTP error answer from llama-server into our exceptions."""
    message, kind = _error_message(body)
    text = f"{kind} {message}".lower()
    if status == 400 and any(marker in text for marker in _CONTEXT_MARKERS):
        raise ContextExceeded(
            f"prompt does not fit the context window: {message}", status=400, retryable=False
        )
    if status == 503:
        raise EngineUnavailable(f"llama-server is not ready: {message}")
    raise UpstreamError(
        f"llama-server answered {status}: {message}", status=status, retryable=status >= 500
    )


class LlamaClient:
    """One llama-server at ``base_url``; ``transport`` lets tests swap the network."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        read_timeout: float = 600.0,
        max_connections: int = 256,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            transport=transport,
            timeout=httpx.Timeout(5.0, read=read_timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=64),
        )

    async def aclose(self) -> None:
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
            raise EngineUnavailable(f"llama-server /health: {type(exc).__name__}: {exc}") from exc
        return Health(response.status_code, response.text[:200])

    async def _get_json(self, path: str) -> Any:
        try:
            response = await self._http.get(path)
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"llama-server {path}: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise_for_response(response.status_code, response.content)
        return orjson.loads(response.content)

    async def props(self) -> Props:
        return Props.from_json(await self._get_json("/props"))

    async def slots(self) -> list[dict[str, Any]]:
        data = await self._get_json("/slots")
        return data if isinstance(data, list) else []

    @asynccontextmanager
    async def chat_stream(self, body: dict[str, Any]) -> AsyncIterator[AsyncIterator[ChunkEvents]]:
        """Stream ``/v1/chat/completions``; exiting the block early cancels the generation."""
        payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
        request = self._http.build_request(
            "POST",
            "/v1/chat/completions",
            content=orjson.dumps(payload),
            headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
        )
        try:
            response = await self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise EngineUnavailable(
                f"cannot reach llama-server: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            if response.status_code != 200:
                raise_for_response(response.status_code, await response.aread())
            yield _events(response)
        finally:
            await response.aclose()


async def _events(response: httpx.Response) -> AsyncIterator[ChunkEvents]:
    decoder = SSEDecoder()
    finished = False
    try:
        async for raw in response.aiter_raw():
            for data in decoder.feed(raw):
                if data == DONE:
                    if not finished:
                        raise UpstreamError("stream ended ([DONE]) without a finish reason")
                    return
                events = parse_chunk(data)
                if events.error is not None:
                    raise_stream_error(events.error)
                if events.finish_reason:
                    finished = True
                yield events
        for data in decoder.flush():
            if data != DONE:
                yield parse_chunk(data)
    except httpx.HTTPError as exc:
        raise UpstreamError(
            f"stream from llama-server broke off: {type(exc).__name__}: {exc}"
        ) from exc
    if not finished:
        raise UpstreamError("stream from llama-server ended without a finish reason")


def raise_stream_error(error: dict[str, Any]) -> None:
    """An error that arrived inside the stream, as ``data: {"error": ...}``."""
    message = str(error.get("message", error))
    kind = str(error.get("type", ""))
    if any(marker in f"{kind} {message}".lower() for marker in _CONTEXT_MARKERS):
        raise ContextExceeded(f"prompt does not fit the context window: {message}", retryable=False)
    raise UpstreamError(f"llama-server reported an error mid-stream: {message}")
