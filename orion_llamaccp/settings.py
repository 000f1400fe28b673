"""Settings: the only place that reads the environment.

The environment selects a profile (``LLM_PROFILE_NAME``) and overrides a handful of knobs;
everything else lives in the profile registry. A blank variable counts as unset, so an
``.env`` file can list every variable with no value. A value that does not parse is a
startup error that names the variable.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import socket
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from dotenv import dotenv_values
from dotenv.parser import parse_stream
from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_core import PydanticUseDefault
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from orion_llamaccp import __version__
from orion_llamaccp.errors import ConfigError
from orion_llamaccp.redaction import mask_url, redact, url_passwords

# Every variable this service reads starts with one of these. Tests and benchmarks clear
# them, so that a developer's shell cannot leak into a worker under test.
ENV_PREFIXES = (
    "LLM_",
    "LLAMACPP_",
    "ORION_",
    "CUDA_VISIBLE_DEVICES_OVERRIDE",
    "HF_",
    "SERVICE_",
    "NODE_NAME",
    "INSTANCE_ID",
    "LLAMA_SERVER_BIN",
    "HEARTBEAT_",
    "ANNOUNCE_",
    "METRICS_",
    "LOG_LEVEL",
)

DEFAULT_PROFILE = "gemma3-270m-cpu"
DEFAULT_CONFIG_PATH = "config/llm_profiles.yaml"
DEFAULT_CACHE_DIR = "~/.cache/orion-llamaccp/models"

NGpuLayers = int | Literal["auto", "all"]
_CUDA_DEVICE = re.compile(r"-1|\d+|(?:GPU|MIG)-[0-9A-Za-z/-]+")


TRANSPORTS = ("pubsub", "stream")


def _env(name: str) -> Any:
    return Field(default=None, validation_alias=AliasChoices(name))


def _unset_if_blank(value: Any) -> Any:
    """Blank counts as unset, spaces too (``env_ignore_empty`` drops only ``""``): a
    ``CUDA_VISIBLE_DEVICES_OVERRIDE=" "`` hid every GPU, a host of " " was passed on.
    Spaces around a value are dropped (a quoted value in ``.env`` or compose): a model
    path of " /m.gguf" became a file under model_root, a host of " 0.0.0.0 " was
    passed on as is."""
    if isinstance(value, str):
        if not value.strip():
            raise PydanticUseDefault()
        return value.strip()
    return value


class _BlankIsUnset(PydanticBaseSettingsSource):
    """The environment without its blank values: spaces count as unset as ``""`` does
    (``env_ignore_empty``), so the ``.env`` file below it still applies. Dropped only in
    the field validators, a value of spaces skipped ``.env`` for the built-in default."""

    def __init__(self, settings_cls: type[BaseSettings], env: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self._env = env

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._env.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        values = self._env()
        return {k: v for k, v in values.items() if not (isinstance(v, str) and not v.strip())}


# Where the ``.env`` file is read from (``.env`` in the working directory by default);
# empty: none. The tests set it empty, so that a ``.env`` beside the repo (deployment.md
# has one made there for compose) does not reach them.
ENV_FILE_VARIABLE = "ORION_LLAMACPP_ENV_FILE"


class _FromTheEnvironment(BaseSettings):
    """Settings read from the environment over a ``.env`` file, blank meaning unset."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        blankless = _BlankIsUnset(settings_cls, env_settings)
        if ENV_FILE_VARIABLE in os.environ:  # another file, or none ("")
            path = env_file()
            if path is not None and not (path.is_file() or path.is_fifo()):
                # Read as none, it gave the defaults without a word.
                named = os.environ[ENV_FILE_VARIABLE].strip()
                raise ConfigError(f"{ENV_FILE_VARIABLE}={named}: not a file")
            dotenv_settings = DotEnvSettingsSource(settings_cls, env_file=path)
        return init_settings, blankless, dotenv_settings, file_secret_settings


