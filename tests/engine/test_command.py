"""The llama-server command line: every shipped profile, overrides, GPU pinning, refusals.

Flags are checked against the real built binary's ``--help``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orion_llamaccp.engine.binary import BinaryInfo, parse_help, probe
from orion_llamaccp.engine.command import LaunchSpec, build_launch
from orion_llamaccp.engine.plan import build_plan
from orion_llamaccp.errors import ConfigError, UnsupportedKnob
from orion_llamaccp.model.paths import plan_files
from orion_llamaccp.profiles.registry import parse_profile
from orion_llamaccp.settings import Overrides, load_settings

EXPECTED = {
    "gemma3-270m-cpu": (
        [
            "--ctx-size",
            "4096",
            "--n-gpu-layers",
            "0",
            "--threads",
            "2",
            "--parallel",
            "2",
            "--batch-size",
            "512",
            "--temp",
            "0.7",
            "--top-k",
            "40",
            "--top-p",
            "0.95",
            "--n-predict",
            "512",
        ],
        {},
    ),
    "deepseek-70b-gguf-atlas": (
        [
            "--ctx-size",
            "8192",
            "--n-gpu-layers",
            "80",
            "--threads",
            "16",
            "--parallel",
            "1",
            "--batch-size",
            "512",
            "--reasoning-format",
            "deepseek",
        ],
        {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "0,1,2,3"},
    ),
    "qwen3-30b-a3b-q4km-2gpu-think": (
        [
            "--ctx-size",
            "65536",
            "--n-gpu-layers",
            "all",
            "--threads",
            "16",
            "--parallel",
            "1",
            "--batch-size",
            "1024",
            "--flash-attn",
            "on",
            "--split-mode",
            "row",
            "--tensor-split",
            "1,1",
            "--no-context-shift",
            "--chat-template-kwargs",
            '{"enable_thinking":true}',
            "--reasoning-format",
            "deepseek",
            "--rope-scaling",
            "yarn",
            "--rope-scale",
            "2",
            "--yarn-orig-ctx",
            "32768",
            "--temp",
            "0.6",
            "--top-k",
            "20",
            "--top-p",
            "0.95",
            "--min-p",
            "0",
            "--presence-penalty",
            "1.5",
            "--n-predict",
            "16384",
        ],
        {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "1,2"},
    ),
    "llama31-8b-instruct-q4km-1gpu": (
        [
            "--ctx-size",
            "16384",
            "--n-gpu-layers",
            "99",
            "--parallel",
            "4",
            "--batch-size",
            "2048",
            "--ubatch-size",
            "512",
            "--flash-attn",
            "auto",
            "--temp",
            "0.7",
            "--metrics",
        ],
        {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "0"},
    ),
    "gemma3-4b-vision-1gpu": (
        [
            "--ctx-size",
            "8192",
            "--n-gpu-layers",
            "all",
            "--parallel",
            "2",
            "--image-min-tokens",
            "256",
            "--image-max-tokens",
            "1024",
        ],
        {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "3"},
    ),
}


@pytest.fixture
def binary_env(monkeypatch: pytest.MonkeyPatch, llama_server_bin: Path, tmp_path: Path) -> None:
    monkeypatch.setenv("LLAMA_SERVER_BIN", str(llama_server_bin))
    monkeypatch.setenv("LLM_CACHE_DIR", str(tmp_path))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_shipped_profile(binary_env: None, llama_server_bin: Path, name: str) -> None:
    plan = build_plan(load_settings(), profile_name=name)
    knobs, env = EXPECTED[name]
    cfg = plan.profile.llamacpp
    head = [
        str(llama_server_bin),
        "--model",
        str(plan.files.model),
        "--host",
        cfg.host,
        "--port",
        str(cfg.port),
    ]
    if plan.files.mmproj is not None:
        head += ["--mmproj", str(plan.files.mmproj)]
    assert list(plan.launch.argv) == head + knobs
    assert dict(plan.launch.env) == env
    assert plan.binary is not None and plan.binary.accepts("--port")


def test_overrides_win_over_the_profile(binary_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in [
        ("LLAMACPP_CTX_SIZE_OVERRIDE", "2048"),
        ("LLAMACPP_N_GPU_LAYERS_OVERRIDE", "auto"),
        ("LLAMACPP_THREADS_OVERRIDE", "4"),
        ("LLAMACPP_PARALLEL_OVERRIDE", "3"),
        ("LLAMACPP_BATCH_SIZE_OVERRIDE", "128"),
        ("LLAMACPP_PORT_OVERRIDE", "9999"),
        ("LLAMACPP_HOST_OVERRIDE", "10.0.0.5"),
        ("LLAMACPP_MODEL_PATH_OVERRIDE", "/elsewhere/m.gguf"),
    ]:
        monkeypatch.setenv(name, value)
    argv = list(build_plan(load_settings(), profile_name="deepseek-70b-gguf-atlas").launch.argv)
    pairs = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert pairs["--model"] == "/elsewhere/m.gguf"
    assert (pairs["--host"], pairs["--port"]) == ("10.0.0.5", "9999")
    assert (pairs["--ctx-size"], pairs["--n-gpu-layers"], pairs["--threads"]) == (
        "2048",
        "auto",
        "4",
    )
    assert (pairs["--parallel"], pairs["--batch-size"]) == ("3", "128")


def test_gpu_pinning_env(binary_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    launch = build_plan(load_settings(), profile_name="qwen3-30b-a3b-q4km-2gpu-think").launch
    assert launch.env["CUDA_VISIBLE_DEVICES"] == "1,2"
    assert launch.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES_OVERRIDE", "3")
    launch = build_plan(load_settings(), profile_name="qwen3-30b-a3b-q4km-2gpu-think").launch
    assert launch.env["CUDA_VISIBLE_DEVICES"] == "3"
    cpu = build_plan(load_settings(), profile_name="gemma3-270m-cpu").launch
    assert cpu.env == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "3"}


def test_cpu_profile_leaves_cuda_alone_without_override(binary_env: None) -> None:
    assert "CUDA_VISIBLE_DEVICES" not in build_plan(load_settings()).launch.env


def _launch(raw: dict, binary: BinaryInfo | None, environ: dict | None = None) -> LaunchSpec:
    profile = parse_profile(
        "p", {"backend": "llamacpp", "llamacpp": {"model_path": "m.gguf", **raw}}
    )
    files = plan_files(profile, None, {"LLM_CACHE_DIR": "/c"})
    return build_launch(
        profile,
        Overrides(),
        files,
        binary=binary,
        binary_path="llama-server",
        environ=environ or {},
    )


def _build(raw: dict, binary: BinaryInfo | None) -> list[str]:
    return list(_launch(raw, binary).argv)


def test_flag_removed_in_this_build_is_refused(llama_server_bin: Path) -> None:
    binary = probe(llama_server_bin)
    # --draft-max is still listed by --help, as "the argument has been removed".
    with pytest.raises(UnsupportedKnob) as err:
        _build({"extra_args": ["--draft-max", "8"]}, binary)
    assert "--draft-max" in str(err.value) and str(binary.path) in str(err.value)
    with pytest.raises(UnsupportedKnob, match="--n-parallel"):
        _build({"extra_args": ["--n-parallel", "2"]}, binary)


def test_knob_missing_from_an_older_build_is_refused() -> None:
    old_help = (
        "-m,    --model FNAME                    model path\n"
        "--port PORT                             port to listen (default: 8080)\n"
        "--host HOST                             ip address to listen\n"
        "-c,    --ctx-size N                     size of the prompt context\n"
        "-fa,   --flash-attn                     enable Flash Attention (default: disabled)\n"
    )
    flags, env_of = parse_help(old_help)
    binary = BinaryInfo(Path("/old/llama-server"), flags, env_of, "b3000")
    assert _build({"ctx_size": 512, "flash_attn": "on"}, binary)[-4:] == [
        "--ctx-size",
        "512",
        "--flash-attn",
        "on",
    ]
    with pytest.raises(UnsupportedKnob) as err:
        _build({"reasoning_format": "deepseek"}, binary)
    message = str(err.value)
    assert "llamacpp.reasoning_format" in message and "--reasoning-format" in message
    assert "/old/llama-server" in message


def test_api_key_goes_through_env_and_is_masked(llama_server_bin: Path) -> None:
    binary = probe(llama_server_bin)
    raw = {"api_key_env": "MY_KEY", "extra_args": ["--api-key", "inline"]}
    launch = _launch(raw, binary, {"MY_KEY": "sekrit-value"})
    assert "sekrit-value" not in launch.argv
    assert launch.env[binary.env_var("--api-key")] == "sekrit-value"
    assert "sekrit-value" not in str(launch.masked_env())
    assert "inline" not in launch.masked_argv()
    with pytest.raises(ConfigError, match="MY_KEY"):
        _launch(raw, binary, {})


def test_knob_values_render_to_current_flag_syntax() -> None:
    argv = _build(
        {
            "flash_attn": True,
            "chat_template_kwargs": {"a": 1, "b": "x"},
            "tensor_split": "3,1",
            "no_context_shift": False,
            "metrics": True,
            "parallel": 2,
        },
        None,
    )
    assert argv[argv.index("--flash-attn") + 1] == "on"
    assert argv[argv.index("--chat-template-kwargs") + 1] == '{"a":1,"b":"x"}'
    assert argv[argv.index("--tensor-split") + 1] == "3,1"
    assert "--no-context-shift" not in argv and "--metrics" in argv
    assert "--n-parallel" not in argv and argv[argv.index("--parallel") + 1] == "2"


def test_expectations_cover_every_shipped_profile() -> None:
    from orion_llamaccp.profiles.registry import load_registry

    assert set(EXPECTED) == set(load_registry(Path("config/llm_profiles.yaml")).profiles)
