"""Figures in, tables and JSON out: percentiles, the machine record, result files."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.harness import BUILD_DIR, REPO

RESULTS = REPO / "bench" / "results"
PACKAGES = ("orion-llamaccp", "redis", "hiredis", "httpx", "orjson", "uvloop", "pydantic")


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: Iterable[float], digits: int = 3) -> dict[str, float | int]:
    data = [v for v in values if v is not None and not math.isnan(v)]
    if not data:
        return {"n": 0}
    return {
        "n": len(data),
        "p50": round(percentile(data, 50), digits),
        "p90": round(percentile(data, 90), digits),
        "p99": round(percentile(data, 99), digits),
        "min": round(min(data), digits),
        "max": round(max(data), digits),
        "mean": round(sum(data) / len(data), digits),
    }


def p50_p90(values: Iterable[float]) -> tuple[float, float]:
    """The median and the 90th percentile, for tables that show just those two."""
    found = summary(values)
    return found["p50"], found["p90"]


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [
        max(len(headers[i]), *(len(row[i]) for row in cells)) if cells else len(headers[i])
        for i in range(len(headers))
    ]
    line = "  ".join("-" * w for w in widths)
    out = [title, line, "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)), line]
    for row in cells:
        out.append("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    out.append(line)
    return "\n".join(out)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return str(value)


def _run(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        return (out.stdout or out.stderr).strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def machine() -> dict[str, Any]:
    """Where and with what the figures were taken."""
    build = BUILD_DIR / "build-info.json"
    try:
        llama_build: Any = json.loads(build.read_text())
    except (OSError, ValueError):
        llama_build = None
    redis_server = shutil.which("redis-server")
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "packages": _versions(),
        "redis_server": _run([redis_server, "--version"]) if redis_server else "missing",
        "llama_server_build": llama_build,
        "gpus": _run(["nvidia-smi", "-L"]) if shutil.which("nvidia-smi") else None,
        "git_commit": _run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        # The bench and its test helpers shape the figures as much as the package does.
        "git_dirty": bool(
            _run(["git", "-C", str(REPO), "status", "--porcelain", "--", ".", ":!bench/results"])
        ),
        # Other work on the machine shows here (1, 5, 15 minutes); the A/A rows measure it.
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def write_result(
    name: str, settings: dict[str, Any], results: dict[str, Any], **extra: Any
) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    record = {
        "benchmark": name,
        "when": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "machine": machine(),
        "settings": settings,
        "results": results,
        **extra,
    }
    path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    return path


def target(name: str, measured: float | None, limit: float, *, higher_is_better: bool) -> dict:
    """One target, met or not (``None`` measured counts as not met)."""
    if measured is None or math.isnan(measured):
        met = False
    else:
        met = measured >= limit if higher_is_better else measured <= limit
    sign = ">=" if higher_is_better else "<="
    return {"target": f"{name} {sign} {limit:g}", "measured": measured, "met": met}


def targets_table(targets: list[dict]) -> str:
    rows = [(t["target"], t["measured"], t["met"]) for t in targets]
    return table("Targets", ["target", "measured", "met"], rows)