class Overrides(_FromTheEnvironment):
    """Per-deployment overrides of the profile's llama-server knobs (``None`` = use profile)."""

    # The same ``.env`` as ``Settings``: an override written there must not be ignored.
    model_config = SettingsConfigDict(
        env_file=".env",
        env_ignore_empty=True,
        extra="ignore",
        frozen=True,
        protected_namespaces=(),
    )

    model_path: str | None = _env("LLAMACPP_MODEL_PATH_OVERRIDE")
    host: str | None = _env("LLAMACPP_HOST_OVERRIDE")
    port: Annotated[int, Field(ge=1, le=65535)] | None = _env("LLAMACPP_PORT_OVERRIDE")
    ctx_size: Annotated[int, Field(ge=0)] | None = _env("LLAMACPP_CTX_SIZE_OVERRIDE")
    n_gpu_layers: NGpuLayers | None = _env("LLAMACPP_N_GPU_LAYERS_OVERRIDE")
    threads: Annotated[int, Field(ge=-1)] | None = _env("LLAMACPP_THREADS_OVERRIDE")
    parallel: Annotated[int, Field(ge=1)] | None = _env("LLAMACPP_PARALLEL_OVERRIDE")
    batch_size: Annotated[int, Field(ge=1)] | None = _env("LLAMACPP_BATCH_SIZE_OVERRIDE")
    cuda_visible_devices: str | None = _env("CUDA_VISIBLE_DEVICES_OVERRIDE")

    _blank = field_validator("*", mode="before")(_unset_if_blank)

    @field_validator("n_gpu_layers", mode="before")
    @classmethod
    def _ngl(cls, value: Any) -> Any:
        """A number, ``auto`` or ``all``; anything else said once (pydantic said why it was
        neither an integer nor one of the words, in two halves)."""
        if not isinstance(value, str):
            return value
        if value.strip().lstrip("-").isdigit():
            return int(value)
        if value.strip().lower() in ("auto", "all"):
            return value.strip().lower()
        raise ValueError("must be a number of layers, or auto, or all")

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        """A host is one word (``a b`` became ``--host 'a b,...'``, llama-server's to refuse)."""
        if value is not None and (not value.strip() or any(c.isspace() for c in value.strip())):
            raise ValueError("a host name or address has no spaces (0.0.0.0: every interface)")
        if value is not None:
            from orion_llamaccp.profiles.models import host_problem

            if problem := host_problem(value.strip(), "LLAMACPP_PORT_OVERRIDE"):
                raise ValueError(problem)
        return value.strip() if value is not None else None

    @field_validator("cuda_visible_devices")
    @classmethod
    def _devices(cls, value: str | None) -> str | None:
        """What CUDA reads: indices, GPU-/MIG- UUIDs, or -1 for none, comma-separated. A
        typo (``abc``, ``0,,1``) went to llama-server as it stood, and CUDA then hid
        every GPU after it, or all of them: a model served on the CPU without a word."""
        if value is None:
            return None
        items = [item.strip() for item in value.split(",")]
        if not all(_CUDA_DEVICE.fullmatch(item) for item in items):
            raise ValueError(
                "must be GPU indices (0,1), GPU-... or MIG-... UUIDs, or -1 for none, "
                "comma-separated"
            )
        return ",".join(items)


_CUT_SHORT = (
    "cannot be read as a URL: percent-encode any '/', '?' or '#' in its user name or "
    "password (for example '/' as %2F)"
)


def _http_url(value: Any, what: str) -> Any:
    """``value`` stripped, if it is an http(s) URL with a host; blank passes (unset)."""
    if not isinstance(value, str) or not value.strip():
        return value  # blank: unset (``_blank``)
    value = value.strip()
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be the http:// or https:// URL {what}")
    if problem := _unreadable(value):  # as the bus URL's: the rest of the password showed
        raise ValueError(problem)
    return value


