"""The worker: one profile served on the bus."""

from __future__ import annotations

import importlib
from typing import Any

# Names resolve lazily: ``run`` imports ``worker.startup`` to subscribe, and must not wait
# for ``worker.service`` (the engine, the HTTP client, the handler) before it has.
_WHERE = {"Worker": "service", "serve": "startup"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
