"""The per-file lock: what it says when it cannot be had."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

from orion_llamaccp.errors import ModelError
from orion_llamaccp.model.lock import file_lock
from tests.support.procs import wait_until


def test_a_lock_whose_folder_goes_while_waiting_for_it_is_a_model_error(tmp_path: Path) -> None:
    """Held elsewhere (another process, here another thread with a lock of its own), then
    its folder removed: the waiter says which lock it could not take, where filelock's
    ``FileNotFoundError`` escaped untranslated (and a worker took it for a bug)."""
    path = tmp_path / "locks" / "m.gguf.lock"
    errors: list[BaseException] = []
    waiting = threading.Event()

    def waiter() -> None:
        try:
            with file_lock(path, what="m.gguf", on_wait=waiting.set):
                pass
        except BaseException as exc:  # the test reads it below
            errors.append(exc)

    with file_lock(path, what="m.gguf"):
        thread = threading.Thread(target=waiter, daemon=True)
        thread.start()
        wait_until(waiting.is_set, timeout=10, what="the second lock waiting")
        shutil.rmtree(path.parent)
        thread.join(10)
    assert not thread.is_alive()
    (error,) = errors
    assert isinstance(error, ModelError), repr(error)
    assert f"cannot take the lock {path} for m.gguf" in str(error)
