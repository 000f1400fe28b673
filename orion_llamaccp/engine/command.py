"""Where the llama-server command line is built.

One function, ``build_launch``, turns (profile, overrides, model files, binary capabilities)
into the argv (a list, never a shell string) and the environment variables we set. Every
knob maps to its current flag; a knob whose flag the probed binary does not accept is an
error naming the knob, the flag and the binary, never silently dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from orion_llamaccp.engine.binary import BinaryInfo
from orion_llamaccp.errors import ConfigError, SecretUnset, UnsupportedKnob
from orion_llamaccp.model.paths import ModelFiles
from orion_llamaccp.profiles.models import LlamaCppConfig, Profile
from orion_llamaccp.settings import Overrides

API_KEY_ENV = "LLAMA_API_KEY"  # what --help names for --api-key in the pinned build
MASK = "***"
# Flags whose value is a secret, every alias (the pinned build's --help has no others).
SECRET_FLAGS = frozenset({"--api-key", "--hf-token", "-hft"})
# Keys llama-server would ask of every request, the worker's own included: through
# api_key_env, which the worker reads too. A key file beside it adds keys for other
# clients (llama-server takes both), and only then.
KEY_FLAGS = frozenset({"--api-key", "--api-key-file"})


def _plain(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _floats(values: tuple[float, ...]) -> str:
    return ",".join(_plain(v) for v in values)


# knob -> (flag, how to render the value; None = a switch with no value)
KNOBS: dict[str, tuple[str, Callable[[Any], str] | None]] = {
    "ctx_size": ("--ctx-size", _plain),
    "n_gpu_layers": ("--n-gpu-layers", _plain),
    "threads": ("--threads", _plain),
    "parallel": ("--parallel", _plain),
    "batch_size": ("--batch-size", _plain),
    "ubatch_size": ("--ubatch-size", _plain),
    "flash_attn": ("--flash-attn", _plain),
    "split_mode": ("--split-mode", _plain),
    "tensor_split": ("--tensor-split", _floats),
    "no_context_shift": ("--no-context-shift", None),
    "kv_unified": ("--kv-unified", None),
    "chat_template_kwargs": ("--chat-template-kwargs", _json),
    "reasoning_budget": ("--reasoning-budget", _plain),
    "reasoning": ("--reasoning", _plain),
    "reasoning_format": ("--reasoning-format", _plain),
    "image_min_tokens": ("--image-min-tokens", _plain),
    "image_max_tokens": ("--image-max-tokens", _plain),
    "rope_scaling": ("--rope-scaling", _plain),
    "rope_scale": ("--rope-scale", _plain),
    "yarn_orig_ctx": ("--yarn-orig-ctx", _plain),
    "temperature": ("--temp", _plain),
    "top_k": ("--top-k", _plain),
    "top_p": ("--top-p", _plain),
    "min_p": ("--min-p", _plain),
    "presence_penalty": ("--presence-penalty", _plain),
    "n_predict": ("--n-predict", _plain),
    "spec_type": ("--spec-type", _plain),
    "spec_draft_n_max": ("--spec-draft-n-max", _plain),
    "n_gpu_layers_draft": ("--n-gpu-layers-draft", _plain),
    "draft_min": ("--spec-draft-n-min", _plain),
    "draft_max": ("--spec-draft-n-max", _plain),
    "metrics": ("--metrics", None),
}
# Switches whose default llama-server picks itself: false is a flag of its own.
SWITCHED_OFF = {"kv_unified": "--no-kv-unified"}
# The environment's overrides win over these profile knobs.
OVERRIDABLE = ("ctx_size", "n_gpu_layers", "threads", "parallel", "batch_size")


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start llama-server, and a masked view of it for humans."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    host: str
    port: int
    secret_env: frozenset[str] = field(default_factory=frozenset)
    api_key: str | None = field(default=None, repr=False)
    # Variables that this build's llama-server reads as flags (``--help``), besides any
    # ``LLAMA_ARG_*``: not inherited, so that only the profile and overrides set it.
    flag_env: frozenset[str] = field(default_factory=frozenset)
    # Where llama-server also listens, for the worker's own requests (``--host``); None:
    # the TCP port only. Other hosts and tools still reach it at ``base_url``.
    unix_socket: str | None = None
    # The GPUs pinned (``gpu.device_ids``, ``CUDA_VISIBLE_DEVICES_OVERRIDE``) with layers
    # asked on them: a llama-server that finds no usable GPU does not serve this profile.
    gpus_required: str | None = None
    # The files the model layer fetched and checked for it (``ModelFiles.all``): a split
    # model's later parts are not on the command line.
    model_files: tuple[str, ...] = ()

    def child_env(self, environ: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
        """llama-server's environment: ``environ`` without the variables it would read as
        flags (a stray ``LLAMA_API_KEY`` made it refuse the worker; ``LLAMA_ARG_*`` change
        what the profile and ``command`` say), plus ours. Also the names left out."""
        dropped = sorted(
            name
            for name in environ
            if name.startswith("LLAMA_ARG_") or name == API_KEY_ENV or name in self.flag_env
        )
        kept = {k: v for k, v in environ.items() if k not in dropped}
        return {**kept, **self.env}, [name for name in dropped if name not in self.env]

    def replaced_gpus(self, environ: Mapping[str, str]) -> str | None:
        """Why the GPUs llama-server sees differ from those the environment named, if they
        do: the pin wins, but a scheduler's job or a container numbers its GPUs from 0,
        and a pin to another one runs on someone else's card or finds none (llama.cpp
        then says "no usable GPU found", and the start fails: ``gpus_required``)."""
        inherited = environ.get("CUDA_VISIBLE_DEVICES")
        pinned = self.env.get("CUDA_VISIBLE_DEVICES")
        if inherited is None or pinned is None or inherited.strip() == pinned:
            return None
        return (
            f"CUDA_VISIBLE_DEVICES={inherited} from the environment is replaced by "
            f"{pinned} (the profile's gpu.device_ids, or CUDA_VISIBLE_DEVICES_OVERRIDE): "
            "inside a container or a scheduler's job the GPUs it was given are numbered "
            "from 0"
        )

    def __repr__(self) -> str:
        """Masked: a traceback's locals, a debugger or a log of the spec showed the API
        key, through ``env``, though ``api_key`` itself was kept out of the repr."""
        return (
            f"LaunchSpec(argv={self.masked_argv()!r}, env={self.masked_env()!r}, "
            f"host={self.host!r}, port={self.port!r}, unix_socket={self.unix_socket!r})"
        )

    def masked_env(self) -> dict[str, str]:
        return {k: (MASK if k in self.secret_env else v) for k, v in self.env.items()}

    def masked_argv(self) -> list[str]:
        return mask_argv(self.argv)

    @property
    def sleeps_when_idle(self) -> bool:
        """Whether llama-server may sleep when idle (``--sleep-idle-seconds`` other than
        -1; it has no environment variable): a look at it then keeps it awake."""
        argv = self.argv
        return any(
            arg == "--sleep-idle-seconds" and argv[i + 1 : i + 2] != ("-1",)
            for i, arg in enumerate(argv)
        )

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        if ":" in host and not host.startswith("["):  # an IPv6 literal
            host = f"[{host}]"
        return f"http://{host}:{self.port}"


def mask_argv(argv: tuple[str, ...] | list[str]) -> list[str]:
    """Hide values of secret-bearing flags, in case ``extra_args`` carries one: in every
    form ``_extra_args`` reads (``--flag value``, ``--flag=value``, ``"--flag value"``)."""
    masked = list(argv)
    for i, arg in enumerate(masked):
        flag, value = _flag_and_value(arg)
        if flag not in SECRET_FLAGS:
            continue
        if value is not None:
            masked[i] = f"{flag}{arg[len(flag)]}{MASK}"  # its own separator, '=' or a space
        elif i + 1 < len(masked):
            masked[i + 1] = MASK
    return masked


def effective_knobs(cfg: LlamaCppConfig, overrides: Overrides) -> dict[str, Any]:
    """The profile's knobs with the environment's overrides applied: what runs."""
    values = {knob: getattr(cfg, knob) for knob in KNOBS}
    for knob in OVERRIDABLE:
        override = getattr(overrides, knob)
        if override is not None:
            values[knob] = override
    return values


def _check(binary: BinaryInfo | None, profile: str, key: str, flag: str) -> None:
    if binary is not None and not binary.accepts(flag):
        raise UnsupportedKnob(
            f"profile '{profile}' sets {key}, which needs the flag {flag}, but "
            f"{binary.path} (build {binary.build}) does not accept it: remove the knob, "
            f"or use a llama-server build that has {flag} (see `llama-server --help`)"
        )


def _knob_args(profile: Profile, values: dict[str, Any], binary: BinaryInfo | None) -> list[str]:
    args: list[str] = []
    set_by: dict[str, str] = {}  # flag -> knob: two names for one flag (draft_max) clash
    for knob, (flag, render) in KNOBS.items():
        value = values[knob]
        if value is False and knob in SWITCHED_OFF:
            flag, value = SWITCHED_OFF[knob], True
        if value is None or value is False:
            continue
        if flag in set_by:  # llama-server would silently take the last one
            raise ConfigError(
                f"profile '{profile.name}' sets both llamacpp.{set_by[flag]} and "
                f"llamacpp.{knob}, which are the same flag {flag}: keep one"
            )
        set_by[flag] = knob
        _check(binary, profile.name, f"llamacpp.{knob}", flag)
        args.extend([flag] if render is None else [flag, render(value)])
    return args


def is_flag(arg: str) -> bool:
    """A flag, not a value: ``-1`` and ``-1e-3`` are numbers."""
    if not arg.startswith("-"):
        return False
    try:
        float(arg)
    except ValueError:
        return True
    return False


def _extra_args(profile: Profile, binary: BinaryInfo | None, owned: set[str]) -> list[str]:
    """The profile's raw flags; ``--flag=value`` and ``"--flag value"`` (one YAML string)
    become ``--flag value``, since that is what was meant and llama-server refuses the
    one-argument forms ("invalid argument"). Only the flag is named in an error: the value
    may be a key."""
    extra: list[str] = []
    value_next = False
    for arg in profile.llamacpp.extra_args:
        if value_next or not is_flag(arg):
            extra.append(arg)
            value_next = False
            continue
        flag, value = _flag_and_value(arg)
        _check(binary, profile.name, f"llamacpp.extra_args ({flag})", flag)
        keys_set = (binary.names(flag) if binary else {flag}) & KEY_FLAGS
        if keys_set and ("--api-key" in keys_set or not profile.llamacpp.api_key_env):
            raise ConfigError(
                f"profile '{profile.name}' sets {flag} in llamacpp.extra_args: llama-server "
                f"would then refuse the worker's own requests (401, a crash loop), since "
                f"the worker must send the key too. Put the key in an environment variable "
                f"and name it in llamacpp.api_key_env (the key then stays out of `ps`)"
            )
        if clash := (binary.names(flag) if binary else {flag}) & owned:
            raise ConfigError(
                f"profile '{profile.name}' sets {flag} in llamacpp.extra_args, but the "
                f"wrapper sets {min(clash)} itself (from the profile's knobs, an override "
                f"or api_key_env): set it there, not in extra_args"
            )
        extra.extend([flag] if value is None else [flag, value])
        value_next = value is None and binary is not None and binary.takes_value(flag)
    return extra


_FLAG = re.compile(r"-[^\s=]*")


def _flag_and_value(arg: str) -> tuple[str, str | None]:
    match = _FLAG.match(arg)
    flag = match.group() if match else arg
    rest = arg[len(flag) :]
    if not rest:
        return flag, None
    return flag, rest[1:] if rest[0] == "=" else rest.strip()


def gpu_env(profile: Profile, overrides: Overrides) -> dict[str, str]:
    """Pin llama-server to GPUs: the override, else the profile's ``gpu.device_ids``."""
    if overrides.cuda_visible_devices is not None:
        visible = overrides.cuda_visible_devices.strip()
    elif profile.gpu.device_ids:
        visible = ",".join(str(i) for i in profile.gpu.device_ids)
    else:
        return {}
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": visible}


