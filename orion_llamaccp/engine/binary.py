"""Find the llama-server binary and learn which flags this build accepts.

llama.cpp renames flags often, so we never assume: the binary's ``--help`` is read once and
every flag we are about to pass is checked against it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from orion_llamaccp.errors import BinaryNotFound, EngineError

IMAGE_BINARY = Path("/app/llama-server")
BUILD_HINT = "run `make llama-server` (builds the pinned llama.cpp into the cache, once)"
_FLAG = re.compile(r"(?<![\w-])(--?[a-zA-Z][a-zA-Z0-9-]*)")
_ENV = re.compile(r"\(env: (LLAMA_ARG_[A-Z0-9_]+)\)")


@dataclass(frozen=True)
class BinaryInfo:
    """A llama-server binary and what its ``--help`` says it accepts."""

    path: Path
    flags: frozenset[str]
    env_vars: frozenset[str]
    build: str

    def accepts(self, flag: str) -> bool:
        return flag in self.flags


def cached_build_path(build_dir: Path) -> Path:
    return build_dir / "bin" / "llama-server"


def find_binary(configured: str | None, build_dir: Path) -> Path:
    """``LLAMA_SERVER_BIN`` > ``llama-server`` on PATH > ``/app/llama-server`` > our build."""
    if configured:
        path = Path(configured).expanduser()
        if path.is_file():
            return path
        found = shutil.which(configured)
        if found:
            return Path(found)
        raise BinaryNotFound(f"LLAMA_SERVER_BIN={configured} does not exist; fix it or unset it")
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path)
    for candidate in (IMAGE_BINARY, cached_build_path(build_dir)):
        if candidate.is_file():
            return candidate
    raise BinaryNotFound(
        "no llama-server found (looked at LLAMA_SERVER_BIN, PATH, /app/llama-server, "
        f"{cached_build_path(build_dir)}): {BUILD_HINT}, or set LLAMA_SERVER_BIN"
    )


def parse_help(text: str) -> tuple[frozenset[str], frozenset[str]]:
    """Flags and ``LLAMA_ARG_*`` variables named in ``--help`` output."""
    flags: set[str] = set()
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("-"):
            continue
        head = re.split(r"\s{2,}", stripped, maxsplit=1)[0]
        flags.update(match.group(1) for match in _FLAG.finditer(head))
    return frozenset(flags), frozenset(_ENV.findall(text))


def _build_label(path: Path) -> str:
    """What we know of the build: our build record if we made it, else ``--version``."""
    record = path.parent.parent / "build-info.json"
    if record.is_file():
        try:
            info = json.loads(record.read_text())
            return f"{info.get('source', '?')} ({info.get('variant', '?')})"
        except (OSError, ValueError):
            pass
    try:
        out = subprocess.run(
            [str(path), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError:
        return "unknown"
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("version:"):
            return line.removeprefix("version:").strip()
    return "unknown"


@lru_cache(maxsize=8)
def _probe(path: str, mtime_ns: int) -> BinaryInfo:
    try:
        out = subprocess.run(
            [path, "--help"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EngineError(f"could not run {path} --help: {exc}") from exc
    text = out.stdout + out.stderr
    flags, env_vars = parse_help(text)
    if "--port" not in flags:
        raise EngineError(
            f"{path} --help does not look like llama-server's (no --port; exit {out.returncode}): "
            f"{text.strip()[-300:]}"
        )
    return BinaryInfo(Path(path), flags, env_vars, _build_label(Path(path)))


def probe(path: Path) -> BinaryInfo:
    """Run ``--help`` once per binary file (cached by path and modification time)."""
    resolved = path.resolve()
    return _probe(str(resolved), resolved.stat().st_mtime_ns)
