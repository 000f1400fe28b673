"""Real worker processes (``python -m orion_llamaccp run``) and a recorder of the bus."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import orjson
import redis
import redis.asyncio as aioredis

from orion_llamaccp.engine.lifeline import die_with_parent
from orion_llamaccp.engine.plan import socket_folder
from orion_llamaccp.engine.supervisor import _remove_stale_socket
from tests.support.procs import pid_alive, wait_until, wait_until_async

CAUGHT_UP = "test:recorder:caught-up:"  # the recorder's own markers, never recorded


@dataclass
class Published:
    channel: str
    data: bytes
    at: float

    @property
    def message(self) -> dict[str, Any]:
        return orjson.loads(self.data)


class BusRecorder:
    """Records every PUBLISH on a Redis (PSUBSCRIBE *) from a background thread.

    Every read catches up first (``_catch_up``): the recorder reads on a connection and a
    thread of its own, so a result the test's client holds, or a worker's exit, can be
    ahead of what was recorded, and a test reading at once missed the last chunks.
    """

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url, socket_connect_timeout=1)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe("*")
        self.subscribed = threading.Event()
        self.subscribed.set()
        # Markers go out on a client of their own that gives up at once on a frozen Redis.
        self._marker_client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        self._messages: list[Published] = []
        self._lock = threading.Lock()
        self._markers: dict[str, threading.Event] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                message = self.pubsub.get_message(timeout=0.2)
            except (redis.ConnectionError, redis.TimeoutError, ValueError, OSError):
                if self._stop.is_set():
                    return
                self._resubscribe()
                continue
            if message and message["type"] == "pmessage":
                self._record(message["channel"].decode(errors="replace"), message["data"])

    def _record(self, channel: str, data: bytes) -> None:
        with self._lock:
            if channel.startswith(CAUGHT_UP):
                self._markers.pop(channel, threading.Event()).set()
            else:
                self._messages.append(Published(channel, data, time.monotonic()))

    def _catch_up(self, timeout: float = 5.0) -> None:
        """Wait until every message Redis published before this call is recorded: Redis
        sends a subscriber its messages in the order it ran the PUBLISHes, so once a
        marker published now is back, everything before it is in. Where Redis is down or
        the recorder not subscribed, or cut off meanwhile (fault tests: a restart, a
        message over the pub/sub output buffer limit), or closed, nothing more is waited
        for: what was published then is lost to it anyway."""
        if self._stop.is_set():
            return
        marker = f"{CAUGHT_UP}{uuid4().hex}"
        seen = threading.Event()
        with self._lock:
            self._markers[marker] = seen
        try:
            heard = self._marker_client.publish(marker, b"")
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            heard = 0
        if heard:
            seen.wait(timeout)
        with self._lock:
            self._markers.pop(marker, None)

    @property
    def messages(self) -> list[Published]:
        self._catch_up()
        with self._lock:
            return list(self._messages)

    def _resubscribe(self) -> None:
        """Redis went away (a fault test): subscribe again once it is back. Markers on
        their way are lost with the connection: their waiters are let go, as they start
        and once subscribed again (one published meanwhile may have counted the old one)."""
        self.subscribed.clear()
        self._let_markers_go()
        while not self._stop.is_set():
            try:
                self.pubsub.close()
                self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                self.pubsub.psubscribe("*")
                self.pubsub.get_message(timeout=0.2)
                self.subscribed.set()
                self._let_markers_go()
                return
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                time.sleep(0.1)

    def _let_markers_go(self) -> None:
        with self._lock:
            for seen in self._markers.values():
                seen.set()

    def on(self, channel: str) -> list[Published]:
        return [m for m in self.messages if m.channel == channel]

    def kinds(self, kind: str) -> list[Published]:
        return [m for m in self.messages if (_decoded(m.data) or {}).get("kind") == kind]

    def from_service(self, service: str = "orion-llamaccp") -> list[Published]:
        return [m for m in self.messages if _source_name(m.data) == service]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.pubsub.close()
        self.client.close()
        self._marker_client.close()


def _source_name(data: bytes) -> object:
    """Who says it sent a message: hostile ones a test publishes may hold anything there
    (a ``source`` that is a list failed a fault test's teardown on Redis 6.2's run)."""
    source = (_decoded(data) or {}).get("source")
    return source.get("name") if isinstance(source, dict) else None


def _decoded(data: bytes) -> dict[str, Any] | None:
    """A published message as a JSON object; None for anything else."""
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return message if isinstance(message, dict) else None


class WorkerProc:
    """``orion-llamaccp run`` in a child process of its own session."""

    def __init__(self, env: dict[str, str], *, name: str, log_dir: Path, redis_url: str) -> None:
        self.env = {"INSTANCE_ID": name, **env}  # a test may give two workers one id
        self.name = name
        self.log_path = log_dir / f"worker-{name}.log"
        self.redis = redis.Redis.from_url(redis_url)
        self.proc: subprocess.Popen[bytes] | None = None
        self.engine_pids: list[int] = []

    def start(self) -> WorkerProc:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orion_llamaccp", "run"],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),  # and its llama-server with it
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def announcement(self) -> dict[str, Any] | None:
        profile = self.env["LLM_PROFILE_NAME"]
        raw = self.redis.hget(f"orion:llm:profile:registry:{profile}:{self.name}", "announcement")
        return orjson.loads(raw)["payload"] if raw else None

    def state(self) -> str | None:
        found = self.announcement()
        return found["state"] if found else None

    def wait_state(self, state: str, timeout: float = 60) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"worker {self.name} exited {self.proc.returncode}:\n{self.log()[-3000:]}"
                )
            found = self.announcement()
            return found if found and found["state"] == state else None

        found = wait_until(
            reached, timeout=timeout, interval=0.05, what=f"worker {self.name} {state}"
        )
        assert isinstance(found, dict)
        if found.get("engine_pid"):
            self.engine_pids.append(int(found["engine_pid"]))
        return found

    def wait_ready(self, timeout: float = 60) -> dict[str, Any]:
        return self.wait_state("ready", timeout)

    def engine_pid(self) -> int:
        found = self.announcement()
        assert found and found.get("engine_pid"), "no engine pid announced"
        pid = int(found["engine_pid"])
        self.engine_pids.append(pid)
        return pid

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)

    def terminate(self, timeout: float = 60) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with_group = self.proc.pid
            os.kill(with_group, signal.SIGKILL)
            self.proc.wait(10)

    def engines_gone(self) -> bool:
        return not any(pid_alive(pid) for pid in self.engine_pids)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        self.terminate()
        wait_until(self.engines_gone, timeout=15, what=f"llama-server of {self.name} gone")
        self.redis.close()
        port = self.env.get("LLAMACPP_PORT_OVERRIDE")
        folder = socket_folder()
        if port and folder:  # a worker killed in the test could not remove its socket file
            for left in folder.glob(f"*-{port}.sock"):  # on whatever host its profile names
                _remove_stale_socket(str(left))
        if hasattr(self, "_log"):
            self._log.close()


async def metrics_once_counted(port: int, requests: int) -> str:
    """The worker's ``/metrics`` once it has counted ``requests`` answers: it counts one
    after its publish returns, which its caller may hear first."""
    from prometheus_client.parser import text_string_to_metric_families

    async def counted() -> str | None:
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
        total = sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "orion_llamacpp_requests_total"
        )
        return text if total >= requests else None

    return str(await wait_until_async(counted, what=f"{requests} answers counted"))


def close_all(workers: list[WorkerProc]) -> None:
    """Close every worker, whatever one of them raises (raised at the end): one left
    running stays subscribed to the session's Redis and answers the next tests."""
    with contextlib.ExitStack() as stack:
        for worker in workers:
            stack.callback(worker.close)