class Settings(_FromTheEnvironment):
    """Everything the process reads from its environment (and an optional ``.env``)."""

    model_config = SettingsConfigDict(
        env_file=".env", env_ignore_empty=True, extra="ignore", frozen=True, populate_by_name=True
    )

    profile_name: str = Field(DEFAULT_PROFILE, validation_alias="LLM_PROFILE_NAME")
    profiles_config_path: Path = Field(
        Path(DEFAULT_CONFIG_PATH), validation_alias="LLM_PROFILES_CONFIG_PATH"
    )
    cache_dir: str = Field(DEFAULT_CACHE_DIR, validation_alias="LLM_CACHE_DIR")
    hf_token: SecretStr | None = Field(None, validation_alias="HF_TOKEN")
    hf_hub_offline: bool = Field(False, validation_alias="HF_HUB_OFFLINE")
    hf_endpoint: str | None = Field(None, validation_alias="HF_ENDPOINT")
    # The llama-server URL other hosts reach, announced as ``engine_url``; unset: the
    # worker's own view (its host and port), which a llama-server in a container or bound
    # to 0.0.0.0 makes useless elsewhere.
    engine_advertise_url: str | None = Field(None, validation_alias="ORION_LLAMACPP_ADVERTISE_URL")
    # Model downloads: no bytes for `stall` seconds aborts an attempt (it resumes);
    # no bytes for `deadline` seconds across retries gives up.
    download_stall_sec: float = Field(
        30.0, gt=0, validation_alias="ORION_LLAMACPP_DOWNLOAD_STALL_SEC"
    )
    download_deadline_sec: float = Field(
        600.0, gt=0, validation_alias="ORION_LLAMACPP_DOWNLOAD_DEADLINE_SEC"
    )
    bus_url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:6379/0"), validation_alias="ORION_BUS_URL"
    )
    service_name: str = Field("orion-llamaccp", validation_alias="SERVICE_NAME")
    service_version: str = Field(__version__, validation_alias="SERVICE_VERSION")
    node_name: str = Field(default_factory=socket.gethostname, validation_alias="NODE_NAME")
    instance_id_setting: str | None = Field(None, validation_alias="INSTANCE_ID")
    llama_server_bin: str | None = Field(None, validation_alias="LLAMA_SERVER_BIN")
    build_dir: str = Field(
        "~/.cache/orion-llamaccp/llama-server", validation_alias="ORION_LLAMACPP_BUILD_DIR"
    )

    heartbeat_interval_sec: float = Field(10.0, gt=0, validation_alias="HEARTBEAT_INTERVAL_SEC")
    announce_interval_sec: float = Field(60.0, gt=0, validation_alias="ANNOUNCE_INTERVAL_SEC")
    metrics_port: int | None = Field(None, ge=0, le=65535, validation_alias="METRICS_PORT")
    log_level: str = Field("INFO", validation_alias="LOG_LEVEL")

    # Bus behaviour. Channel names default to the contract's (bus/keys.py,
    # worker/announce.py ``channels_for``).
    intake_channel: str | None = Field(None, validation_alias="ORION_LLAMACPP_INTAKE_CHANNEL")
    intake_stream: str | None = Field(None, validation_alias="ORION_LLAMACPP_INTAKE_STREAM")
    stream_group: str | None = Field(None, validation_alias="ORION_LLAMACPP_STREAM_GROUP")
    dlq_stream: str | None = Field(None, validation_alias="ORION_LLAMACPP_DLQ_STREAM")
    health_channel: str = Field("orion:system:health", validation_alias="ORION_HEALTH_CHANNEL")
    error_channel: str = Field("orion:system:error", validation_alias="ORION_ERROR_CHANNEL")
    announce_channel: str = Field(
        "orion:llm:profile:announce", validation_alias="ORION_LLM_ANNOUNCE_CHANNEL"
    )
    discover_channel: str = Field(
        "orion:llm:profile:discover", validation_alias="ORION_LLM_DISCOVER_CHANNEL"
    )
    cancel_channel: str = Field(
        "orion:llamacpp:cancel", validation_alias="ORION_LLAMACPP_CANCEL_CHANNEL"
    )
    transports: str = Field("pubsub,stream", validation_alias="ORION_LLAMACPP_TRANSPORTS")
    local_queue_size: int = Field(16, ge=0, validation_alias="ORION_LLAMACPP_LOCAL_QUEUE")
    # Pub/sub messages heard and not yet taken (the worker being built, or a flood); a
    # request beyond is answered ``overloaded``, and beyond ten times as many more,
    # dropped (``worker/startup.py``, ``Intake``). About a kilobyte each for a short chat.
    inbox_size: int = Field(1000, ge=1, validation_alias="ORION_LLAMACPP_INBOX_SIZE")
    # Their bytes, the same way, with as many bytes more waiting for ``overloaded``: the
    # count alone let a flood of large requests (up to ``max_message_bytes`` each) hold
    # gigabytes. Eight of the largest, or tens of thousands of short chats. One message
    # always waits in an inbox that holds none, so a bound below ``max_message_bytes``
    # takes a larger request alone rather than never.
    inbox_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, validation_alias="ORION_LLAMACPP_INBOX_BYTES"
    )
    # The worker's own traffic to llama-server over a UNIX socket beside its TCP port,
    # where the build takes one (``--host``): a token read costs less (docs/benchmarks.md)
    engine_unix_socket: bool = Field(True, validation_alias="ORION_LLAMACPP_ENGINE_UNIX_SOCKET")
    stream_claim_idle_ms: int = Field(
        600_000, ge=1000, validation_alias="ORION_LLAMACPP_CLAIM_IDLE_MS"
    )
    stream_max_deliveries: int = Field(5, ge=1, validation_alias="ORION_LLAMACPP_MAX_DELIVERIES")
    # How often acked entries are deleted from the intake stream; 0 keeps them (for a
    # replay, say), and then something else must trim it.
    stream_trim_sec: float = Field(60.0, ge=0, validation_alias="ORION_LLAMACPP_STREAM_TRIM_SEC")
    # The dead-letter stream keeps this many entries, the newest; 0: no cap.
    dlq_maxlen: int = Field(10_000, ge=0, validation_alias="ORION_LLAMACPP_DLQ_MAXLEN")
    dedup_ttl_sec: int = Field(600, ge=1, validation_alias="ORION_LLAMACPP_DEDUP_TTL_SEC")
    # How long a cancel is kept for a request that reaches the worker after it (a stream
    # entry waiting in the backlog); 0: a cancel reaches only what is in flight.
    cancel_memory_sec: float = Field(
        600.0, ge=0, validation_alias="ORION_LLAMACPP_CANCEL_MEMORY_SEC"
    )
    coalesce_ms: float = Field(10.0, ge=0, validation_alias="ORION_LLAMACPP_COALESCE_MS")
    drain_timeout_sec: float = Field(
        60.0, ge=0, validation_alias="ORION_LLAMACPP_DRAIN_TIMEOUT_SEC"
    )
    engine_wait_sec: float = Field(30.0, ge=0, validation_alias="ORION_LLAMACPP_ENGINE_WAIT_SEC")
    max_message_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, validation_alias="ORION_LLAMACPP_MAX_MESSAGE_BYTES"
    )
    request_timeout_sec: float = Field(
        600.0, gt=0, validation_alias="ORION_LLAMACPP_REQUEST_TIMEOUT_SEC"
    )

    engine_silence_timeout_sec: float = Field(
        120.0, gt=0, validation_alias="ORION_LLAMACPP_SILENCE_TIMEOUT_SEC"
    )
    # A load still not ready after this long is hung even while it works (a spin on a GPU
    # sync counts as CPU time, which the silence watch takes for work); 0: no limit.
    engine_load_timeout_sec: float = Field(
        3600.0, ge=0, validation_alias="ORION_LLAMACPP_LOAD_TIMEOUT_SEC"
    )
    engine_health_interval_sec: float = Field(
        2.0, gt=0, validation_alias="ORION_LLAMACPP_HEALTH_INTERVAL_SEC"
    )
    engine_health_timeout_sec: float = Field(
        5.0, gt=0, validation_alias="ORION_LLAMACPP_HEALTH_TIMEOUT_SEC"
    )
    # llama-server's inference loop still, with /health 200, this long: wedged, restarted;
    # 0: not watched. Above the longest single decode (a prompt batch on the slowest card).
    engine_progress_timeout_sec: float = Field(
        300.0, ge=0, validation_alias="ORION_LLAMACPP_PROGRESS_TIMEOUT_SEC"
    )
    engine_crash_limit: int = Field(5, ge=1, validation_alias="ORION_LLAMACPP_CRASH_LIMIT")
    # A request in llama-server each time it died this many times is not tried again: it
    # may be what kills it. Below the crash limit, or one such request fails the worker.
    request_crash_limit: int = Field(2, ge=1, validation_alias="ORION_LLAMACPP_REQUEST_CRASH_LIMIT")
    redis_retry_sec: float = Field(120.0, gt=0, validation_alias="ORION_LLAMACPP_REDIS_RETRY_SEC")
    redis_socket_timeout_sec: float = Field(
        5.0, gt=0, validation_alias="ORION_LLAMACPP_REDIS_SOCKET_TIMEOUT_SEC"
    )
    pubsub_ping_sec: float = Field(2.0, gt=0, validation_alias="ORION_LLAMACPP_PUBSUB_PING_SEC")

    _blank = field_validator("*", mode="before")(_unset_if_blank)

    @field_validator("hf_token", "bus_url", mode="before")
    @classmethod
    def _strip_secret(cls, value: Any) -> Any:
        """A secret mounted from a file ends in a newline: it would break the HTTP header."""
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        # Blank after the strip counts as unset: ``_blank`` runs after this (the validators
        # of a field run before those of "*").
        return value.strip() if isinstance(value, str) else value

    @field_validator("bus_url")
    @classmethod
    def _readable_url(cls, value: SecretStr) -> SecretStr:
        """A password with a raw ``/``, ``?`` or ``#`` ends the URL's host part early: the
        password goes unmasked, and the client fails on a "port" made of it and prints it
        in its error. Refused here, in words that show none of it."""
        if problem := _unreadable(value.get_secret_value()):
            raise ValueError(problem)
        if urlsplit(value.get_secret_value()).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("hf_endpoint", mode="before")
    @classmethod
    def _hub_url(cls, value: Any) -> Any:
        """A Hub or mirror URL: without its scheme, every request failed as a network
        error, retried until the download deadline (10 minutes a file)."""
        return _http_url(
            value, "of the Hub or a mirror (for example https://hf-mirror.example.com)"
        )

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        """A level logging knows, in any case, its aliases read as their names (``warn``:
        WARNING). One it does not know (``verbose``) ran at INFO without a word, and a
        constant of the module (``BASIC_FORMAT``) crashed."""
        levels = logging.getLevelNamesMapping()
        name = value.strip().upper()
        if name not in levels:
            raise ValueError(f"must be one of {', '.join(levels)}")
        return logging.getLevelName(levels[name])

    @field_validator("transports")
    @classmethod
    def _known_transports(cls, value: str) -> str:
        """``pubsub``, ``stream`` or both, comma-separated: a misspelt one (``strem``)
        turned that intake off without a word, while the worker announced it."""
        named = [item.strip() for item in value.split(",") if item.strip()]
        unknown = [item for item in named if item not in TRANSPORTS]
        if unknown or not named:
            raise ValueError(
                f"each item must be one of {', '.join(TRANSPORTS)} (comma-separated, at "
                f"least one){f'; not {unknown}' if unknown else ''}"
            )
        return ",".join(dict.fromkeys(named))

    @field_validator("engine_advertise_url", mode="before")
    @classmethod
    def _advertised_url(cls, value: Any) -> Any:
        url = _http_url(value, "other hosts reach llama-server at (for example http://atlas:8080)")
        return url.rstrip("/") if isinstance(url, str) else url

    @cached_property
    def overrides(self) -> Overrides:
        return Overrides()

    def overrides_for(self, profile: str) -> Overrides:
        """The environment's overrides for the profile it selects (``LLM_PROFILE_NAME``);
        none for another one a command names (``fetch big`` must not check small's file)."""
        return self.overrides if profile == self.profile_name else Overrides.model_construct()

    @property
    def instance_id(self) -> str:
        """Stable per host and profile, so a restarted worker finds its own stream entries."""
        return self.instance_id_setting or f"{self.node_name}:{self.profile_name}"

    @property
    def cache_path(self) -> Path:
        return Path(os.path.expandvars(self.cache_dir)).expanduser()

    @property
    def build_path(self) -> Path:
        return Path(os.path.expandvars(self.build_dir)).expanduser()

    @property
    def bus_url_display(self) -> str:
        """The bus URL with any password replaced, safe to print."""
        return mask_url(self.bus_url.get_secret_value())

    def secrets(self) -> list[str]:
        """Secret values that must never appear in logs, announcements or errors."""
        found = [self.hf_token.get_secret_value() if self.hf_token else ""]
        found.extend(url_passwords(self.bus_url.get_secret_value()))
        found.extend(url_passwords(self.hf_endpoint or ""))  # a mirror's user and password
        found.extend(url_passwords(self.engine_advertise_url or ""))
        return list(dict.fromkeys(value for value in found if len(value) >= 4))

    def redact(self, text: str) -> str:
        return redact(text, self.secrets())

    def environ(self) -> dict[str, str]:
        """The variables ``${VAR}`` in the registry and ``api_key_env`` may name: the
        environment over the ``.env`` file, as for the settings themselves (on a host run
        a key set only in ``.env`` was "empty or unset"), ``LLM_CACHE_DIR`` always set."""
        return {**env_file_values(), **os.environ, "LLM_CACHE_DIR": str(self.cache_path)}


