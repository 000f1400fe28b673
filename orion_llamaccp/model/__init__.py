"""The model on disk: where a profile's GGUF files live, getting them there, trusting them.

``ensure_model`` is the entry point: plan the files, download what is missing from the
Hugging Face Hub (resuming, retrying, locked against a second process), verify each one
before llama-server sees it, and report progress through a ``ProgressHook``.
"""

from __future__ import annotations

import importlib
from typing import Any

# Names resolve lazily: importing ``orion_llamaccp.model.paths`` (as planning does) must not
# pull in huggingface_hub, gguf and numpy, which cost the worker half a second at start.
_WHERE = {
    "DownloadPolicy": "download",
    "ResolvedModel": "fetch",
    "Target": "sources",
    "ensure_model": "fetch",
    "refetch_corrupt": "fetch",
    "verify_model": "fetch",
    "GgufInfo": "gguf_check",
    "sha256_file": "gguf_check",
    "verify_gguf": "gguf_check",
    "verify_split_set": "gguf_check",
    "ModelFiles": "paths",
    "plan_files": "paths",
    "safe_join": "paths",
    "split_parts": "paths",
    "LogProgress": "progress",
    "ProgressEvent": "progress",
    "ProgressHook": "progress",
    "TerminalProgress": "progress",
    "describe": "progress",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
