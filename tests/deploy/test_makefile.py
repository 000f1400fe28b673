"""The Makefile's own paths: what `make run` on a fresh machine relies on."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support.procs import RedisServer, free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
@pytest.mark.parametrize(
    "cache", [None, "", "/data/models"], ids=["default", "blank", "LLM_CACHE_DIR"]
)
def test_make_puts_the_demo_model_where_the_default_profile_looks(cache: str | None) -> None:
    """The default profile's ``model_root`` is ``${LLM_CACHE_DIR}/gguf``; ``make demo-model``
    put the file under ``~/.cache`` whatever LLM_CACHE_DIR said, and ``make run`` then
    downloaded it from the Hub (or, offline, failed)."""
    env = {k: v for k, v in os.environ.items() if k != "LLM_CACHE_DIR"}
    if cache is not None:
        env["LLM_CACHE_DIR"] = cache
    done = subprocess.run(
        ["make", "-n", "demo-model"], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    root = cache or f"{Path.home()}/.cache/orion-llamaccp/models"
    assert f"assemble('{root}/gguf/gemma-3-270m-q4_k_m.gguf')" in done.stdout, done.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_make_redis_checks_the_bus_the_worker_reads_from_its_env_file(tmp_path: Path) -> None:
    """``make run`` checked (or started) a Redis at the Makefile's default URL while the
    worker read another from ``.env`` (deployment.md's ``redis://redis:6379/0``), and then
    waited for it for good."""
    env_file = tmp_path / ".env"
    env_file.write_text("ORION_BUS_URL=redis://:s3cret@redis.invalid:6390/0\n")
    env = {k: v for k, v in os.environ.items() if k != "ORION_BUS_URL"}
    env["ORION_LLAMACPP_ENV_FILE"] = str(env_file)

    done = subprocess.run(
        ["make", "-s", "redis"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )

    assert done.returncode != 0, done.stdout
    assert "no Redis answers at redis.invalid:6390 (ORION_BUS_URL)" in done.stderr, done.stderr
    assert "s3cret" not in done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_make_help_names_every_target() -> None:
    """``make help`` listed 5 of 14 targets: ``format`` and ``lint-docker``, which the
    README and deployment.md name, were not among them."""
    targets = re.findall(r"^([a-z][a-z-]*):(?!=)", (REPO / "Makefile").read_text(), re.M)
    said = subprocess.run(
        ["make", "-s", "help"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    listed = set(re.findall(r"^make ([a-z-]+) ", said, re.M))
    assert set(targets) - {"help"} == listed, said


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_make_redis_says_how_to_stop_the_redis_it_started(tmp_path: Path) -> None:
    """With nothing at the URL, ``make redis`` starts a redis-server that outlives make,
    and said nothing of it beyond its start."""
    port = free_port()
    env = {**os.environ, "ORION_BUS_URL": f"redis://127.0.0.1:{port}/0", "TMPDIR": str(tmp_path)}
    env.pop("ORION_LLAMACPP_ENV_FILE", None)
    try:
        done = subprocess.run(
            ["make", "-s", "redis"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
        )
        stop = f"redis-cli -h 127.0.0.1 -p {port} shutdown nosave"
        assert done.returncode == 0 and stop in done.stdout, done.stdout + done.stderr
        subprocess.run(stop.split(), check=True, capture_output=True, timeout=10)
    finally:
        for proc in psutil.process_iter(["cmdline"]):
            if f"127.0.0.1:{port}" in " ".join(proc.info["cmdline"] or []):
                proc.kill()


@pytest.fixture(scope="module")
def redis_with_a_password(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(
        tmp_path_factory.mktemp("redis-pw"), extra_args=("--requirepass", "s3cret")
    ).start()
    yield server
    server.stop()


@pytest.mark.parametrize("rest", ["?password=***", "#x", "/0?password=***"])
def test_ensure_redis_finds_a_redis_with_a_password_at_a_url_with_no_database(
    redis_with_a_password: RedisServer, tmp_path: Path, rest: str
) -> None:
    """``redis://host:port?password=...`` (the password in the query, no ``/db``) read as
    port ``6379?password=***``: the Redis there, which answers PING only after AUTH, was
    not found, and ``make run`` tried to start a redis-server on that "port", and failed."""
    port = redis_with_a_password.port
    done = subprocess.run(
        [str(REPO / "scripts/ensure-redis.sh"), f"redis://127.0.0.1:{port}{rest}"],
        env={**os.environ, "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"redis port 127.0.0.1:{port} is open" in done.stdout, done.stdout
