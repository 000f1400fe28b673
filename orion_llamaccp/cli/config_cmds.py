"""Subcommands that read configuration and never serve: profiles, show, validate, command,
doctor."""

from __future__ import annotations

import argparse
import errno
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from orion_llamaccp.errors import OrionLlamaError, SecretUnset, UnsupportedKnob
from orion_llamaccp.settings import Settings, env_file, env_file_values, unread_variables

# The registry, the engine and rich are imported by the commands that use them: every
# command builds this parser, and `run` subscribes before it reads the profile.
if TYPE_CHECKING:
    from orion_llamaccp.engine.plan import ServicePlan
    from orion_llamaccp.profiles.models import Profile
    from orion_llamaccp.profiles.registry import Registry

Handler = Callable[[argparse.Namespace, Settings], int]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profiles", help="table of every profile in the registry")
    p.set_defaults(handler=cmd_profiles)
    p = sub.add_parser("show", help="one profile, as validated")
    p.add_argument("name", nargs="?", help="profile name (default: LLM_PROFILE_NAME)")
    p.set_defaults(handler=cmd_show)
    p = sub.add_parser("validate", help="check the whole registry; exit 1 on any error")
    p.set_defaults(handler=cmd_validate)
    p = sub.add_parser("command", help="the effective llama-server argv and env (secrets masked)")
    p.add_argument("--json", action="store_true", help="print {argv: [...], env: {...}}")
    p.add_argument("--profile", help="profile name (default: LLM_PROFILE_NAME)")
    p.set_defaults(handler=cmd_command)
    p = sub.add_parser("doctor", help="check config, profile, binary, model, Redis, GPUs")
    p.set_defaults(handler=cmd_doctor)


def cmd_profiles(args: argparse.Namespace, settings: Settings) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from orion_llamaccp.profiles.registry import load_registry

    registry = load_registry(settings.profiles_config_path)
    table = Table(title=escape(f"profiles in {registry.path}"))
    for column in ("name", "backend", "model_id", "GPUs", "ctx", "slots", "status"):
        table.add_column(column)
    for name in registry.names:
        # A registry's text is the operator's, not markup: "p[/x]" ended the command.
        label = escape(name) + (" *" if name == settings.profile_name else "")
        if name in registry.profiles:
            p = registry.profiles[name]
            gpus = ",".join(map(str, p.gpu.device_ids)) or "-"
            ctx, slots = p.llamacpp.ctx_size, p.llamacpp.parallel
            table.add_row(
                label,
                p.backend,
                escape(p.model_id or ""),
                gpus,
                str(ctx or "model"),
                str(slots or "auto"),
                "ok",
            )
        elif name in registry.others:
            other = registry.others[name]
            row = (label, escape(other.backend), "", "", "", "", "skipped (other backend)")
            table.add_row(*row)
        else:
            table.add_row(label, "llamacpp", "", "", "", "", "[red]invalid[/red]")
    Console(width=200).print(table)
    print("* = selected by LLM_PROFILE_NAME")
    return 0


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    import yaml

    from orion_llamaccp.profiles.registry import load_registry

    registry = load_registry(settings.profiles_config_path)
    if args.name:
        profile = registry.select(args.name, named_by="the command's profile")
    else:
        profile = registry.select(settings.profile_name)
    data = _masked(profile)
    print(settings.redact(yaml.safe_dump(data, sort_keys=False, allow_unicode=True)), end="")
    return 0


_SECRET_WORDS = frozenset({"key", "apikey", "token", "secret", "password", "passwd"})


def _masked(profile: Profile) -> dict[str, Any]:
    """A profile as ``show`` prints it: the values of secret-bearing flags in
    ``extra_args`` hidden (as ``command`` does), and those of any key of another tool's
    beside ours named like a secret (``api_key``, ``hf_token``)."""
    from orion_llamaccp.engine.command import MASK, mask_argv

    def secret(name: object) -> bool:
        words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name)).lower()  # camelCase too
        return bool(_SECRET_WORDS.intersection(re.split(r"[^a-z0-9]+", words)))

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: MASK if secret(k) else walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(item) for item in value]
        return value

    data = profile.model_dump(mode="json", exclude_none=True)
    for name in (profile.model_extra or {}).keys() & data.keys():  # not those left empty
        data[name] = MASK if secret(name) else walk(data[name])
    llamacpp = data["llamacpp"]
    if "extra_args" in llamacpp:
        llamacpp["extra_args"] = mask_argv(llamacpp["extra_args"])
    return data


