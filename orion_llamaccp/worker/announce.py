"""What the worker tells the fleet about itself: heartbeat details and announcements.

``WorkerView`` reads the worker's live state; it never changes it. Download progress comes
from the model layer's worker thread and is handed to the event loop thread-safely.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orion_llamaccp.bus import keys

if TYPE_CHECKING:
    from orion_llamaccp.model.progress import ProgressEvent
    from orion_llamaccp.worker.service import Worker


@dataclass(frozen=True)
class Channels:
    intake: str
    stream: str
    group: str
    dlq: str


def channels_for(settings: Any, profile: str) -> Channels:
    stream = settings.intake_stream or keys.intake_stream(profile)
    return Channels(
        intake=settings.intake_channel or keys.intake_channel(profile),
        stream=stream,
        group=settings.stream_group or keys.stream_group(profile),
        dlq=settings.dlq_stream or keys.dlq_stream(stream),
    )


def transports(settings: Any) -> set[str]:
    """The intakes the worker serves (``ORION_LLAMACPP_TRANSPORTS``): ``pubsub``, ``stream``."""
    return {t.strip() for t in settings.transports.split(",")}


def listened(settings: Any, channels: Channels) -> dict[str, str]:
    """The channels the worker subscribes to, each with what it hears there (for
    ``doctor``'s permission check, which names it): the pub/sub intake where it serves
    one, cancels, discovery requests."""
    heard = {channels.intake: "the pub/sub intake"} if "pubsub" in transports(settings) else {}
    return {
        **heard,
        settings.cancel_channel: "cancels",
        settings.discover_channel: "discovery requests",
    }


class WorkerView:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.channels = channels_for(worker.settings, worker.profile.name)
        self.state = "starting"
        self.engine_reason: str | None = None
        self.error: str | None = None
        self.received = 0
        self.claims_lost = 0  # pub/sub messages heard and left to another claimant
        self.progress: dict[str, Any] | None = None
        self.model: dict[str, Any] = {}
        self.metrics_port: int | None = None
        self._loop = asyncio.get_running_loop()  # built inside the worker's loop

    def on_progress(self, event: ProgressEvent) -> None:
        """Called from the download thread."""
        data = {
            "phase": event.phase,
            "filename": self.worker.settings.redact(event.filename),
            "bytes_done": event.bytes_done,
            "bytes_total": event.bytes_total,
            "rate_bps": round(event.rate_bps or 0.0),
            "attempt": event.attempt,
        }
        with contextlib.suppress(RuntimeError):  # loop closed: nobody to tell
            self._loop.call_soon_threadsafe(self._set_progress, data)

    def _set_progress(self, data: dict[str, Any]) -> None:
        changed = self.progress is None or self.progress.get("phase") != data["phase"]
        self.progress = data
        if changed:
            self.worker.presence.announce_soon()

    def model_ready(self, resolved: Any = None) -> None:
        files = self.worker.plan.files
        path = Path(files.model)
        # File names are the operator's free text, where a secret can land (a token in a
        # pasted path went out as it stood); identifiers are left exact: a secret that is
        # a common word (a password "orion") would rename channels and services.
        redact = self.worker.settings.redact
        self.model = {
            "file": redact(path.name),
            "path": redact(str(path)),
            "size_bytes": getattr(resolved, "size", None) or _size(path),
            "sha256": getattr(resolved, "sha256", None),
            "parts": len(files.parts),
        }
        self.progress = None

    async def _stream_backlog(self) -> int | None:
        worker = self.worker
        if worker.consumer is None:
            return None
        with contextlib.suppress(Exception):
            for group in await worker.redis.xinfo_groups(self.channels.stream):
                name = group.get("name")
                name = name.decode() if isinstance(name, bytes) else name
                if name == self.channels.group:
                    return int(group.get("lag") or 0) + int(group.get("pending") or 0)
        return None

    async def details(self) -> dict[str, Any]:
        worker = self.worker
        stats = worker.stats
        details: dict[str, Any] = {
            "profile": worker.profile.name,
            "model_id": worker.profile.model_id,
            "state": self.state,
            "slots_busy": worker.slots.busy,
            "slots_total": worker.slots.total,
            "queue_local": worker.waiting,
            "queue_stream_backlog": await self._stream_backlog(),
            "requests_served": stats.served,
            "requests_failed": stats.failed,
            "tokens_generated": stats.tokens,
            "tokens_per_sec_recent": stats.recent_tokens_per_sec(),
            "uptime_sec": stats.uptime_sec,
            "restarts": worker.supervisor.restarts,
        }
        if self.progress:
            details["progress"] = self.progress
        if reason := self._reason():
            details["reason"] = reason
        return details

    def _reason(self) -> str | None:
        """Why the worker failed, or what the engine last said of its state (redacted)."""
        said = self.error or self.engine_reason
        return self.worker.settings.redact(said) if said else None

    def _engine_url(self) -> str:
        """Where other hosts reach llama-server (``ORION_LLAMACPP_ADVERTISE_URL``, any
        password in it masked), else where this worker does."""
        settings = self.worker.settings
        if settings.engine_advertise_url:
            return settings.redact(settings.engine_advertise_url)
        return self.worker.plan.launch.base_url

    async def announcement(self) -> dict[str, Any]:
        worker = self.worker
        profile = worker.profile
        # Here, not at the top: start-up imports this module before it subscribes, and
        # the command line's module brings the profile models with it (about 25 ms).
        from orion_llamaccp.engine.command import effective_knobs

        props = worker.supervisor.props
        launch = worker.plan.launch
        return {
            "service": worker.settings.service_name,
            "node": worker.settings.node_name,
            "instance": worker.settings.instance_id,
            "version": worker.settings.service_version,
            "boot_id": worker.presence.boot_id,
            "profile": profile.name,
            "display_name": profile.display_name,
            "model_id": profile.model_id,
            "task_type": profile.task_type,
            "supports_tools": profile.supports_tools,
            "supports_embeddings": profile.supports_embeddings,
            "supports_vision": profile.supports_vision,
            "ctx_size": effective_knobs(profile.llamacpp, worker.settings.overrides)["ctx_size"],
            "n_ctx_per_slot": props.n_ctx if props else None,
            "slots": worker.slots.total,
            "gpu_ids": _gpu_ids(launch.env.get("CUDA_VISIBLE_DEVICES"), profile.gpu.device_ids),
            "cuda_visible_devices": launch.env.get("CUDA_VISIBLE_DEVICES"),
            # Which of the two it reads: a caller of the other one waited its whole timeout.
            "intakes": sorted(transports(worker.settings)),
            "intake_channel": self.channels.intake,
            "intake_stream": self.channels.stream,
            "stream_group": self.channels.group,
            "dlq_stream": self.channels.dlq,
            "engine_url": self._engine_url(),
            "engine_pid": worker.supervisor.pid,
            "metrics_port": self.metrics_port,
            "heartbeat_interval_sec": worker.settings.heartbeat_interval_sec,
            "model": self.model
            or {"file": worker.settings.redact(Path(worker.plan.files.model).name)},
            "llama_server_build": (props.build_info if props else None)
            or (worker.plan.binary.build if worker.plan.binary else None),
            "argv": [worker.settings.redact(a) for a in launch.masked_argv()],
            "state": self.state,
            "reason": self._reason(),
            "progress": self.progress,
            "updated_at": time.time(),
        }


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _gpu_ids(visible: str | None, configured: tuple[int, ...]) -> list[int | str]:
    """The GPUs llama-server sees: ``CUDA_VISIBLE_DEVICES`` as launched (an override
    included; ids or UUIDs), else the profile's."""
    if visible is None:
        return list(configured)
    parts = [part.strip() for part in visible.split(",")]
    return [int(part) if part.isdigit() else part for part in parts if part]
