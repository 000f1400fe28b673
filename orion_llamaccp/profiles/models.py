"""Typed, frozen profile models: what one entry of ``llm_profiles.yaml`` may say.

Profile-level extras (``notes``, ``preferred_verbs``, ...) are kept; the ``gpu`` and
``llamacpp`` blocks forbid unknown keys, because a misspelled knob that silently does
nothing is the worst kind of configuration bug. For the same reason a knob of either block
written beside it, at the profile level, is refused, and so is a value YAML read as
something else than what was meant (``ctx_size: on`` as ``True``, so 1).

Errors raised with :func:`refuse` are complete sentences: the registry adds no "got ...".
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from orion_llamaccp.errors import ConfigError

REFUSED = "profile_refused"  # the error type of refuse(): its message is the whole story


def refuse(message: str) -> PydanticCustomError:
    """A validation error whose message needs no "got ..." after it."""
    return PydanticCustomError(REFUSED, message)


def host_problem(host: str, port_is: str) -> str | None:
    """Why ``host`` is no host name or address (one with a port, a URL), or None. The
    worker makes its URL of it: ``127.0.0.1:8080`` read as an IPv6 address ended `run` in
    a traceback. ``port_is``: where the port goes instead."""
    for item in (part.strip() for part in host.split(",")):
        if item.endswith(".sock"):  # a UNIX socket path, in llama-server's list
            continue
        if "/" in item or (":" in item and not _ipv6(item)):
            return (
                f"'{item}' is not a host name or address (a port or a URL?): write the "
                f"host alone, such as 0.0.0.0 or 127.0.0.1; the port goes in {port_is}"
            )
    return None


def _ipv6(item: str) -> bool:
    try:
        ipaddress.IPv6Address(item.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    return True


def _not_a_boolean(value: Any) -> Any:
    """YAML 1.1 reads ``on``/``yes``/``true`` as True and pydantic then as 1."""
    if isinstance(value, bool):
        raise refuse(
            "is a YAML boolean (yes/no/on/off/true/false are read as one), not a number: "
            "write a number"
        )
    return value


Int = Annotated[int, BeforeValidator(_not_a_boolean)]
Float = Annotated[float, BeforeValidator(_not_a_boolean)]
PositiveInt = Annotated[Int, Field(ge=1)]
NonNegativeInt = Annotated[Int, Field(ge=0)]
NGpuLayers = Annotated[int | Literal["auto", "all"], BeforeValidator(_not_a_boolean)]

# A default may not hold a '$' (no nesting): ${A:-${B}} would keep '${B' as a name.
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}$]*))?\}")
_DOLLAR = re.compile(r"\$(\{[^}]*\}?|[A-Za-z0-9_]*)")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _bad_variable(value: str) -> str | None:
    """Why ``value`` has a ``$`` that is not a ``${NAME}`` or ``${NAME:-default}``, or None.
    ``$NAME``, ``${NAME-x}`` or ``${NAME:/x}`` were kept as they stood, a relative path."""
    starts = {match.start() for match in _VAR.finditer(value)}
    for index, char in enumerate(value):
        if char == "$" and index not in starts:
            found = _DOLLAR.match(value, index)
            fragment = found.group(0) if found else "$"
            name = _NAME.match(fragment.lstrip("${"))
            example = name.group(0) if name else "NAME"
            return (
                f"{value!r} has {fragment!r}, which is not expanded: write ${{{example}}} "
                f"or ${{{example}:-default}} (with braces and ':-'); a '$' may not appear "
                f"otherwise"
            )
    return None


def expand_path(value: str, env: Mapping[str, str]) -> Path:
    """Expand ``${VAR}``, ``${VAR:-default}`` and ``~`` in a configured path. A ``${VAR}``
    unset or empty, without a default, is an error: a misspelled name made
    ``${LLM_CACHE_DIRR}/gguf`` into ``/gguf``, where models were looked for and
    downloaded. Any other ``$`` (``$VAR``, ``${VAR-x}``) is an error too."""
    problem = _bad_variable(value)
    if problem:
        raise ConfigError(problem)

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = env.get(name)
        if found:
            return found
        if default is None:
            raise ConfigError(
                f"{value!r} uses ${{{name}}}, which is unset or empty: set it, or give a "
                f"default as ${{{name}:-/some/path}}"
            )
        return default

    return Path(os.path.expanduser(_VAR.sub(substitute, value)))


class GpuConfig(BaseModel):
    """Hardware hints; ``device_ids`` is what pins llama-server to GPUs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_gpus: NonNegativeInt | None = None
    tensor_parallel_size: PositiveInt | None = None
    device_ids: tuple[NonNegativeInt, ...] = ()
    max_model_len: PositiveInt | None = None
    max_batch_tokens: PositiveInt | None = None
    max_concurrent_requests: PositiveInt | None = None
    gpu_memory_fraction: Annotated[Float, Field(gt=0, le=1)] | None = None

    @field_validator("device_ids")
    @classmethod
    def _distinct(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        twice = sorted({i for i in value if value.count(i) > 1})
        if twice:
            raise refuse(
                f"GPU {', '.join(map(str, twice))} is listed more than once: list each GPU once"
            )
        return value


# llama-server's --reasoning-format values; a request's own option takes the same.
ReasoningFormat = Literal["none", "deepseek", "deepseek-legacy", "auto"]


class LlamaCppConfig(BaseModel):
    """The ``llamacpp:`` block: where the model is and how llama-server runs it."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    # Where the model is.
    model_root: str = "${LLM_CACHE_DIR}"
    model_path: str | None = None
    hf_repo_id: str | None = None
    hf_filename: str | None = None
    hf_revision: str | None = None
    mmproj_filename: str | None = None
    mmproj_repo_id: str | None = None
    hf_draft_repo_id: str | None = None
    hf_draft_filename: str | None = None

    # Server.
    host: str = "127.0.0.1"
    port: Annotated[Int, Field(ge=1, le=65535)] = 8080
    api_key_env: str | None = None
    metrics: bool = False
    extra_args: tuple[str, ...] = ()

    # Capacity and hardware.
    ctx_size: NonNegativeInt | None = None
    n_gpu_layers: NGpuLayers | None = None
    threads: Annotated[Int, Field(ge=-1)] | None = None
    parallel: PositiveInt | None = Field(
        None, validation_alias=AliasChoices("parallel", "n_parallel")
    )
    batch_size: PositiveInt | None = None
    ubatch_size: PositiveInt | None = None
    flash_attn: Literal["on", "off", "auto"] | None = None
    split_mode: Literal["none", "layer", "row"] | None = None
    tensor_split: tuple[Annotated[Float, Field(ge=0)], ...] | None = None
    no_context_shift: bool = False
    # One KV buffer shared by all slots (true), or a slice of the context each (false);
    # unset, llama-server decides (shared only when it picks the number of slots itself).
    kv_unified: bool | None = None

    # Chat template and reasoning.
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_budget: Int | None = None
    reasoning: Literal["on", "off", "auto"] | None = None
    reasoning_format: ReasoningFormat | None = None

    # Vision.
    image_min_tokens: PositiveInt | None = None
    image_max_tokens: PositiveInt | None = None

    # RoPE.
    rope_scaling: Literal["none", "linear", "yarn"] | None = None
    rope_scale: Annotated[Float, Field(gt=0)] | None = None
    yarn_orig_ctx: NonNegativeInt | None = None

    # Sampling defaults: fill what a request leaves out.
    temperature: Annotated[Float, Field(ge=0)] | None = None
    top_k: NonNegativeInt | None = None
    top_p: Annotated[Float, Field(ge=0, le=1)] | None = None
    min_p: Annotated[Float, Field(ge=0, le=1)] | None = None
    presence_penalty: Float | None = None
    n_predict: Annotated[Int, Field(ge=-2)] | None = None

    # Speculative decoding.
    spec_type: str | None = None
    spec_draft_n_max: PositiveInt | None = None
    n_gpu_layers_draft: NGpuLayers | None = None
    draft_min: NonNegativeInt | None = None
    draft_max: PositiveInt | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_parallel(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "parallel" in data and "n_parallel" in data:
            raise refuse(
                "parallel and n_parallel are one setting (n_parallel is another name for "
                "parallel): keep only one of them"
            )
        return data

    @model_validator(mode="after")
    def _repo_with_its_file(self) -> LlamaCppConfig:
        """A repo named for the mmproj or the draft model without the file to take from
        it did nothing at all: no file planned, none downloaded, no flag."""
        for repo, file in (
            ("mmproj_repo_id", "mmproj_filename"),
            ("hf_draft_repo_id", "hf_draft_filename"),
        ):
            if getattr(self, repo) and not getattr(self, file):
                raise refuse(
                    f"{repo} names the repo to take a file from, but {file} is not set, so "
                    f"nothing is taken from it: set {file} (the file's name in that repo), "
                    f"or remove {repo}"
                )
        return self

    @field_validator("flash_attn", "reasoning", mode="before")
    @classmethod
    def _on_off(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return "on" if value else "off"
        return value

    @field_validator("n_gpu_layers", "n_gpu_layers_draft", mode="before")
    @classmethod
    def _layers(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        return value

    @field_validator("tensor_split", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part for part in re.split(r"[,/ ]+", value.strip()) if part]
        return value

    @field_validator("api_key_env")
    @classmethod
    def _variable_name(cls, value: str | None) -> str | None:
        """A key pasted here in place of its variable's name would otherwise be printed by
        every error that names the variable; the message does not repeat it."""
        if value is not None and not _NAME.fullmatch(value):
            raise refuse(
                "must be the name of an environment variable (letters, digits and '_', "
                "not starting with a digit) that holds the key, not the key itself"
            )
        return value

    @field_validator("model_root", "model_path")
    @classmethod
    def _variables(cls, value: str | None) -> str | None:
        problem = _bad_variable(value) if value is not None else None
        if problem:
            raise refuse(problem)
        return value

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not value.strip() or any(char.isspace() for char in value):
            raise refuse(
                "is empty or has spaces in it: write an address or host name (0.0.0.0 "
                "for every interface), or leave host out for 127.0.0.1"
            )
        if problem := host_problem(value, "llamacpp.port"):
            raise refuse(problem)
        return value

    @field_validator("extra_args", mode="before")
    @classmethod
    def _args(cls, value: Any) -> Any:
        """Strings and numbers only: a mapping (``{--api-key: sk-...}``) was made into its
        Python text, shown by ``show`` and ``command``, and null into the word None. The
        message names the item, never its content."""
        if not isinstance(value, list | tuple):
            return value
        for number, item in enumerate(value, 1):
            if isinstance(item, bool) or not isinstance(item, str | int | float):
                raise refuse(
                    f"item {number} is {_kind(item)}, not a string or a number: write each "
                    f'flag and each value as an item of its own, as in ["--flag", "value"]'
                )
        return [str(item) for item in value]


class Profile(BaseModel):
    """One llama.cpp profile of the registry, validated."""

    model_config = ConfigDict(extra="allow", frozen=True, protected_namespaces=())

    name: str
    backend: Literal["llamacpp"] = "llamacpp"
    display_name: str | None = None
    task_type: str | None = None
    model_id: str | None = None
    supports_tools: bool = False
    supports_embeddings: bool = False
    supports_vision: bool = False
    gpu: GpuConfig = GpuConfig()
    llamacpp: LlamaCppConfig = LlamaCppConfig()

    @model_validator(mode="before")
    @classmethod
    def _no_near_misses(cls, data: Any) -> Any:
        """Keys of other backends' tools may sit beside ours (``notes``), but one a letter
        or two from ours (``gpus:``) is a typo, and a knob of ours (``ctx_size:``) was
        meant for its block: either would silently do nothing."""
        if not isinstance(data, Mapping):
            return data
        known = known_keys(cls)
        for key in data:
            if key in known:
                continue
            word = str(key).replace("-", "_").lower()
            for block, model in (("llamacpp", LlamaCppConfig), ("gpu", GpuConfig)):
                if word in known_keys(model):
                    raise refuse(
                        f"'{key}' belongs under {block}:, not beside it, where it does nothing"
                    )
            # In any case: GPU: was kept as an unknown key, and the pin dropped.
            close = difflib.get_close_matches(word, known, n=1, cutoff=0.8)
            if close:
                raise refuse(f"unknown key '{key}' (did you mean '{close[0]}'?)")
        return data

    @property
    def label(self) -> str:
        return self.display_name or self.name


def _kind(item: Any) -> str:
    """What an ``extra_args`` item is, in words, without its content."""
    if item is None:
        return "empty (null)"
    if isinstance(item, bool):
        return "a boolean (YAML reads yes/no/on/off/true/false as one: quote it)"
    if isinstance(item, Mapping):
        return "a mapping"
    if isinstance(item, list | tuple):
        return "a list"
    return f"a {type(item).__name__}"


def known_keys(model: type[BaseModel]) -> list[str]:
    """Field names and their aliases: the words a user may write in a block."""
    names: list[str] = []
    for name, info in model.model_fields.items():
        names.append(name)
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names.extend(str(choice) for choice in alias.choices)
    return sorted(set(names))
