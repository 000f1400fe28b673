"""A Prometheus endpoint for the worker (off unless ``METRICS_PORT`` is set).

Counters and histograms are fed by the request handler's observer hook; gauges read the
worker's live state when scraped, so nothing is updated on the per-token path.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    start_http_server,
)

if TYPE_CHECKING:
    from orion_llamaccp.worker.service import Worker

ENGINE_STATES = (
    "downloading",
    "starting",
    "loading",
    "ready",
    "restarting",
    "draining",
    "stopped",
    "failed",
)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, worker: Worker) -> None:
        self.registry = CollectorRegistry()
        labels = {"profile": worker.profile.name, "instance": worker.settings.instance_id}
        reg = self.registry
        self.requests = Counter(
            "orion_llamacpp_requests", "Requests by outcome", ["outcome", *labels], registry=reg
        )
        self.ttft = Histogram(
            "orion_llamacpp_time_to_first_token_seconds",
            "From receiving a request to its first token",
            list(labels),
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.duration = Histogram(
            "orion_llamacpp_request_duration_seconds",
            "From receiving a request to its answer",
            list(labels),
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self._labels = labels
        # Gauges that read the worker's state as they are scraped.
        live: dict[str, tuple[str, Callable[[], float]]] = {
            "orion_llamacpp_tokens_generated": (
                "Completion tokens generated",
                lambda: worker.stats.tokens,
            ),
            "orion_llamacpp_claims_lost": (
                "Pub/sub requests heard and left to another claimant (a replica, or a copy)",
                lambda: worker.view.claims_lost,
            ),
            "orion_llamacpp_pubsub_dropped": (
                "Pub/sub requests dropped unanswered: heard with the inbox and its "
                "overflow full (ORION_LLAMACPP_INBOX_SIZE messages or "
                "ORION_LLAMACPP_INBOX_BYTES bytes; ten times as many messages and as "
                "many bytes)",
                lambda: worker.intake.dropped,
            ),
            "orion_llamacpp_engine_restarts": (
                "llama-server restarts",
                lambda: worker.supervisor.restarts,
            ),
            "orion_llamacpp_queue_depth": (
                "Requests waiting for a slot (local)",
                lambda: worker.waiting,
            ),
            "orion_llamacpp_slots_busy": ("Slots in use", lambda: worker.slots.busy),
            "orion_llamacpp_slots_total": ("Slots", lambda: worker.slots.total),
            "orion_llamacpp_gc_frozen_objects": (
                "Objects the garbage collector no longer scans (frozen once the engine is ready)",
                gc.get_freeze_count,
            ),
        }
        for name, (text, read) in live.items():
            gauge = Gauge(name, text, list(labels), registry=reg)
            gauge.labels(**labels).set_function(read)
        state = Gauge(
            "orion_llamacpp_engine_state",
            "1 for the current engine state",
            ["state", *labels],
            registry=reg,
        )
        for name in ENGINE_STATES:
            state.labels(state=name, **labels).set_function(
                lambda name=name: 1.0 if worker.view.state == name else 0.0
            )
        GCCollector(registry=reg)  # python_gc_collections_total and friends, by generation

    def observe(self, outcome: str, ttft: float | None, duration: float) -> None:
        self.requests.labels(outcome=outcome, **self._labels).inc()
        self.duration.labels(**self._labels).observe(duration)
        if ttft is not None:
            self.ttft.labels(**self._labels).observe(ttft)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the HTTP endpoint in a thread; returns the bound port (0 picks one)."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_address[1])

    def close(self) -> None:
        server = getattr(self, "_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()
