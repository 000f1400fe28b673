"""Settings: blank means unset, a bad value names its variable, secrets stay hidden."""

from __future__ import annotations

import pytest

from orion_llamaccp.errors import ConfigError
from orion_llamaccp.settings import load_settings


def test_blank_overrides_are_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "LLAMACPP_CTX_SIZE_OVERRIDE",
        "LLAMACPP_N_GPU_LAYERS_OVERRIDE",
        "LLAMACPP_PORT_OVERRIDE",
        "CUDA_VISIBLE_DEVICES_OVERRIDE",
        "LLM_PROFILE_NAME",
    ):
        monkeypatch.setenv(name, "")
    settings = load_settings()
    assert settings.overrides.ctx_size is None
    assert settings.overrides.n_gpu_layers is None
    assert settings.overrides.cuda_visible_devices is None
    assert settings.profile_name == "gemma3-270m-cpu"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LLAMACPP_CTX_SIZE_OVERRIDE", "big"),
        ("LLAMACPP_PORT_OVERRIDE", "70000"),
        ("LLAMACPP_N_GPU_LAYERS_OVERRIDE", "most"),
        ("HEARTBEAT_INTERVAL_SEC", "soon"),
        ("LLAMACPP_PARALLEL_OVERRIDE", "0"),
    ],
)
def test_unparseable_value_is_a_startup_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert f"{name}={value!r}" in str(err.value)


def test_overrides_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMACPP_N_GPU_LAYERS_OVERRIDE", "all")
    monkeypatch.setenv("LLAMACPP_CTX_SIZE_OVERRIDE", "16384")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES_OVERRIDE", "2,3")
    overrides = load_settings().overrides
    assert (overrides.n_gpu_layers, overrides.ctx_size) == ("all", 16384)
    assert overrides.cuda_visible_devices == "2,3"
    monkeypatch.setenv("LLAMACPP_N_GPU_LAYERS_OVERRIDE", "12")
    assert load_settings().overrides.n_gpu_layers == 12


def test_instance_id_default_is_stable_and_per_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NAME", "atlas")
    monkeypatch.setenv("LLM_PROFILE_NAME", "p1")
    assert load_settings().instance_id == load_settings().instance_id == "atlas:p1"
    monkeypatch.setenv("INSTANCE_ID", "replica-7")
    assert load_settings().instance_id == "replica-7"


def test_bus_password_is_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORION_BUS_URL", "redis://:s3cretpw@redis.internal:6379/0")
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh")
    settings = load_settings()
    assert "s3cretpw" not in settings.bus_url_display
    assert settings.bus_url_display == "redis://:***@redis.internal:6379/0"
    assert "hf_abcdefgh" not in repr(settings)
    assert settings.redact("token hf_abcdefgh pw s3cretpw") == "token *** pw ***"
