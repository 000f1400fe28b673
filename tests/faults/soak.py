"""A randomized soak: two or three workers under a steady mixed load while a seeded
scheduler injects faults; the bus contract's promises checked after each episode.

Not part of ``make test`` (its name is no ``test_*.py``): run it by its path, 90 s to four
minutes an episode (90 s on round 35's VMs). Round 32 ran seeds 101-135 (5,625 requests,
594 faults); what it found is ``test_same_id_drain.py``. Round 33 added the ``twins``
fault (one envelope on both intakes, or twice in the stream, as a burst overloads pub/sub,
a worker stops, or every llama-server dies) and tight episodes (a pub/sub queue of 0 or 1,
a request given up at its first or second engine death); a durable request answered by its
pub/sub copy's retryable error, its stream copy added 3 s before, no chunk out, Redis
steady, fails. Round 33 ran seeds 201-214 (2,190 requests, 208 faults, 21 of them twins):
no violation; a pub/sub copy with chunks out still answers with its error (4 times). Round
34 hands such a request over to its stream copy (``Claims.hand_over``), and the check
holds a chunked pub/sub copy's error to it as well (not one past its time limit); seeds
201-214 again: 2,274 requests, 225 faults (28 twins), no violation; 5 unsure, each a
stream copy added after its pub/sub copy's ``overloaded``. Round 34, later (the stop's
Redis steps on one budget, the pub/sub inbox bounded) ran seeds 215-226: 2,055 requests,
190 faults (24 twins), no violation; 7 unsure: 3 a stream copy added after its pub/sub
copy's ``overloaded``, 4 (two requests) one chunk the recorder missed across a Redis
restart. Round 35 (the drain's inbox and overflow on its deadline, a second SIGTERM
cutting its Redis steps short) ran seeds 227-238 on d5dfeae: 2,063 requests, 180 faults
(31 twins), no violation; 8 unsure: 7 a stream copy added after its pub/sub copy's
``overloaded``, 1 a durable answer the recorder missed across a Redis restart (its
answered guard set). Round 35, later (``leave`` waiting for the UNSUBSCRIBE reply of a
session still subscribing, a stream entry unanswered after it streamed handing its record
on) ran seeds 239-250 on 2df9df7: 1,964 requests, 183 faults (22 twins), no violation; 3
unsure, each a stream copy added after its pub/sub copy's ``overloaded``. Round 37 (the
split of ``worker/handler.py`` into ``records.py`` and ``not_before.py``) ran seeds
371-373 on f50ebb1 and 374-377 on fcc6388: 1,150 requests, 102 faults (11 twins), no
violation; 3 unsure, each a stream copy added after its pub/sub copy's ``overloaded``.

    SOAK_SEEDS=1,2,3 SOAK_FAULT_SEC=70 .venv/bin/python -m pytest tests/faults/soak.py -s

Every episode writes ``$SOAK_OUT/soak-<seed>.json`` (violations, counts, fault log).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest

from orion_llamaccp.bus import keys
from orion_llamaccp.client import work_queue_entry
from tests.faults.conftest import Fault
from tests.support.orion_contract import check_message
from tests.support.procs import llama_servers_under, pid_alive
from tests.support.workers import WorkerProc

SEEDS = [int(s) for s in os.environ.get("SOAK_SEEDS", "1").split(",") if s]
FAULT_SEC = float(os.environ.get("SOAK_FAULT_SEC", "70"))
OUT = Path(os.environ.get("SOAK_OUT", "/tmp/soak-out"))
INTAKE = "orion:exec:request:LlamaCppHost:tiny"
STREAM, GROUP = "orion:stream:llamacpp:tiny:request", "llamacpp:tiny"
CANCEL = "orion:llamacpp:cancel"
ENV = {
    "ORION_LLAMACPP_CLAIM_IDLE_MS": "1500",
    "ORION_LLAMACPP_DRAIN_TIMEOUT_SEC": "6",
    "ORION_LLAMACPP_CRASH_LIMIT": "40",
    "ORION_LLAMACPP_REQUEST_CRASH_LIMIT": "3",
}


def now() -> float:
    return time.monotonic()


@dataclass
class Req:
    n: int
    envelope: dict[str, Any] | None  # None: a malformed one (see ``raw``)
    via: str
    reply_to: str | None
    correlation_id: str | None
    kind: str  # plain, cancel, short_ttl, dup_corr, dup_key, same_env, twins, burst, malformed_*
    sent_at: float
    chunk_channel: str | None = None
    stream: bool = False
    cancelled_at: float | None = None
    heard: int | None = None
    send_error: str | None = None
    ttl_ms: int | None = None
    fields: dict[str, Any] | None = None  # a raw stream entry
    raw: bytes | None = None
    added_at: float | None = None  # its send returned


@dataclass
class Workers:
    fault: Fault
    rng: random.Random
    log: list[str]
    t0: float
    live: list[WorkerProc] = field(default_factory=list)
    all: list[WorkerProc] = field(default_factory=list)
    busy: set[str] = field(default_factory=set)  # names under a fault now
    n: int = 0
    stopped_pids: set[int] = field(default_factory=set)
    env: dict[str, str] = field(default_factory=dict)  # the episode's own settings

    def say(self, what: str) -> None:
        line = f"{now() - self.t0:7.2f}s {what}"
        self.log.append(line)
        print("   ", line, flush=True)

    def spawn(self, name: str | None = None, instance: str | None = None) -> WorkerProc:
        if name is None:
            self.n += 1
            name = f"w{self.n}"
        extra = {"INSTANCE_ID": instance} if instance else {}
        w = self.fault.spawn(name, slow=True, ready=False, **{**ENV, **self.env, **extra})
        self.live.append(w)
        self.all.append(w)
        self.say(f"spawned worker {name} pid {w.pid}")
        return w

    @contextlib.contextmanager
    def holding(self, w: WorkerProc) -> Iterator[None]:
        """``w`` under a fault: no other fault picks it meanwhile."""
        self.busy.add(w.name)
        try:
            yield
        finally:
            self.busy.discard(w.name)

    def pick(self) -> WorkerProc | None:
        free = [w for w in self.live if w.name not in self.busy and w.proc.poll() is None]
        return self.rng.choice(free) if free else None


def engine_of(w: WorkerProc) -> int | None:
    pids = llama_servers_under(w.pid)
    if pids:
        w.engine_pids.extend(p for p in pids if p not in w.engine_pids)
    return pids[0] if pids else None


class Load:
    """A steady mixed flow of requests."""

    def __init__(self, fault: Fault, rng: random.Random, t0: float) -> None:
        self.fault = fault
        self.rng = rng
        self.t0 = t0
        self.reqs: list[Req] = []
        self.paused = asyncio.Event()
        self.stop = asyncio.Event()
        self.n = 0
        self.tasks: set[asyncio.Task] = set()

    def _hi(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"hello {self.rng.randrange(1000)}"}]

    def _opts(self, stream: bool) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "max_tokens": self.rng.choice([3, 30, 200, 1000, 2500]),
            "ignore_eos": True,
        }
        if stream:
            opts["stream"] = True
        return opts

    async def run(self, interval: float) -> None:
        while not self.stop.is_set():
            if not self.paused.is_set():
                try:
                    await asyncio.wait_for(self._one(), 15)
                except Exception as exc:
                    print("    load: send failed", type(exc).__name__, exc, flush=True)
            await asyncio.sleep(self.rng.expovariate(1 / interval))

    async def _send(self, req: Req) -> None:
        self.reqs.append(req)
        client = self.fault.client
        try:
            if req.fields is not None:
                await client.redis.xadd(STREAM, req.fields)
            elif req.raw is not None:
                req.heard = await client.redis.publish(INTAKE, req.raw)
            else:
                req.heard = await client.send(req.envelope, profile="tiny", via=req.via)
            req.added_at = now()
        except Exception as exc:
            req.send_error = f"{type(exc).__name__}: {exc}"

    def _req(self, env: dict, via: str, kind: str, stream: bool) -> Req:
        self.n += 1
        return Req(
            self.n,
            env,
            via,
            env["reply_to"],
            env["correlation_id"],
            kind,
            now(),
            chunk_channel=env["reply_to"] + ":chunks" if stream else None,
            stream=stream,
            ttl_ms=env.get("ttl_ms"),
        )

    async def _one(self) -> None:
        rng, client = self.rng, self.fault.client
        via = "stream" if rng.random() < 0.65 else "pubsub"
        stream = rng.random() < 0.6
        roll = rng.random()
        if roll < 0.55:
            env = client.request(self._hi(), profile="tiny", options=self._opts(stream))
            await self._send(self._req(env, via, "plain", stream))
        elif roll < 0.65:  # cancelled after a while
            env = client.request(self._hi(), profile="tiny", options=self._opts(stream))
            env["payload"]["options"]["max_tokens"] = rng.choice([1000, 3000])
            req = self._req(env, via, "cancel", stream)
            await self._send(req)
            self._later(rng.uniform(0.0, 1.2), self._cancel(req))
        elif roll < 0.73:  # a short expiry
            ttl = rng.choice([50, 200, 800, 2000])
            env = client.request(self._hi(), profile="tiny", options=self._opts(stream), ttl_ms=ttl)
            if rng.random() < 0.5:  # or the work queue's expires_at_ms
                env["ttl_ms"] = None
                env["trace"] = {"work": {"expires_at_ms": int(time.time() * 1000) + ttl}}
            req = self._req(env, via, "short_ttl", stream)
            req.ttl_ms = ttl
            await self._send(req)
        elif roll < 0.79:  # two requests of one flow: one correlation id, own reply_to
            corr = str(uuid.uuid4())
            same_body = rng.random() < 0.5
            opts = self._opts(stream)
            hi = self._hi()
            for _ in range(2):
                env = client.request(
                    hi if same_body else self._hi(),
                    profile="tiny",
                    options=opts,
                    correlation_id=corr,
                )
                await self._send(self._req(env, via, "dup_corr", stream))
        elif roll < 0.84:  # two requests with one idempotency key
            key = uuid.uuid4().hex
            for _ in range(2):
                v = "stream" if rng.random() < 0.65 else "pubsub"
                env = client.request(
                    self._hi(),
                    profile="tiny",
                    options=self._opts(stream),
                    trace={"work": {"idempotency_key": key}},
                )
                await self._send(self._req(env, v, "dup_key", stream))
                await asyncio.sleep(rng.uniform(0, 0.5))
        elif roll < 0.89:  # the same envelope sent twice (a producer's resend)
            env = client.request(self._hi(), profile="tiny", options=self._opts(stream))
            for _ in range(2):
                v = "stream" if rng.random() < 0.7 else "pubsub"
                await self._send(self._req(env, v, "same_env", stream))
                await asyncio.sleep(rng.uniform(0, 1.0))
        else:
            await self._malformed()

    async def _malformed(self) -> None:
        rng, client = self.rng, self.fault.client
        reply_to = f"orion:llamacpp:reply:{uuid.uuid4()}"
        corr = str(uuid.uuid4())
        which = rng.choice(["bad_json", "no_messages", "no_envelope", "extra_key", "pubsub_bad"])
        self.n += 1
        req = Req(self.n, None, "stream", reply_to, corr, f"malformed_{which}", now())
        if which == "bad_json":
            req.fields = {
                "schema_version": "work_queue.entry.v1",
                "envelope": b'{"schema": "orion.envelope", "payload": {',
                "reply_to": reply_to,
                "correlation_id": corr,
            }
        elif which == "no_envelope":
            req.fields = {"reply_to": reply_to, "correlation_id": corr, "junk": "x"}
        elif which in ("no_messages", "extra_key", "pubsub_bad"):
            env = client.request(
                self._hi(), profile="tiny", options={"max_tokens": 5}, reply_to=reply_to,
                correlation_id=corr,
            )  # fmt: skip
            if which == "no_messages":
                del env["payload"]["messages"]
            else:
                env["payload"]["stream"] = True  # a top-level payload key Orion forbids
            req.envelope = env
            if which == "pubsub_bad":
                req.via = "pubsub"
                req.raw = orjson.dumps(env)
            else:
                req.fields = work_queue_entry(env)
        await self._send(req)

    def _later(self, delay: float, coro: Any) -> None:
        async def run() -> None:
            await asyncio.sleep(delay)
            await coro

        task = asyncio.create_task(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _cancel(self, req: Req) -> None:
        if self.paused.is_set():
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(3):
                await self.fault.client.cancel(req.correlation_id)
                req.cancelled_at = now()


class Chaos:
    """The seeded fault scheduler."""

    def __init__(self, fault: Fault, rng: random.Random, workers: Workers, load: Load) -> None:
        self.fault = fault
        self.rng = rng
        self.w = workers
        self.load = load
        self.redis_lock = asyncio.Lock()
        self.tasks: set[asyncio.Task] = set()
        self.counts: Counter[str] = Counter()
        self.recorder_gaps: list[tuple[float, float]] = []  # Redis down: (from, to)
        self.freezes: list[tuple[float, float]] = []  # Redis frozen: (from, to)

    def say(self, what: str) -> None:
        self.w.say(what)

    async def run(self, until: float) -> None:
        faults = [
            (self.engine_kill, 5),
            (self.engine_stop, 3),
            (self.worker_kill, 2),
            (self.worker_term, 2),
            (self.worker_stop, 1),
            (self.container_pause, 2),
            (self.term_same_name, 1),
            (self.term_then_kill, 1),
            (self.redis_freeze, 2),
            (self.redis_kill, 2),
            (self.twins, 3),
        ]
        names, weights = zip(*faults, strict=True)
        while now() < until:
            # Mostly a few seconds apart; now and then right behind the last one.
            gap = self.rng.uniform(0.05, 1.0) if self.rng.random() < 0.3 else self.rng.uniform(3, 9)
            await asyncio.sleep(gap)
            if now() >= until:
                break
            action = self.rng.choices(names, weights)[0]
            task = asyncio.create_task(self._guarded(action))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        if self.tasks:
            await asyncio.gather(*self.tasks)

    async def _guarded(self, action: Any) -> None:
        try:
            await action()
        except Exception as exc:
            self.say(f"fault {action.__name__} raised {type(exc).__name__}: {exc}")

    async def engine_kill(self) -> None:
        w = self.w.pick()
        pid = engine_of(w) if w else None
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL)
        self.counts["engine_kill"] += 1
        self.say(f"SIGKILL llama-server {pid} of {w.name}")

    async def engine_stop(self) -> None:
        w = self.w.pick()
        pid = engine_of(w) if w else None
        if pid is None:
            return
        d = self.rng.choice([0.5, 2.0, 4.0, 8.0, 14.0])
        with self.w.holding(w):
            os.kill(pid, signal.SIGSTOP)
            self.counts["engine_stop"] += 1
            self.say(f"SIGSTOP llama-server {pid} of {w.name} for {d}s")
            await asyncio.sleep(d)
            with contextlib.suppress(ProcessLookupError):
                if pid_alive(pid):
                    os.kill(pid, signal.SIGCONT)
            self.say(f"SIGCONT llama-server {pid} of {w.name}")

    async def _replace(self, w: WorkerProc, same_name: bool) -> None:
        self.w.live.remove(w)
        if len(self.w.live) < 3:
            self.w.spawn(w.name if same_name else None)

    async def worker_kill(self) -> None:
        w = self.w.pick()
        if w is None or len(self.w.live) < 2:
            return
        with self.w.holding(w):
            w.kill()
            self.counts["worker_kill"] += 1
            same = self.rng.random() < 0.3
            self.say(
                f"SIGKILL worker {w.name} pid {w.pid} (replaced{' same name' if same else ''})"
            )
            await self._replace(w, same)

    async def worker_term(self) -> None:
        w = self.w.pick()
        if w is None or len(self.w.live) < 2:
            return
        with self.w.holding(w):
            w.signal(signal.SIGTERM)
            self.counts["worker_term"] += 1
            self.say(f"SIGTERM worker {w.name} pid {w.pid}")
            self.w.live.remove(w)
            if len(self.w.live) < 3:
                self.w.spawn()
            for _ in range(200):  # its drain
                if w.proc.poll() is not None:
                    break
                await asyncio.sleep(0.1)
            self.say(f"worker {w.name} exited {w.proc.poll()}")

    async def worker_stop(self) -> None:
        w = self.w.pick()
        if w is None:
            return
        d = self.rng.choice([0.5, 1.0, 3.0, 6.0])
        with self.w.holding(w):
            os.kill(w.pid, signal.SIGSTOP)
            self.w.stopped_pids.add(w.pid)
            self.counts["worker_stop"] += 1
            self.say(f"SIGSTOP worker {w.name} for {d}s")
            await asyncio.sleep(d)
            os.kill(w.pid, signal.SIGCONT)
            self.w.stopped_pids.discard(w.pid)
            self.say(f"SIGCONT worker {w.name}")

    async def container_pause(self) -> None:
        """A paused container: the worker and its llama-server stopped together."""
        w = self.w.pick()
        if w is None:
            return
        d = self.rng.choice([1.0, 3.0, 6.0])
        pids = [w.pid, *(p for p in [engine_of(w)] if p)]
        with self.w.holding(w):
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
                self.w.stopped_pids.add(pid)
            self.counts["container_pause"] += 1
            self.say(f"SIGSTOP worker {w.name} and its llama-server {pids} for {d}s")
            await asyncio.sleep(d)
            for pid in reversed(pids):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
                self.w.stopped_pids.discard(pid)
            self.say(f"SIGCONT worker {w.name} and its llama-server")

    async def term_same_name(self) -> None:
        """SIGTERM, and a replacement under the same name at once (while it drains)."""
        w = self.w.pick()
        if w is None or len(self.w.live) < 2:
            return
        with self.w.holding(w):
            w.signal(signal.SIGTERM)
            self.counts["term_same_name"] += 1
            self.say(f"SIGTERM worker {w.name} pid {w.pid}, replaced under its name at once")
            self.w.live.remove(w)
            self.w.spawn(w.name + "'", instance=w.env["INSTANCE_ID"])  # a log of its own
            for _ in range(200):
                if w.proc.poll() is not None:
                    break
                await asyncio.sleep(0.1)
            self.say(f"worker {w.name} exited {w.proc.poll()}")

    async def term_then_kill(self) -> None:
        """SIGTERM, then SIGKILL in the middle of the drain."""
        w = self.w.pick()
        if w is None or len(self.w.live) < 2:
            return
        with self.w.holding(w):
            w.signal(signal.SIGTERM)
            self.counts["term_then_kill"] += 1
            d = self.rng.uniform(0.1, 3.0)
            self.say(f"SIGTERM worker {w.name} pid {w.pid}, SIGKILL in {d:.1f}s")
            self.w.live.remove(w)
            self.w.spawn()
            await asyncio.sleep(d)
            w.kill()
            self.say(f"worker {w.name} exited {w.proc.poll()}")

    async def twins(self) -> None:
        """One envelope on both intakes, or twice in the stream, as a fault lands on it:
        a burst of pub/sub requests that overloads a worker (``local_queue`` 0 or 1 in a
        tight episode), a worker told to stop right after (its queued pub/sub copies
        refused "worker is stopping"), or every llama-server killed mid-generation (the
        first copy gives it up: after its last try, or its engine deaths in a tight
        episode; the other copy waits on it)."""
        load, rng, client = self.load, self.rng, self.fault.client
        if load.paused.is_set():
            return
        how = rng.choice(["overload", "stop", "engine"])
        sent = []
        async with asyncio.timeout(20):
            if how in ("overload", "stop"):
                for _ in range(rng.randrange(3, 9)):
                    opts = {"max_tokens": rng.choice([1000, 2500]), "ignore_eos": True}
                    env = client.request(load._hi(), profile="tiny", options=opts)
                    await load._send(load._req(env, "pubsub", "burst", False))
            for _ in range(rng.randrange(1, 4)):
                stream = rng.random() < 0.6
                opts = load._opts(stream)
                if how == "engine":
                    opts["max_tokens"] = rng.choice([1000, 2500])
                env = client.request(load._hi(), profile="tiny", options=opts)
                both = rng.random() < (0.3 if how == "engine" else 0.85)
                # Mostly the stream copy first: the pub/sub copy's refusal then yields to it.
                vias = ["stream", "pubsub"] if rng.random() < 0.75 else ["pubsub", "stream"]
                vias = vias if both else ["stream", "stream"]
                for v in vias:
                    await load._send(load._req(env, v, "twins", stream))
                    await asyncio.sleep(rng.uniform(0, 0.3))
                sent.append("+".join(vias))
        self.counts[f"twins_{how}"] += 1
        self.say(f"twins ({how}): {', '.join(sent)}")
        if how == "stop":
            await asyncio.sleep(rng.uniform(0, 0.4))
            await self.worker_term()
        elif how == "engine":
            await asyncio.sleep(rng.uniform(0.5, 3.0))
            for w in list(self.w.live):
                pid = engine_of(w) if w.name not in self.w.busy else None
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    self.say(f"SIGKILL llama-server {pid} of {w.name} (twins)")

    async def redis_freeze(self) -> None:
        if self.redis_lock.locked():
            return
        async with self.redis_lock:
            d = self.rng.choice([0.3, 1.0, 2.5, 4.0, 7.0])
            self.load.paused.set()
            await asyncio.sleep(0.05)
            frozen = now()
            self.fault.redis.freeze()
            self.counts["redis_freeze"] += 1
            self.say(f"SIGSTOP redis for {d}s")
            await asyncio.sleep(d)
            self.fault.redis.thaw()
            self.freezes.append((frozen, now()))
            self.say("SIGCONT redis")
            self.load.paused.clear()

    async def redis_kill(self) -> None:
        if self.redis_lock.locked():
            return
        async with self.redis_lock:
            d = self.rng.choice([0.2, 1.0, 2.5])
            self.load.paused.set()
            await asyncio.sleep(0.05)
            down = now()
            await asyncio.to_thread(self.fault.redis.kill)
            self.counts["redis_kill"] += 1
            self.say(f"SIGKILL redis, down {d}s")
            await asyncio.sleep(d)
            await asyncio.to_thread(self.fault.redis.start)
            self.say("redis restarted")
            rec = self.fault.recorder
            for _ in range(20):  # it noticed
                if not rec.subscribed.is_set():
                    break
                await asyncio.sleep(0.05)
            for _ in range(200):
                if rec.subscribed.is_set():
                    break
                await asyncio.sleep(0.05)
            self.recorder_gaps.append((down, now()))
            self.say("recorder back")
            self.load.paused.clear()


def _in_gap(gaps: list[tuple[float, float]], start: float, end: float) -> bool:
    return any(a <= end and start <= b + 1.5 for a, b in gaps)


def check(
    reqs: list[Req],
    messages: list[Any],
    gaps: list[tuple[float, float]],
    end: float,
    freezes: list[tuple[float, float]],
) -> tuple[list[dict], list[dict], Counter]:
    """Violations, inconclusive findings and counts over everything recorded."""
    by_channel: dict[str, list[tuple[int, Any]]] = {}
    for i, m in enumerate(messages):
        by_channel.setdefault(m.channel, []).append((i, m))
    violations: list[dict] = []
    unsure: list[dict] = []
    counts: Counter[str] = Counter()

    def flag(where: list[dict], what: str, group: list[Req], **more: Any) -> None:
        where.append(
            {
                "what": what,
                "requests": [
                    {
                        "n": r.n,
                        "kind": r.kind,
                        "via": r.via,
                        "reply_to": r.reply_to,
                        "correlation_id": r.correlation_id,
                        "id": r.envelope.get("id") if r.envelope else None,
                        "sent_at": round(r.sent_at, 3),
                        "cancelled_at": r.cancelled_at and round(r.cancelled_at, 3),
                        "ttl_ms": r.ttl_ms,
                        "heard": r.heard,
                        "send_error": r.send_error,
                        "options": (r.envelope or {}).get("payload", {}).get("options"),
                    }
                    for r in group
                ],
                **more,
            }
        )

    # Every message of the service: the contract.
    for m in messages:
        try:
            data = orjson.loads(m.data)
        except orjson.JSONDecodeError:
            continue
        src = data.get("source") if isinstance(data, dict) else None
        if isinstance(src, dict) and src.get("name") == "orion-llamaccp":
            counts["service messages"] += 1
            try:
                check_message(m.data)
            except Exception as exc:
                violations.append(
                    {"what": "contract", "channel": m.channel, "error": str(exc)[:800],
                     "message": m.data.decode(errors="replace")[:1500]}
                )  # fmt: skip

    groups: dict[str, list[Req]] = {}
    for r in reqs:
        if r.reply_to:
            groups.setdefault(r.reply_to, []).append(r)
    for reply_to, group in groups.items():
        answers = by_channel.get(reply_to, [])
        results = [(i, m) for i, m in answers]
        kinds = [orjson.loads(m.data).get("kind") for _, m in results]
        durable = any(r.via == "stream" for r in group)
        start = min(r.sent_at for r in group)
        answered_at = results[0][1].at if results else end
        near_gap = _in_gap(gaps, start, answered_at)
        sent_ok = [r for r in group if r.send_error is None]
        counts[f"{'durable' if durable else 'pubsub'} groups"] += 1
        brief = [m.data.decode(errors="replace")[:1200] for _, m in results]
        if any(k != "llm.chat.result" for k in kinds):
            flag(violations, "non-result on reply_to", group, kinds=kinds, messages=brief)
        if len(results) > 1:
            flag(violations, f"{len(results)} results on one reply_to", group, messages=brief)
            counts["answered twice"] += 1
        if durable:
            if not results:
                if not sent_ok:
                    counts["durable, send failed, unanswered"] += 1
                elif near_gap:
                    flag(unsure, "durable unanswered (a Redis restart around it)", group)
                    counts["durable lost?"] += 1
                else:
                    flag(violations, "durable request never answered", group)
                    counts["durable lost"] += 1
                continue
        elif not results:
            counts["pubsub unanswered"] += 1
            continue
        counts["answered"] += 1
        payload = orjson.loads(results[0][1].data)["payload"]
        error = payload.get("error")
        counts[f"outcome {'stream' if durable else 'pubsub'} {error or 'ok'}"] += 1
        # Is the error one this request could get?
        if error:
            details = payload.get("details", {})
            kinds_here = {r.kind for r in group}
            allowed = set() if durable else {"engine_unavailable", "overloaded", "upstream_failed"}
            if "engine_deaths" in details or "delivered" in str(details.get("message")):
                allowed.add("upstream_failed")
            if "cancel" in kinds_here or "dup_corr" in kinds_here:
                allowed.add("cancelled")
            if "short_ttl" in kinds_here:
                allowed.add("expired")
            if any(k.startswith("malformed") for k in kinds_here):
                allowed.add("validation_failed")
            if kinds_here & {"dup_key", "dup_corr", "same_env", "twins"}:
                allowed |= {"cancelled", "expired"}  # a stored answer of a twin
            if isinstance(details.get("attempt"), int) and details["attempt"] >= 5:
                allowed.add("upstream_failed")  # ORION_LLAMACPP_MAX_DELIVERIES
            mixed = payload.get("meta", {}).get("transport") == "pubsub"
            if (
                durable
                and mixed
                and error in {"engine_unavailable", "overloaded", "upstream_failed"}
            ):
                # Its answer where the stream copy was added well before and Redis was
                # steady: the stream copy answers it (``StreamCopies``), under a new
                # attempt where chunks went out (``Claims.hand_over``); not a generation
                # past its time limit, which the stream copy would not try again.
                added = [r.added_at for r in group if r.via == "stream" and r.added_at]
                ahead = answered_at - min(added) if added else 0.0
                chunked = any(
                    i < results[0][0]
                    for r in group
                    if r.chunk_channel
                    for i, _ in by_channel.get(r.chunk_channel, [])
                )
                steady = not _in_gap([*gaps, *freezes], start, answered_at)
                timed_out = "exceeded" in str(details.get("message"))
                where = violations if ahead > 3 and steady and not timed_out else unsure
                flag(where, f"durable request answered by its pub/sub copy: {error}", group,
                     messages=brief, stream_copy_ahead_s=round(ahead, 2),
                     chunked=chunked)  # fmt: skip
                allowed.add(error)
            if error not in allowed:
                flag(
                    violations if durable else unsure,
                    f"unexpected error {error}",
                    group,
                    messages=brief,
                )
        # Chunks: whole, before the result, none twice.
        chunk_ch = next((r.chunk_channel for r in group if r.chunk_channel), None)
        if chunk_ch is None:
            continue
        chunks = by_channel.get(chunk_ch, [])
        first_result_index = results[0][0]
        after = [m for i, m in chunks if i > first_result_index]
        if after:
            flag(
                violations,
                "chunk after the result",
                group,
                chunks=[m.data.decode(errors="replace")[:400] for m in after],
                result=brief[0],
            )
        cps = [orjson.loads(m.data)["payload"] for _, m in chunks]
        keys_ = [(c["attempt"], c["seq"]) for c in cps]
        if len(keys_) != len(set(keys_)):
            flag(violations, "a chunk twice", group, keys=keys_)
        by_attempt: dict[int, list[dict]] = {}
        for c in cps:
            by_attempt.setdefault(c["attempt"], []).append(c)
        for attempt, cs in by_attempt.items():
            seqs = [c["seq"] for c in cs]
            if seqs != list(range(len(seqs))):
                flag(
                    unsure if near_gap else violations,
                    f"chunks of attempt {attempt} not gapless/in order",
                    group,
                    seqs=seqs,
                )
        if not error and "duplicate_of_key" not in payload.get("meta", {}):
            attempt = payload["meta"]["attempt"]
            cs = by_attempt.get(attempt, [])
            text = "".join(c["delta"] for c in cs)
            if text != payload["content"]:
                flag(
                    unsure if near_gap else violations,
                    "chunks of the answer's attempt are not its text",
                    group,
                    attempt=attempt,
                    attempts=sorted(by_attempt),
                    chunks=len(cs),
                    chunk_text=text[:200],
                    content=payload["content"][:200],
                    result=brief[0],
                )
            if max(by_attempt, default=0) > attempt:
                flag(
                    unsure,
                    "chunks of a later attempt than the answer's",
                    group,
                    attempt=attempt,
                    attempts=sorted(by_attempt),
                )
    return violations, unsure, counts


@pytest.mark.timeout(900)
@pytest.mark.parametrize("fault_appendonly", [True])
@pytest.mark.parametrize("seed", SEEDS)
async def test_soak(fault: Fault, seed: int, fault_appendonly: bool, tmp_path: Path) -> None:
    print(f"\n=== soak episode seed={seed} fault_sec={FAULT_SEC}", flush=True)
    rng = random.Random(seed)
    t0 = now()
    log: list[str] = []
    workers = Workers(fault, random.Random(seed * 7919 + 1), log, t0)
    n_workers = rng.choice([2, 2, 3])
    if rng.random() < 0.5:  # tight: pub/sub refused soon, a request given up at one death
        workers.env = {
            "ORION_LLAMACPP_LOCAL_QUEUE": rng.choice(["0", "1"]),
            "ORION_LLAMACPP_REQUEST_CRASH_LIMIT": rng.choice(["1", "2"]),
        }
    workers.say(f"episode settings: {workers.env or 'as ever'}")
    for _ in range(n_workers):
        workers.spawn()
    for w in list(workers.live):
        await asyncio.to_thread(w.wait_ready, 120)
    workers.say(f"{n_workers} workers ready")
    load = Load(fault, random.Random(seed * 31 + 2), t0)
    chaos = Chaos(fault, random.Random(seed * 131 + 3), workers, load)
    sending = asyncio.create_task(load.run(interval=0.45))
    await asyncio.sleep(3)
    try:
        await chaos.run(until=now() + FAULT_SEC)
    finally:
        load.stop.set()
        await sending
        for pid in list(workers.stopped_pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    workers.say(f"faults over: {dict(chaos.counts)}; {len(load.reqs)} requests; settling")
    # Quiet: every durable request answered, or 150 s.
    deadline = now() + 150
    while now() < deadline:
        await asyncio.sleep(2)
        try:
            info = await asyncio.wait_for(fault.raw.xinfo_groups(STREAM), 5)
        except Exception:
            continue
        mine = [g for g in info if g["name"] in (GROUP, GROUP.encode())]
        if mine and mine[0]["pending"] == 0 and not mine[0].get("lag") and not load.tasks:
            break
    await asyncio.sleep(5)  # a second answer would show meanwhile
    info = await fault.raw.xinfo_groups(STREAM)
    pending = await fault.raw.xpending_range(STREAM, GROUP, "-", "+", 100)
    dlq = await fault.raw.xrange(STREAM + ":dlq")
    workers.say(f"settled: group {info}")
    end = now()
    messages = fault.recorder.messages
    violations, unsure, counts = check(load.reqs, messages, chaos.recorder_gaps, end, chaos.freezes)
    # Unanswered as far as the recorder heard: did the worker publish it (its guard)?
    for u in unsure:
        if u["what"].startswith("durable unanswered"):
            for r in u["requests"]:
                if r["id"]:
                    reply = hashlib.sha1(r["reply_to"].encode()).hexdigest()[:12]
                    guard = keys.answered(f"{r['id']}:{reply}")
                    u.setdefault("guard_set", []).append(bool(await fault.raw.exists(guard)))
    if pending:
        violations.append({"what": "stream entries still pending", "pending": str(pending)})
    counts["requests"] = len(load.reqs)
    counts["dead letters"] = len(dlq)
    counts.update({f"kind {k}": v for k, v in Counter(r.kind for r in load.reqs).items()})
    counts.update({f"via {k}": v for k, v in Counter(r.via for r in load.reqs).items()})
    alive = [w.name for w in workers.live if w.proc.poll() is None]
    exits = {w.name: w.proc.poll() for w in workers.all}
    OUT.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (a throwaway soak)
    report = {
        "seed": seed,
        "fault_sec": FAULT_SEC,
        "settings": workers.env,
        "faults": dict(chaos.counts),
        "counts": dict(counts),
        "violations": violations,
        "unsure": unsure,
        "fault_log": log,
        "workers": exits,
        "alive": alive,
        "logs": {w.name: str(w.log_path) for w in workers.all},
        "dlq": [str(e)[:300] for e in dlq][:20],
    }
    (OUT / f"soak-{seed}.json").write_text(json.dumps(report, indent=1, default=str))
    # keep the logs
    for w in workers.all:
        with contextlib.suppress(OSError):
            (OUT / f"soak-{seed}-{w.log_path.name}").write_text(w.log())
    print(f"=== seed={seed} faults={dict(chaos.counts)}", flush=True)
    print(f"=== seed={seed} counts={dict(sorted(counts.items()))}", flush=True)
    print(f"=== seed={seed} violations={len(violations)} unsure={len(unsure)}", flush=True)
    for v in violations:
        print("VIOLATION", json.dumps(v, default=str)[:3000], flush=True)
    for u in unsure:
        print("UNSURE", json.dumps(u, default=str)[:1500], flush=True)
    # Teardown kills: SIGCONT everything first.
    for w in workers.all:
        for pid in [w.pid, *w.engine_pids]:
            with contextlib.suppress(ProcessLookupError, psutil.Error):
                if pid_alive(pid):
                    os.kill(pid, signal.SIGCONT)
    assert not violations, f"seed {seed}: {len(violations)} violations"