class EngineProbe:
    """A llama-server seen from outside, to check what it really did: its slots (``/slots``)
    and its own counters (``/metrics``, served when the profile sets ``metrics: true``).

    A slot is idle again whether its generation was cut off or ran to its end, so its
    state cannot tell a cancel that worked from one that did not; llama-server's
    ``tokens_predicted_total`` can: it counts every token generated, those of a generation
    cut off by a closed connection included (added as the slot is released, in the same
    loop step that makes it idle, and ``/slots`` and ``/metrics`` are answered by that loop).
    """

    def __init__(self, url: str) -> None:
        self.http = httpx.AsyncClient(base_url=url, timeout=5.0)

    async def __aenter__(self) -> EngineProbe:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    async def counters(self) -> dict[str, float]:
        """``/metrics`` by name, without the ``llamacpp:`` prefix."""
        response = await self.http.get("/metrics")
        response.raise_for_status()
        found: dict[str, float] = {}
        for line in response.text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.split()
                found[name.removeprefix("llamacpp:")] = float(value)
        return found

    async def predicted(self) -> int:
        """Tokens llama-server generated since it started, cut-off generations included."""
        return int((await self.counters())["tokens_predicted_total"])

    async def slots(self) -> list[dict[str, Any]]:
        response = await self.http.get("/slots")
        response.raise_for_status()
        return response.json()

    async def last_task(self) -> int:
        """The id of the last task a slot took: a later one is a request that reached it."""
        return max(int(s.get("id_task", -1)) for s in await self.slots())

    async def settled(
        self, *, after_task: int | None = None, timeout: float = 60, what: str = ""
    ) -> int:
        """``predicted`` once no slot is processing and, with ``after_task``, a slot has
        taken a later task (the request under test reached llama-server, ``what`` says
        which). The timeout is generous: a generation that was not stopped must show in the
        count, not end the test as a timeout."""

        async def idle() -> bool:
            slots = await self.slots()
            if any(s.get("is_processing") for s in slots):
                return False
            return after_task is None or max(int(s.get("id_task", -1)) for s in slots) > after_task

        await wait_until_async(
            idle,
            timeout=timeout,
            what=f"llama-server idle{f' after {what}' if what else ''}",
        )
        return await self.predicted()


