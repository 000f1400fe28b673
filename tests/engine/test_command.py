"""The llama-server command line: every shipped profile, overrides, GPU pinning, refusals.

Flags are checked against the real built binary's ``--help``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from orion_llamaccp.engine import binary as binary_module
from orion_llamaccp.engine.binary import BinaryInfo, _entries, host_list, parse_help, probe
from orion_llamaccp.engine.client import LlamaClient
from orion_llamaccp.engine.command import SECRET_FLAGS, LaunchSpec, build_launch, mask_argv
from orion_llamaccp.engine.lifeline import die_with_parent
from orion_llamaccp.engine.plan import build_plan, socket_path
from orion_llamaccp.engine.supervisor import EngineState, Supervisor
from orion_llamaccp.errors import ConfigError, EngineError, UnsupportedKnob
from orion_llamaccp.model.paths import plan_files
from orion_llamaccp.profiles.registry import parse_profile
from orion_llamaccp.settings import Overrides, load_settings
from tests.engine.conftest import FAST, PRELUDE, LaunchFactory, assert_answers
from tests.support.procs import ipv6_loopback, pid_alive, wait_until

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
        f"{cfg.host},{socket_path(cfg.host, cfg.port)}",  # and a UNIX socket for the worker
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
        ("LLM_PROFILE_NAME", "deepseek-70b-gguf-atlas"),  # the overrides are its own
    ]:
        monkeypatch.setenv(name, value)
    argv = list(build_plan(load_settings()).launch.argv)
    pairs = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert pairs["--model"] == "/elsewhere/m.gguf"
    assert (pairs["--host"], pairs["--port"]) == (
        f"10.0.0.5,{socket_path('10.0.0.5', 9999)}",
        "9999",
    )
    assert (pairs["--ctx-size"], pairs["--n-gpu-layers"], pairs["--threads"]) == (
        "2048",
        "auto",
        "4",
    )
    assert (pairs["--parallel"], pairs["--batch-size"]) == ("3", "128")


def test_the_worker_s_unix_socket_is_added_where_the_build_takes_one(
    binary_env: None, llama_server_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """llama-server listens on a UNIX socket beside its TCP port for the worker's own
    requests, where its ``--host`` takes one (this build's does); not for a build that
    does not, a host list of the profile's own, or with the setting off."""
    assert probe(llama_server_bin).unix_sockets
    launch = build_plan(load_settings(), profile_name="gemma3-270m-cpu").launch
    pairs = dict(zip(launch.argv[1::2], launch.argv[2::2], strict=False))
    assert launch.unix_socket == socket_path(launch.host, launch.port)
    assert pairs["--host"] == f"{launch.host},{launch.unix_socket}"
    plan = build_plan(load_settings(), profile_name="gemma3-270m-cpu")
    old_build = replace(plan.binary, unix_sockets=False)
    common = {
        "binary_path": "llama-server",
        "environ": {},
        "unix_socket": lambda _port: "/tmp/x.sock",
    }
    overrides = load_settings().overrides_for(plan.profile.name)
    for binary, host in ((old_build, "127.0.0.1"), (plan.binary, "127.0.0.1,/run/own.sock")):
        profile = plan.profile.model_copy(
            update={"llamacpp": plan.profile.llamacpp.model_copy(update={"host": host})}
        )
        launch = build_launch(profile, overrides, plan.files, binary=binary, **common)
        assert launch.unix_socket is None
        assert launch.argv[launch.argv.index("--host") + 1] == host
    monkeypatch.setenv("ORION_LLAMACPP_ENGINE_UNIX_SOCKET", "0")
    launch = build_plan(load_settings(), profile_name="gemma3-270m-cpu").launch
    assert launch.unix_socket is None and "," not in launch.argv[launch.argv.index("--host") + 1]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary folder with a short path: pytest's own (``tmp_path``) grows with the
    count of its sessions on a machine, and from the hundredth a socket path in it no
    longer fits a socket's address (104 bytes), which some tests here do not mean."""
    folder = Path(tempfile.mkdtemp(prefix="oc-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_the_unix_socket_is_in_a_folder_of_the_user_s_own_or_not_at_all(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The socket lives in a folder only this user may enter (0700, made on the way), so
    no other user can take its name first or connect. TCP only, not a llama-server that
    cannot bind or talks to someone else: where the folder is not ours alone, where no
    temporary folder takes a file (a read-only root), where the path would not fit a
    socket's address (a deep ``TMPDIR``) or holds a comma (``--host`` is a list)."""
    monkeypatch.setattr(tempfile, "tempdir", str(short_tmp))
    folder = short_tmp / f"orion-llamaccp-{os.getuid()}"
    assert socket_path("127.0.0.1", 8080) == f"{folder}/127.0.0.1-8080.sock"
    assert folder.stat().st_mode & 0o777 == 0o700
    folder.chmod(0o755)  # others may enter: not ours alone
    assert socket_path("127.0.0.1", 8080) is None
    for odd in ("d" * 90, "a,b"):
        (short_tmp / odd).mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(short_tmp / odd))
        assert socket_path("127.0.0.1", 8080) is None, odd

    def read_only() -> str:
        raise FileNotFoundError("No usable temporary directory found in ['/tmp']")

    monkeypatch.setattr(tempfile, "gettempdir", read_only)
    assert socket_path("127.0.0.1", 8080) is None


def test_each_address_of_a_port_gets_a_socket_of_its_own(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two llama-servers may share a port on two addresses of one host; named by the port
    alone, their sockets were one path, and the second could not bind it. Any host
    setting (an IPv6 address, a name) makes a plain file name."""
    monkeypatch.setattr(tempfile, "tempdir", str(short_tmp))
    hosts = ["127.0.0.1", "10.0.0.5", "0.0.0.0", "::1", "[fe80::1%eth0]", "gpu-box.lan"]
    paths = [socket_path(host, 8080) for host in hosts]
    assert len(set(paths)) == len(hosts)
    folder = short_tmp / f"orion-llamaccp-{os.getuid()}"
    for path in paths:
        assert path is not None and Path(path).parent == folder, path
        assert Path(path).name.endswith("-8080.sock"), path
    assert socket_path("::1", 8080) == socket_path("::1", 8080)


def test_only_builds_whose_host_takes_a_list_get_the_socket() -> None:
    """Older builds take one address or one ``.sock`` path in ``--host``: given a list,
    they bind a socket named after the whole string and open no TCP port."""
    new = (
        "--host HOST                             IP addresses to listen on, comma-separated,"
        " or UNIX socket paths\n"
        "                                        ending in .sock; with multiple TCP addresses\n"
    )
    old = (
        "--host HOST                             ip address to listen, or bind to an UNIX"
        " socket if the address\n"
        "                                        ends with .sock (default: 127.0.0.1)\n"
    )
    plain = "--host HOST                             ip address to listen (default: 127.0.0.1)\n"
    assert host_list(new)
    assert not host_list(old)
    assert not host_list(plain)


@pytest.mark.parametrize("host", ["/run/llama/own.sock", "127.0.0.1,::1"])
def test_a_host_that_is_a_socket_or_a_list_of_its_own_gets_no_socket_of_ours(
    llama_server_bin: Path, host: str
) -> None:
    """The worker's own socket is added beside one address; a profile whose ``host`` is
    already a socket path (or a list) keeps it as written: ``own.sock,ours.sock`` would
    have llama-server listen where the operator did not ask."""
    profile = parse_profile(
        "p", {"backend": "llamacpp", "llamacpp": {"model_path": "m.gguf", "host": host}}
    )
    launch = build_launch(
        profile,
        Overrides(),
        plan_files(profile, None, {"LLM_CACHE_DIR": "/c"}),
        binary=probe(llama_server_bin),
        binary_path="llama-server",
        environ={},
        unix_socket=lambda _host, _port: "/tmp/ours.sock",
    )
    assert launch.argv[launch.argv.index("--host") + 1] == host
    assert launch.unix_socket is None


def test_gpu_pinning_env(binary_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    launch = build_plan(load_settings(), profile_name="qwen3-30b-a3b-q4km-2gpu-think").launch
    assert launch.env["CUDA_VISIBLE_DEVICES"] == "1,2"
    assert launch.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES_OVERRIDE", "3")
    monkeypatch.setenv("LLM_PROFILE_NAME", "qwen3-30b-a3b-q4km-2gpu-think")
    launch = build_plan(load_settings()).launch
    assert launch.env["CUDA_VISIBLE_DEVICES"] == "3"
    monkeypatch.setenv("LLM_PROFILE_NAME", "gemma3-270m-cpu")
    cpu = build_plan(load_settings()).launch
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
    flags, env_of, aliases, valued = parse_help(old_help)
    binary = BinaryInfo(Path("/old/llama-server"), flags, env_of, "b3000", aliases, valued)
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
    raw = {"api_key_env": "MY_KEY"}
    launch = _launch(raw, binary, {"MY_KEY": "sekrit-value"})
    assert "sekrit-value" not in launch.argv
    assert launch.env[binary.env_var("--api-key")] == "sekrit-value"
    assert "sekrit-value" not in str(launch.masked_env())
    assert "sekrit-value" not in repr(launch) and "MY_KEY" not in repr(launch)
    assert binary.env_var("--api-key") in repr(launch)
    with pytest.raises(ConfigError, match="MY_KEY"):
        _launch(raw, binary, {})


def test_a_key_that_starts_with_a_quote_reaches_llama_server_whole(
    llama_server_bin: Path,
) -> None:
    """llama-server reads its key variable as CSV: a key opening with ``"`` and holding no
    comma was read as a quoted field, another key than the one the worker sends (401 on
    every request: a crash loop)."""
    binary = probe(llama_server_bin)
    launch = _launch({"api_key_env": "MY_KEY"}, binary, {"MY_KEY": '"abc'})
    assert launch.env[binary.env_var("--api-key")] == '"""abc"'
    assert launch.api_key == '"abc'


def test_a_draft_model_is_passed_to_llama_server(llama_server_bin: Path) -> None:
    """Downloaded and checked, the draft was never on the command line (speculative
    decoding silently off) where this line went missing."""
    raw = {"hf_draft_repo_id": "org/draft", "hf_draft_filename": "draft.gguf"}
    argv = _build(raw, probe(llama_server_bin))
    assert argv[argv.index("--model-draft") + 1] == "/c/draft.gguf"


def test_an_api_key_read_from_a_file_loses_its_line_end(llama_server_bin: Path) -> None:
    """A secret mounted from a file ends with a newline: httpx refused the header, every
    /health poll failed without a word, and the engine stayed ``loading``."""
    binary = probe(llama_server_bin)
    launch = _launch({"api_key_env": "MY_KEY"}, binary, {"MY_KEY": "  sekrit-value\n"})
    assert launch.api_key == launch.env[binary.env_var("--api-key")] == "sekrit-value"


@pytest.mark.parametrize("key", ["line\nbreak", "tab\there", "clé-€"])
def test_an_api_key_no_header_can_carry_is_refused_without_repeating_it(
    llama_server_bin: Path, key: str
) -> None:
    """A non-ASCII key ended the worker in a traceback (UnicodeEncodeError in the client);
    one with a control character inside stayed ``loading`` for good."""
    with pytest.raises(ConfigError, match=r"MY_KEY.*a character an HTTP header cannot") as err:
        _launch({"api_key_env": "MY_KEY"}, probe(llama_server_bin), {"MY_KEY": key})
    assert key not in str(err.value)


@pytest.mark.parametrize(
    ("pasted", "said"),
    [
        ("sk-4f9a-live-77", "profiles.p.llamacpp.api_key_env: must be the name of"),
        ("4f9a77c1", "profiles.p.llamacpp.api_key_env: must be the name of"),
        ("s3cr3tKey_live", "but that variable is empty or unset"),
        ("AKIAIOSFODNN7EXAMPLE", "but that variable is empty or unset"),
    ],
)
def test_a_key_pasted_in_place_of_its_variable_name_is_never_repeated(
    llama_server_bin: Path, pasted: str, said: str
) -> None:
    """``api_key_env: <the key>`` is an easy slip, and every worker sharing the registry
    logs and announces the error it causes: the key must not be in it. A value no
    variable could be named is refused with the profile; one that could (a lower-case
    word) is refused at launch, when the variable is unset, without its name."""
    binary = probe(llama_server_bin)
    with pytest.raises(ConfigError) as refused:
        _launch({"api_key_env": pasted}, binary, {})
    message = str(refused.value)
    assert said in message, message
    assert "api_key_env" in message and pasted not in message


@pytest.mark.parametrize(
    "extra",
    [["--api-key", "sk-SECRET123"], ["--api-key=sk-SECRET123"], ["--api-key sk-SECRET123"],
     ["--api-key-file", "/run/secrets/sk-SECRET123"]],
)  # fmt: skip
def test_a_key_in_extra_args_is_refused_for_api_key_env(
    llama_server_bin: Path, extra: list[str]
) -> None:
    """A key set in extra_args passed ``validate``, ``doctor`` and ``command``; llama-server
    then refused the worker's own ``/props`` (401: the worker sends only the key it reads
    through api_key_env), and the worker restarted it until its crash loop gave up."""
    with pytest.raises(ConfigError, match="api_key_env") as refused:
        _launch({"extra_args": extra}, probe(llama_server_bin), {})
    assert "sk-SECRET123" not in str(refused.value)


def test_a_key_file_beside_api_key_env_adds_keys_for_other_clients(
    llama_server_bin: Path,
) -> None:
    """With the worker's own key in api_key_env, a key file in extra_args gives other
    clients of llama-server keys of their own (llama-server takes both)."""
    raw = {"api_key_env": "MY_KEY", "extra_args": ["--api-key-file", "/run/keys"]}
    launch = _launch(raw, probe(llama_server_bin), {"MY_KEY": "sekrit-value"})
    assert list(launch.argv[-2:]) == ["--api-key-file", "/run/keys"]
    assert launch.api_key == "sekrit-value"


@pytest.mark.parametrize(
    ("raw", "env", "flag"),
    [
        ({"extra_args": ["--port", "9000"]}, {}, "--port"),
        ({"ctx_size": 4096, "extra_args": ["-c", "32768"]}, {}, "--ctx-size"),
        ({"extra_args": ["-np 8"]}, {"LLAMACPP_PARALLEL_OVERRIDE": "2"}, "--parallel"),
        ({"api_key_env": "MY_KEY", "extra_args": ["--api-key", "inline"]}, {}, "--api-key"),
        ({"kv_unified": False, "extra_args": ["-kvu"]}, {}, "--no-kv-unified"),
        ({"extra_args": ["--host", "0.0.0.0"]}, {}, "--host"),  # its socket and port lost
        ({"extra_args": ["-m", "other.gguf"]}, {}, "--model"),  # not the model checked
    ],
)
def test_extra_args_may_not_set_what_the_wrapper_sets(
    llama_server_bin: Path,
    monkeypatch: pytest.MonkeyPatch,
    raw: dict,
    env: dict[str, str],
    flag: str,
) -> None:
    """llama-server takes a flag's last value, so a flag in extra_args that the wrapper
    also sets won silently: an override undone (``-c`` after the ctx-size override), the
    server on a port the worker does not watch (it was then killed as hung), a key the
    worker does not send. Refused, naming the flag and not its value."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=re.escape(flag)) as refused:
        _launch(raw, probe(llama_server_bin), {"MY_KEY": "sekrit-value"})
    assert "inline" not in str(refused.value) and "sekrit" not in str(refused.value)


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


def test_extra_args_in_flag_equals_value_form_become_two_arguments(
    llama_server_bin: Path,
) -> None:
    """llama-server refuses ``--port=8080`` ("invalid argument"); what was meant is passed."""
    raw = {"extra_args": ["--threads-http=1", "--override-kv", "a.b=bool:false"]}
    argv = _build(raw, probe(llama_server_bin))
    assert argv[-4:] == ["--threads-http", "1", "--override-kv", "a.b=bool:false"]
    assert "--threads-http=1" not in argv
    with pytest.raises(UnsupportedKnob, match="--n-parallel"):
        _build({"extra_args": ["--n-parallel=2"]}, probe(llama_server_bin))


def test_an_extra_args_value_that_starts_with_a_dash_is_a_value_not_a_flag(
    llama_server_bin: Path,
) -> None:
    """A stop string such as ``- User:`` or a negative number was taken for a flag, and
    the profile refused ("needs the flag -"); ``--help`` says which flags take a value."""
    raw = {"extra_args": ["-r", "- User:", "--yarn-ext-factor", "-1e-3", "--no-slots"]}
    argv = _build(raw, probe(llama_server_bin))
    assert argv[-5:] == ["-r", "- User:", "--yarn-ext-factor", "-1e-3", "--no-slots"]
    with pytest.raises(UnsupportedKnob, match="--no-such-flag"):  # after a flag with no value
        _build({"extra_args": ["--no-slots", "--no-such-flag"]}, probe(llama_server_bin))
    binary = probe(llama_server_bin)  # a dot in a flag's name is part of it
    assert binary.accepts("--fim-qwen-1.5b-default") and not binary.accepts("--fim-qwen-1")


def test_secrets_in_flag_equals_value_form_are_masked(llama_server_bin: Path) -> None:
    raw = {"extra_args": ["--hf-token=hf_one", "-hft=hf_two"]}
    masked = " ".join(_launch(raw, probe(llama_server_bin)).masked_argv())
    assert "hf_one" not in masked and "hf_two" not in masked
    assert masked.endswith("--hf-token *** -hft ***")
    assert mask_argv(["llama-server", "--api-key=x", "--hf-token"]) == [
        "llama-server",
        "--api-key=***",
        "--hf-token",
    ]
    # ``show`` masks the profile's extra_args as written: one YAML string, flag and value.
    as_written = ["--hf-token hf_SPACEFORM", "--api-key \tsk-TAB", "--threads-http 1"]
    assert mask_argv(as_written) == ["--hf-token ***", "--api-key ***", "--threads-http 1"]


def test_a_flag_and_its_value_in_one_string_become_two_arguments_and_stay_hidden(
    llama_server_bin: Path,
) -> None:
    """``"--hf-token hf_..."`` as one YAML string: two arguments were meant, and neither the
    command shown nor an error about the flag may carry the token."""
    binary = probe(llama_server_bin)
    raw = {"extra_args": ["--threads-http 1", "--hf-token  sk-SECRET123"]}
    assert _build(raw, binary)[-4:] == ["--threads-http", "1", "--hf-token", "sk-SECRET123"]
    assert "sk-SECRET123" not in " ".join(_launch(raw, binary).masked_argv())
    with pytest.raises(UnsupportedKnob, match="--no-such-flag") as refused:
        _build({"extra_args": ["--no-such-flag sk-SECRET123"]}, binary)
    assert "sk-SECRET123" not in str(refused.value)


def test_every_secret_flag_of_the_binary_is_masked(llama_server_bin: Path) -> None:
    """Every option whose value --help calls a key or a token, with all its aliases."""
    text = subprocess.run(
        [str(llama_server_bin), "--help"], capture_output=True, text=True, check=True
    ).stdout
    secret = set()
    for head, _ in _entries(text):
        flags = re.findall(r"-{1,2}[a-z][\w-]*", head)
        if re.search(r"\s(KEY|TOKEN)$", head.strip()):
            secret.update(flags)
    assert {"--api-key", "--hf-token", "-hft"} <= secret
    assert secret == SECRET_FLAGS


async def test_real_llama_server_starts_with_a_flag_equals_value_extra_arg(
    make_launch: LaunchFactory,
) -> None:
    supervisor = Supervisor(make_launch(extra_args=["--threads-http=1"]), environ={}, policy=FAST)
    try:
        await supervisor.start()
        assert supervisor.state is EngineState.READY
    finally:
        await supervisor.stop()


def test_ipv6_host_is_bracketed_in_the_base_url() -> None:
    def url(host: str) -> str:
        return LaunchSpec(argv=(), env={}, host=host, port=8080).base_url

    assert url("::1") == "http://[::1]:8080"
    assert url("[::1]") == "http://[::1]:8080"
    assert url("::") == "http://127.0.0.1:8080"
    assert url("127.0.0.1") == "http://127.0.0.1:8080"
    LlamaClient(url("::1"))  # it parses


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback")
async def test_client_reaches_real_llama_server_on_ipv6_loopback(
    make_launch: LaunchFactory,
) -> None:
    supervisor = Supervisor(make_launch(host="::1"), environ={}, policy=FAST)
    try:
        await supervisor.start()
        await assert_answers(supervisor, max_tokens=2)
    finally:
        await supervisor.stop()


def test_two_knobs_for_one_flag_are_refused() -> None:
    with pytest.raises(ConfigError) as err:
        _build({"spec_draft_n_max": 8, "draft_max": 16}, None)
    message = str(err.value)
    assert "spec_draft_n_max" in message and "draft_max" in message
    assert "--spec-draft-n-max" in message
    assert _build({"draft_max": 16}, None)[-2:] == ["--spec-draft-n-max", "16"]


@pytest.mark.parametrize(
    ("extra", "sleeps"),
    [([], False), (["--sleep-idle-seconds", "30"], True), (["--sleep-idle-seconds=-1"], False)],
)
def test_whether_llama_server_may_sleep_is_read_from_its_command(
    llama_server_bin: Path, extra: list[str], sleeps: bool
) -> None:
    """An idle llama-server is watched unless it may sleep (-1: it may not)."""
    assert _launch({"extra_args": extra}, probe(llama_server_bin)).sleeps_when_idle is sleeps


def test_llama_server_is_not_given_the_variables_it_reads_as_flags() -> None:
    """Those ``--help`` names (``flag_env``) and any ``LLAMA_ARG_*`` or ``LLAMA_API_KEY``
    are left out of what llama-server inherits; ours (the profile's key) are set."""
    launch = LaunchSpec(
        ("llama-server",),
        {"LLAMA_API_KEY": "the-profile-s", "CUDA_VISIBLE_DEVICES": "0"},
        "127.0.0.1",
        8080,
        flag_env=frozenset({"LLAMA_NEW_FLAG"}),
    )
    inherited = {
        "PATH": "/bin",
        "LLAMA_API_KEY": "stray",
        "LLAMA_ARG_CTX_SIZE": "4",
        "LLAMA_NEW_FLAG": "1",
        "LLAMA_LOG_COLORS": "0",
    }
    env, dropped = launch.child_env(inherited)
    assert env == {
        "PATH": "/bin",
        "LLAMA_LOG_COLORS": "0",
        "LLAMA_API_KEY": "the-profile-s",
        "CUDA_VISIBLE_DEVICES": "0",
    }
    assert dropped == ["LLAMA_ARG_CTX_SIZE", "LLAMA_NEW_FLAG"]


def test_a_gpu_pin_that_replaces_the_environment_s_gpus_is_said() -> None:
    """The pin wins over an inherited ``CUDA_VISIBLE_DEVICES`` (a scheduler's job, a
    container's one GPU), silently: llama-server then ran on another job's GPU, or on
    the CPU when the pinned one was not there."""
    launch = LaunchSpec(("llama-server",), {"CUDA_VISIBLE_DEVICES": "0"}, "127.0.0.1", 8080)
    said = launch.replaced_gpus({"CUDA_VISIBLE_DEVICES": "2"})
    assert said is not None and "CUDA_VISIBLE_DEVICES=2" in said and "replaced by 0" in said
    assert launch.replaced_gpus({"CUDA_VISIBLE_DEVICES": "0"}) is None
    assert launch.replaced_gpus({}) is None
    unpinned = LaunchSpec(("llama-server",), {}, "127.0.0.1", 8080)
    assert unpinned.replaced_gpus({"CUDA_VISIBLE_DEVICES": "2"}) is None  # left as it is


def test_a_version_that_answers_late_is_unknown_not_a_traceback(
    llama_server_bin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--version`` past its timeout raised ``TimeoutExpired``, which nothing caught:
    ``run``, ``command`` and ``doctor`` ended in a traceback, the fleet never told."""
    slow = tmp_path / "llama-server"
    shutil.copy(PRELUDE, slow)
    monkeypatch.setenv("REAL_LLAMA_SERVER", str(llama_server_bin))
    monkeypatch.setenv("PRELUDE_SLOW_VERSION", "5")
    monkeypatch.setattr(binary_module, "VERSION_TIMEOUT_SEC", 0.5)

    info = probe(slow)

    assert info.build == "unknown" and "--port" in info.flags


def test_a_binary_killed_by_a_signal_says_which_and_why(
    llama_server_bin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build for another CPU dies of SIGILL: it was "does not look like llama-server's
    (no --port; exit -4)", with nothing after it."""
    dying = tmp_path / "llama-server"
    shutil.copy(PRELUDE, dying)
    monkeypatch.setenv("REAL_LLAMA_SERVER", str(llama_server_bin))
    monkeypatch.setenv("PRELUDE_SIGNAL", "ILL")

    with pytest.raises(EngineError, match="was killed by SIGILL") as err:
        probe(dying)

    assert "an instruction this CPU does not have" in str(err.value)


def test_the_gpu_pin_wins_over_the_inherited_environment() -> None:
    """llama-server's environment is the worker's, with ours over it: a scheduler's
    ``CUDA_VISIBLE_DEVICES`` (or ``CUDA_DEVICE_ORDER``) must not undo the pin, which
    ``command``, the announcement and the log all say is in force."""
    profile = parse_profile(
        "p",
        {"backend": "llamacpp", "gpu": {"device_ids": [1, 2]}, "llamacpp": {"model_path": "m"}},
    )
    files = plan_files(profile, None, {"LLM_CACHE_DIR": "/c"})
    launch = build_launch(profile, Overrides(), files, binary=None, binary_path="x", environ={})
    inherited = {"CUDA_VISIBLE_DEVICES": "5", "CUDA_DEVICE_ORDER": "FASTEST_FIRST", "HOME": "/h"}
    env, _ = launch.child_env(inherited)
    assert (env["CUDA_VISIBLE_DEVICES"], env["CUDA_DEVICE_ORDER"]) == ("1,2", "PCI_BUS_ID")
    assert env["HOME"] == "/h"
    assert launch.replaced_gpus(inherited) is not None


def test_a_launch_names_every_part_and_extra_of_its_model() -> None:
    """What the supervisor checks for a file gone from disk before fetching the model
    again: a split model's later parts are not on the command line, a LoRA is none."""
    raw = {
        "model_path": "x-00001-of-00002.gguf",
        "mmproj_filename": "p.gguf",
        "hf_draft_repo_id": "org/draft",
        "hf_draft_filename": "d.gguf",
        "extra_args": ["--lora", "/m/l.gguf"],
    }
    assert _launch(raw, None).model_files == (
        "/c/x-00001-of-00002.gguf",
        "/c/x-00002-of-00002.gguf",
        "/c/p.gguf",
        "/c/d.gguf",
    )


def test_the_probe_s_child_dies_with_a_worker_that_is_sigkilled() -> None:
    """A stop kills the probe's process group; a SIGKILLed worker cannot, and its child
    (a ``--help`` that may initialise CUDA for a minute) lived on after it. Probed from a
    thread, as the worker does: the parent-death signal follows the thread that forks."""
    script = (
        "import threading\n"
        "from orion_llamaccp.engine.binary import Children\n"
        "threading.Thread(target=Children().run, args=(['sleep', '3601'], 3600)).start()\n"
    )
    worker = subprocess.Popen([sys.executable, "-c", script], preexec_fn=die_with_parent())
    probed: list[psutil.Process] = []
    try:

        def probing() -> bool:
            with contextlib.suppress(psutil.Error):
                probed[:] = psutil.Process(worker.pid).children()
            return any(p.cmdline() == ["sleep", "3601"] for p in probed)

        wait_until(probing, timeout=30, what="the probe's child")
        worker.kill()
        worker.wait()
        wait_until(lambda: not pid_alive(probed[0].pid), timeout=10, what="the child gone")
    finally:
        worker.kill()
        for proc in probed:
            with contextlib.suppress(psutil.Error):
                proc.kill()


def test_the_probe_s_children_are_killed_with_their_own_and_none_start_after() -> None:
    """A stop kills the child a probe runs, and what that child runs (a launcher script's
    llama-server), and refuses those the probe's thread would start after it."""
    children = binary_module.Children()
    done: list[subprocess.CompletedProcess[str]] = []
    script = ["sh", "-c", "sleep 3600; echo never"]  # sh waits for its own child
    thread = threading.Thread(target=lambda: done.append(children.run(script, 3600)))
    thread.start()

    # Only the script's: in the whole suite this process has others (a session's Redis,
    # llama-servers), which live on.
    ours = (script[-2:], ["sleep", "3600"])

    def running() -> list[psutil.Process]:
        found = []
        for proc in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):  # one of the others, gone meanwhile
                if proc.cmdline()[-2:] in ours:
                    found.append(proc)
        return found if len(found) == 2 else []

    started = wait_until(running, timeout=10, what="the child and its own")
    children.kill()
    thread.join(10)  # bounds the wait only
    assert [d.returncode for d in done] == [-signal.SIGKILL]
    # The grandchild's SIGKILL lands when the kernel next schedules it: waited for (a
    # bound only), not taken as done the moment its parent was reaped.
    wait_until(lambda: not any(pid_alive(p.pid) for p in started), timeout=10, what="all gone")
    with pytest.raises(EngineError, match="stopping"):
        children.run(["true"], 10)
