"""Load ``llm_profiles.yaml`` and pick the active profile, with errors a user can act on.

A real-world registry holds profiles of other backends too (vLLM, ``llama-cola``, ...):
those are listed but never validated here. A broken llama.cpp profile that is not the one
selected does not stop the service; ``validate`` reports every problem.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from orion_llamaccp.errors import ConfigError, ProfileNotFound
from orion_llamaccp.profiles.models import (
    REFUSED,
    GpuConfig,
    LlamaCppConfig,
    Profile,
    known_keys,
)

BACKEND = "llamacpp"
_BLOCKS: dict[str, type[BaseModel]] = {"gpu": GpuConfig, "llamacpp": LlamaCppConfig}


@dataclass(frozen=True)
class OtherProfile:
    """A profile for another backend: shown in listings, never served by us."""

    name: str
    backend: str
    display_name: str | None = None


@dataclass(frozen=True)
class Registry:
    """The parsed registry: valid llama.cpp profiles, others, and per-profile problems."""

    path: Path
    profiles: dict[str, Profile] = field(default_factory=dict)
    others: dict[str, OtherProfile] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return sorted({*self.profiles, *self.others, *self.problems})

    def select(self, name: str, *, named_by: str = "LLM_PROFILE_NAME") -> Profile:
        """The profile to serve, or the error that says why it cannot be served;
        ``named_by``: where the name came from, for the way out (a command's argument)."""
        if name in self.profiles:
            return self.profiles[name]
        if name in self.problems:
            raise ConfigError(self.problems[name])
        if name in self.others:
            other = self.others[name]
            raise ConfigError(
                f"LLM PROFILE '{name}' has backend '{other.backend}', not '{BACKEND}': "
                f"this service only serves llama.cpp profiles "
                f"({', '.join(sorted(self.profiles)) or 'none in this registry'})"
            )
        raise ProfileNotFound(_not_found(name, self.names, self.path, named_by))


def _not_found(name: str, names: list[str], path: Path, named_by: str) -> str:
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.4)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    way_out = (
        "Set LLM_PROFILE_NAME to one of them"
        if named_by == "LLM_PROFILE_NAME"
        else f"Name one of them as {named_by}"
    )
    return (
        f"LLM PROFILE '{name}' not found in registry {path}.{hint} "
        f"Available: {', '.join(names) or '(none)'}. {way_out}."
    )


def describe_errors(name: str, exc: ValidationError) -> str:
    """Turn pydantic's errors into ``profiles.NAME.block.key: problem`` lines."""
    lines = []
    for err in exc.errors():
        loc = [str(part) for part in err["loc"]]
        where = ".".join(["profiles", name, *loc])
        if err["type"] == "extra_forbidden" and loc and loc[0] in _BLOCKS:
            known = known_keys(_BLOCKS[loc[0]])
            close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            extra = " Raw llama-server flags go in extra_args." if loc[0] == "llamacpp" else ""
            lines.append(f"{where}: unknown key{hint}.{extra}")
        else:
            # Not for the whole profile, nor after a message of ours that says it all.
            said = not loc or err["type"] == REFUSED
            got = "" if said else f" ({_got(loc, err.get('input'))})"
            lines.append(f"{where}: {err['msg']}{got}")
    return "\n".join(lines)


def _got(loc: list[str], value: Any) -> str:
    """The bad value, unless where it sits may hold a secret (a raw ``--api-key`` in
    ``extra_args``, say): every worker sharing the registry logs a broken profile."""
    if any(part == "extra_args" or _SECRETISH.search(part) for part in loc):
        return f"got a {type(value).__name__}; not repeated, it may hold a secret"
    return f"got {value!r}"


_SECRETISH = re.compile(r"key|token|secret|passw", re.IGNORECASE)


