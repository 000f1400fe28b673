"""Engine tests on the event loop the worker runs (``cli.run_async``: uvloop), for what
depends on the loop itself: asyncio's own loop reports a child's exit only once every pipe
of it is closed, uvloop as the child ends."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest
import uvloop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], Any]]:
    return {"uvloop": uvloop.new_event_loop}
