"""``orion-llamaccp fetch`` and ``verify`` through their argparse wiring."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from orion_llamaccp.cli import config_cmds, model_cmds
from orion_llamaccp.engine.plan import build_plan
from orion_llamaccp.errors import ModelCorrupt, ModelNotFound
from orion_llamaccp.settings import Settings
from tests.model.conftest import FILENAME, REPO_ID, make_gguf
from tests.model.hub_server import LocalHub

SettingsFactory = Callable[..., Settings]
Bytes = Callable[[int], bytes]
Capsys = pytest.CaptureFixture[str]


def run(argv: list[str], settings: Settings) -> int:
    parser = argparse.ArgumentParser(prog="orion-llamaccp")
    model_cmds.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args, settings)


@pytest.fixture
def settings(make_settings: SettingsFactory, tmp_path: Path) -> Settings:
    registry = tmp_path / "llm_profiles.yaml"
    block = {"model_root": "${LLM_CACHE_DIR}", "hf_repo_id": REPO_ID, "hf_filename": FILENAME}
    registry.write_text(yaml.safe_dump({"profiles": {"tiny": {"llamacpp": block}}}))
    return make_settings(profiles_config_path=registry, profile_name="tiny")


def test_fetch_downloads_and_prints_the_file(
    hub: LocalHub, settings: Settings, gguf_bytes: Bytes, cache_dir: Path, capsys: Capsys
) -> None:
    sha = hub.add(REPO_ID, FILENAME, gguf_bytes(0))

    assert run(["fetch", "tiny", "--json"], settings) == 0

    [row] = json.loads(capsys.readouterr().out)
    assert row["path"] == str(cache_dir / FILENAME)
    assert row["sha256"] == sha
    assert row["architecture"] == "llama"


def test_verify_a_profile_checks_without_network(
    hub: LocalHub, settings: Settings, gguf_bytes: Bytes, cache_dir: Path, capsys: Capsys
) -> None:
    with pytest.raises(ModelNotFound, match="orion-llamaccp fetch"):
        run(["verify"], settings)
    (cache_dir / FILENAME).write_bytes(gguf_bytes(0))

    assert run(["verify", "tiny"], settings) == 0

    assert f"ok  {cache_dir / FILENAME}" in capsys.readouterr().out
    assert hub.requests == []


def test_verify_a_path_with_hash(settings: Settings, tmp_path: Path, capsys: Capsys) -> None:
    model = make_gguf(tmp_path / "x.gguf")

    assert run(["verify", str(model), "--hash", "--json"], settings) == 0

    [row] = json.loads(capsys.readouterr().out)
    assert row["sha256"] and len(row["sha256"]) == 64
    assert row["gguf_version"] == 3


def test_verify_a_truncated_path_raises(settings: Settings, tmp_path: Path) -> None:
    model = make_gguf(tmp_path / "x.gguf")
    model.write_bytes(model.read_bytes()[:-10])

    with pytest.raises(ModelCorrupt, match="truncated"):
        run(["verify", str(model)], settings)


def test_doctor_and_command_say_a_model_path_switches_the_download_off(
    make_settings: SettingsFactory, tmp_path: Path, cache_dir: Path, capsys: Capsys
) -> None:
    """Both said the file would be downloaded from hf_repo_id, which a model path prevents."""
    registry = tmp_path / "llm_profiles.yaml"
    block = {
        "model_root": "${LLM_CACHE_DIR}",
        "hf_repo_id": REPO_ID,
        "hf_filename": FILENAME,
        "model_path": "mine/model.gguf",
    }
    registry.write_text(yaml.safe_dump({"profiles": {"tiny": {"llamacpp": block}}}))
    settings = make_settings(profiles_config_path=registry, profile_name="tiny")
    plan = build_plan(settings, require_binary=False)

    name, ok, detail = config_cmds._check_model(plan, settings)
    parser = argparse.ArgumentParser(prog="orion-llamaccp")
    config_cmds.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["command"])
    assert args.handler(args, settings) == 0

    said = "llamacpp.model_path chooses this file and wins over llamacpp.hf_repo_id"
    assert (name, ok) == ("model", False)
    assert str(cache_dir / "mine" / "model.gguf") in detail and said in detail
    assert "will be downloaded" not in detail
    out = capsys.readouterr().out
    assert said in out and "not downloaded yet" not in out
