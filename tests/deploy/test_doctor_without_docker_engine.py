"""The image's entrypoint, run here in place of a container (no Docker engine on these
machines): ``orion-llamaccp doctor`` with the container's environment, parsed out of the
Dockerfile, the compose file and the env examples.

Two stand-ins: /app/config does not exist here, so LLM_PROFILES_CONFIG_PATH points at this
repository's config/, and a temporary folder plays the /models mount (LLM_CACHE_DIR); the
bus URL points at the test Redis in place of the compose `redis` service.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from orion_llamaccp.profiles.models import expand_path
from orion_llamaccp.profiles.registry import load_registry
from tests.deploy.container import CPU_SERVICE, GPU_SERVICE, REPO, container_env
from tests.support.procs import free_port

CONFIG = REPO / "config" / "llm_profiles.yaml"


def _doctor(env: dict[str, str], cwd: Path) -> tuple[int, dict[str, tuple[str, str]]]:
    """Run the installed console script, as the image's ENTRYPOINT does; parse its lines."""
    script = Path(sys.executable).parent / "orion-llamaccp"
    out = subprocess.run(
        [str(script), "doctor"],
        env=env,
        cwd=cwd,  # like the image's WORKDIR /app: no .env file to pick up
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = {}
    for line in out.stdout.splitlines():
        status, name, detail = [*line.split(None, 2), "", ""][:3]
        lines[name] = (status, detail)
    assert lines, out.stdout + out.stderr
    return out.returncode, lines


def _container_env_here(service: str, cache: Path, redis_url: str) -> dict[str, str]:
    env = container_env(service)
    assert env["LLM_PROFILES_CONFIG_PATH"] == "/app/config/llm_profiles.yaml"
    assert env["LLM_CACHE_DIR"] == "/models"
    env |= {
        "LLM_PROFILES_CONFIG_PATH": str(CONFIG),
        "LLM_CACHE_DIR": str(cache),
        "ORION_BUS_URL": redis_url,
    }
    # The autouse fixture already removed our variables from os.environ; keep PATH, HOME...
    return {**os.environ, **env, "PYTHONUNBUFFERED": "1"}


def _expected_model(profile_name: str, env: dict[str, str]) -> Path:
    cfg = load_registry(CONFIG).profiles[profile_name].llamacpp
    return expand_path(cfg.model_root, env) / cfg.hf_filename


def test_doctor_with_the_gpu_service_env_without_docker_engine(
    tmp_path: Path, redis_url: str
) -> None:
    env = _container_env_here(GPU_SERVICE, tmp_path / "models", redis_url)
    profile = env["LLM_PROFILE_NAME"]  # from compose/.env.example
    _, lines = _doctor(env, tmp_path)
    assert lines["config"][0] == "ok", lines["config"]
    assert lines["profile"][0] == "ok" and lines["profile"][1].startswith(f"{profile} (")
    # The image's llama-server is not here: proves the Dockerfile ENV reached the wrapper.
    assert lines["binary"][0] == "FAIL" and "/app/llama-server" in lines["binary"][1]
    model = _expected_model(profile, env)
    assert lines["model"][0] == "note"  # not a fault: the first start downloads it
    assert lines["model"][1].startswith(f"{model} is missing: it will be downloaded"), lines
    assert lines["redis"][0] == "ok", lines["redis"]


def test_doctor_with_the_cpu_service_env_and_a_real_binary_without_docker_engine(
    tmp_path: Path, redis_url: str, llama_server_bin: Path, tiny_model: Path
) -> None:
    env = _container_env_here(CPU_SERVICE, tmp_path / "models", redis_url)
    env |= {"LLM_PROFILE_NAME": "gemma3-270m-cpu", "LLAMA_SERVER_BIN": str(llama_server_bin)}
    env["LLAMACPP_PORT_OVERRIDE"] = str(free_port())  # the image's 8080 may be taken here
    model = _expected_model("gemma3-270m-cpu", env)
    assert model.is_relative_to(tmp_path / "models"), "the CPU profile lives in the cache"
    model.parent.mkdir(parents=True)
    shutil.copy(tiny_model, model)
    code, lines = _doctor(env, tmp_path)
    for name in ("env", "config", "profile", "binary", "flags", "model", "port", "redis", "gpus"):
        assert lines[name][0] == "ok", f"{name}: {lines[name][1]}"
    assert lines["model"][1].startswith(str(model))
    assert code == 0
