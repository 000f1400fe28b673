"""What we keep beside the models under ``model_root``: records, locks, partial downloads.

Everything lives in one hidden folder, ``model_root/.orion/``, mirroring the model's path:

- ``records/<name>.json``: the Hub's sha256, revision and commit of a file we downloaded,
  so a restart can report the model's sha256 without re-hashing 70 GB. A record counts
  while the file's size and mtime still match it (a hand-copied replacement voids it); a
  file whose mtime alone changed (the folder copied without its times) is hashed once,
  and keeps its record if the bytes are still the ones downloaded.
- ``locks/<name>.lock``: one lock per file, so two processes download it once.
- ``partial/<name>.<etag>.part``: a download in progress; kept across failures and
  restarts so the next attempt resumes instead of starting over.

A file that fails verification is never deleted: ``move_aside`` renames it beside itself
as ``<name>.corrupt-<timestamp>`` so a human can inspect it (and delete it).
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from orion_llamaccp.errors import ModelError

log = logging.getLogger(__name__)

STATE_DIR = ".orion"


class FileRecord(BaseModel):
    """Provenance of a downloaded file, valid while the file's size and mtime match."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    size: int
    mtime_ns: int
    sha256: str | None = None
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    # The sha256 of other bytes found under the record since (damage, or a copy by hand)
    changed: str | None = None

    def matches(self, path: Path) -> bool:
        try:
            stat = path.stat()
        except OSError:
            return False
        return stat.st_size == self.size and stat.st_mtime_ns == self.mtime_ns

    def same_size(self, path: Path) -> bool:
        try:
            return path.stat().st_size == self.size
        except OSError:
            return False


def _state(root: Path, path: Path, kind: str, suffix: str) -> Path:
    rel = path.relative_to(root)
    return root / STATE_DIR / kind / rel.parent / f"{rel.name}{suffix}"


def lock_path(root: Path, path: Path) -> Path:
    return _state(root, path, "locks", ".lock")


def record_path(root: Path, path: Path) -> Path:
    return _state(root, path, "records", ".json")


def partial_path(root: Path, path: Path, etag: str) -> Path:
    tag = re.sub(r"[^0-9a-zA-Z]", "", etag)[:16] or "x"
    return _state(root, path, "partial", f".{tag}.part")


def partial_folder(root: Path, path: Path) -> Path:
    """Where ``path``'s partial downloads lie, whatever their etag."""
    return _state(root, path, "partial", "").parent


def stale_partials(root: Path, path: Path, keep: Path) -> list[Path]:
    """Partial downloads of ``path`` for another etag: the Hub's file changed since."""
    folder = partial_folder(root, path)
    if not folder.is_dir():
        return []
    mine = re.compile(re.escape(path.name) + r"\.[0-9a-zA-Z]{1,16}\.part")
    return [p for p in folder.iterdir() if mine.fullmatch(p.name) and p != keep]


def read_record(root: Path, path: Path, *, any_time: bool = False) -> FileRecord | None:
    """The file's record if there is one and it still describes the file on disk;
    ``any_time``: also one whose mtime alone differs (for the caller to hash the file)."""
    try:
        record = FileRecord.model_validate_json(record_path(root, path).read_bytes())
    except (OSError, ValidationError):
        return None
    if record.matches(path) or (any_time and record.same_size(path)):
        return record
    return None


def write_record(
    root: Path,
    path: Path,
    *,
    sha256: str | None,
    repo_id: str | None = None,
    revision: str | None = None,
    commit: str | None = None,
    like: Path | None = None,
    changed: str | None = None,
) -> FileRecord:
    """Record the file as it is now; a read-only ``model_root`` only costs a warning.

    ``like``: the file whose size and time to record, about to be renamed to ``path``
    (a rename keeps both): recorded first, a download cut between the two steps leaves a
    record without its file, which the next download replaces, never a file without its
    record, which would pass for one copied by hand (no sha256, no source).
    """
    stat = (like or path).stat()
    record = FileRecord(
        size=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
        sha256=sha256,
        repo_id=repo_id,
        revision=revision,
        commit=commit,
        changed=changed,
    )
    target = record_path(root, path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        tmp.write_text(record.model_dump_json(indent=2), encoding="utf-8")
        os.replace(tmp, target)
    except OSError as exc:
        log.warning("cannot record sha256 of %s in %s: %s", path, target, exc)
    return record


def can_record(root: Path, path: Path) -> bool:
    """Whether a record of ``path`` can be written (``model_root`` may be mounted
    read-only: then a record refreshed is refreshed for this run only)."""
    folder = record_path(root, path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return os.access(folder, os.W_OK)


def move_aside(path: Path, *, beside: Path | None = None) -> Path:
    """Rename a bad file to ``<name>.corrupt-<timestamp>`` and return the new path.

    ``beside`` names the model file the bad bytes were meant to become (for a failed
    ``.part``), so the evidence lands next to the model where a human looks for it.
    """
    like = beside or path
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = like.with_name(f"{like.name}.corrupt-{stamp}")
    counter = 1
    while aside.exists():
        counter += 1
        aside = like.with_name(f"{like.name}.corrupt-{stamp}-{counter}")
    try:
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, aside)
    except OSError as exc:
        raise ModelError(
            f"{path} is corrupt and cannot be moved aside ({exc.strerror}): "
            f"delete or replace it by hand"
        ) from exc
    # The caller has logged why (corrupt, or downloaded from another repo or revision).
    log.warning("moved %s aside to %s (inspect or delete it)", like.name, aside)
    return aside


def aside_copies(path: Path) -> list[Path]:
    """Files moved aside in ``path``'s folder (any model's): they hold disk space until a
    human deletes them, which a download short of space must say."""
    try:
        found = [p for p in path.parent.glob("*.corrupt-*") if p.is_file()]
    except OSError:
        return []
    return sorted(found)
