"""Where a profile's files live on disk: pure path logic, no I/O beyond ``resolve()``.

Precedence for the main model file:
``LLAMACPP_MODEL_PATH_OVERRIDE`` > ``llamacpp.model_path`` > ``model_root/hf_filename`` >
``model_id`` when it is an absolute ``.gguf`` path.

Names that come from the registry (``model_path``, ``hf_filename``, ``mmproj_filename``,
``hf_draft_filename``) can never resolve outside ``model_root``. Only the operator's own
override may point anywhere.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from orion_llamaccp.errors import ConfigError, ModelNotFound, UnsafeModelPath
from orion_llamaccp.profiles.models import Profile, expand_path
from orion_llamaccp.settings import set_in

# The settings that name the model file by path: either one switches its download off.
PATH_SETTINGS = ("LLAMACPP_MODEL_PATH_OVERRIDE", "llamacpp.model_path")
SPLIT_PART = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class ModelFiles:
    """The files llama-server needs, and where each one comes from."""

    root: Path
    model: Path
    parts: tuple[Path, ...]
    mmproj: Path | None = None
    draft: Path | None = None
    source: str = "hf_filename"

    @property
    def all(self) -> tuple[Path, ...]:
        extra = tuple(p for p in (self.mmproj, self.draft) if p is not None)
        return (*self.parts, *extra)


def model_root(profile: Profile, env: Mapping[str, str]) -> Path:
    return _expanded(profile, "model_root", profile.llamacpp.model_root, env)


def _expanded(profile: Profile, key: str, value: str, env: Mapping[str, str]) -> Path:
    """``value`` with its ``${VAR}`` and ``~`` expanded, or an error naming the setting."""
    try:
        return expand_path(value, env)
    except ConfigError as exc:
        raise ConfigError(f"profile '{profile.name}': llamacpp.{key} {exc}") from None


def safe_join(root: Path, name: str, key: str) -> Path:
    """``root / name``, refusing anything that would land outside ``root``; ``key`` is
    the setting that said ``name``, for the error."""
    pure = PurePosixPath(name.replace("\\", "/"))
    bad = not name or "\x00" in name or pure.is_absolute() or ".." in pure.parts
    if bad or name.startswith("~") or not pure.parts:
        anywhere = "" if key.startswith("llamacpp.") else ", or an absolute path"
        raise UnsafeModelPath(
            f"{key} = {name!r} would resolve outside model_root {root}: give a plain "
            f"relative file name (sub-folders allowed, no '..', no '~'){anywhere}"
        )
    candidate = (root / pure).resolve()
    if not candidate.is_relative_to(root.resolve()):
        raise UnsafeModelPath(
            f"{key} = {name!r} resolves to {candidate}, outside model_root {root} "
            f"(through a symbolic link): refuse to use it, since a download or a repair "
            f"would write there too; point model_root at the folder the file is in, or "
            f"LLAMACPP_MODEL_PATH_OVERRIDE at the file itself"
        )
    return root / pure


def repo_name(root: Path, path: Path) -> str:
    """The file's name inside its Hub repo: its path under ``model_root``, with ``/``."""
    return path.relative_to(root).as_posix()