def _unreadable(url: str) -> str | None:
    """Why ``url`` cannot be read as written (in words that show none of it), or None."""
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        if "@" in parts.netloc:  # its user part is whole: the port itself is wrong
            return "cannot be read as a URL: its port is not a number from 0 to 65535"
        return _CUT_SHORT
    if "@" in parts.netloc:
        # A raw '@' in the password, then a raw '/', '?' or '#': the host part ends at the
        # cut with a user part of its own (":p@ss"), and the rest of the password and the
        # real host land in the path, query or fragment, where no '@' belongs.
        keys = [pair.partition("=")[0] for pair in parts.query.split("&")]
        if "@" in parts.path or "@" in parts.fragment or any("@" in key for key in keys):
            return _CUT_SHORT
        return None
    if "://" not in url:
        return None
    rest = url[url.index("://") + 3 + len(parts.netloc) :]
    before, at, _ = rest.partition("@")
    # user:password cut short by a '/', '?' or '#'
    return _CUT_SHORT if at and ":" in before else None


_URL_VARIABLES = ("HF_ENDPOINT", "ORION_LLAMACPP_ADVERTISE_URL")  # may hold a password


def _explain(exc: ValidationError, model: type[BaseSettings]) -> str:
    lines = []
    by_variable = {_variable_of(name, info): info for name, info in model.model_fields.items()}
    for err in exc.errors():
        variable = str(err["loc"][0]) if err["loc"] else "?"  # errors name the alias
        info = by_variable.get(variable)
        value = err.get("input")
        if info is not None and info.annotation in (SecretStr, SecretStr | None):
            value = "<hidden>"  # a secret's bad value is still the secret
        elif variable in _URL_VARIABLES and "@" in str(value):
            value = "<hidden: it may hold a user and password>"
        lines.append(f"{variable}={value!r}{set_in(variable)}: {err['msg']}")
    return "invalid environment: " + "; ".join(lines)


