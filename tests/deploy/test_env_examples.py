"""The env examples, the compose environment and the image's ENV name only variables the
service reads (its settings' aliases) or Compose itself uses, so they cannot drift."""

from __future__ import annotations

from orion_llamaccp.settings import variables_read
from tests.deploy.container import (
    ENV_EXAMPLES,
    GPU_SERVICE,
    SERVICE_ENV_EXAMPLE,
    dockerfile_env,
    load_compose,
    read_env_example,
    referenced_variables,
    service,
)

# Read by Compose (interpolation), never by the service.
COMPOSE_ONLY = {"LLAMACPP_HOST_PORT", "APP_UID"}  # the published port; the build's UID
# Set in the image for Python itself.
IMAGE_ONLY = {"PATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"}


SERVICE_READS = variables_read()


def test_every_example_variable_is_read_by_the_service_or_by_compose() -> None:
    assert {"LLM_PROFILE_NAME", "ORION_BUS_URL", "CUDA_VISIBLE_DEVICES_OVERRIDE"} <= SERVICE_READS
    for path in ENV_EXAMPLES:
        unknown = sorted(set(read_env_example(path).values) - SERVICE_READS - COMPOSE_ONLY)
        assert not unknown, f"{path.name}: nothing reads {unknown}"
    assert not COMPOSE_ONLY - referenced_variables(load_compose()), "stale COMPOSE_ONLY entry"


def test_container_environment_and_image_env_are_read_by_the_service() -> None:
    unknown = sorted(set(service(GPU_SERVICE)["environment"]) - SERVICE_READS)
    assert not unknown, f"compose environment: nothing reads {unknown}"
    unknown = sorted(set(dockerfile_env()) - SERVICE_READS - IMAGE_ONLY)
    assert not unknown, f"Dockerfile ENV: nothing reads {unknown}"


def test_the_examples_are_the_seed_selection_and_overrides_and_shared_stack_apart() -> None:
    root, svc = (set(read_env_example(path).values) for path in ENV_EXAMPLES)
    assert not root & svc, f"listed in both env examples: {sorted(root & svc)}"
    assert "ORION_BUS_URL" in root
    assert {"LLM_PROFILE_NAME", "LLM_CACHE_DIR", "LLAMACPP_HOST_PORT"} <= svc


def test_every_override_reaches_the_container() -> None:
    """Compose passes on only the variables it lists: an override the README offers
    but compose did not list (``LLAMACPP_MODEL_PATH_OVERRIDE``
    was one) was set in ``compose/.env`` and did nothing. Host and port are fixed there."""
    overrides = {name for name in SERVICE_READS if name.endswith("_OVERRIDE")}
    # And the worker's own id: two containers of one profile on one host need one each.
    overrides.add("INSTANCE_ID")
    passed = set(service(GPU_SERVICE)["environment"])
    assert overrides - passed == set(), sorted(overrides - passed)
    svc = set(read_env_example(SERVICE_ENV_EXAMPLE).values)
    fixed = {"LLAMACPP_HOST_OVERRIDE", "LLAMACPP_PORT_OVERRIDE"}
    assert overrides - fixed - svc == set(), sorted(overrides - fixed - svc)