def worker_gauge(port: int, name: str) -> float:
    """One gauge of a worker's ``/metrics`` (``METRICS_PORT``), served from a thread of its
    own, so it answers while the worker's event loop waits on Redis."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    line = next(x for x in text.splitlines() if x.startswith(name + "{"))
    return float(line.rsplit(" ", 1)[1])


async def wait_replicas_counted(
    recorder: BusRecorder, redis_url: str, channel: str, instances: list[str], beats: int = 3
) -> None:
    """Until ``instances`` are all the subscribers of ``channel`` and each has counted them.

    A worker counts the replicas on its intake channel (``PUBSUB NUMSUB``) once per
    heartbeat interval, on a schedule of its own, and starts a pub/sub request before its
    claim while it counts itself alone. No heartbeat says what it counted; but the count
    runs on the heartbeat's period, so ``beats`` (3) heartbeats of each worker after the
    subscribers were seen span two periods, one of which holds a whole count."""
    client = aioredis.Redis.from_url(redis_url)
    try:

        async def subscribed() -> bool:
            ((_, count),) = await client.pubsub_numsub(channel)
            return int(count) == len(instances)

        await wait_until_async(
            subscribed, timeout=30, what=f"{len(instances)} subscriber(s) on {channel}"
        )
    finally:
        await client.aclose()

    def heard(instance: str) -> int:
        return sum(
            m.message["payload"]["instance"] == instance for m in recorder.kinds("system.health.v1")
        )

    seen = {instance: heard(instance) for instance in instances}
    await wait_until_async(
        lambda: all(heard(i) >= seen[i] + beats for i in instances),
        timeout=30,
        what=f"{beats} heartbeats of each of {instances}",
    )