def split_parts(path: Path) -> tuple[Path, ...]:
    """All parts of a split GGUF named ``x-00001-of-0000N.gguf``; just ``path`` otherwise."""
    match = SPLIT_PART.match(path.name)
    if not match:
        return (path,)
    count, index = int(match.group("count")), int(match.group("index"))
    if not 1 <= index <= count:
        raise UnsafeModelPath(
            f"{path.name} is named as part {index} of a split GGUF of {count} parts, which "
            f"cannot be: a split model is named by any of its parts, "
            f"<name>-00001-of-<count>.gguf (llama-server loads the first)"
        )
    stem = match.group("stem")
    return tuple(path.with_name(f"{stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1))


def main_model_path(
    profile: Profile, override: str | None, env: Mapping[str, str]
) -> tuple[Path, str]:
    """The main model file and which setting chose it."""
    root = model_root(profile, env)
    cfg = profile.llamacpp
    if override:
        source = "LLAMACPP_MODEL_PATH_OVERRIDE"
        # Expanded as model_root is: ``$HOME/m.gguf`` (from a file no shell read: .env,
        # an env_file, a pod spec) was taken for a file named so under model_root.
        try:
            path = expand_path(override, env)
        except ConfigError as exc:
            raise ConfigError(f"{source}{set_in(source)}: {exc}") from None
        return (path if path.is_absolute() else safe_join(root, str(path), source)), source
    if cfg.model_path:
        path = _expanded(profile, "model_path", cfg.model_path, env)
        if path.is_absolute():
            if not path.resolve().is_relative_to(root.resolve()):
                raise UnsafeModelPath(
                    f"llamacpp.model_path = {cfg.model_path!r} is outside model_root {root}: "
                    f"put the file under model_root, or set LLAMACPP_MODEL_PATH_OVERRIDE"
                )
            return path, "llamacpp.model_path"
        return safe_join(root, str(path), "llamacpp.model_path"), "llamacpp.model_path"
    if cfg.hf_filename:
        return safe_join(root, cfg.hf_filename, "llamacpp.hf_filename"), "llamacpp.hf_filename"
    if (
        profile.model_id
        and profile.model_id.endswith(".gguf")
        and Path(profile.model_id).is_absolute()
    ):
        return Path(profile.model_id), "model_id"
    raise ModelNotFound(
        f"profile '{profile.name}' names no model file: set llamacpp.hf_repo_id + "
        f"llamacpp.hf_filename (downloaded into {root}), llamacpp.model_path, "
        f"or an absolute .gguf path as model_id"
    )


def not_a_file(path: Path, source: str | None) -> str:
    """What stands at ``path`` where a file was wanted, and what to do, chosen by ``source``
    (a setting): said after "``path`` is" (a folder given as the model path was said to be
    "missing")."""
    if not path.is_dir():
        return f"not a regular file: {source or 'the profile'} must name a GGUF file"
    if source in PATH_SETTINGS:
        found = sorted(child.name for child in path.glob("*.gguf"))
        held = f"it holds {', '.join(found[:3])}{', ...' if len(found) > 3 else ''}"
        return (
            f"a folder, not a GGUF file ({held if found else 'no .gguf in it'}): "
            f"{source} names the model file itself (of a split model, its first part, "
            f"<name>-00001-of-<count>.gguf)"
        )
    return (
        "a folder, not a GGUF file: remove it, or point the profile at the file "
        "(a container's bind mount of a host file that does not exist makes a folder there)"
    )


def downloads_model(profile: Profile, files: ModelFiles) -> bool:
    """The model comes from the Hub only when it is the file at ``model_root/hf_filename``."""
    cfg = profile.llamacpp
    if not (cfg.hf_repo_id and cfg.hf_filename):
        return False
    named = safe_join(files.root, cfg.hf_filename, "llamacpp.hf_filename")
    return split_parts(named)[0] == files.model


def no_download_reason(profile: Profile, files: ModelFiles) -> str | None:
    """Why the model is not downloaded though the profile names ``hf_repo_id``, and what
    to do; ``None`` when it is downloaded, or when no repo is named.

    A model path setting wins over ``hf_repo_id`` + ``hf_filename`` and switches the
    download off: a user who set both would otherwise wait for a download that never comes.
    """
    repo = profile.llamacpp.hf_repo_id
    if not repo or downloads_model(profile, files):
        return None
    if files.source not in PATH_SETTINGS:
        return (
            f"llamacpp.hf_repo_id {repo} is set without llamacpp.hf_filename, so nothing is "
            f"downloaded: set hf_filename, or copy the GGUF to {files.model}"
        )
    return (
        f"{files.source} chooses this file and wins over llamacpp.hf_repo_id {repo}, so "
        f"nothing is downloaded: copy the GGUF to {files.model}, or {_undo_path(profile, files)}"
    )


def _undo_path(profile: Profile, files: ModelFiles) -> str:
    cfg = profile.llamacpp
    unset = ["remove llamacpp.model_path from the profile"] if cfg.model_path else []
    if files.source == "LLAMACPP_MODEL_PATH_OVERRIDE":
        unset.insert(0, "unset LLAMACPP_MODEL_PATH_OVERRIDE")
    if not cfg.hf_filename:
        unset.append("set llamacpp.hf_filename")
        return " and ".join(unset) + f" to have it downloaded from {cfg.hf_repo_id}"
    return (
        " and ".join(unset)
        + f" to have {cfg.hf_filename} downloaded from {cfg.hf_repo_id} into {files.root}"
    )


def plan_files(profile: Profile, override: str | None, env: Mapping[str, str]) -> ModelFiles:
    """Every file the profile needs, without touching the network or checking they exist."""
    root = model_root(profile, env)
    cfg = profile.llamacpp
    model, source = main_model_path(profile, override, env)
    mmproj = (
        safe_join(root, cfg.mmproj_filename, "llamacpp.mmproj_filename")
        if cfg.mmproj_filename
        else None
    )
    draft = (
        safe_join(root, cfg.hf_draft_filename, "llamacpp.hf_draft_filename")
        if cfg.hf_draft_filename
        else None
    )
    parts = split_parts(model)
    return ModelFiles(
        root=root, model=parts[0], parts=parts, mmproj=mmproj, draft=draft, source=source
    )
