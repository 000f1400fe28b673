"""Where each of a profile's files comes from, and whether the file on disk still is that.

A downloaded file's record (``store.FileRecord``) names the repo, revision and commit it
came from. A record that names another source than the profile does now means the
profile changed (a new ``hf_repo_id`` or ``hf_revision``): the file is replaced. Unless
another profile of the same registry names that very source for that very path: two
containers sharing ``model_root`` (one file name, ``mmproj-model-f16.gguf`` say, in two
repos) would then replace each other's file on every start, for ever. That is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from orion_llamaccp.errors import ConfigError, ModelError
from orion_llamaccp.model.hub import HubFile
from orion_llamaccp.model.paths import (
    ModelFiles,
    downloads_model,
    no_download_reason,
    plan_files,
    repo_name,
)
from orion_llamaccp.model.store import FileRecord
from orion_llamaccp.profiles.models import Profile
from orion_llamaccp.profiles.registry import load_registry
from orion_llamaccp.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """One file the profile needs, and the Hub file it comes from (if any).

    ``no_download``: for a file the profile also names a repo for, why it is not
    downloaded all the same, and what to do (a model path setting wins over the repo).
    """

    path: Path
    role: str
    hub: HubFile | None = None
    no_download: str | None = None
    named_by: str | None = None  # the setting that chose the model file


def plan_targets(profile: Profile, files: ModelFiles) -> list[Target]:
    """Every file with its Hub source; a file chosen by a path setting has none."""
    cfg = profile.llamacpp
    targets = _model_targets(profile, files)
    extras = (
        (files.mmproj, "mmproj", cfg.mmproj_repo_id),
        (files.draft, "draft model", cfg.hf_draft_repo_id),
    )
    for path, role, repo in extras:
        if path is not None:
            targets.append(Target(path, role, _extra_source(profile, files.root, path, repo)))
    return targets


def _model_targets(profile: Profile, files: ModelFiles) -> list[Target]:
    cfg, count = profile.llamacpp, len(files.parts)
    repo = cfg.hf_repo_id if downloads_model(profile, files) else None
    why = no_download_reason(profile, files)
    return [
        Target(
            part,
            "model" if count == 1 else f"model part {index} of {count}",
            HubFile(repo, repo_name(files.root, part), cfg.hf_revision) if repo else None,
            why,
            files.source,
        )
        for index, part in enumerate(files.parts, 1)
    ]


def _extra_source(profile: Profile, root: Path, path: Path, repo: str | None) -> HubFile | None:
    cfg = profile.llamacpp
    repo = repo or cfg.hf_repo_id
    if not repo:
        return None
    revision = cfg.hf_revision if repo == cfg.hf_repo_id else None
    return HubFile(repo, repo_name(root, path), revision)


def other_source(record: FileRecord | None, hub: HubFile | None) -> str | None:
    """Why a file we downloaded is not the one the profile names now (its hf_repo_id or
    hf_revision changed); a file without a record was put there by hand and is trusted.
    A revision that names the commit the file came from (pinning a profile to what it
    runs) is the same source: that file is not downloaded again."""
    if record is None or record.repo_id is None or hub is None:
        return None
    had = HubFile(record.repo_id, hub.filename, record.revision)
    if had.repo_id == hub.repo_id and (
        (had.revision or "main") == (hub.revision or "main")
        or names_commit(hub.revision, record.commit)
    ):
        return None
    return f"it was downloaded from {had.label}, but the profile now names {hub.label}"


def names_commit(revision: str | None, commit: str | None) -> bool:
    """Whether ``revision`` is ``commit``'s hash, whole or its first 7 or more digits."""
    if not revision or not commit or len(revision) < 7:
        return False
    short = revision.lower()
    return all(c in "0123456789abcdef" for c in short) and commit.lower().startswith(short)


def refuse_if_shared(
    profile: Profile, settings: Settings, target: Target, record: FileRecord | None
) -> None:
    """Raise when another profile of the registry names this path with the source the
    file on disk came from: replacing it would start a tug of war, not a switch."""
    if record is None or target.hub is None:
        return
    claim = _other_claim(profile, settings, target.path, record)
    if claim is None:
        return
    name, theirs = claim
    raise ModelError(
        f"{target.role} {target.path} is {theirs.label}, as profile '{name}' names it, but "
        f"profile '{profile.name}' names {target.hub.label} for the same file: two "
        f"services sharing model_root {target.path.parent} would replace each other's file "
        f"on every start. Give one of the two profiles a model_root of its own (e.g. "
        f"${{LLM_CACHE_DIR}}/{profile.name}), or remove profile '{name}' from "
        f"{settings.profiles_config_path} if nothing serves it any more"
    )


def _other_claim(
    profile: Profile, settings: Settings, path: Path, record: FileRecord
) -> tuple[str, HubFile] | None:
    """Another profile whose file at ``path`` is the source ``record`` names."""
    try:
        registry = load_registry(settings.profiles_config_path)
    except ConfigError as exc:  # the profile came from elsewhere: nothing to compare with
        log.debug("cannot compare %s with the registry's other profiles: %s", path, exc)
        return None
    env, here = settings.environ(), path.resolve()
    for name, other in registry.profiles.items():
        if name == profile.name:
            continue
        try:
            files = plan_files(other, settings.overrides_for(name).model_path, env)
        except (ConfigError, ModelError):  # that profile's own problem, not this one's
            continue
        for theirs in plan_targets(other, files):
            same_file = theirs.path.resolve() == here
            if same_file and theirs.hub is not None and other_source(record, theirs.hub) is None:
                return name, theirs.hub
    return None
