"""Make a profile's files present and sound before llama-server ever sees them.

For each file (every part of a split model, the mmproj, the draft model):

1. A file already at its path that passes ``verify_gguf`` is used as is, with no network:
   that is how hand-copied files and ``HF_HUB_OFFLINE=1`` work.
2. A missing file is downloaded (``download.fetch_file``) under a per-file lock, into a
   ``.part`` file that only becomes the model file after its sha256 matches the Hub's and
   its header checks out. No reader ever sees a half-written model file.
3. A file that fails is downloaded again, once, and moved aside (never deleted) when its
   replacement has passed its check. A second failure is an error that says what is
   wrong and what to do. A file whose download record names another repo or revision
   than the profile does now is replaced once the new one has passed its check, unless
   another profile of the registry names that source for it (``sources``). Either way
   the file in place stays there until then: a failed download leaves it as it was.

``refetch_corrupt`` is the deeper check the engine runs when llama-server reports a broken
model: it also hashes each file against the recorded (or the Hub's) sha256.
Both functions block: async callers run them in a thread.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from orion_llamaccp.errors import ModelCorrupt, ModelError, ModelNotFound
from orion_llamaccp.model import store
from orion_llamaccp.model.download import DownloadPolicy, Fetched, check_room_for_all, fetch_file
from orion_llamaccp.model.gguf_check import (
    GgufInfo,
    diagnose_gguf,
    sha256_file,
    verify_split_set,
)
from orion_llamaccp.model.hub import HubClient, HubFile, Transient
from orion_llamaccp.model.lock import file_lock
from orion_llamaccp.model.paths import ModelFiles, not_a_file, plan_files, repo_name
from orion_llamaccp.model.progress import ProgressHook, Reporter
from orion_llamaccp.model.sources import (
    Target,
    names_commit,
    other_source,
    plan_targets,
    refuse_if_shared,
)
from orion_llamaccp.profiles.models import Profile
from orion_llamaccp.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedModel:
    """The profile's files, checked: what the engine launches and the presence announces."""

    files: ModelFiles
    info: GgufInfo
    sha256: str | None
    size: int
    file_sha256: Mapping[Path, str | None] = dataclasses.field(default_factory=dict)
    downloaded: tuple[Path, ...] = ()
    moved_aside: tuple[Path, ...] = ()


@dataclass(frozen=True)
class _Unusable:
    """Why the file at a target's path cannot be used as it is."""

    problem: str
    stale: bool = False  # sound, but from another source than the profile names now


@dataclass(frozen=True)
class _Checked:
    path: Path
    info: GgufInfo
    sha256: str | None
    downloaded: bool = False
    moved_aside: tuple[Path, ...] = ()


