"""A worker that cannot be built still says so on the bus.

``serve`` listens before it reads the profile (``startup.py``), so an unknown profile, a
registry that does not parse, a missing llama-server binary or a flag it lacks is found
out with Redis at hand. Left to the exit alone, such a worker restart-loops unseen by the
fleet, and a request heard in the moment it listened goes unanswered. Before the exit it
leaves the channels (every message heard is in the inbox then), answers each request
heard unless another replica listens on the channel and will, and tells the fleet once:
a ``down`` heartbeat with the reason, and a ``system.error``.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

from orion_llamaccp.bus.claims import Claims
from orion_llamaccp.bus.envelope import HEALTH, ServiceRef, SystemHealthV1
from orion_llamaccp.bus.outbox import Outbox
from orion_llamaccp.bus.replies import Publisher
from orion_llamaccp.settings import Settings
from orion_llamaccp.worker.announce import channels_for
from orion_llamaccp.worker.jobs import Job, decode_job
from orion_llamaccp.worker.startup import Intake

log = logging.getLogger(__name__)

ERROR_CODE = "engine_unavailable"  # as a worker that gives up later says it (``Worker._fatal``)
REPORT_TIMEOUT_SEC = 5.0  # a Redis gone as well must not hold the exit up


class FailedStart:
    """What one worker that could not start tells the bus; ``reason`` is redacted."""

    def __init__(
        self, settings: Settings, redis: aioredis.Redis, intake: Intake, reason: str
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.intake = intake
        self.reason = reason
        self.profile = settings.profile_name
        self.channel = channels_for(settings, self.profile).intake
        self.outbox = Outbox(
            ServiceRef(
                name=settings.service_name,
                node=settings.node_name,
                version=settings.service_version,
                instance=settings.instance_id,
            )
        )
        self.publisher = Publisher(redis, retry_for=1.0)

    async def report(self) -> int:
        """Answer what was heard, then tell the fleet; returns the requests answered."""
        await self.intake.listener.leave(*self.intake.listener.channels)
        answered = await self._answer_heard()
        await self._beat_down()
        details = {"message": self.reason, "profile": self.profile, "retryable": False}
        await self.publisher.event(
            self.settings.error_channel, self.outbox.system_error(ERROR_CODE, details)
        )
        return answered

    async def _answer_heard(self) -> int:
        heard = [data for channel, data, _ in self._drain_inbox() if channel == self.channel]
        if not heard:
            return 0
        # Left already: anyone still counted is a replica that heard these too, and one
        # that can serve them should, rather than be beaten to them by our error.
        claims = Claims(redis=self.redis, profile=self.profile, dedup_ttl=60)
        if await claims.subscribers(self.channel) > 0:
            log.info("%d request(s) heard left to the other replicas", len(heard))
            return 0
        answered = 0
        for data in heard:
            job = decode_job(data, "pubsub", self.settings.max_message_bytes)
            if job.reply_to and await claims.claim_message(job.key, self.settings.instance_id):
                await self._answer(job, claims)
                answered += 1
        return answered

    def _drain_inbox(self) -> list[tuple[str, bytes, Any]]:
        inbox = self.intake.inbox
        return [inbox.get_nowait() for _ in range(inbox.qsize())]

    async def _answer(self, job: Job, claims: Claims) -> None:
        reply_to = job.reply_to
        assert reply_to is not None
        payload = {
            "error": ERROR_CODE,
            "details": {
                "message": f"the worker could not start: {self.reason}",
                "retryable": False,
            },
            "meta": {
                "served_by": self.settings.service_name,
                "profile": self.profile,
                "instance": self.settings.instance_id,
                "transport": job.transport,
            },
        }
        message = (
            self.outbox.result(job.envelope, payload)
            if job.envelope is not None
            else self.outbox.result_for_undecodable(job.salvaged, payload)
        )
        stages = [self.publisher.stage_result(reply_to, job.delivery_id, message)]
        if job.occurrence:  # a message without an id: its resend is a new request
            stages.insert(0, claims.stage_forget(job.key))
        await self.publisher.commit("result", stages)

    async def _beat_down(self) -> None:
        """One heartbeat, ``down`` with the reason, for the dashboards; no liveness key:
        nothing here lives on."""
        payload = SystemHealthV1(
            service=self.settings.service_name,
            node=self.settings.node_name,
            version=self.settings.service_version,
            instance=self.settings.instance_id,
            boot_id=str(uuid.uuid4()),
            status="down",
            last_seen_ts=datetime.now(UTC),
            heartbeat_interval_sec=self.settings.heartbeat_interval_sec,
            details={"profile": self.profile, "state": "failed", "reason": self.reason},
        ).model_dump(mode="json")
        await self.publisher.event(
            self.settings.health_channel, self.outbox.encode(HEALTH, payload)
        )
