"""compose/docker-compose.yml, checked without a Docker engine (none runs on these machines):
the variables it uses are documented, and its mount, ports, GPUs and stop behaviour agree
with the image, the profiles and the settings."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

import pytest

from orion_llamaccp.engine.supervisor import SupervisorPolicy
from orion_llamaccp.profiles.models import expand_path
from orion_llamaccp.profiles.registry import load_registry
from orion_llamaccp.settings import Settings
from orion_llamaccp.stopping import GOODBYES_SEC
from tests.deploy.container import (
    COMPOSE,
    CPU_SERVICE,
    ENV_EXAMPLES,
    GPU_SERVICE,
    REPO,
    container_env,
    example_values,
    instructions,
    interpolate,
    load_compose,
    parse_duration,
    published_ports,
    read_env_example,
    referenced_variables,
    service,
)

SERVICES = (GPU_SERVICE, CPU_SERVICE)


def _registry_profiles():
    return load_registry(REPO / "config" / "llm_profiles.yaml").profiles


def test_compose_parses_and_every_variable_it_uses_is_documented() -> None:
    compose = load_compose()
    assert set(SERVICES) <= set(compose["services"])
    examples = [read_env_example(path) for path in ENV_EXAMPLES]
    documented = {name: ex.comments[name] for ex in examples for name in ex.values}
    used = referenced_variables(compose)
    missing = sorted(used - set(documented))
    assert not missing, f"{COMPOSE.name} uses variables no env example lists: {missing}"
    unexplained = sorted(name for name in used if not documented[name])
    assert not unexplained, f"listed without a comment above them: {unexplained}"


def test_every_env_example_variable_reaches_the_container_or_compose() -> None:
    # Variables reach the container only through `environment:`: one listed in an example
    # but not used by compose would be silently dropped.
    used = referenced_variables(load_compose())
    for path in ENV_EXAMPLES:
        dropped = sorted(set(read_env_example(path).values) - used)
        assert not dropped, f"{path.name} lists variables compose never uses: {dropped}"


@pytest.mark.parametrize("name", SERVICES)
def test_model_mount_is_the_container_cache_dir_and_holds_every_model_root(name: str) -> None:
    env = container_env(name)
    host_cache = example_values()["LLM_CACHE_DIR"]
    volumes = [interpolate(v, example_values()).split(":") for v in service(name)["volumes"]]
    mounts = [spec for spec in volumes if spec[0] == host_cache]
    assert len(mounts) == 1, f"one mount of the host cache LLM_CACHE_DIR expected: {volumes}"
    target = PurePosixPath(mounts[0][1])
    assert PurePosixPath(env["LLM_CACHE_DIR"]) == target
    # compose's `environment:` must set it: the env files hold the *host* path.
    assert service(name)["environment"]["LLM_CACHE_DIR"] == str(target)
    for profile in _registry_profiles().values():
        root = PurePosixPath(expand_path(profile.llamacpp.model_root, env))
        assert root.is_relative_to(target), (
            f"profile {profile.name}: model_root {profile.llamacpp.model_root!r} is {root} "
            f"in the container, outside the mounted cache {target}"
        )


@pytest.mark.parametrize("name", SERVICES)
def test_published_port_is_where_llama_server_listens(
    name: str,
) -> None:
    env = container_env(name)
    ((host_port, container_port),) = published_ports(name, example_values())
    assert host_port == int(read_env_example(ENV_EXAMPLES[1]).values["LLAMACPP_HOST_PORT"])
    for profile in _registry_profiles().values():
        port = int(env.get("LLAMACPP_PORT_OVERRIDE") or profile.llamacpp.port)
        host = env.get("LLAMACPP_HOST_OVERRIDE") or profile.llamacpp.host
        assert port == container_port, f"profile {profile.name} listens on {port}"
        # A server on the container's loopback is unreachable through a published port.
        assert host in ("0.0.0.0", "::"), f"profile {profile.name} binds {host}"
    exposed = [rest for keyword, rest in instructions() if keyword == "EXPOSE"]
    assert exposed == [str(container_port)]


def test_external_network_app_net() -> None:
    compose = load_compose()
    assert compose["networks"]["app-net"] == {"external": True}
    for name in (*SERVICES, "redis"):
        assert service(name)["networks"] == ["app-net"]


def test_gpu_service_reserves_all_gpus_and_cpu_service_none() -> None:
    (device,) = service(GPU_SERVICE)["deploy"]["resources"]["reservations"]["devices"]
    # All of them: the profiles' device_ids are host indices, which a subset would renumber.
    assert device == {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    assert "deploy" not in service(CPU_SERVICE)
    assert service(CPU_SERVICE)["profiles"] == ["cpu"], "only when asked for, by name"


@pytest.mark.parametrize("name", SERVICES)
def test_restart_policy_and_stop_grace_covers_the_drain(name: str) -> None:
    svc = service(name)
    assert svc["restart"] == "unless-stopped"
    assert svc["init"] is True, "tini forwards SIGTERM to the wrapper and reaps strays"
    drain = container_env(name).get("ORION_LLAMACPP_DRAIN_TIMEOUT_SEC") or (
        Settings.model_fields["drain_timeout_sec"].default
    )
    needed = float(drain) + SupervisorPolicy().stop_grace + GOODBYES_SEC
    assert parse_duration(svc["stop_grace_period"]) >= needed


@pytest.mark.parametrize("name", SERVICES)
def test_the_image_user_s_uid_comes_from_the_env_file(name: str) -> None:
    """The host cache must be writable by the image's user: the docs said to build with
    ``--build-arg APP_UID``, but compose passed no build arguments, so ``up --build`` made
    the user 1000 again."""
    assert "ARG APP_UID=1000" in (REPO / "Dockerfile").read_text()
    uid = service(name)["build"]["args"]["APP_UID"]
    assert interpolate(uid, {"APP_UID": "1234"}) == "1234"
    assert interpolate(uid, {"APP_UID": ""}) == "1000"  # blank in the env file


def test_redis_runs_only_behind_the_standalone_profile() -> None:
    redis = service("redis")
    assert redis["profiles"] == ["standalone"]
    assert re.fullmatch(r"redis:\d+\.\d+(\.\d+)?-alpine", redis["image"]), "pin the tag"
    # One per host: two projects' Redis on app-net both answered to `redis` (Docker's DNS
    # takes turns), and the workers of one fleet were split between two buses.
    assert redis["container_name"] == "orion-llamaccp-redis"
    assert "profiles" not in service(GPU_SERVICE), "the production service starts by default"
    # Without ORION_BUS_URL the wrapper talks to this Redis, by its service name.
    env = {k: v for k, v in example_values().items() if k != "ORION_BUS_URL"}
    raw = service(GPU_SERVICE)["environment"]["ORION_BUS_URL"]
    assert interpolate(raw, env) == "redis://redis:6379/0"