def _planned(
    settings: Settings, registry: Registry
) -> Iterator[tuple[str, ServicePlan | None, OrionLlamaError | None]]:
    """Each llama.cpp profile as `run` would build its command (no binary needed): a clash
    of extra_args with a knob, a flag this build does not take, a path out of model_root,
    two spellings of one flag. ``SecretUnset``: its api_key_env variable is unset here."""
    from orion_llamaccp.engine.plan import plan_profile

    for name, profile in registry.profiles.items():
        try:
            yield name, plan_profile(settings, registry, profile, require_binary=False), None
        except OrionLlamaError as exc:
            yield name, None, exc


def cmd_validate(args: argparse.Namespace, settings: Settings) -> int:
    from orion_llamaccp.profiles.registry import load_registry

    registry = load_registry(settings.profiles_config_path)
    problems = dict(registry.problems)
    unchecked = None  # why the flags were not checked against a binary
    for name, plan, exc in _planned(settings, registry):
        if isinstance(exc, SecretUnset):
            print(f"ok       {name} (its api_key_env variable is unset here: not checked)")
        elif exc is not None:
            problems[name] = f"profiles.{name}: {exc}"
        elif plan is not None:
            unchecked = unchecked or plan.binary_problem
            print(f"ok       {name}")
    # Named, and unusable, the binary fails the check (the setup is wrong); not found, it
    # is a machine without llama-server (a CI gate), said and passed.
    broken_binary = bool(unchecked and settings.llama_server_bin)
    if unchecked:
        level = "ERROR   " if broken_binary else "note    "
        print(f"{level} flags not checked against a llama-server binary: {unchecked}")
    for name, other in registry.others.items():
        print(f"skipped  {name} (backend {other.backend})")
    for problem in problems.values():
        for line in problem.splitlines():
            print(f"ERROR    {line}")
    total = len(registry.profiles) + len(registry.problems)
    valid = total - len(problems)
    unchecked_said = " (their flags not checked: see above)" if broken_binary else ""
    print(f"{valid}/{total} llama.cpp profiles valid in {registry.path}{unchecked_said}")
    return 1 if problems or broken_binary else 0


def cmd_command(args: argparse.Namespace, settings: Settings) -> int:
    from orion_llamaccp.engine.plan import build_plan

    plan = build_plan(settings, profile_name=args.profile, require_binary=False)
    launch = plan.launch
    if args.json:
        out = {"argv": launch.masked_argv(), "env": launch.masked_env()}
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    if plan.binary is None:
        print(f"# note: flags not checked against a llama-server binary: {plan.binary_problem}")
    if replaced := launch.replaced_gpus(settings.environ()):  # said at `run` too, in the log
        print(f"# note: {replaced}")
    print(f"# profile {plan.profile.name}; model from {plan.files.source}")
    print(f"# model file: {plan.files.model} ({_model_state(plan)})")
    for key, value in launch.masked_env().items():
        print(f"{key}={value} \\")
    print(" \\\n  ".join(_pairs(launch.masked_argv())))
    return 0


def _model_state(plan: ServicePlan) -> str:
    from orion_llamaccp.model.paths import no_download_reason, not_a_file

    if plan.files.model.is_file():
        return "present"
    if plan.files.model.exists():  # a folder: it is there, and it is not the file
        return not_a_file(plan.files.model, plan.files.source)
    reason = no_download_reason(plan.profile, plan.files)  # a repo named, but not used
    return f"missing: {reason}" if reason else "not downloaded yet"


def _pairs(argv: list[str]) -> list[str]:
    """Group each flag with its value, one per line, shell-quoted."""
    from orion_llamaccp.engine.command import is_flag

    lines: list[str] = [shlex.quote(argv[0])]
    for arg in argv[1:]:
        if is_flag(arg) or len(lines) == 1 or " " in lines[-1]:
            lines.append(shlex.quote(arg))
        else:
            lines[-1] += " " + shlex.quote(arg)
    return lines


# ----------------------------------------------------------------------------- doctor

# A check's outcome: ok (True), failed (False), or a note (None): not yet so, and not
# wrong (a model `run` will download), or not checked here.
Check = tuple[str, bool | None, str]


