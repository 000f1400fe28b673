"""The Makefile's own paths: what `make run` on a fresh machine relies on."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

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
