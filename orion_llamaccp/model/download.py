"""Bring one file's bytes from the Hub into its ``.part`` file: resume, retry, give up.

Each attempt asks the Hub for the file's metadata (a fresh, possibly re-signed URL), then
GETs from the first byte not yet on disk. An attempt fails on a network error, a 5xx/429,
or a stall (no byte for ``stall_sec``: the read timeout); tenacity retries it with
exponential backoff. We give up only when the file has not grown for ``deadline_sec``, so
a slow but moving 70 GB download is never killed, and a dead network fails in bounded
time. Growing means new bytes past the furthest point reached: a server that ignores
``Range`` sends the same first bytes again on every attempt, which is no progress, and
so does an attempt that starts over because the server's sizes disagree (a body longer
or shorter than the size it announced).
The finished ``.part`` is handed back unverified; ``fetch`` checks it before it becomes
the model file.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential

from orion_llamaccp.errors import DownloadError, ModelError
from orion_llamaccp.model import store
from orion_llamaccp.model.hub import (
    HubClient,
    HubFile,
    RangeNotSatisfiable,
    Refused,
    RemoteFile,
    Transient,
    Unreachable,
)
from orion_llamaccp.model.partial import PartialFile
from orion_llamaccp.model.progress import Reporter, size_text
from orion_llamaccp.settings import Settings

log = logging.getLogger(__name__)
# A link refused this many times in a row, fresh each time, is not an expired one.
REFUSALS = 3

DISK_MARGIN = 64 * 1024 * 1024
HASHING_PARTIAL = "hashing the bytes already downloaded, to resume after them"


@dataclass(frozen=True)
class DownloadPolicy:
    """Bounds of one file's download; tests shrink them through ``Settings``."""

    stall_sec: float = 30.0
    deadline_sec: float = 600.0
    backoff_max_sec: float = 30.0

    @property
    def backoff_initial_sec(self) -> float:
        """1 s, or less when the deadline is short, so that several retries fit in it."""
        return min(1.0, self.deadline_sec / 20)

    @classmethod
    def from_settings(cls, settings: Settings) -> DownloadPolicy:
        return cls(
            stall_sec=settings.download_stall_sec, deadline_sec=settings.download_deadline_sec
        )


@dataclass(frozen=True)
class Fetched:
    """A complete ``.part`` file: its bytes, what the Hub said, and their sha256."""

    partial: Path
    remote: RemoteFile
    sha256: str
    attempts: int


