"""Read the deployment files the way Docker and Compose do, for tests without a Docker engine.

Only what our files use is supported: Dockerfile instructions with ``\\`` continuations and
``#`` comment lines; Compose interpolation ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
``${VAR:?error}``, ``${VAR?error}``, ``$VAR`` and ``$$``; env files of ``NAME=value`` lines.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = REPO / "compose" / "docker-compose.yml"
ROOT_ENV_EXAMPLE = REPO / ".env.example"
SERVICE_ENV_EXAMPLE = REPO / "compose" / ".env.example"
# In the order of the documented command: the service file's values win.
ENV_EXAMPLES = (ROOT_ENV_EXAMPLE, SERVICE_ENV_EXAMPLE)
GPU_SERVICE = "llamaccp"
CPU_SERVICE = "llamaccp-cpu"

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_REF = re.compile(rf"\$(?:\$|\{{({_NAME})(?:(:?[-?])([^}}]*))?\}}|({_NAME}))")
_ASSIGN = re.compile(rf"^({_NAME})=(.*)$")


# ----------------------------------------------------------------------------- env files


@dataclass(frozen=True)
class EnvExample:
    """An env file: its values, and the comment block above each variable."""

    path: Path
    values: dict[str, str]
    comments: dict[str, str]


def read_env_example(path: Path) -> EnvExample:
    values: dict[str, str] = {}
    comments: dict[str, str] = {}
    block: list[str] = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(stripped.lstrip("#").strip())
            continue
        match = _ASSIGN.match(stripped)
        if match:
            values[match.group(1)] = match.group(2)
            comments[match.group(1)] = " ".join(block).strip()
        elif stripped:
            raise AssertionError(f"{path}: not NAME=value: {line!r}")
        block = []
    return EnvExample(path, values, comments)


def example_values() -> dict[str, str]:
    """What ``--env-file .env --env-file compose/.env`` gives Compose, from the examples."""
    merged: dict[str, str] = {}
    for path in ENV_EXAMPLES:
        merged.update(read_env_example(path).values)
    return merged


# ----------------------------------------------------------------------------- compose


def referenced_variables(node: Any) -> set[str]:
    """Every variable interpolated in a parsed Compose file (comments are not values)."""
    if isinstance(node, dict):
        return set().union(*(referenced_variables(v) for v in [*node, *node.values()]))
    if isinstance(node, list):
        return set().union(*(referenced_variables(v) for v in node))
    names = set()
    for match in _REF.finditer(str(node)):
        name = match.group(1) or match.group(4)
        if name:
            names.add(name)
    return names


def interpolate(value: str, env: Mapping[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        op, arg = match.group(2), match.group(3)
        found = env.get(name)
        unset = found is None or (found == "" and op is not None and op.startswith(":"))
        if op in ("-", ":-") and unset:
            return arg
        if op in ("?", ":?") and unset:
            raise AssertionError(f"compose would refuse to start: {name}: {arg}")
        return found or ""

    return _REF.sub(substitute, value)


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def service(name: str) -> dict[str, Any]:
    return load_compose()["services"][name]


def service_environment(name: str, env: Mapping[str, str]) -> dict[str, str]:
    """A service's ``environment:``, interpolated with ``env`` (the --env-file values)."""
    raw = service(name).get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {key: interpolate(str(value), env) for key, value in raw.items()}


def parse_duration(text: str) -> float:
    """Compose durations: ``90s``, ``1m30s``, ``2m``."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def published_ports(name: str, env: Mapping[str, str]) -> list[tuple[int, int]]:
    """``(host port, container port)`` for each ``ports:`` entry of a service."""
    found = []
    for entry in service(name).get("ports", []):
        spec = interpolate(str(entry), env).split("/")[0]
        *host, container = spec.split(":")
        found.append((int(host[-1]) if host else 0, int(container)))
    return found


# ----------------------------------------------------------------------------- Dockerfile


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` in order, continuations joined, comments dropped."""
    found: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        found.append((keyword.upper(), rest.strip()))
    return found


def arg_defaults(stage_only: bool = False) -> dict[str, str]:
    """``ARG`` defaults: before ``FROM`` (global) or inside the stage."""
    found: dict[str, str] = {}
    in_stage = False
    for keyword, rest in instructions():
        if keyword == "FROM":
            in_stage = True
        elif keyword == "ARG" and in_stage == stage_only:
            name, _, default = rest.partition("=")
            found[name] = default
    return found


def base_image(build_args: Mapping[str, str]) -> str:
    env = {**arg_defaults(), **build_args}
    (image,) = [interpolate(rest, env) for kw, rest in instructions() if kw == "FROM"]
    return image.split()[0]


def dockerfile_env() -> dict[str, str]:
    """``ENV`` values as the image sets them (``$VAR`` in values left as written)."""
    found: dict[str, str] = {}
    for keyword, rest in instructions():
        if keyword == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                found[name] = value
    return found


def exec_form(keyword: str) -> list[str]:
    (rest,) = [rest for kw, rest in instructions() if kw == keyword]
    value = json.loads(rest)
    assert isinstance(value, list), f"{keyword} is not in exec (JSON array) form: {rest}"
    return value


def container_env(name: str = GPU_SERVICE) -> dict[str, str]:
    """What the container's process sees: image ``ENV``, then the service's ``environment:``
    filled from the env examples (Compose's order of precedence); ``PATH`` left out."""
    env = {k: v for k, v in dockerfile_env().items() if k != "PATH"}
    env.update(service_environment(name, example_values()))
    return env
