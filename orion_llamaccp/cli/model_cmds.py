"""``fetch`` and ``verify``: get a profile's model onto disk, or check files already there.

``fetch`` is what ``run`` does before starting llama-server, minus the server: useful to
warm a cache or a container image. ``verify`` never touches the network; it takes a file
(``verify x.gguf``) or a profile (``verify`` / ``verify PROFILE``). Errors are raised as
package errors: the main CLI prints them as one ``error:`` line.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from orion_llamaccp.settings import Settings

# The model modules and the registry are imported by the commands that use them: every
# command builds this parser, and `run` subscribes before it reads the profile.
if TYPE_CHECKING:
    from orion_llamaccp.model.fetch import ResolvedModel
    from orion_llamaccp.model.gguf_check import GgufInfo
    from orion_llamaccp.model.progress import ProgressHook


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``fetch [PROFILE]`` and ``verify [PATH|PROFILE]``."""
    fetch = sub.add_parser(
        "fetch",
        help="download and verify a profile's model files, without serving",
        description="Download whatever the profile's model files lack, then verify them.",
    )
    fetch.add_argument("profile", nargs="?", help="profile name (default: LLM_PROFILE_NAME)")
    fetch.add_argument("--json", action="store_true", help="print the result as JSON")
    fetch.set_defaults(handler=cmd_fetch)

    verify = sub.add_parser(
        "verify",
        help="check a GGUF file or a profile's files (no network)",
        description="Check GGUF headers and that tensor data lies within each file.",
    )
    verify.add_argument(
        "target", nargs="?", metavar="PATH|PROFILE", help="a .gguf file or a profile name"
    )
    verify.add_argument(
        "--hash", action="store_true", help="also compute sha256 (reads every byte)"
    )
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.set_defaults(handler=cmd_verify)


def cmd_fetch(args: argparse.Namespace, settings: Settings) -> int:
    from orion_llamaccp.engine.plan import select_profile
    from orion_llamaccp.model.fetch import ensure_model

    _, profile = select_profile(settings, args.profile)
    with ExitStack() as stack:
        resolved = ensure_model(profile, settings, progress=_progress_hook(stack))
    _print_resolved(resolved, args.json)
    return 0


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    target: str | None = args.target
    if target is not None and _looks_like_path(target):
        _verify_path(Path(target).expanduser(), args.hash, args.json)
        return 0
    from orion_llamaccp.engine.plan import select_profile
    from orion_llamaccp.model.fetch import verify_model

    _, profile = select_profile(settings, target)
    with ExitStack() as stack:
        hook = _progress_hook(stack) if args.hash else None
        resolved = verify_model(profile, settings, deep=args.hash, progress=hook)
    _print_resolved(resolved, args.json)
    return 0


def _looks_like_path(target: str) -> bool:
    return target.endswith(".gguf") or "/" in target or Path(target).expanduser().exists()


def _progress_hook(stack: ExitStack) -> ProgressHook:
    from orion_llamaccp.model.progress import LogProgress, TerminalProgress

    if sys.stderr.isatty():
        return stack.enter_context(TerminalProgress())
    return LogProgress()


def _verify_path(path: Path, with_hash: bool, as_json: bool) -> None:
    from orion_llamaccp.model.gguf_check import sha256_file, verify_gguf, verify_split_set
    from orion_llamaccp.model.paths import split_parts

    infos = [verify_gguf(part) for part in split_parts(path)]
    verify_split_set(infos)
    rows = [_row(info, sha256_file(info.path) if with_hash else None) for info in infos]
    _emit(rows, as_json)


def _print_resolved(resolved: ResolvedModel, as_json: bool) -> None:
    rows = []
    for path, sha in resolved.file_sha256.items():
        row = {"path": str(path), "size": path.stat().st_size, "sha256": sha}
        if path == resolved.files.model:
            row.update(_row(resolved.info, sha))
        rows.append(row)
    for aside in resolved.moved_aside:
        print(f"note: a corrupt file was moved aside to {aside}", file=sys.stderr)
    _emit(rows, as_json)


def _row(info: GgufInfo, sha: str | None) -> dict[str, object]:
    return {
        "path": str(info.path),
        "size": info.size,
        "sha256": sha,
        "gguf_version": info.version,
        "architecture": info.architecture,
        "tensors": info.tensor_count,
        "split": f"{(info.split_no or 0) + 1}/{info.split_count}" if info.is_split else None,
    }


def _emit(rows: list[dict[str, object]], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    for row in rows:
        size = int(str(row["size"])) / 1e6
        extra = ", ".join(
            f"{key} {row[key]}"
            for key in ("architecture", "gguf_version", "tensors", "split")
            if row.get(key) is not None
        )
        print(f"ok  {row['path']}  {size:.1f} MB" + (f"  ({extra})" if extra else ""))
        print(f"    sha256 {row['sha256'] or '(not recorded; `verify --hash` computes it)'}")