def _check_plan(settings: Settings) -> tuple[list[Check], ServicePlan | None]:
    from orion_llamaccp.engine.binary import find_binary, probe
    from orion_llamaccp.profiles.registry import load_registry

    lines: list[Check] = []
    try:
        registry = load_registry(settings.profiles_config_path)
        # Counted as `validate` counts them: it found two a plain read had let through.
        planned = {name: (plan, exc) for name, plan, exc in _planned(settings, registry)}
        invalid = [*registry.problems, *(n for n, (_, e) in planned.items() if _invalid(e))]
        lines.append(
            (
                "config",
                True,
                f"{registry.path}: {len(registry.profiles)} llama.cpp profiles, "
                f"{len(registry.others)} of other backends, {len(invalid)} invalid"
                + (
                    f" ({', '.join(invalid)}: `orion-llamaccp validate` says why)"
                    if invalid
                    else ""
                ),
            )
        )
    except OrionLlamaError as exc:
        lines.append(("config", False, str(exc)))
        return lines, None
    try:
        profile = registry.select(settings.profile_name)
    except OrionLlamaError as exc:  # the registry read: its profile is what is wrong
        lines.append(("profile", False, str(exc)))
        return lines, None
    plan, unplanned = planned[settings.profile_name]  # the plan `run` would build
    # A flag the binary lacks is the flags' line; anything else that stops the plan (a
    # model_path out of model_root, no model file named, api_key_env unset) is the
    # profile's: it said "ok profile" and then "FAIL flags" with no flag wrong.
    flags_wrong = plan is None and isinstance(unplanned, UnsupportedKnob)
    if plan is None and not flags_wrong:
        lines.append(("profile", False, str(unplanned)))
    else:
        lines.append(("profile", True, f"{profile.name} ({profile.label})"))
    try:
        path = find_binary(settings.llama_server_bin, settings.build_path)
        info = probe(path)
        lines.append(("binary", True, f"{path} (build {info.build}, {len(info.flags)} flags)"))
    except OrionLlamaError as exc:
        lines.append(("binary", False, str(exc)))
    if plan is None:
        if flags_wrong:
            lines.append(("flags", False, str(unplanned)))
        return lines, None
    if plan.binary is not None:
        lines.append(("flags", True, "every knob of the profile maps to a flag this build accepts"))
    return lines, plan


def _invalid(exc: OrionLlamaError | None) -> bool:
    return exc is not None and not isinstance(exc, SecretUnset)


def _check_model(plan: ServicePlan, settings: Settings) -> Check:
    from orion_llamaccp.model.paths import downloads_model, not_a_file

    path = plan.files.model
    if path.exists() and not path.is_file():  # said to be "missing", a folder given
        return ("model", False, f"{path} is {not_a_file(path, plan.files.source)}")
    if not path.is_file():
        if not downloads_model(plan.profile, plan.files):
            return ("model", False, f"{path} is missing: {_missing_model_advice(plan)}")
        repo = plan.profile.llamacpp.hf_repo_id
        if settings.hf_hub_offline:
            said = f"HF_HUB_OFFLINE forbids downloading it from {repo}: copy it there or unset it"
            return ("model", False, f"{path} is missing, and {said}")
        # A profile's first start, not a fault: `run` downloads it.
        return ("model", None, f"{path} is missing: {_missing_model_advice(plan)}")
    try:
        from orion_llamaccp.model.gguf_check import verify_gguf

        info = verify_gguf(path)
        return ("model", True, f"{path} ({info.size / 1e6:.1f} MB, GGUF v{info.version})")
    except ImportError:
        return ("model", True, f"{path} ({path.stat().st_size / 1e6:.1f} MB)")
    except OrionLlamaError as exc:
        return ("model", False, str(exc))


def _missing_model_advice(plan: ServicePlan) -> str:
    """What happens to a missing model file: a model path setting switches the download
    off even when the profile names hf_repo_id, and the advice must not promise one."""
    from orion_llamaccp.model.paths import downloads_model, no_download_reason

    profile, files = plan.profile, plan.files
    if downloads_model(profile, files):
        return (
            f"it will be downloaded from {profile.llamacpp.hf_repo_id} on `run` "
            f"(or `orion-llamaccp fetch`)"
        )
    return no_download_reason(profile, files) or "copy the GGUF there"


def _check_port(plan: ServicePlan) -> Check:
    """Whether llama-server can listen where the profile says: a port taken (another
    llama-server, this profile's worker already running) failed only at `run`, after five
    restarts."""
    host, port = plan.launch.host, plan.launch.port
    where = f"{host}:{port}"
    if "," in host or host.endswith(".sock"):
        return ("port", None, f"{where}: an address list, not checked")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
            probe.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return _port_taken(plan, where)
        return ("port", False, f"llama-server could not listen on {where}: {exc.strerror or exc}")
    return ("port", True, f"{where} is free for llama-server")


def _port_taken(plan: ServicePlan, where: str) -> Check:
    """Taken by this profile's own llama-server (``dc exec ... doctor`` in a running
    container, where it is as it should be), or by anything else (`run` would fail)."""
    import httpx

    host = plan.launch.host
    ask = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host.strip("[]")
    headers = {"Authorization": f"Bearer {plan.launch.api_key}"} if plan.launch.api_key else {}
    try:
        props = httpx.get(f"http://{ask}:{plan.launch.port}/props", headers=headers, timeout=3)
        serving = props.json().get("model_path") if props.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        serving = None
    if serving and Path(serving).resolve() == plan.files.model.resolve():
        return ("port", None, f"{where} is this profile's llama-server, running (its worker's)")
    by = f"a llama-server serving {serving}" if serving else "another server"
    return (
        "port",
        False,
        f"{where} is taken (by {by}): `run` would fail; stop it or set LLAMACPP_PORT_OVERRIDE",
    )