class _Fetcher:
    """Brings one profile's targets to a verified state; one instance per call."""

    def __init__(
        self,
        profile: Profile,
        settings: Settings,
        root: Path,
        reporter: Reporter,
        cancel: threading.Event | None,
        *,
        download: bool = True,
    ) -> None:
        self.profile, self.settings, self.root = profile, settings, root
        self.reporter, self.cancel = reporter, cancel
        self.may_download = download and not settings.hf_hub_offline
        self.writes_records = download  # `verify` never touches the files nor their records
        self._hashed: dict[tuple[Path, int, int], str] = {}
        self.policy = DownloadPolicy.from_settings(settings)
        token = settings.hf_token.get_secret_value() if settings.hf_token else None
        self.client = HubClient(
            endpoint=settings.hf_endpoint, token=token, timeout=self.policy.stall_sec
        )

    def resolve(self, files: ModelFiles, targets: Sequence[Target], deep: bool) -> ResolvedModel:
        self._room_for_missing(targets)
        checked: list[_Checked] = []
        for index, target in enumerate(targets):
            if 0 < index < len(files.parts):
                target = self._with_first_part_s_commit(target, checked[0].path)
            checked.append(self.ensure(target, deep=deep))
        parts = checked[: len(files.parts)]
        verify_split_set([c.info for c in parts])
        return ResolvedModel(
            files=files,
            info=parts[0].info,
            sha256=parts[0].sha256,
            size=sum(c.info.size for c in parts),
            file_sha256={c.path: c.sha256 for c in checked},
            downloaded=tuple(c.path for c in checked if c.downloaded),
            moved_aside=tuple(p for c in checked for p in c.moved_aside),
        )

    def _room_for_missing(self, targets: Sequence[Target]) -> None:
        """Refuse at once when the files not on disk yet will not fit together."""
        missing = [(t.hub, t.path) for t in targets if t.hub is not None and not t.path.exists()]
        if not self.may_download or len(missing) < 2:
            return
        try:
            check_room_for_all(self.client, missing, self.root, self.cancel)
        except ModelError as exc:  # a watcher of the progress events must hear it too
            for _, path in missing:
                self.reporter.emit("failed", self.name(path), message=str(exc))
            raise

    def _with_first_part_s_commit(self, target: Target, first: Path) -> Target:
        """A split model's later part from the commit its first part came from: a branch
        (``main``) looked up again for each part could give a part of a re-upload after
        one of the model before it (a part fetched days later, say), and the parts'
        checks (each its own sha256, the split's counts) would not tell the mix."""
        hub = target.hub
        record = self.record(first)
        commit = record.commit if record is not None else None
        if hub is None or commit is None or names_commit(hub.revision, commit):
            return target
        return dataclasses.replace(target, hub=dataclasses.replace(hub, revision=commit))

    def ensure(self, target: Target, *, deep: bool) -> _Checked:
        name = self.name(target.path)
        self.reporter.emit("checking", name)
        try:
            checked = self._ensure(target, deep)
        except ModelError as exc:
            self.reporter.emit("failed", name, message=str(exc))
            raise
        size = checked.info.size
        self.reporter.emit("ready", name, done=size, total=size)
        return checked

    def _ensure(self, target: Target, deep: bool) -> _Checked:
        found = self.check_existing(target, deep)
        if isinstance(found, _Checked):
            return found
        hub = self._source_or_refuse(target, found)
        name = self.name(target.path)

        def on_wait() -> None:
            self.reporter.emit("checking", name, message="waiting for another process")

        lock = store.lock_path(self.root, target.path)
        with file_lock(lock, what=name, cancel=self.cancel, on_wait=on_wait):
            found = self.check_existing(target, deep)  # another process may have won
            if isinstance(found, _Checked):
                return found
            if found is None:
                return self.download_verified(target, hub, tries=2)
            # The file there stays in place until its replacement has passed its check:
            # a source that does not exist (a typo in hf_revision), a Hub out of reach or
            # a full disk leaves it where it was, not renamed away from a working service.
            if found.stale:
                log.warning("%s: %s; downloading it to replace it", target.role, found.problem)
                return self.download_verified(target, hub, tries=2)
            log.warning("%s: %s; downloading it again", target.role, found.problem)
            return self.download_verified(target, hub, tries=1, corrupt=True)

    def _source_or_refuse(self, target: Target, found: _Unusable | None) -> HubFile:
        """Where to download the file from, or the error for a file we will not download."""
        if target.hub is not None and self.may_download:
            return target.hub
        what, how = f"{target.role} {target.path}", self._how_to_fix(target)
        if found is None:
            raise ModelNotFound(f"{what} does not exist; {how}")
        raise ModelCorrupt(f"{what} is not usable: {found.problem}; {how}")

    def _how_to_fix(self, target: Target) -> str:
        hub = target.hub
        if hub is None:
            return target.no_download or (
                "copy a good file there, or name it in the profile with hf_repo_id + hf_filename"
            )
        if self.settings.hf_hub_offline:
            return (
                f"HF_HUB_OFFLINE=1 forbids downloading it: copy {hub.filename} from "
                f"https://huggingface.co/{hub.repo_id} to {target.path}, or unset HF_HUB_OFFLINE"
            )
        return f"run `orion-llamaccp fetch` to download it from {hub.label}"

    def check_existing(self, target: Target, deep: bool) -> _Checked | _Unusable | None:
        """A usable file already in place, what is wrong with the one there, or None
        where there is none."""
        path = target.path
        if not path.exists():
            return None
        if not path.is_file():  # a folder given as the model, a bind mount's, say
            raise ModelError(f"{target.role} {path} is {not_a_file(path, target.named_by)}")
        try:
            info, problem = diagnose_gguf(path)
        except ModelNotFound:  # moved away by another process since: theirs is locked
            return None
        if info is None:
            return _Unusable(problem or "")
        record = self.record(path)
        if record is not None and record.changed:
            said = _changed_since(record)
            if deep:
                return _Unusable(said)
            log.warning("%s: %s", self.name(path), said)
        stale = other_source(record, target.hub)
        if stale is not None:
            refuse_if_shared(self.profile, self.settings, target, record)
            return _Unusable(stale, stale=True)
        sha = (record.changed or record.sha256) if record else None
        if deep:
            expected = sha or self._hub_sha256(target)
            sha = self.hash(path)
            if expected and sha != expected:
                return _Unusable(f"its sha256 {sha} does not match the expected {expected}")
        return _Checked(path, info, sha)

    def download_verified(
        self, target: Target, hub: HubFile, *, tries: int, corrupt: bool = False
    ) -> _Checked:
        """Download, check, move into place; bad bytes are moved aside and fetched again.
        ``corrupt``: the file in place is bad, and moved aside (not replaced) by the new
        one, for whoever looks into what damaged it."""
        aside: list[Path] = []
        digests: list[str] = []  # of the downloads that failed their check
        while True:
            fetched = fetch_file(
                self.client,
                hub,
                target=target.path,
                root=self.root,
                policy=self.policy,
                reporter=self.reporter,
                cancel=self.cancel,
            )
            self.reporter.emit("verifying", self.name(target.path), attempt=fetched.attempts)
            info, problem = self._check_fetched(fetched)
            if info is not None:
                if corrupt:
                    aside.insert(0, store.move_aside(target.path))
                return self._install(target, fetched, info, tuple(aside))
            aside.append(store.move_aside(fetched.partial, beside=target.path))
            last = len(aside) >= tries
            self._give_up_if_hopeless(hub, fetched, problem or "", aside, digests, last=last)
            digests.append(fetched.sha256)
            log.warning("%s failed its check: %s; downloading it again", hub.label, problem)

    def _check_fetched(self, fetched: Fetched) -> tuple[GgufInfo | None, str | None]:
        expected = fetched.remote.sha256
        if expected and fetched.sha256 != expected:
            return None, f"sha256 {fetched.sha256} does not match the Hub's {expected}"
        if not expected:  # a git file, or a mirror that does not pass the LFS digest on
            log.warning(
                "%s: the Hub gave no sha256 for it (ETag %r), so only its size and its "
                "GGUF structure are checked, not its bytes",
                fetched.remote.source.label,
                fetched.remote.etag[:80],
            )
        return diagnose_gguf(fetched.partial)

    def _give_up_if_hopeless(
        self,
        hub: HubFile,
        fetched: Fetched,
        problem: str,
        aside: list[Path],
        digests: list[str],
        *,
        last: bool,
    ) -> None:
        """Raise where another download cannot help: the bytes are the Hub's own (its
        sha256, or, where it gives none, the same bytes twice), or the tries are spent."""
        kept = ", ".join(str(p) for p in aside)
        if fetched.remote.sha256 and fetched.remote.sha256 == fetched.sha256:
            raise ModelCorrupt(
                f"{hub.label} on the Hub is not a usable GGUF: {problem}. Its sha256 matches "
                f"the Hub's, so downloading again cannot help: pick another file or revision "
                f"(the download is kept at {kept})"
            )
        if not fetched.remote.sha256 and fetched.sha256 in digests:
            raise ModelCorrupt(
                f"{hub.label} on the Hub is not a usable GGUF: {problem}. Two downloads gave "
                f"the same bytes (sha256 {fetched.sha256}; the Hub gave none to compare "
                f"with: a git file, or a mirror without LFS), so downloading again cannot "
                f"help: pick another file or revision (the downloads are kept at {kept})"
            )
        if last:
            times = "twice" if len(aside) > 1 else "again (so had the file in place, left there)"
            raise ModelCorrupt(
                f"{hub.label} failed its check {times}: {problem}. The downloads are kept at "
                f"{kept}. Something alters the bytes on the way (proxy, disk, HF_ENDPOINT "
                f"mirror): check it, then run `orion-llamaccp fetch` again"
            )

    def _install(
        self, target: Target, fetched: Fetched, info: GgufInfo, aside: tuple[Path, ...]
    ) -> _Checked:
        store.write_record(
            self.root,
            target.path,
            sha256=fetched.sha256,
            repo_id=fetched.remote.source.repo_id,
            revision=fetched.remote.source.revision,
            commit=fetched.remote.commit,
            like=fetched.partial,
        )
        try:
            target.path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(fetched.partial, target.path)
        except OSError as exc:
            raise ModelError(
                f"cannot move the downloaded {fetched.partial} to {target.path}: {exc.strerror}"
            ) from exc
        log.info("downloaded %s (%d bytes, sha256 %s)", target.path, info.size, fetched.sha256)
        info = dataclasses.replace(info, path=target.path)
        return _Checked(target.path, info, fetched.sha256, downloaded=True, moved_aside=aside)

    def _hub_sha256(self, target: Target) -> str | None:
        """The Hub's sha256 for a file we have no record of (deep check only)."""
        if target.hub is None or not self.may_download:
            return None
        try:
            return self.client.describe(target.hub).sha256
        except (ModelError, Transient) as exc:
            log.warning("cannot ask the Hub for %s's sha256: %s", target.hub.label, exc)
            return None

    def record(self, path: Path) -> store.FileRecord | None:
        """What we downloaded ``path`` from. A record whose file kept its size but not its
        mtime (the model folder copied or restored without its times, a ``touch``) is
        kept when the bytes still hash to its sha256, once, for a switch of the
        profile's revision replaces only a file whose source is known: dropped, the
        file would pass for one copied by hand and be kept whatever the profile names."""
        if not self.under_root(path):
            return None
        record = store.read_record(self.root, path, any_time=True)
        if record is None or record.matches(path):
            return record
        if record.sha256 is None:
            return None
        name = self.name(path)
        if self.writes_records and not store.can_record(self.root, path):
            log.info(  # else every start would hash it again
                "%s: its time changed, and %s is read-only: taken as copied by hand",
                name,
                self.root,
            )
            return None
        log.info("%s: its time changed since it was downloaded; hashing it", name)
        sha = self.hash(path)
        # Other bytes (damage, or another file copied over it) are kept in the record as
        # ``changed``: hashed once, and every deep check after says so (dropped, the
        # record left the next `verify --hash` nothing to compare with).
        changed = sha if sha != record.sha256 else None
        if not self.writes_records:
            return record.model_copy(update={"changed": changed})
        return store.write_record(
            self.root,
            path,
            sha256=record.sha256,
            repo_id=record.repo_id,
            revision=record.revision,
            commit=record.commit,
            changed=changed,
        )

    def hash(self, path: Path) -> str:
        """The file's sha256, hashed once per call however many checks ask for it."""
        stat = path.stat()
        key = (path, stat.st_size, stat.st_mtime_ns)
        if key not in self._hashed:
            name, total = self.name(path), stat.st_size

            def on_bytes(done: int) -> None:
                self.reporter.emit("verifying", name, done=done, total=total)

            self._hashed[key] = sha256_file(path, on_bytes)
        return self._hashed[key]

    def under_root(self, path: Path) -> bool:
        return path.is_relative_to(self.root)

    def name(self, path: Path) -> str:
        return repo_name(self.root, path) if self.under_root(path) else path.name


