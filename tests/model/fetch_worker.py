"""Run ``ensure_model`` in a process of its own, for the two-process lock test.

    python -m tests.model.fetch_worker '{"settings": {...}, "llamacpp": {...}}'

Logs go to stderr (the test waits for the "waiting for another process" line); the result
is one JSON line on stdout.
"""

from __future__ import annotations

import json
import logging
import sys

from orion_llamaccp.model import ensure_model
from orion_llamaccp.profiles.registry import parse_profile
from orion_llamaccp.settings import Settings


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    settings = Settings(**spec["settings"])
    profile = parse_profile("worker", {"llamacpp": spec["llamacpp"]})
    resolved = ensure_model(profile, settings)
    result = {"sha256": resolved.sha256, "downloaded": bool(resolved.downloaded)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
