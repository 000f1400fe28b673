"""A synthetic llama-server: the same HTTP and SSE bytes, as fast as a socket allows.

The capacity and intake benchmarks put it where llama-server would be, so the model is
never the limit and the worker's own ceiling shows. The worker launches it like the real
binary (``LLAMA_SERVER_BIN`` points at a two-line script that execs this module), so it
answers ``--help`` with llama-server-style lines, takes ``--host``/``--port``/``--parallel``
and ``--ctx-size``, and serves:

- ``GET /health`` 200, ``GET /props`` (``total_slots``, a slot's ``n_ctx``), ``GET /slots``;
- ``POST /v1/chat/completions``: ``max_tokens`` content chunks in llama-server's exact
  framing (chunked transfer encoding, one HTTP chunk per ``data:`` event, the first chunk
  carrying the role, then ``finish_reason``, the usage chunk with ``timings``, ``[DONE]``),
  written ``burst`` events per socket write, honouring TCP back-pressure, and then the
  connection closed, as llama-server (cpp-httplib) closes it after a streamed response
  (``tests/engine/test_client.py`` checks the real one still does), so the worker pays
  the connects it pays in production (``--keep-alive`` keeps it open instead);
- ``GET /bench/arrivals``: when each chat request arrived (``time.monotonic_ns()``, the
  same clock in every process on Linux), keyed by the last user message, then forgotten.

    python -m bench.upstream --port 8080 [--burst 16] [--token-interval-us 0] [--keep-alive]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time

import orjson

HELP = """\
----- common params -----

-h,    --help, --usage                  print usage and exit
--version                               show version and build info
-t,    --threads N                      number of threads (env: LLAMA_ARG_THREADS)
-c,    --ctx-size N                     size of the prompt context (env: LLAMA_ARG_CTX_SIZE)
-n,    --predict, --n-predict N         number of tokens to predict (env: LLAMA_ARG_N_PREDICT)
-b,    --batch-size N                   logical maximum batch size (env: LLAMA_ARG_BATCH)
-ub,   --ubatch-size N                  physical maximum batch size (env: LLAMA_ARG_UBATCH)
-fa,   --flash-attn [on|off|auto]       flash attention (env: LLAMA_ARG_FLASH_ATTN)
--no-context-shift                      disables context shift (env: LLAMA_ARG_NO_CONTEXT_SHIFT)
--rope-scaling {none,linear,yarn}       RoPE frequency scaling method
--rope-scale N                          RoPE context scaling factor
--yarn-orig-ctx N                       YaRN: original context size of model
-ngl,  --gpu-layers, --n-gpu-layers N   max. number of layers to store in VRAM
-sm,   --split-mode {none,layer,row}    how to split the model across multiple GPUs
-ts,   --tensor-split N0,N1,N2,...      fraction of the model to offload to each GPU
-m,    --model FNAME                    model path (env: LLAMA_ARG_MODEL)
--mmproj FILE                           path to a multimodal projector file
-md,   --model-draft FNAME              draft model for speculative decoding
--temp N                                temperature
--top-k N                               top-k sampling
--top-p N                               top-p sampling
--min-p N                               min-p sampling
--presence-penalty N                    presence penalty
--chat-template-kwargs STRING           extra template parameters
--reasoning-budget N                    thinking budget
--reasoning-format FORMAT               reasoning format
--reasoning [on|off|auto]               reasoning
--image-min-tokens N                    minimum image tokens
--image-max-tokens N                    maximum image tokens
--spec-type TYPE                        speculative decoding type
--spec-draft-n-max N                    draft tokens
--spec-draft-n-min N                    minimum draft tokens
-ngld, --n-gpu-layers-draft N           draft layers on the GPU
--api-key KEY                           API key to use for authentication (env: LLAMA_API_KEY)

----- example-specific params -----

-np,   --parallel N                     number of server slots (env: LLAMA_ARG_N_PARALLEL)
--host HOST                             IP addresses to listen on, comma-separated, or UNIX
                                        socket paths ending in .sock (env: LLAMA_ARG_HOST)