def set_in(name: str) -> str:
    """`` (set in FILE)`` where ``name``'s value came from the ``.env`` file, else ``""``.

    A bad value there was said as if the environment held it: the operator looked for it
    in the shell, the compose file, the unit, and not in the file that set it."""
    if (os.environ.get(name) or "").strip():  # the environment's wins over the file's
        return ""
    if name.upper() in {found.upper() for found in env_file_values()}:  # as pydantic reads it
        return f" (set in {env_file()})"
    return ""


def _variable_of(name: str, info: Any) -> str:
    """The environment variable a field is read from."""
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return str(alias or name)


def variables_read() -> set[str]:
    """Every environment variable the settings and overrides read, aliases included."""
    names: set[str] = set()
    for model in (Settings, Overrides):
        for name, info in model.model_fields.items():
            alias = info.validation_alias
            choices = alias.choices if isinstance(alias, AliasChoices) else [alias or name]
            names.update(str(choice) for choice in choices)
    return names


# Named like ours, read by others: Compose (the published port), the image's build
# arguments, and the llama-server build script's cache (``make llama-server``, the bench).
_READ_ELSEWHERE = frozenset(
    {
        "LLAMACPP_HOST_PORT",
        "LLAMACPP_BUILD",
        "LLAMACPP_VARIANT",
        "ORION_LLAMACPP_CACHE",
        "CUDA_VISIBLE_DEVICES",  # CUDA's own, set by a container runtime
        ENV_FILE_VARIABLE,  # read before the settings, to find their file
    }
)


