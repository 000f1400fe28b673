"""Find the llama-server binary and learn which flags this build accepts.

llama.cpp renames flags often, so we never assume: the binary's ``--help`` is read once and
every flag we are about to pass is checked against it.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from orion_llamaccp.engine.diagnostics import exit_said
from orion_llamaccp.engine.lifeline import die_with_parent
from orion_llamaccp.errors import BinaryNotFound, EngineError

IMAGE_BINARY = Path("/app/llama-server")
BUILD_HINT = "run `make llama-server` (builds the pinned llama.cpp into the cache, once)"
_FLAG = re.compile(r"(?<![\w-])(--?[a-zA-Z][a-zA-Z0-9.-]*)")  # --fim-qwen-1.5b-default
_ENV = re.compile(r"\(env: (LLAMA_[A-Z0-9_]+)\)")
# The description starts after a gap of 2+ spaces that does not follow an alias comma.
_DESC_GAP = re.compile(r"(?<![,\s])\s{2,}")


@dataclass(frozen=True)
class BinaryInfo:
    """A llama-server binary and what its ``--help`` says it accepts."""

    path: Path
    flags: frozenset[str]
    env_of: dict[str, str]
    build: str
    aliases: Mapping[str, frozenset[str]] = field(default_factory=dict)
    valued: frozenset[str] = frozenset()  # flags followed by a value (``-c N``)
    # ``--host`` takes a list with UNIX socket paths (``0.0.0.0,/run/x.sock``): newer builds
    unix_sockets: bool = False
    # ``--n-gpu-layers auto`` is taken (its default in newer builds): ``gpu_layers_auto``
    gpu_layers_auto: bool = False

    def accepts(self, flag: str) -> bool:
        return flag in self.flags

    def takes_value(self, flag: str) -> bool:
        """Whether ``--help`` shows a value after ``flag``: the next argument is then its
        value, whatever it looks like (``-r "- User:"``, ``--yarn-ext-factor -1e-3``)."""
        return flag in self.valued

    def names(self, flag: str) -> frozenset[str]:
        """``flag`` and its aliases (``-c`` and ``--ctx-size``), per ``--help``."""
        return self.aliases.get(flag, frozenset({flag}))

    def env_var(self, flag: str) -> str | None:
        """The ``LLAMA_*`` variable that sets ``flag``, per this build's ``--help``."""
        return self.env_of.get(flag)


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
        what = "is a folder, not the binary" if path.is_dir() else "does not exist"
        raise BinaryNotFound(f"LLAMA_SERVER_BIN={configured} {what}; fix it or unset it")
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


def _entries(text: str) -> list[tuple[str, str]]:
    """Split ``--help`` into (option column, description incl. continuation lines)."""
    entries: list[tuple[str, str]] = []
    for line in text.splitlines():
        if line.startswith("-"):
            parts = _DESC_GAP.split(line, maxsplit=1)
            entries.append((parts[0], parts[1] if len(parts) > 1 else ""))
        elif line.startswith(" ") and entries:
            head, desc = entries[-1]
            entries[-1] = (head, f"{desc} {line.strip()}")
    return entries


def parse_help(
    text: str,
) -> tuple[frozenset[str], dict[str, str], dict[str, frozenset[str]], frozenset[str]]:
    """Accepted flags, each flag's environment variable, each flag's other names
    (``-c`` and ``--ctx-size``), and the flags that take a value (``N`` after ``-c``),
    from ``--help`` output.

    Flags whose description says "the argument has been removed" are still listed by
    llama.cpp but rejected at run time: they do not count as accepted.
    """
    flags: set[str] = set()
    env_of: dict[str, str] = {}
    aliases: dict[str, frozenset[str]] = {}
    valued: set[str] = set()
    for head, desc in _entries(text):
        names = frozenset(m.group(1) for m in _FLAG.finditer(head))
        aliases.update(dict.fromkeys(names, names))
        if _FLAG.sub("", head).replace(",", "").strip():  # a value's name after them
            valued.update(names)
        if "has been removed" in desc:
            continue
        flags.update(names)
        env = _ENV.search(desc)
        if env:
            env_of.update(dict.fromkeys(names, env.group(1)))
    return frozenset(flags), env_of, aliases, frozenset(valued)


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
        out = _children().run([str(path), "--version"], VERSION_TIMEOUT_SEC)
    except (OSError, subprocess.TimeoutExpired):  # a label, not a reason to fail the start
        return "unknown"
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("version:"):
            return line.removeprefix("version:").strip()
    return "unknown"