class _Download:
    """One file's download: state shared by its attempts."""

    def __init__(
        self,
        client: HubClient,
        hub: HubFile,
        target: Path,
        root: Path,
        reporter: Reporter,
        cancel: threading.Event | None,
    ) -> None:
        self.client, self.hub, self.target, self.root = client, hub, target, root
        self.reporter, self.cancel = reporter, cancel
        self.attempt = 0
        self.refusals = 0  # attempts in a row whose link the file's server refused
        self.last_progress = time.monotonic()
        self.high_water = 0  # the furthest byte of the partial file reached so far
        self.range_ignored = False
        self.partial: PartialFile | None = None
        self.name = target.relative_to(root).as_posix()

    def run_attempt(self) -> Fetched:
        self.attempt += 1
        self.check_cancel()
        remote = self.client.describe(self.hub)
        partial = self._partial_for(remote)
        self.reporter.emit(
            "downloading", self.name, done=partial.size, total=remote.size, attempt=self.attempt
        )
        try:
            self._transfer(remote, partial)
        except RangeNotSatisfiable:
            log.warning("server refused to resume %s: starting over", self.hub.filename)
            partial.reset()  # the bytes fetched again are not progress: ``high_water`` stays
            raise Transient("resume offset refused; starting over") from None
        if remote.size is not None and partial.size != remote.size:
            raise Transient(f"got {partial.size} of {remote.size} bytes")
        return Fetched(partial.path, remote, partial.sha256(), self.attempt)

    def _partial_for(self, remote: RemoteFile) -> PartialFile:
        path = store.partial_path(self.root, self.target, remote.etag)
        if self.partial is None or self.partial.path != path:
            for stale in store.stale_partials(self.root, self.target, keep=path):
                log.info("removing partial download of an older version: %s", stale)
                stale.unlink(missing_ok=True)
            self.partial = PartialFile(path)
            self.high_water = self.partial.size
        if remote.size is not None and self.partial.size > remote.size:
            self.partial.reset()  # as above: a server whose sizes disagree would loop
        return self.partial

    def _transfer(self, remote: RemoteFile, partial: PartialFile) -> None:
        offset = partial.size
        if remote.size is not None and offset == remote.size:
            self._hash_partial(partial)  # complete before a restart: hashed, not fetched
            return
        if offset:
            log.info("resuming %s at byte %d of %s", self.hub.filename, offset, remote.size)
        _check_space(partial.path.parent, (remote.size or 0) - offset, self.hub.label, self.target)
        self._hash_partial(partial)
        with (
            self.client.stream(remote, offset) as (start, chunks),
            partial.appender(start) as write,
        ):
            if offset and not start:
                self._range_was_ignored(offset)
            done = start
            for chunk in chunks:
                write(chunk)
                done += len(chunk)
                if done > self.high_water:
                    self.high_water, self.last_progress = done, time.monotonic()
                self.reporter.emit(
                    "downloading", self.name, done=done, total=remote.size, attempt=self.attempt
                )
                self.check_cancel()

    def _hash_partial(self, partial: PartialFile) -> None:
        """Hash the bytes already on disk before the GET is opened, not while it waits:
        minutes for a 60 GB partial, that an idle connection would not survive. Progress
        is reported and a cancel obeyed meanwhile."""
        if not partial.behind:
            return
        total = partial.size

        def on_bytes(done: int) -> None:
            self.reporter.emit(
                "verifying",
                self.name,
                done=done,
                total=total,
                attempt=self.attempt,
                message=HASHING_PARTIAL,
            )
            self.check_cancel()

        partial.catch_up(on_bytes)
        # Minutes of hashing are not minutes of a network that does not move: without this,
        # the first failed GET after a long hash would give up at once, past the deadline.
        self.last_progress = time.monotonic()

    def _range_was_ignored(self, offset: int) -> None:
        self.range_ignored = True
        log.warning(
            "the server ignored the request to resume %s at byte %d: starting over from 0",
            self.hub.filename,
            offset,
        )

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise DownloadError(
                f"download of {self.hub.label} cancelled; the partial file is kept and resumed "
                f"next time"
            )


def check_room_for_all(
    client: HubClient,
    files: list[tuple[HubFile, Path]],
    root: Path,
    cancel: threading.Event | None = None,
) -> None:
    """Room for every file still to download, before the first of them is fetched.

    Each download checks the room its own file needs; a split model's parts (and an
    mmproj or a draft beside it) were checked one at a time, so a disk with room for two
    parts of four filled up after hours of downloading them. Asks the Hub for each
    file's size: a HEAD more per file, only where two or more are missing. The bytes of
    a partial download already on disk count as fetched. Raises ``DownloadError`` when
    the files together do not fit. A HEAD that fails leaves the check undone: each
    file's download retries it, or reports the error with that file. A ``cancel`` is
    heard between HEADs (each may take its whole timeout on a slow Hub).
    """
    needed = 0
    for hub, target in files:
        if cancel is not None and cancel.is_set():
            raise DownloadError(f"download of {hub.label} cancelled before it began")
        try:
            remote = client.describe(hub)
        except (Transient, ModelError) as exc:
            log.debug("room for every file not checked up front: %s", exc)
            return
        have = _size_of(store.partial_path(root, target, remote.etag))  # 0: none (or gone)
        needed += max(0, (remote.size or 0) - have)
    # Every partial download lies under model_root's state folder, on one file system.
    folder = store.partial_folder(root, files[0][1])
    names = ", ".join(hub.label for hub, _ in files)
    _check_space(folder, needed, f"the {len(files)} files still to download ({names})", files[0][1])


