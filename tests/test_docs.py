"""The docs name the tests that show what they promise: every one they name exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_NAMED = re.compile(r"\btest_[a-z0-9_]+")


def _tests_and_modules() -> set[str]:
    found: set[str] = set()
    for path in (REPO / "tests").rglob("test_*.py"):
        found.add(path.stem)
        found.update(re.findall(r"^(?:async )?def (test_[a-z0-9_]+)", path.read_text(), re.M))
    return found


@pytest.mark.parametrize("doc", [d for d in DOCS if d.name != "benchmarks-history.md"], ids=str)
def test_every_test_a_doc_names_exists(doc: Path) -> None:
    """A test renamed or removed left its old name in the docs, under a promise it no
    longer shows."""
    known = _tests_and_modules()
    missing = sorted(set(_NAMED.findall(doc.read_text())) - known)
    assert not missing, f"{doc.name} names tests that do not exist: {missing}"