def build_launch(
    profile: Profile,
    overrides: Overrides,
    files: ModelFiles,
    *,
    binary: BinaryInfo | None,
    binary_path: str,
    environ: Mapping[str, str],
    unix_socket: Callable[[str, int], str | None] | None = None,
) -> LaunchSpec:
    """The argv and environment for ``profile``; ``binary=None`` skips the flag check.

    ``unix_socket``: gives, for the host and port, a path llama-server listens on as well
    as its TCP port (or None); asked only if this build's ``--host`` takes a list and the host
    is one address (not a list of its own).
    """
    cfg = profile.llamacpp
    host = overrides.host or cfg.host
    port = overrides.port or cfg.port
    one_address = "," not in host and not host.endswith(".sock")  # not the profile's own list
    takes_list = binary is not None and binary.unix_sockets
    socket_file = unix_socket(host, port) if unix_socket and takes_list and one_address else None
    listen = f"{host},{socket_file}" if socket_file else host
    argv = [binary_path, "--model", str(files.model), "--host", listen, "--port", str(port)]
    if files.mmproj is not None:
        _check(binary, profile.name, "llamacpp.mmproj_filename", "--mmproj")
        argv += ["--mmproj", str(files.mmproj)]
    if files.draft is not None:
        _check(binary, profile.name, "llamacpp.hf_draft_filename", "--model-draft")
        argv += ["--model-draft", str(files.draft)]
    knobs = effective_knobs(cfg, overrides)
    argv += _knob_args(profile, knobs, binary)
    # Set here, or through the environment (the API key): an extra_args flag for one of
    # them would win (llama-server takes the last), silently undoing an override, or
    # moving the port or the key away from what the worker then talks to.
    owned = {arg for arg in argv[1:] if arg.startswith("--")}
    if cfg.api_key_env:
        owned.add("--api-key")
    extra = _extra_args(profile, binary, owned)
    env = gpu_env(profile, overrides)
    gpus = _gpus_required(env, knobs["n_gpu_layers"])
    argv += _gpu_layers_said(gpus, knobs, extra, binary) + extra
    secret: set[str] = set()
    api_key = None
    if cfg.api_key_env:
        api_key = _api_key(profile.name, cfg.api_key_env, environ)
        _check(binary, profile.name, "llamacpp.api_key_env", "--api-key")
        # Through the environment, not argv: argv is visible to every user in `ps`.
        name = (binary.env_var("--api-key") if binary else None) or API_KEY_ENV
        env[name] = _one_key(api_key)
        secret.add(name)
    flag_env = frozenset(binary.env_of.values()) if binary else frozenset()
    return LaunchSpec(
        tuple(argv), env, host, port, frozenset(secret), api_key, flag_env, socket_file,
        gpus, tuple(str(path) for path in files.all),
    )  # fmt: skip