def parse_profile(name: str, raw: Any) -> Profile:
    """Validate one llama.cpp profile entry, raising ``ConfigError`` with key paths."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"profiles.{name}: expected a mapping, got {type(raw).__name__}")
    try:
        return Profile.model_validate({**raw, "name": name})
    except ValidationError as exc:
        raise ConfigError(describe_errors(name, exc)) from None


class DuplicateKey(yaml.constructor.ConstructorError):
    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(None, None, f"key {key!r} appears twice")
        self.key, self.line, self.first_line = key, line, first_line


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's "the last one wins" would let a second profile of the same name (or a knob
    set twice) silently replace the first: a key written twice in a mapping is an error.
    Keys brought in by a merge (``<<: *base``) may still be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKey(key, line, seen[key])
            seen[key] = line
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> Mapping[str, Any]:
    """The registry file's ``profiles:`` mapping."""
    try:
        document = yaml.load(_read_text(path), Loader=_UniqueKeyLoader)  # a SafeLoader
    except DuplicateKey as exc:
        raise ConfigError(
            f"{path}: line {exc.line}: key '{exc.key}' appears twice in the same mapping "
            f"(first on line {exc.first_line}); remove or rename one of them"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(document, Mapping) or "profiles" not in document:
        raise ConfigError(
            f"{path} has no top-level 'profiles:' key: the registry must start with it"
        )
    profiles = document["profiles"]
    if not isinstance(profiles, Mapping):
        raise ConfigError(f"{path}: 'profiles:' must be a mapping of name -> profile")
    return profiles


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong and where, without the lines around it that PyYAML quotes: the
    message goes to logs and, from a worker that cannot start, onto the bus, and a line of
    the registry may hold a secret (an ``--api-key`` in ``extra_args``). Either mark may
    be missing (a tab in the indentation has a context but no context mark)."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return str(exc).split("\n", 1)[0]
    said = [
        text + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark else "")
        for text, mark in ((exc.context, exc.context_mark), (exc.problem, exc.problem_mark))
        if text
    ]
    if "'\\t'" in (exc.problem or ""):
        said.append(_tab_hint(exc.problem_mark))
    return "; ".join(said) or type(exc).__name__


def _tab_hint(mark: yaml.Mark | None) -> str:
    """Where the tab is: in the indentation, or after a key (``ctx_size:<tab>4096``),
    where "indent with spaces" sent the reader to the wrong end of the line."""
    buffer = getattr(mark, "buffer", None)
    if mark is not None and isinstance(buffer, str):
        start = buffer.rfind("\n", 0, mark.index) + 1
        if buffer[start : mark.index].strip():
            return "a tab inside the line (after a key's colon?): write a space there"
    return "indent with spaces: YAML does not allow tabs there"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        found = "is a folder, not a file," if path.is_dir() else "not found"
        raise ConfigError(
            f"llm_profiles.yaml {found} at {path} (resolved to {path.resolve()}). "
            f"Set LLM_PROFILES_CONFIG_PATH to the registry file "
            f"(default config/llm_profiles.yaml; /app/config/llm_profiles.yaml in the image)."
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
            f"{exc.start}): save it as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None


def load_registry(path: Path) -> Registry:
    """Read and validate every llama.cpp profile; other backends are listed, not validated."""
    registry = Registry(path=path)
    for key, raw in read_yaml(path).items():
        name = str(key)
        if name in registry.profiles or name in registry.others or name in registry.problems:
            # YAML reads 1: as a number and "1": as text: two keys, one name.
            registry.profiles.pop(name, None)
            registry.others.pop(name, None)
            registry.problems[name] = f'profiles.{name} is written twice (as 1: and "1", say)'
            continue
        backend = raw.get("backend", BACKEND) if isinstance(raw, Mapping) else BACKEND
        if backend is None:
            registry.problems[name] = (
                f"profiles.{name}.backend is empty: write backend: {BACKEND}, or leave it out"
            )
            continue
        if backend != BACKEND and _spelt_like_ours(backend):
            registry.problems[name] = (
                f"profiles.{name}.backend: {backend!r} is not how this wrapper's backend is "
                f"written: write backend: {BACKEND}, or leave it out"
            )
            continue
        if backend != BACKEND:
            display = raw.get("display_name") if isinstance(raw, Mapping) else None
            registry.others[name] = OtherProfile(name, str(backend), display)
            continue
        try:
            registry.profiles[name] = parse_profile(name, raw)
        except ConfigError as exc:
            registry.problems[name] = str(exc)
    return registry


def _spelt_like_ours(backend: object) -> bool:
    """``LlamaCpp``, ``llama.cpp``, ``llama-cpp``, ``llamacp``: meant as ours, but skipped
    as another backend's profile (``validate`` said ``0/0 profiles valid`` and passed).
    Only our name in another case or punctuation, or one letter off: ``ik_llama.cpp``,
    ``llamacpp-rpc`` or ``llamacpp2`` are other tools, whose profiles share the registry."""
    word = "".join(c for c in str(backend).lower() if c.isalnum())
    return word == BACKEND or (word.isalpha() and _one_letter_off(word, BACKEND))


def _one_letter_off(word: str, target: str) -> bool:
    """One letter left out, added, changed, or two beside each other swapped."""
    if word == target or abs(len(word) - len(target)) > 1:
        return False
    at = next(i for i, (a, b) in enumerate(zip(word + " ", target + " ", strict=False)) if a != b)
    swapped = word[at : at + 2][::-1] == target[at : at + 2] and word[at + 2 :] == target[at + 2 :]
    return (
        swapped
        or word[at + 1 :] in {target[at:], target[at + 1 :]}
        or word[at:] == target[at + 1 :]
    )
