"""A worker that cannot be built still says so on the bus.

``serve`` listens before it reads the profile (``startup.py``), so an unknown profile, a
registry that does not parse, a missing llama-server binary or a flag it lacks is found
out with Redis at hand. Left to the exit alone, such a worker restart-loops unseen by the
fleet, and a request heard in the moment it listened goes unanswered. Before the exit it
tells the fleet once (a ``down`` heartbeat with the reason, kept under its liveness key
for ``ps`` and ``health``, and a ``system.error``), then leaves the channels and answers
each request it heard, through the pub/sub claim: a replica that heard it too, and can
serve it, has claimed it by then and answers instead.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import redis.asyncio as aioredis

from orion_llamaccp.bus.claims import REPLICA_GRACE_SEC, Claims
from orion_llamaccp.bus.lane import Lane
from orion_llamaccp.bus.outbox import Outbox
from orion_llamaccp.bus.presence import beat
from orion_llamaccp.bus.replies import Publisher
from orion_llamaccp.settings import Settings
from orion_llamaccp.worker.announce import channels_for
from orion_llamaccp.worker.jobs import Failure, Job, decode_job, result_message
from orion_llamaccp.worker.startup import Intake

log = logging.getLogger(__name__)

ERROR_CODE = "engine_unavailable"  # as a worker that gives up later says it (``Worker._fatal``)


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
        self.outbox = Outbox.of(settings)

    async def tell_fleet(self, timeout: float) -> None:
        """The ``down`` beat and the ``system.error``; first, so a slow Redis cannot leave
        them behind the answers."""
        error = {"message": self.reason, "profile": self.profile, "retryable": False}
        # No slots: ``ps`` and ``watch`` list a llama.cpp host by its profile and slots.
        down = {
            "profile": self.profile,
            "state": "failed",
            "reason": self.reason,
            "slots_busy": 0,
            "slots_total": 0,
        }
        async with asyncio.timeout(timeout):
            await beat(
                self.redis,
                self.outbox,
                boot_id=str(uuid.uuid4()),
                interval=self.settings.heartbeat_interval_sec,
                channel=self.settings.health_channel,
                details=down,
            )
            await self.redis.publish(
                self.settings.error_channel, self.outbox.system_error(ERROR_CODE, error)
            )

    async def answer_heard(self) -> int:
        """Leave the channels (every message heard is in the inbox then), and answer each
        request heard whose claim this worker wins; returns how many it answered."""
        if self.intake.listener.subscribed.is_set():
            await self.intake.listener.leave(*self.intake.listener.channels)
        await self.intake.close()  # a subscription still on its way ends here too
        inbox = self.intake.inbox
        drained = [inbox.get_nowait() for _ in range(inbox.qsize())]
        heard = [data for channel, data, _ in drained if channel == self.channel]
        heard += self.intake.overflow  # those beyond the inbox's bound: the same answer
        self.intake.overflow.clear()
        if not heard:
            return 0
        await asyncio.sleep(REPLICA_GRACE_SEC)
        lane = Lane(self.redis)
        try:
            claims = Claims(self.redis, profile=self.profile, dedup_ttl=60, lane=lane)
            claims.leaving = True  # a resend must find a replica that stays
            publisher = Publisher(self.redis, retry_for=1.0, lane=lane)
            answered = 0
            for data in heard:
                job = decode_job(data, "pubsub", self.settings.max_message_bytes)
                if not job.reply_to:
                    continue
                if await claims.claim_message(job.key, job.claimant(self.settings.instance_id)):
                    await self._answer(job, claims, publisher)
                    answered += 1
                else:
                    log.info("request %s claimed by a replica: left to it", job.request_id)
            return answered
        finally:
            await lane.aclose()

    async def _answer(self, job: Job, claims: Claims, publisher: Publisher) -> None:
        reply_to = job.reply_to
        assert reply_to is not None
        failure = Failure(ERROR_CODE, f"the worker could not start: {self.reason}")
        payload = failure.payload(
            job,
            served_by=self.settings.service_name,
            profile=self.profile,
            instance=self.settings.instance_id,
        )
        message = result_message(self.outbox, job, payload)
        stages = [publisher.stage_result(reply_to, job.delivery_id, message)]
        if job.occurrence:  # a message without an id: its resend is a new request
            claimant = job.claimant(self.settings.instance_id)
            stages.insert(0, claims.stage_answered(job.key, claimant))
        await publisher.commit("result", stages)