def _changed_since(record: store.FileRecord) -> str:
    at = f"@{record.revision}" if record.revision else ""
    source = f" from {record.repo_id}{at}" if record.repo_id else ""
    return (
        f"its sha256 {record.changed} differs from the {record.sha256} recorded when it "
        f"was downloaded{source}: its bytes changed since (damage on disk, or another "
        f"file copied over it)"
    )


def _run(
    profile: Profile,
    settings: Settings,
    progress: ProgressHook | None,
    cancel: threading.Event | None,
    *,
    deep: bool,
    download: bool = True,
) -> ResolvedModel:
    files = plan_files(profile, settings.overrides_for(profile.name).model_path, settings.environ())
    fetcher = _Fetcher(profile, settings, files.root, Reporter(progress), cancel, download=download)
    return fetcher.resolve(files, plan_targets(profile, files), deep)


def ensure_model(
    profile: Profile,
    settings: Settings,
    *,
    progress: ProgressHook | None = None,
    cancel: threading.Event | None = None,
) -> ResolvedModel:
    """Every file of the profile present and verified, downloading what is missing."""
    return _run(profile, settings, progress, cancel, deep=False)


def refetch_corrupt(
    profile: Profile,
    settings: Settings,
    *,
    progress: ProgressHook | None = None,
    cancel: threading.Event | None = None,
) -> ResolvedModel:
    """Like ``ensure_model``, but hash every file too; a bad one is moved aside and re-fetched.

    For the engine, when llama-server says ``missing tensor`` or similar. ``moved_aside`` /
    ``downloaded`` of the result say whether anything was wrong.
    """
    return _run(profile, settings, progress, cancel, deep=True)


def verify_model(
    profile: Profile,
    settings: Settings,
    *,
    deep: bool = False,
    progress: ProgressHook | None = None,
) -> ResolvedModel:
    """Check the profile's files where they are, never touching the network or the files.

    ``deep`` hashes each file and compares it with the sha256 recorded at download.
    """
    return _run(profile, settings, progress, None, deep=deep, download=False)
