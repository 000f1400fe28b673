"""constraints.txt: one exact version of every Python package, the same for the tests,
``make venv`` and the image. pyproject.toml gives ranges; without the pins, an image built
next month installed whatever was newest then (a redis-py 8.0 swallows cancellation: see
pyproject.toml), never what CI had tested."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.container import REPO, instructions

CONSTRAINTS = REPO / "constraints.txt"


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version.strip(), f"not an exact pin: {line!r}"
            pins[canonicalize_name(name)] = version.strip()
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    named = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    return [r for r in map(Requirement, named) if r.marker is None or r.marker.evaluate()]


def test_every_dependency_is_pinned_within_its_range() -> None:
    pins = _pins()
    for requirement in _requirements():
        pinned = pins.get(canonicalize_name(requirement.name))
        assert pinned, f"{requirement.name} is not pinned in constraints.txt: make lock"
        assert requirement.specifier.contains(pinned, prereleases=True), (
            f"constraints.txt pins {requirement.name}=={pinned}, outside pyproject.toml's "
            f"{requirement}: make lock"
        )


def test_the_tests_run_on_the_pinned_versions() -> None:
    """What this suite runs on is what the image installs: a venv made before the pins
    changed is made again by ``make venv`` (its target depends on constraints.txt)."""
    installed = {
        canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
    }
    differ = {
        name: (pinned, installed.get(name))
        for name, pinned in _pins().items()
        if installed.get(name) != pinned
    }
    assert not differ, f"pinned vs installed: {differ}; run make venv"


def test_the_image_and_make_venv_install_the_pinned_versions() -> None:
    copies = [rest.split() for keyword, rest in instructions() if keyword == "COPY"]
    assert ["pyproject.toml", "constraints.txt", "./"] in copies, copies
    runs = [rest for keyword, rest in instructions() if keyword == "RUN"]
    [dependencies] = [rest for rest in runs if "-r /tmp/requirements.txt" in rest]
    assert "-c constraints.txt" in dependencies, dependencies
    makefile = (REPO / "Makefile").read_text()
    target = re.search(r"^\$\(BIN\)/orion-llamaccp: (.*)\n((?:\t.*\n)+)", makefile, re.M)
    assert target is not None
    assert "constraints.txt" in target.group(1).split()
    assert "pip install -q -c constraints.txt -e '.[dev]'" in target.group(2)