def _check_space(folder: Path, needed: int, label: str, target: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed + DISK_MARGIN > free:
        raise DownloadError(
            f"not enough disk space for {label}: {needed / 1e9:.2f} GB more needed in "
            f"{folder}, {free / 1e9:.2f} GB free; free some space or move model_root"
            + _in_place_hint(target)
            + _aside_hint(target)
        )


def _in_place_hint(target: Path) -> str:
    """The file a download replaces stays until its replacement has passed its check,
    so the two need room side by side."""
    if not target.is_file():
        return ""
    return (
        f". The file there now, {target} ({size_text(_size_of(target))}), stays until "
        f"the new one has passed its check: deleting it first makes room"
    )


def _aside_hint(target: Path, shown: int = 5) -> str:
    """The corrupt copies kept beside the model: often what fills the disk, since each
    bad download is kept whole for inspection and never deleted by us."""
    aside = store.aside_copies(target)
    if not aside:
        return ""
    sizes = [_size_of(p) for p in aside]
    listed = ", ".join(f"{p} ({size_text(n)})" for p, n in zip(aside[:shown], sizes, strict=False))
    more = f" and {len(aside) - shown} more" if len(aside) > shown else ""
    return (
        f". {len(aside)} file(s) moved aside as corrupt take {size_text(sum(sizes))} there: "
        f"{listed}{more}; they are kept only for inspection and can be deleted"
    )


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # deleted by a human meanwhile: it takes no space any more
        return 0


def fetch_file(
    client: HubClient,
    hub: HubFile,
    *,
    target: Path,
    root: Path,
    policy: DownloadPolicy,
    reporter: Reporter,
    cancel: threading.Event | None = None,
) -> Fetched:
    """Download ``hub`` into its ``.part`` file under ``root``, retrying until the deadline."""
    job = _Download(client, hub, target, root, reporter, cancel)

    def stop(state: RetryCallState) -> bool:
        idle = time.monotonic() - job.last_progress
        cancelled = cancel is not None and cancel.is_set()
        refused = state.outcome is not None and isinstance(state.outcome.exception(), Refused)
        job.refusals = job.refusals + 1 if refused else 0
        return (
            cancelled
            or job.refusals >= REFUSALS
            or idle + _next_wait(policy, state) >= policy.deadline_sec
        )

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        hint = ""
        if isinstance(error, Unreachable) and state.attempt_number == 1:
            hint = f", for up to {policy.deadline_sec:g} s without progress. {OFFLINE_HINT}"
        log.warning(
            "download of %s failed (attempt %d): %s; retrying%s",
            hub.label,
            job.attempt,
            error,
            hint,
        )

    retrying = Retrying(
        retry=retry_if_exception_type(Transient),
        stop=stop,
        wait=wait_exponential(multiplier=policy.backoff_initial_sec, max=policy.backoff_max_sec),
        before_sleep=before_sleep,
        sleep=_sleeper(cancel),
        reraise=True,
    )
    try:
        return retrying(job.run_attempt)
    except Transient as exc:
        job.check_cancel()  # the attempt failed as it was cancelled: that is what to say
        if isinstance(exc, Refused) and job.refusals >= REFUSALS:
            raise DownloadError(
                f"{exc} for {hub.label}, {job.refusals} times in a row, each time after "
                f"asking the Hub again: not an expired link, but something in the way of "
                f"that server (a proxy or firewall), or a mirror (HF_ENDPOINT) that refuses it"
            ) from None
        raise DownloadError(_give_up(job, policy, exc)) from None
    except OSError as exc:  # the disk, not the network: free space, permissions
        raise DownloadError(
            f"cannot write the download of {hub.label} under {root}: {exc.strerror or exc}; "
            f"check free space and permissions"
        ) from exc


def _next_wait(policy: DownloadPolicy, state: RetryCallState) -> float:
    wait = policy.backoff_initial_sec * 2 ** (state.attempt_number - 1)
    return min(wait, policy.backoff_max_sec)


def _sleeper(cancel: threading.Event | None) -> Callable[[float], None]:
    def sleep(seconds: float) -> None:
        if cancel is None:
            time.sleep(seconds)
        else:
            cancel.wait(seconds)

    return sleep


# A host that never reaches the Hub (air-gapped, a DNS without it) waited the whole
# deadline (10 minutes by default) with nothing but the network error said.
OFFLINE_HINT = (
    "Where this host cannot reach Hugging Face: copy the file to the model path by hand "
    "and set HF_HUB_OFFLINE=1, or point HF_ENDPOINT at a mirror"
)


def _give_up(job: _Download, policy: DownloadPolicy, error: Transient) -> str:
    kept = job.partial.path if job.partial is not None and job.partial.size else None
    resume = f"; {kept} is kept and the next try resumes from it" if kept else ""
    ranges = (
        " The server ignores Range requests, so every attempt started over from byte 0: "
        "a proxy or mirror (HF_ENDPOINT) that cannot resume cannot fetch a file over a "
        "connection this unreliable."
        if job.range_ignored
        else ""
    )
    return (
        f"gave up downloading {job.hub.label} after {job.attempt} attempts with no progress "
        f"for {policy.deadline_sec:g} s (last error: {error}){resume}.{ranges} Check the "
        f"network and HF_ENDPOINT, then run `orion-llamaccp fetch` again"
        + (f". {OFFLINE_HINT}" if isinstance(error, Unreachable) else "")
    )
