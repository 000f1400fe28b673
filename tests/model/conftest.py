"""Fixtures for the model layer: a local Hub-protocol server, tiny GGUFs, settings, profiles."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from huggingface_hub import constants as hf_constants

from orion_llamaccp.devtools.random_gguf import write_random_llama
from orion_llamaccp.profiles.models import Profile
from orion_llamaccp.profiles.registry import parse_profile
from orion_llamaccp.settings import Settings
from tests.model.hub_server import LocalHub

REPO_ID = "orion-test/tiny-llama"
FILENAME = "tiny-llama-f32.gguf"


@pytest.fixture(autouse=True)
def _hub_online(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub read HF_HUB_OFFLINE at import: make sure the test process is online."""
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub() -> Iterator[LocalHub]:
    with LocalHub() as server:
        yield server


def make_gguf(path: Path, seed: int = 0) -> Path:
    """A real llama GGUF of about 100 kB (one layer, a 300-token vocabulary)."""
    return write_random_llama(path, n_embd=32, n_layers=1, n_head=2, n_ff=64, vocab=300, seed=seed)


def make_split_gguf(
    folder: Path, stem: str, parts: int, seed: int = 1, per_part: int = 2
) -> list[Path]:
    """A GGUF split the way llama.cpp's gguf-split does it (``split.no`` etc. per part),
    ``per_part`` tensors in each part."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / f"{stem}.gguf"
    writer = gguf.GGUFWriter(str(base), "llama", split_max_tensors=per_part)
    writer.add_name("orion-split-test")
    writer.add_block_count(1)
    for index in range(parts * per_part):
        writer.add_tensor(f"t{index}.weight", rng.standard_normal((64, 32)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return [folder / f"{stem}-{i:05d}-of-{parts:05d}.gguf" for i in range(1, parts + 1)]


@pytest.fixture(scope="session")
def gguf_bytes(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], bytes]:
    """``gguf_bytes(seed)``: the bytes of a tiny model; each seed a different file."""
    folder = tmp_path_factory.mktemp("ggufs")
    cache: dict[int, bytes] = {}

    def build(seed: int = 0) -> bytes:
        if seed not in cache:
            cache[seed] = make_gguf(folder / f"m{seed}.gguf", seed).read_bytes()
        return cache[seed]

    return build


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    path = tmp_path / "cache"
    path.mkdir()
    return path


@pytest.fixture
def make_settings(hub: LocalHub, cache_dir: Path) -> Callable[..., Settings]:
    """Settings pointing at the local Hub, with test-sized download bounds."""

    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "cache_dir": str(cache_dir),
            "hf_endpoint": hub.endpoint,
            "hf_hub_offline": False,
            "download_stall_sec": 3.0,  # well above any pause of a busy test machine
            "download_deadline_sec": 4.0,
        }
        return Settings(**(values | overrides))

    return build


def make_profile(**llamacpp: Any) -> Profile:
    """A profile whose files live in ``${LLM_CACHE_DIR}`` and come from ``REPO_ID``."""
    block = {"model_root": "${LLM_CACHE_DIR}", "hf_repo_id": REPO_ID, "hf_filename": FILENAME}
    return parse_profile("test", {"llamacpp": block | llamacpp})
