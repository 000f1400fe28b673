"""Real processes for tests: Redis servers on free ports, waiting with deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import psutil
import redis.asyncio as aioredis

from orion_llamaccp.engine.lifeline import die_with_parent

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, for a server a test starts a moment later.

    Not the kernel's pick (``bind`` to port 0): that comes from the ephemeral range, where
    every outgoing connection (the worker's to Redis, say) also takes its own port, so one
    of them could hold it by the time the server binds; and a port just released could be
    picked again for the next server of the same test. So: a random port below that
    range, free now, and never handed out twice in one run.
    """
    low = _ephemeral_low()
    for _ in range(1000):
        port = random.randrange(max(1024, low - 16384), low)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port below {low}")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def ipv6_loopback() -> bool:
    """Whether this machine can bind ``::1`` (some containers have no IPv6)."""
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def wait_until(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> object:
    """Poll ``predicate`` until truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def wait_until_async(
    predicate: Callable[[], Awaitable[object] | object],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value) or isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


FREEZER = Path("/sys/fs/cgroup/freezer")  # cgroup v1's freezer, where it is mounted


def can_freeze() -> bool:
    return (FREEZER / "tasks").is_file() and os.access(FREEZER, os.W_OK)


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """``pid`` frozen by cgroup v1's freezer: in state D, where a SIGKILL waits until it is
    thawed, as for a process stuck in the kernel (a hung GPU driver, a network file
    system gone). Thawed and its cgroup removed on the way out."""
    group = FREEZER / f"orion-test-{os.getpid()}-{pid}"
    group.mkdir()
    try:
        (group / "cgroup.procs").write_text(str(pid))  # every thread ("tasks": one)
        (group / "freezer.state").write_text("FROZEN")
        wait_until(
            lambda: (group / "freezer.state").read_text().strip() == "FROZEN",
            what=f"pid {pid} frozen",
        )
        yield
    finally:
        (group / "freezer.state").write_text("THAWED")
        for proc in (group / "cgroup.procs").read_text().split():  # alive: back to the top
            with contextlib.suppress(OSError):
                (FREEZER / "cgroup.procs").write_text(proc)
        group.rmdir()


def llama_servers_under(pid: int) -> list[int]:
    """llama-server processes descended from ``pid`` (including reparented ones by name)."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if "llama-server" in " ".join(child.cmdline()[:1]):
                found.append(child.pid)
        except psutil.Error:  # gone, or a zombie: no longer a server
            continue
    return found


class RedisServer:
    """A redis-server of our own on a free port; kill, freeze and restart it at will."""

    def __init__(
        self,
        workdir: Path,
        *,
        appendonly: bool = False,
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
        binary: str | None = None,
    ) -> None:
        # ORION_TEST_REDIS_SERVER: every test's Redis another build (the whole suite ran
        # on Redis 6.2 so: ``ORION_TEST_REDIS_SERVER=$ORION_TEST_REDIS_OLDEST make test``).
        binary = binary or os.environ.get("ORION_TEST_REDIS_SERVER") or shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.workdir = workdir
        self.appendonly = appendonly
        self.port = port or free_port()
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--dir",
            str(self.workdir),
            "--logfile",
            str(self.workdir / "redis.log"),
            "--protected-mode",
            "no",
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent(),  # a test or bench killed mid-run leaves no Redis
        )
        wait_until(self._answers, timeout=10, what=f"redis-server on port {self.port}")
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))  # up, password or not
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)

    def freeze(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self) -> RedisServer:
        self.kill()
        return self.start()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


async def subscribers(client: object, channel: str) -> int:
    """How many connections are subscribed to ``channel`` (PUBSUB NUMSUB)."""
    counts = await client.pubsub_numsub(channel)  # type: ignore[attr-defined]
    return int(counts[0][1]) if counts else 0


async def wait_stream_acked(client: object, stream: str, group: str, timeout: float = 10.0) -> None:
    """Every entry of ``group`` acked (a worker acks just after publishing the result)."""

    async def acked() -> bool:
        groups = await client.xinfo_groups(stream)  # type: ignore[attr-defined]
        mine = [g for g in groups if g["name"] in (group, group.encode())]
        return bool(mine) and mine[0]["pending"] == 0 and not mine[0].get("lag")

    await wait_until_async(acked, timeout=timeout, what=f"{stream} fully acked by {group}")


async def replica_of(replica: aioredis.Redis, primary: RedisServer) -> None:
    """Make ``replica`` a replica of ``primary`` and wait for their link."""
    await replica.replicaof("127.0.0.1", primary.port)

    async def linked() -> bool:
        return (await replica.info("replication")).get("master_link_status") == "up"

    await wait_until_async(linked, timeout=30, what=f"a replica of {primary.port}")