# Both --version and --help initialise CUDA first, which can take long on a host with many
# GPUs and no persistence mode.
VERSION_TIMEOUT_SEC = 30.0
HELP_TIMEOUT_SEC = 60.0


class Children:
    """The probe's child processes (``--help``, ``--version``) while they run, for a stop
    to end at once.

    The worker probes in a thread that a stop does not wait for (``startup.serve``), and
    a SIGTERM to the worker alone (a container's stop) left the child running after the
    worker had gone: up to a minute where it initialises CUDA. Each child leads a process
    group of its own, killed whole: a launcher script's own children go with it. A worker
    SIGKILLed cannot do that: the child itself gets the parent-death signal (its own
    children do not, as with llama-server's).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen[str]] = set()
        self.killed = False

    def run(self, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        """``subprocess.run(args, capture_output=True, text=True, timeout=timeout)``,
        killed with ``kill``; refused once that was called."""
        with self._lock:  # started and noted at once: a kill between them would miss it
            if self.killed:
                raise EngineError(f"not running {' '.join(args)}: stopping")
            proc = subprocess.Popen(
                args,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
                # A SIGKILLed worker cannot kill the group: the child goes with it. The
                # thread that starts it waits for it, so it lives as long as the child.
                preexec_fn=die_with_parent(),
            )
            self._running.add(proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            raise
        finally:
            with self._lock:
                self._running.discard(proc)
        return subprocess.CompletedProcess(args, proc.returncode, out, err)

    def kill(self) -> None:
        """Kill the children running now, and refuse those asked for later."""
        with self._lock:
            self.killed = True
            for proc in self._running:
                _kill_group(proc)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:  # not reaped: its group id is not anyone else's yet
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


_CHILDREN: contextvars.ContextVar[Children | None] = contextvars.ContextVar(
    "probe_children", default=None
)


def _children() -> Children:
    return _CHILDREN.get() or Children()


def probing_with(children: Children) -> contextvars.Context:
    """A context (for ``Context.run``, in the probe's thread) in which the probe's
    children are ``children``'s, for its caller to kill."""
    context = contextvars.copy_context()
    context.run(_CHILDREN.set, children)
    return context


@lru_cache(maxsize=8)
def _last_lines(text: str, count: int = 3, width: int = 160) -> str:
    """Its last ``count`` lines, on one line, each cut at a word (where a broken binary
    says what is wrong: a library it cannot load). The last 300 characters began
    mid-word and ran over many lines."""
    lines = [line.strip() for line in text.splitlines() if line.strip()][-count:]
    return (
        " / ".join(
            line if len(line) <= width else line[:width].rsplit(" ", 1)[0] + " ..."
            for line in lines
        )
        or "(nothing)"
    )


def _probe(path: str, mtime_ns: int) -> BinaryInfo:
    try:
        out = _children().run([path, "--help"], HELP_TIMEOUT_SEC)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EngineError(f"could not run {path} --help: {exc}") from exc
    text = out.stdout + out.stderr
    flags, env_of, aliases, valued = parse_help(text)
    if "--port" not in flags:
        if out.returncode < 0:
            raise EngineError(f"{path} --help: the binary {exit_said(out.returncode)}")
        raise EngineError(
            f"{path} --help does not look like llama-server's (no --port; exit {out.returncode}); "
            f"it ended with: {_last_lines(text)}"
        )
    return BinaryInfo(
        Path(path),
        flags,
        env_of,
        _build_label(Path(path)),
        aliases,
        valued,
        host_list(text),
        gpu_layers_auto(text),
    )


def host_list(text: str) -> bool:
    """Whether ``--help`` says ``--host`` takes a comma-separated list that may hold UNIX
    socket paths. Older builds take one address *or* one ``.sock`` path ("ip address to
    listen, or bind to an UNIX socket if the address ends with .sock"): given a list,
    they bind a socket at the whole string and open no TCP port."""
    desc = _description(text, "--host").lower()
    return "unix socket" in desc and "comma" in desc


def gpu_layers_auto(text: str) -> bool:
    """Whether ``--help`` says ``--n-gpu-layers`` takes ``auto`` ("either an exact number,
    'auto', or 'all'"); older builds take a number only."""
    return "'auto'" in _description(text, "--n-gpu-layers")


def _description(text: str, flag: str) -> str:
    """What ``--help`` says of ``flag`` (its first entry naming it); "" if none does."""
    return next((desc for head, desc in _entries(text) if flag in head), "")


def probe(path: Path) -> BinaryInfo:
    """Run ``--help`` once per binary file (cached by path and modification time)."""
    resolved = path.resolve()
    return _probe(str(resolved), resolved.stat().st_mtime_ns)
