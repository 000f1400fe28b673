"""Every target's measured value across saved runs of ``python -m bench``, and its range.

The VM's speed moves by up to 3x from day to day, so one run says little about the next;
docs/benchmarks.md quotes the range of the whole-bench checks beside the latest run. Each
saved output (``bench/results/check-make-bench-*.txt``, ``make-bench-*.txt``) holds a
*Targets* table per benchmark, one line a target: ``<target>  <measured>  yes|NO``. This
reads those lines back, so that the ranges can be made again with a new run added:

    .venv/bin/python -m bench.ranges bench/results/check-make-bench-round*.txt

Per target: the lowest and highest value, the number of runs, then each run's value
(``!`` where that run missed the target).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

# "<target text ending in a bound>  <measured>  yes|NO", as bench.report prints it.
_TARGET = re.compile(r"^\s*(.+?(?:<=|>=)\s*[\d.]+)\s+(-?[\d,.]+)\s+(yes|NO)\s*$")


def read_targets(path: Path) -> dict[str, tuple[float, bool]]:
    """``path``'s targets: each one's measured value and whether it was met."""
    found: dict[str, tuple[float, bool]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if match := _TARGET.match(line):
            target, measured, met = match.groups()
            found[target.strip()] = (float(measured.replace(",", "")), met == "yes")
    return found


def _run_name(path: Path) -> str:
    return path.stem.removeprefix("check-make-bench-").removeprefix("make-bench-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ranges", description=__doc__)
    parser.add_argument("outputs", nargs="+", type=Path, help="saved python -m bench outputs")
    parser.add_argument("--only", default="", help="targets whose text contains this")
    args = parser.parse_args(argv)
    runs = {_run_name(path): read_targets(path) for path in args.outputs}
    targets = dict.fromkeys(t for found in runs.values() for t in found if args.only in t)
    if not targets:
        parser.error("no Targets lines found in those files")
    width = max(map(len, targets))
    for target in targets:
        values = {run: found[target] for run, found in runs.items() if target in found}
        numbers = [value for value, _ in values.values()]
        each = " ".join(
            f"{run}:{value:g}{'' if met else '!'}" for run, (value, met) in values.items()
        )
        print(
            f"{target:<{width}}  {min(numbers):>9g} - {max(numbers):<9g} n={len(numbers)}  {each}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