_ALWAYS_OURS = ("LLAMACPP_", "ORION_LLAMACPP_")  # every name with these prefixes is ours
_NAMED_LIKE_OURS = (*_ALWAYS_OURS, "LLM_", "CUDA_VISIBLE_", "ORION_", "HF_")
# Orion's other services and huggingface_hub read many names of these prefixes
# (``HF_TOKEN_PATH``, ``HF_HOME``): only a near-twin of ours counts (``ORION_BUS_URI``,
# ``HF_TOKN``), or the worker talked to the default Redis, or the Hub without the token.
_SHARED_PREFIXES = ("ORION_", "HF_")


def unread_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """What to say of variables that look like ours but that nothing reads: a misspelt
    override (``LLAMACPP_CTXSIZE_OVERRIDE``) or selection (``LLM_PROFILE``) did nothing,
    without a word, and the profile's own value (or the default profile) was served.
    Every ``LLAMACPP_*`` and ``ORION_LLAMACPP_*`` name is ours; an ``LLM_*`` or
    ``CUDA_VISIBLE_*`` name only when it is close to one of ours (other services share
    those prefixes), an ``ORION_*`` or ``HF_*`` one only when it is one of ours mistyped.
    The ``.env`` file's names too (the environment's given, none)."""
    said = []
    if environ is None:
        names, unparsed = _read_env_file()
        environ, where = os.environ, dict.fromkeys(names, "")
        said += _unparsed_said(unparsed)
    else:
        where = {}
    known = variables_read()
    for name in sorted({*environ, *where}):
        if name in known or name in _READ_ELSEWHERE or not name.startswith(_NAMED_LIKE_OURS):
            continue  # (difflib for every variable of a shell costs milliseconds at start)
        ours = name.startswith(_ALWAYS_OURS)
        shared = not ours and name.startswith(_SHARED_PREFIXES)
        near = difflib.get_close_matches(name, known, n=1, cutoff=0.9 if shared else 0.75)
        if ours or near:
            hint = f" (did you mean {near[0]}?)" if near else ""
            set_in = f" in {env_file()}" if name in where and name not in environ else ""
            said.append(f"{name} is set{set_in} but nothing reads it{hint}: it changes nothing")
    return said


