"""Typed, frozen profile models: what one entry of ``llm_profiles.yaml`` may say.

Profile-level extras (``notes``, ``preferred_verbs``, ...) are kept; the ``gpu`` and
``llamacpp`` blocks forbid unknown keys, because a misspelled knob that silently does
nothing is the worst kind of configuration bug.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from orion_llamaccp.errors import ConfigError

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
NGpuLayers = int | Literal["auto", "all"]

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def expand_path(value: str, env: Mapping[str, str]) -> Path:
    """Expand ``${VAR}``, ``${VAR:-default}`` and ``~`` in a configured path. A ``${VAR}``
    unset or empty, without a default, is an error: a misspelled name made
    ``${LLM_CACHE_DIRR}/gguf`` into ``/gguf``, where models were looked for and
    downloaded."""

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
    gpu_memory_fraction: Annotated[float, Field(gt=0, le=1)] | None = None


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
    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    api_key_env: str | None = None
    metrics: bool = False
    extra_args: tuple[str, ...] = ()

    # Capacity and hardware.
    ctx_size: NonNegativeInt | None = None
    n_gpu_layers: NGpuLayers | None = None
    threads: Annotated[int, Field(ge=-1)] | None = None
    parallel: PositiveInt | None = Field(
        None, validation_alias=AliasChoices("parallel", "n_parallel")
    )
    batch_size: PositiveInt | None = None
    ubatch_size: PositiveInt | None = None
    flash_attn: Literal["on", "off", "auto"] | None = None
    split_mode: Literal["none", "layer", "row"] | None = None
    tensor_split: tuple[Annotated[float, Field(ge=0)], ...] | None = None
    no_context_shift: bool = False
    # One KV buffer shared by all slots (true), or a slice of the context each (false);
    # unset, llama-server decides (shared only when it picks the number of slots itself).
    kv_unified: bool | None = None

    # Chat template and reasoning.
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_budget: int | None = None
    reasoning: Literal["on", "off", "auto"] | None = None
    reasoning_format: Literal["none", "deepseek", "deepseek-legacy", "auto"] | None = None

    # Vision.
    image_min_tokens: PositiveInt | None = None
    image_max_tokens: PositiveInt | None = None

    # RoPE.
    rope_scaling: Literal["none", "linear", "yarn"] | None = None
    rope_scale: Annotated[float, Field(gt=0)] | None = None
    yarn_orig_ctx: NonNegativeInt | None = None

    # Sampling defaults: fill what a request leaves out.
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_k: NonNegativeInt | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    presence_penalty: float | None = None
    n_predict: Annotated[int, Field(ge=-2)] | None = None

    # Speculative decoding.
    spec_type: str | None = None
    spec_draft_n_max: PositiveInt | None = None
    n_gpu_layers_draft: NGpuLayers | None = None
    draft_min: NonNegativeInt | None = None
    draft_max: PositiveInt | None = None

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
            raise ValueError(
                "must be the name of an environment variable (letters, digits and '_', "
                "not starting with a digit) that holds the key, not the key itself"
            )
        return value

    @field_validator("extra_args", mode="before")
    @classmethod
    def _args(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return [str(item) for item in value]
        return value


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
        or two from ours (``gpus:``) is a typo that would silently do nothing."""
        if isinstance(data, Mapping):
            known = known_keys(cls)
            for key in data:
                close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.8)
                if key not in known and close:
                    raise ValueError(f"unknown key '{key}' (did you mean '{close[0]}'?)")
        return data

    @property
    def label(self) -> str:
        return self.display_name or self.name


def known_keys(model: type[BaseModel]) -> list[str]:
    """Field names and their aliases: the words a user may write in a block."""
    names: list[str] = []
    for name, info in model.model_fields.items():
        names.append(name)
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names.extend(str(choice) for choice in alias.choices)
    return sorted(set(names))
