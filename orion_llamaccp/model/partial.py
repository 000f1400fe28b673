"""The ``.part`` file of a download in progress: resumable, and hashed as bytes arrive.

Hashing while writing means a finished 70 GB download needs no second pass to check its
sha256. Whatever was on disk before this process started (a resume after a restart) is
hashed once from disk by ``catch_up``, which the downloader calls before it opens the
request: a 60 GB partial takes minutes to hash, and a server whose connection sat idle
that long closes it. The digest always covers exactly the bytes in the file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

READ_CHUNK = 8 * 1024 * 1024


class PartialFile:
    """Append-only bytes of one file at one etag, with a running sha256."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._digest = hashlib.sha256()
        self._hashed = 0

    @property
    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def reset(self) -> None:
        """Throw away the bytes (the server's file changed, or it ignored our Range)."""
        self.truncate(0)

    def truncate(self, size: int) -> None:
        if self.path.exists():
            with self.path.open("r+b") as handle:
                handle.truncate(size)
        if self._hashed > size:
            self._digest, self._hashed = hashlib.sha256(), 0

    @contextmanager
    def appender(self, start: int) -> Iterator[Callable[[bytes], None]]:
        """A ``write(chunk)`` for bytes that begin at ``start``; flushed to disk on exit."""
        if start > self.size:
            raise ValueError(f"cannot append at {start}: {self.path} has {self.size} bytes")
        self.truncate(start)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.catch_up()  # a no-op when the downloader caught up before opening the request
        with self.path.open("ab") as handle:

            def write(chunk: bytes) -> None:
                handle.write(chunk)
                self._digest.update(chunk)
                self._hashed += len(chunk)

            try:
                yield write
            finally:
                handle.flush()
                os.fsync(handle.fileno())

    def sha256(self) -> str:
        self.catch_up()
        return self._digest.hexdigest()

    @property
    def behind(self) -> int:
        """Bytes on disk the digest has not seen yet: what ``catch_up`` would read."""
        size = self.size
        return size if self._hashed > size else size - self._hashed

    def catch_up(self, on_bytes: Callable[[int], None] | None = None) -> None:
        """Hash the bytes on disk that the digest has not seen (a resume from disk).

        ``on_bytes(hashed)`` after each chunk: progress, and the place to cancel (by
        raising) a hash that takes minutes; the digest stays consistent with ``_hashed``.
        """
        size = self.size
        if self._hashed > size:
            self._digest, self._hashed = hashlib.sha256(), 0
        if self._hashed == size:
            return
        with self.path.open("rb") as handle:
            handle.seek(self._hashed)
            while self._hashed < size and (chunk := handle.read(READ_CHUNK)):
                chunk = chunk[: size - self._hashed]
                self._digest.update(chunk)
                self._hashed += len(chunk)
                if on_bytes is not None:
                    on_bytes(self._hashed)
