"""What the worker has done, for heartbeats, announcements and the metrics endpoint.

Plain counters updated on the event loop (no locks needed); ``recent_tokens_per_sec`` is a
sliding window over the last minute of finished requests.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

WINDOW_SEC = 60.0


@dataclass
class Stats:
    started_at: float = field(default_factory=time.monotonic)
    served: int = 0
    failed: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    tokens: int = 0
    in_flight: int = 0
    duplicates: int = 0
    _window: deque[tuple[float, int]] = field(default_factory=deque)

    def finished(self, outcome: str, tokens: int) -> None:
        self.outcomes[outcome] += 1
        if outcome == "ok":
            self.served += 1
        else:
            self.failed += 1
        self.tokens += tokens
        now = time.monotonic()
        self._window.append((now, tokens))
        self._forget_before(now - WINDOW_SEC)

    def _forget_before(self, since: float) -> None:
        while self._window and self._window[0][0] < since:
            self._window.popleft()

    def recent_tokens_per_sec(self) -> float:
        now = time.monotonic()
        self._forget_before(now - WINDOW_SEC)
        if not self._window:
            return 0.0
        # Over the window itself (or the uptime, if shorter), not since the first finish
        # in it: a long answer finished after an idle spell was its tokens over a second,
        # 1,650 tok/s for one that ran at 30.
        span = max(min(now - self.started_at, WINDOW_SEC), 1.0)
        return round(sum(t for _, t in self._window) / span, 1)

    @property
    def uptime_sec(self) -> float:
        return round(time.monotonic() - self.started_at, 1)
