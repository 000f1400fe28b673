"""``python -m bench [relay|capacity|intake|startup|footprint ...]``: run, print, record.

With no names, all five run in order. Each starts what it needs (its own Redis on a free
port, llama-server or the synthetic upstream, worker processes), prints its table and
writes ``bench/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
import time

from bench.harness import Workspace

ORDER = ("relay", "capacity", "intake", "startup", "footprint")


async def _main(names: list[str]) -> int:
    ws = Workspace()
    texts = []
    try:
        for name in names:
            module = importlib.import_module(f"bench.{name}")
            started = time.monotonic()
            print(f"== {name}: running ...", flush=True)
            result = await module.run(ws)
            print(result["text"], flush=True)
            print(
                f"({name}: {time.monotonic() - started:.0f} s; wrote {result['path']})\n",
                flush=True,
            )
            texts.append(result["text"])
    finally:
        ws.close()
    if len(texts) > 1:
        print("\n\n".join(texts))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", choices=[*ORDER, []], help="benchmarks to run")
    args = parser.parse_args(argv)
    names = args.names or list(ORDER)
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_main(names))


if __name__ == "__main__":
    sys.exit(main())