def _gpus_required(env: Mapping[str, str], layers: Any) -> str | None:
    """The pinned GPUs, where some layers are to run on them (not ``n_gpu_layers: 0``, and
    not a pin to none: ``-1`` or empty, how CUDA is told to use no GPU)."""
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if not visible or visible.startswith("-") or layers == 0:
        return None
    return visible


def _gpu_layers_said(
    gpus: str | None, knobs: Mapping[str, Any], extra: list[str], binary: BinaryInfo | None
) -> list[str]:
    """``--n-gpu-layers auto`` for pinned GPUs where the profile leaves the layers to
    llama-server: the build's own default, but only its option says that no GPU can be
    used ("no usable GPU found"), and without it a profile pinned to GPUs was served on
    the CPU as ``ready`` (``gpus_required``)."""
    if gpus is None or knobs["n_gpu_layers"] is not None or binary is None:
        return []
    names = binary.names("--n-gpu-layers")
    if not binary.gpu_layers_auto or any(_flag_and_value(a)[0] in names for a in extra):
        return []
    return ["--n-gpu-layers", "auto"]


def _api_key(profile: str, variable: str, environ: Mapping[str, str]) -> str:
    """The key in ``variable``, without the spaces and line ends around it (a secret
    mounted from a file ends with one, and a header cannot carry it: every /health poll
    failed in httpx, and the engine stayed ``loading`` without a word of why)."""
    said = f"profile '{profile}' sets llamacpp.api_key_env={_shown_name(variable)}, but "
    key = environ.get(variable, "").strip()
    if not key:
        raise SecretUnset(said + "that variable is empty or unset")
    if not all(" " <= char < "\x7f" for char in key):
        raise ConfigError(
            said + "the key in it holds a character an HTTP header cannot carry (a "
            "control character inside it, or one outside ASCII): write the key alone"
        )
    return key


def _one_key(key: str) -> str:
    """``key`` as one key in llama-server's ``--api-key`` value, which it reads as a
    comma-separated list (CSV: a field in double quotes may hold commas, ``""`` is a
    quote): a key with a comma would be two keys, neither the one the worker sends."""
    if "," not in key and not key.startswith('"'):
        return key
    return '"' + key.replace('"', '""') + '"'


def _shown_name(name: str) -> str:
    """The variable's name, unless it could be the key pasted in its place: variable names
    are written in capitals with words apart (``LLAMA_API_KEY``); keys are mixed case, or
    capitals and digits in one run (``AKIA...``, base32)."""
    if name.isupper() and "_" in name.strip("_"):
        return name
    return "<not shown: not a name in capitals with an '_', it may be the key itself>"
