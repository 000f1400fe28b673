"""One lock per model file, so two processes (or threads) download it only once.

The lock is ``filelock``'s OS-level lock: a process that dies releases it with its file
descriptors, so a crashed downloader never leaves a lock behind. Waiting is unbounded
(another process may be 30 minutes into a 40 GB download) but announced once in the log
and through ``on_wait``, and can be cancelled.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from orion_llamaccp.errors import DownloadError, ModelError

log = logging.getLogger(__name__)

POLL_SEC = 0.2


@contextmanager
def file_lock(
    path: Path,
    *,
    what: str,
    cancel: threading.Event | None = None,
    on_wait: Callable[[], None] | None = None,
) -> Iterator[None]:
    """Hold ``path`` as a lock for the block; ``what`` names the file in messages."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create lock folder {path.parent}: {exc.strerror}") from exc
    lock = FileLock(path)
    try:
        lock.acquire(blocking=False)
    except Timeout:  # first: filelock's Timeout is an OSError too
        log.info("waiting for another process to finish with %s (lock %s)", what, path)
        if on_wait is not None:
            on_wait()
        _wait(lock, what, cancel)
    except OSError as exc:  # a lock file we may not create (permissions), or a folder there
        raise ModelError(f"cannot take the lock {path} for {what}: {exc.strerror}") from exc
    try:
        yield
    finally:
        lock.release()


def _wait(lock: FileLock, what: str, cancel: threading.Event | None) -> None:
    cancelled = cancel.is_set if cancel is not None else None
    try:
        lock.acquire(timeout=-1, poll_interval=POLL_SEC, cancel_check=cancelled)
    except Timeout:
        raise DownloadError(f"cancelled while waiting for the lock on {what}") from None
    except OSError as exc:  # its folder removed meanwhile, say
        raise ModelError(f"cannot take the lock {lock.lock_file} for {what}: {exc}") from exc
