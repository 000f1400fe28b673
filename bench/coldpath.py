"""The worker's path from a message's bytes to llama-server's request body, warm and cold.

    python -m bench.coldpath [--runs 100]

In the relay traces (section 1 of docs/benchmarks-history.md) each step between a message arriving
and its request leaving takes about 0.1 ms, where the same code takes 10-25 µs in a loop.
The difference is the caches: between two requests the worker sleeps while llama-server,
Redis and the caller run, and the next request finds the worker's code and data evicted.
This times each part of that path in a loop (warm) and after touching 64 MB and sleeping
2 ms before every call (cold). What it says: the lever on this path is how much code and
data a request touches before its bytes leave, more than how many microseconds that code
takes warm.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

from bench.callers import BusCaller
from bench.harness import PROFILE
from bench.report import table
from orion_llamaccp.bus.codec import decode_chat
from orion_llamaccp.profiles.models import Profile
from orion_llamaccp.worker.jobs import decode_job
from orion_llamaccp.worker.llama_request import build_body, parse_options

_EVICT = bytearray(64 << 20)


def _evict(n: int) -> None:
    for k in range(0, len(_EVICT), 64):
        _EVICT[k] = n & 255
    time.sleep(0.002)


def _p50_us(fn: Callable[[], Any], runs: int, cold: bool) -> float:
    times = []
    for n in range(runs):
        if cold:
            _evict(n)
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def parts() -> dict[str, Callable[[], Any]]:
    caller = BusCaller("redis://127.0.0.1:1/0", PROFILE)  # builds envelopes, connects nowhere
    messages = [{"role": "user", "content": "Tell me a story about a lighthouse keeper."}]
    options = {"temperature": 0, "seed": 42, "max_tokens": 256, "ignore_eos": True}
    raw = orjson.dumps(caller.envelope(messages, {**options, "stream": True}))
    profile = Profile.model_validate({"name": PROFILE, "model_id": "m", "model_file": "m.gguf"})
    job = decode_job(raw, "stream", 1 << 20)
    assert job.envelope is not None
    chat = decode_chat(job.envelope)
    opts = parse_options(chat)

    def whole() -> bytes:
        decoded = decode_job(raw, "stream", 1 << 20)
        assert decoded.envelope is not None
        payload = decode_chat(decoded.envelope)
        return orjson.dumps(build_body(payload, parse_options(payload), profile)[0])

    return {
        "orjson.loads of the message": lambda: orjson.loads(raw),
        "decode_job (envelope, pydantic)": lambda: decode_job(raw, "stream", 1 << 20),
        "decode_chat (payload, pydantic)": lambda: decode_chat(job.envelope),  # type: ignore[arg-type]
        "parse_options (pydantic)": lambda: parse_options(chat),
        "build_body + orjson.dumps": lambda: orjson.dumps(build_body(chat, opts, profile)[0]),
        "the whole path": whole,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.coldpath")
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args(argv)
    rows = [
        (name, _p50_us(fn, args.runs * 10, cold=False), _p50_us(fn, args.runs, cold=True))
        for name, fn in parts().items()
    ]
    print(
        table(
            "Message bytes to llama-server's body, p50 us: in a loop, and after the caches "
            "were flushed (64 MB touched, 2 ms asleep)",
            ["part", "warm", "cold"],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