def _check_redis(settings: Settings) -> Check:
    import redis

    from orion_llamaccp.bus.server import unfit

    url = settings.bus_url.get_secret_value()
    where = settings.bus_url_display
    if "ORION_BUS_URL" not in os.environ and "ORION_BUS_URL" in env_file_values():
        where += f" (ORION_BUS_URL from {env_file()})"  # a compose .env on the host, often
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        client.ping()
        try:
            info = {**client.info("server"), **client.info("memory")}
        except redis.ResponseError:  # INFO denied by an ACL: left unchecked
            info = {}
        version = str(info.get("redis_version", "?"))
        problem = next(iter(unfit(info)), None) or _refused_channels(settings, client, url)
        client.close()
        if problem:
            return ("redis", False, f"{where}: {settings.redact(problem)}")
        return ("redis", True, f"{where} answers (Redis {version})")
    except (redis.RedisError, OSError, ValueError) as exc:
        return (
            "redis",
            False,
            f"{where}: {type(exc).__name__}: "
            f"{settings.redact(str(exc))}; "
            + (
                "fix the user name or password in ORION_BUS_URL"
                if isinstance(exc, redis.AuthenticationError)
                else "start Redis or set ORION_BUS_URL"
            ),
        )


def _refused_channels(settings: Settings, client: Any, url: str) -> str | None:
    """What the bus user may not do on the channels `run` uses (an ACL): doctor said ok,
    and `run` found out at its SUBSCRIBE, or its first heartbeat."""
    from orion_llamaccp.bus.permissions import refused, user_of
    from orion_llamaccp.worker.announce import channels_for, listened

    subscribe = listened(settings, channels_for(settings, settings.profile_name))
    publish = {
        settings.health_channel: "heartbeats",
        settings.announce_channel: "announcements",
        settings.error_channel: "error reports",
    }
    return refused(client, user_of(client, url), publish=publish, subscribe=subscribe)


def _check_gpus(plan: ServicePlan) -> Check:
    """The GPUs the profile runs layers on (``LaunchSpec.gpus_required``) against those
    ``nvidia-smi -L`` lists: a pin to a GPU that is not there fails the start."""
    pinned = plan.launch.gpus_required
    if pinned is None:
        said = plan.launch.env.get("CUDA_VISIBLE_DEVICES")
        why = f"CUDA_VISIBLE_DEVICES={said}, no layers on GPUs" if said else "no GPU pinned"
        return ("gpus", True, f"none needed ({why})")
    smi = shutil.which("nvidia-smi")
    if smi is None:
        detail = f"profile runs layers on GPUs {pinned}, but no nvidia-smi here: run on a GPU host"
        return ("gpus", False, f"{detail}, or {_ON_THE_CPU}")
    out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=False)
    found = _gpus_listed(out.stdout)
    missing = [gpu for gpu in pinned.split(",") if gpu.strip() not in found]
    if not missing:
        return ("gpus", True, f"profile pins GPUs {pinned}: all listed by nvidia-smi")
    have = ", ".join(sorted(found, key=lambda g: (len(g), g))) or "none"
    detail = (
        f"profile pins GPUs {pinned}, but nvidia-smi lists no {', '.join(missing)} (it "
        f"lists {have}): fix gpu.device_ids or CUDA_VISIBLE_DEVICES_OVERRIDE"
    )
    return ("gpus", False, f"{detail}, or {_ON_THE_CPU}")


_ON_THE_CPU = "set LLAMACPP_N_GPU_LAYERS_OVERRIDE=0 to serve on the CPU"


def _gpus_listed(listing: str) -> set[str]:
    """Every name a pin may give each GPU of ``nvidia-smi -L``: its index and its UUID
    (``GPU 0: NVIDIA H100 (UUID: GPU-...)``), and a MIG device's UUID."""
    found: set[str] = set()
    for line in listing.splitlines():
        if match := re.match(r"\s*GPU (\d+):", line):
            found.add(match.group(1))
        found.update(re.findall(r"UUID: ((?:GPU|MIG)-[\w-]+)", line))
    return found


def _check_env() -> Check:
    unread = unread_variables()
    return ("env", not unread, "; ".join(unread) or "every variable of ours is read")


def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    lines, plan = _check_plan(settings)
    lines.insert(0, _check_env())
    if plan is not None:
        lines.append(_check_model(plan, settings))
        lines.append(_check_port(plan))
    lines.append(_check_redis(settings))
    if plan is not None:
        lines.append(_check_gpus(plan))
    for name, ok, detail in lines:
        print(f"{_SAID[ok]}  {name:8} {detail}")
    return 1 if any(ok is False for _, ok, _ in lines) else 0


_SAID = {True: "ok  ", False: "FAIL", None: "note"}