def env_file_unparsed() -> list[str]:
    """What to say of the ``.env`` file's lines that are not ``NAME=value``."""
    return _unparsed_said(_read_env_file()[1])


def _unparsed_said(lines: list[int]) -> list[str]:
    path = env_file()
    return [f"{path}:{line}: not NAME=value, so nothing of that line is read" for line in lines]


def env_file() -> Path | None:
    """The ``.env`` file the settings read: ``ORION_LLAMACPP_ENV_FILE``'s, else ``./.env``."""
    if ENV_FILE_VARIABLE in os.environ:
        named = os.environ[ENV_FILE_VARIABLE].strip()
        return Path(named).expanduser() if named else None
    return Path(".env")


def _env_file_to_read() -> Path | None:
    """The ``.env`` file, where it can be read again: not one given as a pipe, which the
    settings read once."""
    path = env_file()
    return path if path is not None and path.is_file() else None


def env_file_values() -> dict[str, str]:
    """What the ``.env`` file sets, by name."""
    if (path := _env_file_to_read()) is None:
        return {}
    with contextlib.suppress(OSError, UnicodeDecodeError):
        found = dotenv_values(path, encoding="utf-8")
        return {name: value for name, value in found.items() if value is not None}
    return {}


def _read_env_file() -> tuple[list[str], list[int]]:
    """The names the ``.env`` file sets, and the numbers of its lines that set nothing
    for want of ``NAME=value`` (python-dotenv's own warning named no file, and came
    twice)."""
    if (path := _env_file_to_read()) is None:
        return [], []
    with contextlib.suppress(OSError, UnicodeDecodeError), path.open(encoding="utf-8") as text:
        bindings = list(parse_stream(text))
        names = [b.key for b in bindings if b.key]
        return names, [b.original.line for b in bindings if b.error]
    return [], []


def load_settings(**overrides: Any) -> Settings:
    """Read settings and their overrides now, turning parse errors into a ``ConfigError``."""
    try:
        settings = Settings(**overrides)
        _ = settings.overrides
    except ValidationError as exc:
        model = Overrides if exc.title == "Overrides" else Settings
        raise ConfigError(_explain(exc, model)) from None
    # (A crash limit of 1 fails the worker at the first death: nothing to keep below it.)
    if 1 < settings.engine_crash_limit <= settings.request_crash_limit:
        request, engine = "ORION_LLAMACPP_REQUEST_CRASH_LIMIT", "ORION_LLAMACPP_CRASH_LIMIT"
        raise ConfigError(
            f"{request} ({settings.request_crash_limit}){set_in(request)} must be below "
            f"{engine} ({settings.engine_crash_limit}){set_in(engine)}: a request "
            "llama-server dies on would otherwise take the worker down before it is given up"
        )
    return settings
