"""Interleaved A/B: one command on a base commit and on the working tree, taking turns.

    python -m bench.ab [--base HEAD] [--pairs 3] -- -m bench.relay --rounds 60
    python -m bench.ab --base HEAD~2 -- -m bench capacity

This VM's speed moves by up to 2x within a day, so two runs minutes apart do not compare;
runs that take turns do. A is a clone of this repository at ``--base``; B is a copy of the
working tree as it is (what git tracks, and untracked files it does not ignore). Both run
with this interpreter, each with its own folder first on ``PYTHONPATH``, in the order A,
B, A, B, ...; each run's output is printed under a header as it ends.

``--base-tree DIR`` takes A from a folder instead (``git archive`` of the base commit)
and runs B in this checkout: for a machine with no git history, such as the GPU one
(``bench/gpu/run.sh ab``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.harness import REPO, python_path


def _git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


def prepare(base: str, root: Path) -> tuple[Path, Path]:
    """The two trees: ``root/a`` at ``base``, ``root/b`` the working tree's files."""
    a, b = root / "a", root / "b"
    subprocess.run(["git", "clone", "-q", str(REPO), str(a)], check=True)
    _git("checkout", "-q", _git("rev-parse", base).strip(), cwd=a)
    files = _git("ls-files", "-co", "--exclude-standard", "-z").split("\0")
    for name in filter(None, files):
        source = REPO / name
        if source.is_file():
            (b / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, b / name)
    return a, b


def run_in(tree: Path, args: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": python_path(tree)}
    done = subprocess.run(
        [sys.executable, *args], cwd=tree, env=env, capture_output=True, text=True
    )
    return done.stdout + done.stderr + (f"(exit {done.returncode})\n" if done.returncode else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab")
    parser.add_argument("--base", default="HEAD", help="the commit A runs (default HEAD)")
    parser.add_argument("--base-tree", type=Path, help="A's files, instead of --base")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then python's arguments")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --, e.g. -- -m bench.relay --rounds 60")
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        if args.base_tree is not None:
            a, b, base = args.base_tree.resolve(), REPO, str(args.base_tree)
        else:
            (a, b), base = prepare(args.base, Path(tmp)), args.base
        for n in range(1, args.pairs + 1):
            for side, tree in (("A", a), ("B", b)):
                label = base if side == "A" else "working tree"
                print(f"== {side}{n} ({label})", flush=True)
                print(run_in(tree, command), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
