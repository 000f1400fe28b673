"""The model on disk: where a profile's GGUF files live, getting them there, trusting them.

``ensure_model`` is the entry point: plan the files, download what is missing from the
Hugging Face Hub (resuming, retrying, locked against a second process), verify each one
before llama-server sees it, and report progress through a ``ProgressHook``.
"""

from orion_llamaccp.model.download import DownloadPolicy
from orion_llamaccp.model.fetch import (
    ResolvedModel,
    Target,
    ensure_model,
    refetch_corrupt,
    verify_model,
)
from orion_llamaccp.model.gguf_check import GgufInfo, sha256_file, verify_gguf, verify_split_set
from orion_llamaccp.model.paths import ModelFiles, plan_files, safe_join, split_parts
from orion_llamaccp.model.progress import (
    LogProgress,
    ProgressEvent,
    ProgressHook,
    TerminalProgress,
    describe,
)

__all__ = [
    "DownloadPolicy",
    "GgufInfo",
    "LogProgress",
    "ModelFiles",
    "ProgressEvent",
    "ProgressHook",
    "ResolvedModel",
    "Target",
    "TerminalProgress",
    "describe",
    "ensure_model",
    "plan_files",
    "refetch_corrupt",
    "safe_join",
    "sha256_file",
    "split_parts",
    "verify_gguf",
    "verify_model",
    "verify_split_set",
]
