"""From settings to "what exactly we would launch": registry, profile, files, command line.

This is the one place that strings the layers together before anything runs, so ``command``,
``doctor``, ``run`` and the worker all agree on the same answer.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from orion_llamaccp.engine.binary import BinaryInfo, find_binary, probe
from orion_llamaccp.engine.command import LaunchSpec, build_launch
from orion_llamaccp.errors import EngineError
from orion_llamaccp.model.paths import ModelFiles, plan_files
from orion_llamaccp.profiles.models import Profile
from orion_llamaccp.profiles.registry import Registry, load_registry
from orion_llamaccp.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServicePlan:
    """The selected profile and the llama-server launch it produces."""

    settings: Settings
    registry: Registry
    profile: Profile
    files: ModelFiles
    binary: BinaryInfo | None
    launch: LaunchSpec
    binary_problem: str | None = None  # why there is no ``binary`` (require_binary=False)


def select_profile(settings: Settings, name: str | None = None) -> tuple[Registry, Profile]:
    """Load the registry and pick the profile; other profiles' problems become warnings."""
    registry = load_registry(settings.profiles_config_path)
    wanted = name or settings.profile_name
    profile = registry.select(
        wanted, named_by="the command's profile" if name else "LLM_PROFILE_NAME"
    )
    for other, problem in registry.problems.items():
        if other != wanted:
            log.warning("ignoring broken profile %s: %s", other, problem)
    return registry, profile


def build_plan(
    settings: Settings, *, profile_name: str | None = None, require_binary: bool = True
) -> ServicePlan:
    """Resolve everything needed to start llama-server, without starting it.

    With ``require_binary=False`` a missing binary is tolerated (the flag check is skipped),
    so ``command`` still shows what would run on a machine without llama-server.
    """
    registry, profile = select_profile(settings, profile_name)
    return plan_profile(settings, registry, profile, require_binary=require_binary)


def plan_profile(
    settings: Settings, registry: Registry, profile: Profile, *, require_binary: bool = True
) -> ServicePlan:
    """``build_plan`` for a profile already selected; runs the binary's ``--help``."""
    overrides = settings.overrides_for(profile.name)
    files = plan_files(profile, overrides.model_path, settings.environ())
    binary: BinaryInfo | None = None
    problem = None
    try:
        path = find_binary(settings.llama_server_bin, settings.build_path)
        binary = probe(path)
        binary_path = str(path)
    except EngineError as exc:
        if require_binary:
            raise
        problem = str(exc)
        binary_path = settings.llama_server_bin or "llama-server"
    launch = build_launch(
        profile,
        overrides,
        files,
        binary=binary,
        binary_path=binary_path,
        environ=settings.environ(),
        unix_socket=socket_path if settings.engine_unix_socket else None,
    )
    return ServicePlan(settings, registry, profile, files, binary, launch, problem)


def socket_path(host: str, port: int) -> str | None:
    """Where llama-server listens for the worker beside its TCP ``host:port``: in
    ``socket_folder``, named by the address and port, which no other llama-server on this
    host can hold (two may share a port on two addresses: ``127.0.0.1`` and a LAN one).
    None, and TCP only, where there is no such folder or the path is too long for a
    socket's address or holds a comma (``--host`` is a comma-separated list)."""
    folder = socket_folder()
    if folder is None:
        return None
    path = str(folder / f"{_NOT_IN_A_NAME.sub('_', host)}-{port}.sock")
    return path if len(path.encode()) < _SOCKET_PATH_MAX and "," not in path else None


def socket_folder() -> Path | None:
    """The folder of this user's own (mode 0700, made here) that llama-server's sockets
    live in, so that no other user can take a name first or connect. None where that
    cannot be had: no temporary folder takes a file (a read-only root), or the folder is
    not ours alone."""
    try:
        folder = Path(tempfile.gettempdir()) / f"orion-llamaccp-{os.getuid()}"
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.lstat()
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        return None
    return folder


# An IPv6 address's colons and brackets, or whatever else a host setting holds.
_NOT_IN_A_NAME = re.compile(r"[^A-Za-z0-9.-]")
_SOCKET_PATH_MAX = 104  # sun_path holds 108 bytes on Linux, 104 on the BSDs and macOS