--port PORT                             port to listen on (default: 8080) (env: LLAMA_ARG_PORT)
--metrics                               enable prometheus compatible metrics endpoint
"""

_ID = b"chatcmpl-benchsyntheticupstream0000"
_WORDS = [f" w{i}" for i in range(64)]


def _event(obj: dict) -> bytes:
    """One SSE event as llama-server frames it: its own HTTP chunk, then a blank line."""
    data = b"data: " + orjson.dumps(obj) + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


def _chunk(delta: dict, finish: str | None = None, **extra: object) -> dict:
    return {
        "choices": [{"finish_reason": finish, "index": 0, "delta": delta}],
        "created": 1795667331,
        "id": _ID.decode(),
        "model": "synthetic.gguf",
        "system_fingerprint": "b0-synthetic",
        "object": "chat.completion.chunk",
        **extra,
    }


class Renderer:
    """Pre-rendered events; only the usage chunk depends on the request."""

    def __init__(self) -> None:
        role = _chunk({"role": "assistant", "content": None})
        self.role = _event(role)
        self.tokens = [_event(_chunk({"content": word})) for word in _WORDS]
        self.finish = _event(_chunk({}, "length"))
        self.done = _event_raw(b"data: [DONE]\n\n")
        self.end = b"0\r\n\r\n"

    def usage(self, prompt: int, completion: int, elapsed_ms: float) -> bytes:
        timings = {
            "cache_n": 0,
            "prompt_n": prompt,
            "prompt_ms": 0.1,
            "predicted_n": completion,
            "predicted_ms": elapsed_ms,
            "predicted_per_second": completion / max(elapsed_ms / 1000, 1e-9),
        }
        usage = {
            "completion_tokens": completion,
            "prompt_tokens": prompt,
            "total_tokens": prompt + completion,
        }
        chunk = _chunk({}, usage=usage, timings=timings)
        chunk["choices"] = []
        return _event(chunk)


def _event_raw(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nServer: llama.cpp\r\nAccess-Control-Allow-Origin: \r\n"
    b"X-Accel-Buffering: no\r\nContent-Type: text/event-stream\r\n"
    b"Transfer-Encoding: chunked\r\nKeep-Alive: timeout=5, max=100\r\n\r\n"
)


def _json_response(status: int, body: object) -> bytes:
    data = orjson.dumps(body)
    reason = {200: b"OK", 404: b"Not Found", 400: b"Bad Request"}.get(status, b"OK")
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json; charset=utf-8\r\n"
        b"Content-Length: %d\r\nKeep-Alive: timeout=5, max=100\r\n\r\n%s"
        % (status, reason, len(data), data)
    )


class Server:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.render = Renderer()
        self.arrivals: dict[str, int] = {}
        self.requests = 0
        self.connections = 0

    def props(self) -> dict:
        # As llama-server's: the context of one slot, under the default generation
        # settings only.
        per_slot = self.args.ctx_size // max(self.args.parallel, 1)
        return {
            "total_slots": self.args.parallel,
            "model_path": self.args.model,
            "build_info": "bench-synthetic-upstream",
            "default_generation_settings": {"n_ctx": per_slot},
        }


class Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; requests are served one after the other."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.writable = asyncio.Event()
        self.writable.set()
        self.busy = False
        self.closed = False
        self.task: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections += 1
        transport.set_write_buffer_limits(high=256 * 1024)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self._next()

    def _next(self) -> None:
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = self.buffer[:head_end].decode("latin-1")
        lines = head.split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        end = head_end + 4 + length
        if len(self.buffer) < end:
            return
        body = self.buffer[head_end + 4 : end]
        self.buffer = self.buffer[end:]
        self.busy = True
        if method == "POST" and target.startswith("/v1/chat/completions"):
            arrived = time.monotonic_ns()
            self.task = asyncio.ensure_future(self._chat(body, arrived))
        else:
            self._reply(self._get(target))

    def _reply(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)
        self._finished()

    def _finished(self) -> None:
        self.busy = False
        if self.buffer and not self.closed:
            self._next()

    def _get(self, target: str) -> bytes:
        server = self.server
        if target.startswith("/health"):
            return _json_response(200, {"status": "ok"})
        if target.startswith("/props"):
            return _json_response(200, server.props())
        if target.startswith("/slots"):
            return _json_response(200, [])
        if target.startswith("/bench/arrivals"):
            found, server.arrivals = server.arrivals, {}
            return _json_response(
                200,
                {"arrivals": found, "requests": server.requests, "connections": server.connections},
            )
        return _json_response(404, {"error": {"code": 404, "message": "File Not Found"}})

    async def _chat(self, raw: bytes, arrived: int) -> None:
        server = self.server
        server.requests += 1
        body = orjson.loads(raw)
        messages = body.get("messages") or [{}]
        marker = str(messages[-1].get("content", ""))
        if marker.startswith("bench-probe "):
            server.arrivals[marker] = arrived
        n = int(body.get("max_tokens") or 16)
        await self._stream(n)
        if not server.args.keep_alive and self.transport is not None:
            self.transport.close()  # after what is written: llama-server's way
        self._finished()

    async def _until(self, due: float) -> None:
        """Paced like a model; the loop's timers are too coarse for that, so yield-spin."""
        while not self.closed:
            left = due - time.perf_counter()
            if left <= 0:
                return
            await asyncio.sleep(0 if left < 0.002 else 0.001)

    async def _stream(self, n: int) -> None:
        render, args, transport = self.server.render, self.server.args, self.transport
        assert transport is not None
        started = time.perf_counter()
        tokens = render.tokens
        cycle = len(tokens)
        transport.write(STREAM_HEAD + render.role)
        burst = max(args.burst, 1)
        interval = args.token_interval_us / 1e6
        sent = 0
        due = time.perf_counter()
        while sent < n and not self.closed:
            count = min(burst, n - sent)
            transport.write(b"".join(tokens[(sent + i) % cycle] for i in range(count)))
            sent += count
            if interval > 0:
                due += interval * count
                await self._until(due)
            elif not self.writable.is_set():
                await self.writable.wait()
            else:
                await asyncio.sleep(0)  # let the other streams have their turn
        if self.closed:
            return
        elapsed_ms = (time.perf_counter() - started) * 1000
        transport.write(render.finish + render.usage(8, n, elapsed_ms) + render.done + render.end)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--version", action="store_true")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("-m", "--model", default="synthetic.gguf")
    parser.add_argument("-c", "--ctx-size", type=int, default=65536)
    parser.add_argument("-np", "--parallel", type=int, default=64)
    parser.add_argument("--burst", type=int, default=int(os.environ.get("BENCH_BURST", "16")))
    parser.add_argument(
        "--token-interval-us",
        type=float,
        default=float(os.environ.get("BENCH_TOKEN_INTERVAL_US", "0")),
    )
    parser.add_argument(
        "--keep-alive",
        action="store_true",
        default=os.environ.get("BENCH_KEEP_ALIVE", "0") not in ("", "0"),
        help="keep a connection open after a streamed response (llama-server closes it)",
    )
    args, _unknown = parser.parse_known_args(argv)  # llama-server flags we do not need
    return args


async def _serve(args: argparse.Namespace) -> None:
    server = Server(args)
    loop = asyncio.get_running_loop()
    hosts = args.host.split(",")  # as llama-server takes them: addresses, .sock paths
    listeners = [
        await (
            loop.create_unix_server(lambda: Conn(server), host, backlog=1024)
            if host.endswith(".sock")
            else loop.create_server(lambda: Conn(server), host, args.port, backlog=1024)
        )
        for host in hosts
    ]
    tcp = next((h for h in hosts if not h.endswith(".sock")), hosts[0])
    print(
        f"main: server is listening on http://{tcp}:{args.port} - starting the main loop",
        file=sys.stderr,
        flush=True,
    )
    await asyncio.gather(*(listener.serve_forever() for listener in listeners))


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.help:
        print(HELP)
        return 0
    if args.version:
        print("version: 0 (bench synthetic upstream)")
        return 0
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner, contextlib.suppress(KeyboardInterrupt):
        runner.run(_serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
