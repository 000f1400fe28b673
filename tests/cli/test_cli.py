"""The command line, run as a user would: a child process with an environment."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from orion_llamaccp.bus.server import redis_too_old
from orion_llamaccp.cli.serve_cmds import install_stop_signals
from tests.conftest import OLDEST_REDIS, SpawnWorker, write_tiny_registry
from tests.engine.conftest import PRELUDE
from tests.support.procs import RedisServer, free_port, pid_alive, wait_until
from tests.support.workers import WorkerProc


def cli(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orion_llamaccp", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def shown_profiles(env: dict, registry: Path, text: str) -> str:
    """What ``show`` prints of a registry written as ``text`` (it must exit 0)."""
    registry.write_text(text)
    shown = cli({**env, "LLM_PROFILES_CONFIG_PATH": str(registry)}, "show")
    assert shown.returncode == 0, shown.stderr
    return shown.stdout


def test_doctor_all_ok(subprocess_env: dict) -> None:
    done = cli(subprocess_env, "doctor")
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    names = [line.split()[1] for line in lines]
    assert names == [
        *("env", "config", "profile", "binary", "flags", "model", "port", "redis", "gpus")
    ]
    assert all(line.startswith("ok") for line in lines)
    assert "tiny.gguf" in lines[names.index("model")]
    version = redis.Redis.from_url(subprocess_env["ORION_BUS_URL"]).info()["redis_version"]
    assert lines[names.index("redis")].endswith(f"answers (Redis {version})")


def test_doctor_fails_a_port_llama_server_cannot_listen_on(subprocess_env: dict) -> None:
    """Another server on the profile's port (another llama-server, this profile's worker
    already running): doctor said ok to all, and `run` failed after five restarts."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = cli({**subprocess_env, "LLAMACPP_PORT_OVERRIDE": str(port)}, "doctor")
    by_name = {line.split()[1]: line for line in done.stdout.splitlines()}
    assert done.returncode == 1, done.stdout
    assert by_name["port"].startswith("FAIL") and f"127.0.0.1:{port} is taken" in by_name["port"]
    assert "(by another server)" in by_name["port"] and "LLAMACPP_PORT_OVERRIDE" in by_name["port"]


def test_run_on_a_port_another_server_holds_fails_at_once_saying_so(
    subprocess_env: dict,
) -> None:
    """What doctor says of such a port, `run` found out after five starts (8 s of
    backoff, "restart #4" in its log) and a "crash loop" error: no restart frees a port
    another server holds. It fails at the first start now, saying what to do."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = cli({**subprocess_env, "LLAMACPP_PORT_OVERRIDE": str(port)}, "run")
    assert done.returncode == 1, done.stderr[-2000:]
    said = (
        "cannot serve profile tiny: llama-server's port is already taken: something "
        f"answers at http://127.0.0.1:{port}"
    )
    [line] = [line for line in done.stderr.splitlines() if said in line]
    assert "LLAMACPP_PORT_OVERRIDE" in line, line
    assert "restart #" not in done.stderr and "crash loop" not in done.stderr, done.stderr


def test_doctor_notes_the_port_of_the_profile_s_own_running_llama_server(
    spawn_worker: SpawnWorker, subprocess_env: dict
) -> None:
    """``dc exec llamaccp orion-llamaccp doctor`` in a running container: the port is the
    worker's own llama-server's, as it should be, and was a FAIL (exit status 1)."""
    worker = spawn_worker()
    port = worker.announcement()["engine_url"].rsplit(":", 1)[1].strip("/")
    done = cli({**subprocess_env, "LLAMACPP_PORT_OVERRIDE": port}, "doctor")
    by_name = {line.split()[1]: line for line in done.stdout.splitlines()}
    assert by_name["port"].startswith("note"), done.stdout
    assert "this profile's llama-server, running" in by_name["port"]
    assert done.returncode == 0, done.stdout


@pytest.mark.parametrize(("offline", "outcome"), [("0", "note"), ("1", "FAIL")])
def test_doctor_notes_a_model_run_will_download(
    subprocess_env: dict, tmp_path: Path, offline: str, outcome: str
) -> None:
    """A profile's first start: its model is not downloaded yet, and `run` will. Doctor
    said FAIL and exited 1, where deployment.md offers it as the first check; with
    HF_HUB_OFFLINE set, `run` cannot download it, and that fails."""
    registry = tmp_path / "hub.yaml"
    registry.write_text(
        "profiles:\n  hub:\n    backend: llamacpp\n    model_id: org/m\n    llamacpp:\n"
        f"      model_root: {tmp_path / 'models'}\n      hf_repo_id: org/m\n"
        f"      hf_filename: m-q4.gguf\n      port: {free_port()}\n"
    )
    env = {
        **subprocess_env,
        "LLM_PROFILES_CONFIG_PATH": str(registry),
        "LLM_PROFILE_NAME": "hub",
        "HF_HUB_OFFLINE": offline,
    }
    done = cli(env, "doctor")
    by_name = {line.split()[1]: line for line in done.stdout.splitlines()}
    assert by_name["model"].startswith(outcome), done.stdout
    said = "will be downloaded from org/m on `run`" if outcome == "note" else "HF_HUB_OFFLINE"
    assert said in by_name["model"], done.stdout
    assert done.returncode == (0 if outcome == "note" else 1), done.stdout


@pytest.mark.parametrize(
    ("policy", "fails"),
    [("allkeys-lru", True), ("volatile-ttl", True), ("noeviction", False)],
)
def test_doctor_fails_a_redis_that_evicts_keys(
    subprocess_env: dict, tmp_path: Path, policy: str, fails: bool
) -> None:
    """At its memory limit such a Redis drops the request streams (allkeys-*) or the
    guards that answer each request once (volatile-*: they all expire): doctor said ok."""
    args = ("--maxmemory", "64mb", "--maxmemory-policy", policy)
    server = RedisServer(tmp_path / "redis", extra_args=args).start()
    try:
        done = cli({**subprocess_env, "ORION_BUS_URL": server.url}, "doctor")
    finally:
        server.stop()
    line = next(line for line in done.stdout.splitlines() if line.split()[1] == "redis")
    said = f"Redis evicts keys at its memory limit (maxmemory-policy {policy})"
    assert (line.startswith("FAIL") and said in line) == fails, line
    assert done.returncode == (1 if fails else 0), done.stdout


@pytest.mark.parametrize(
    ("version", "refused"),
    [("6.0.16", True), ("5.0.7", True), ("6.2.0", False), ("7.0.15", False), ("8.2", False)],
)
def test_doctor_refuses_a_redis_older_than_6_2(version: str, refused: bool) -> None:
    """Every beat of a worker on Redis 6.0 failed (SET ... GET), after its PUBLISH: the
    fleet heard beats while ``health`` and ``ps`` found nothing, and doctor said ok.
    (No Redis older than 6.2 can run here: the version INFO gives is checked.)"""
    said = (
        f"Redis {version} is older than 6.2, which the worker needs (SET ... GET for its "
        f"liveness key, XAUTOCLAIM for the stream intake): upgrade Redis"
    )
    assert redis_too_old(version) == (said if refused else None)


# ACL rules of a user beside ``on >pw ~* +@all``, and what doctor must say of it: with
# ``ACL`` allowed it asks ``ACL DRYRUN`` (Redis 7); without (``-acl``, or 6.2), it tries.
_ACL_CASES = [
    (
        ("resetchannels", "&orion:system:*", "&orion:llm:*", "&orion:llamacpp:*"),
        "may not SUBSCRIBE to orion:exec:request:LlamaCppHost:tiny (the pub/sub intake; ",
    ),
    (
        ("-acl", "resetchannels", "&orion:exec:*", "&orion:llamacpp:*", "&orion:llm:*"),
        "may not PUBLISH to orion:system:health (heartbeats; ",
    ),
    (("-publish", "allchannels"), "may not run PUBLISH ("),
    (("-acl", "-publish", "allchannels"), "may not run PUBLISH ("),
    (("-acl", "-subscribe", "allchannels"), "may not run SUBSCRIBE ("),
    (("-acl", "allchannels"), None),
]


@pytest.mark.parametrize("version", ["7", "6.2"])
def test_doctor_fails_a_redis_user_the_acl_keeps_off_the_worker_s_channels(
    subprocess_env: dict, tmp_path: Path, version: str
) -> None:
    """An ACL user that may not SUBSCRIBE to the intake, or PUBLISH heartbeats: doctor
    said ok, and `run` failed at its SUBSCRIBE ("No permissions to access a channel",
    which one unsaid). Doctor names the user, the command and the channel now."""
    binary = None
    if version == "6.2":
        if not OLDEST_REDIS.is_file():
            pytest.fail(f"no Redis 6.2 at {OLDEST_REDIS} (make test builds it)")
        binary = str(OLDEST_REDIS)
    server = RedisServer(tmp_path / "redis", binary=binary).start()
    admin = redis.Redis.from_url(server.url)
    try:
        for index, (rules, said) in enumerate(_ACL_CASES):
            user = f"u{index}"
            admin.execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", "+@all", *rules)
            url = f"redis://{user}:pw@127.0.0.1:{server.port}/0"
            done = cli({**subprocess_env, "ORION_BUS_URL": url}, "doctor")
            line = next(line for line in done.stdout.splitlines() if line.split()[1] == "redis")
            if said is None:
                assert line.startswith("ok") and done.returncode == 0, (rules, line)
                continue
            assert line.startswith("FAIL") and done.returncode == 1, (rules, line)
            assert f"Redis user '{user}' {said}" in line and "grant it in Redis's ACL" in line
            assert "pw@" not in line, line
        # Tried, not sent: no one heard a thing, and nothing stays subscribed.
        assert admin.pubsub_channels() == [], admin.pubsub_channels()
    finally:
        admin.close()
        server.stop()


def test_doctor_says_what_to_fix(subprocess_env: dict, tmp_path: Path) -> None:
    env = {
        **subprocess_env,
        "LLAMA_SERVER_BIN": str(tmp_path / "nope"),
        "ORION_BUS_URL": f"redis://:hunter22@127.0.0.1:{free_port()}/0",
        "LLM_CACHE_DIR": str(tmp_path / "empty"),
    }
    done = cli(env, "doctor")
    assert done.returncode == 1
    by_name = {line.split()[1]: line for line in done.stdout.splitlines()}
    assert by_name["binary"].startswith("FAIL") and "LLAMA_SERVER_BIN" in by_name["binary"]
    assert by_name["model"].startswith("FAIL") and "copy the GGUF there" in by_name["model"]
    assert by_name["redis"].startswith("FAIL") and "ORION_BUS_URL" in by_name["redis"]
    assert "hunter22" not in done.stdout + done.stderr
    assert by_name["config"].startswith("ok") and by_name["profile"].startswith("ok")


def test_doctor_says_when_the_bus_url_came_from_the_env_file(
    subprocess_env: dict, tmp_path: Path
) -> None:
    """After ``cp .env.example .env`` on a host, the worker reads compose's
    ``redis://redis:6379/0`` from it: doctor failed that URL without saying where it
    came from (the environment had none)."""
    env_file = tmp_path / ".env"
    env_file.write_text(f"ORION_BUS_URL=redis://127.0.0.1:{free_port()}/0\n")
    env = {k: v for k, v in subprocess_env.items() if k != "ORION_BUS_URL"}
    env["ORION_LLAMACPP_ENV_FILE"] = str(env_file)
    done = cli(env, "doctor")
    line = next(line for line in done.stdout.splitlines() if line.split()[1] == "redis")
    assert line.startswith("FAIL") and f"(ORION_BUS_URL from {env_file})" in line, line


def test_doctor_blames_an_unknown_profile_on_the_profile_not_the_config(
    subprocess_env: dict,
) -> None:
    """It said "ok config" and then "FAIL config LLM PROFILE ... not found"."""
    done = cli({**subprocess_env, "LLM_PROFILE_NAME": "tiyn"}, "doctor")
    by_name = {line.split()[1]: line for line in done.stdout.splitlines()}
    assert done.returncode == 1 and by_name["config"].startswith("ok"), done.stdout
    assert by_name["profile"].startswith("FAIL") and "'tiyn' not found" in by_name["profile"]


def test_doctor_blames_a_profile_that_names_no_usable_model_file_on_the_profile(
    subprocess_env: dict, tmp_path: Path
) -> None:
    """A selected profile that cannot be planned for a reason of its own (its model_path
    out of model_root) said "ok profile", then "FAIL flags" with that reason: no flag
    was wrong."""
    registry = tmp_path / "profiles.yaml"
    text = Path(subprocess_env["LLM_PROFILES_CONFIG_PATH"]).read_text()
    registry.write_text(text.replace("model_path: tiny.gguf", "model_path: /elsewhere/m.gguf"))
    done = cli({**subprocess_env, "LLM_PROFILES_CONFIG_PATH": str(registry)}, "doctor")
    by_name = {line.split()[1]: line for line in done.stdout.splitlines()}
    assert done.returncode == 1, done.stdout
    assert by_name["profile"].startswith("FAIL") and "outside model_root" in by_name["profile"]
    assert "flags" not in by_name, done.stdout


def test_doctor_checks_the_pinned_gpus_against_a_fake_nvidia_smi(
    subprocess_env: dict, tmp_path: Path
) -> None:
    """No GPU here: ``nvidia-smi`` is a stand-in that lists one. doctor passed a pin to a
    GPU the host does not have (it counted GPUs, not which), and failed a profile told to
    serve on the CPU (``n_gpu_layers`` 0, or a pin to none) for want of ``nvidia-smi``."""
    tools = tmp_path / "bin"
    tools.mkdir()
    smi = tools / "nvidia-smi"
    smi.write_text('#!/bin/sh\necho "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1a2b-3c)"\n')
    smi.chmod(0o755)
    with_smi = {**subprocess_env, "PATH": f"{tools}:{subprocess_env['PATH']}"}

    def gpus(env: dict, **overrides: str) -> str:
        done = cli({**env, **overrides}, "doctor")
        return next(line for line in done.stdout.splitlines() if line.split()[1] == "gpus")

    pin = {"LLAMACPP_N_GPU_LAYERS_OVERRIDE": "99"}
    assert gpus(with_smi, CUDA_VISIBLE_DEVICES_OVERRIDE="0", **pin).startswith("ok")
    assert gpus(with_smi, CUDA_VISIBLE_DEVICES_OVERRIDE="GPU-1a2b-3c", **pin).startswith("ok")
    missing = gpus(with_smi, CUDA_VISIBLE_DEVICES_OVERRIDE="0,3", **pin)
    assert missing.startswith("FAIL") and "lists no 3 (it lists 0, GPU-1a2b-3c)" in missing
    nowhere = gpus(subprocess_env, CUDA_VISIBLE_DEVICES_OVERRIDE="0", **pin)
    assert nowhere.startswith("FAIL") and "no nvidia-smi here" in nowhere
    on_purpose = {"LLAMACPP_N_GPU_LAYERS_OVERRIDE": "0", "CUDA_VISIBLE_DEVICES_OVERRIDE": "0"}
    assert gpus(subprocess_env, **on_purpose).startswith("ok")
    assert gpus(subprocess_env, CUDA_VISIBLE_DEVICES_OVERRIDE="-1", **pin).startswith("ok")


def test_a_misspelt_variable_of_ours_is_said_not_ignored(subprocess_env: dict) -> None:
    """``LLAMACPP_CTXSIZE_OVERRIDE`` or ``LLM_PROFILE`` did nothing, without a word: the
    profile's context, or the default profile, was served. Every ``LLAMACPP_*`` and
    ``ORION_LLAMACPP_*`` name is ours; an ``LLM_*`` name is said only when it is close to
    one of ours (other services use that prefix); Compose's own are left alone."""
    env = {
        **subprocess_env,
        "LLAMACPP_CTXSIZE_OVERRIDE": "1024",
        "LLM_PROFILE": "other",
        "LLM_GATEWAY_URL": "http://gateway",
        "LLAMACPP_HOST_PORT": "8081",
    }
    done = cli(env, "doctor")
    line = next(line for line in done.stdout.splitlines() if line.split()[1] == "env")
    assert line.startswith("FAIL") and done.returncode == 1
    assert "LLAMACPP_CTXSIZE_OVERRIDE is set but nothing reads it (did you mean " in line
    assert "LLAMACPP_CTX_SIZE_OVERRIDE?)" in line
    assert "LLM_PROFILE is set but nothing reads it (did you mean LLM_PROFILE_NAME?)" in line
    assert "LLM_GATEWAY_URL" not in line and "LLAMACPP_HOST_PORT" not in line
    shown = cli(env, "command")  # every command says it, on stderr
    assert shown.returncode == 0 and "LLAMACPP_CTXSIZE_OVERRIDE is set" in shown.stderr


def test_a_misspelt_variable_in_the_env_file_is_said_too(
    subprocess_env: dict, tmp_path: Path
) -> None:
    """Only the environment's names were looked at: the same typo in ``.env``, where
    compose deployments keep them, did nothing without a word; so did a GPU pin missing
    a letter. CUDA's own ``CUDA_VISIBLE_DEVICES`` (a container runtime sets it) is left
    alone."""
    env_file = tmp_path / "service.env"
    env_file.write_text(
        "LLAMACPP_CTXSIZE_OVERRIDE=1234\nLLM_PROFILE=other\nLLAMACPP_PORT_OVERRIDE 99\n"
    )
    env = {
        **subprocess_env,
        "ORION_LLAMACPP_ENV_FILE": str(env_file),
        "CUDA_VISIBLE_DEVICE_OVERRIDE": "1",
        "CUDA_VISIBLE_DEVICES": "0",
    }
    done = cli(env, "doctor")
    line = next(line for line in done.stdout.splitlines() if line.split()[1] == "env")
    assert line.startswith("FAIL") and done.returncode == 1
    assert f"LLAMACPP_CTXSIZE_OVERRIDE is set in {env_file} but nothing reads it" in line
    assert f"LLM_PROFILE is set in {env_file} but nothing reads it" in line
    assert "CUDA_VISIBLE_DEVICE_OVERRIDE is set but nothing reads it (did you mean " in line
    assert "CUDA_VISIBLE_DEVICES is set" not in line
    # A line without "=": python-dotenv's warning named no file (twice); ours, once.
    assert f"{env_file}:3: not NAME=value, so nothing of that line is read" in line
    assert "python-dotenv could not parse" not in done.stderr, done.stderr


def test_validate_fails_on_a_named_binary_that_is_not_there_and_notes_a_missing_one(
    subprocess_env: dict, tmp_path: Path
) -> None:
    """LLAMA_SERVER_BIN naming nothing: ``validate`` said every profile ok (exit 0), its
    flag check skipped without a word, and ``command`` said only "no binary found". No
    binary at all (a CI gate's machine) still passes, with a note of what was not done."""
    named = {**subprocess_env, "LLAMA_SERVER_BIN": str(tmp_path / "no-llama-server")}
    done = cli(named, "validate")
    assert done.returncode == 1, done.stdout
    said = f"ERROR    flags not checked against a llama-server binary: LLAMA_SERVER_BIN={tmp_path}"
    assert said in done.stdout and "does not exist" in done.stdout, done.stdout
    assert done.stdout.rstrip().endswith(
        "valid in "
        + subprocess_env["LLM_PROFILES_CONFIG_PATH"]
        + " (their flags not checked: see above)"
    ), done.stdout
    # Another program there: what it said last, on the error's line, cut at words (the
    # last 300 characters of its help began mid-word and ran over lines).
    done = cli(
        {**subprocess_env, "LLAMA_SERVER_BIN": shutil.which("true") or "/bin/true"}, "validate"
    )
    [error] = [line for line in done.stdout.splitlines() if line.startswith("ERROR")]
    assert "does not look like llama-server's (no --port; exit 0); it ended with: " in error
    assert error.rstrip().endswith("invocation'"), error
    shown = cli(named, "command")
    assert "no-llama-server does not exist" in shown.stdout.splitlines()[0], shown.stdout
    shown = cli({**named, "LLAMA_SERVER_BIN": str(tmp_path)}, "command")
    assert f"{tmp_path} is a folder, not the binary" in shown.stdout.splitlines()[0]
    unset = {k: v for k, v in subprocess_env.items() if k != "LLAMA_SERVER_BIN"}
    none = {**unset, "ORION_LLAMACPP_BUILD_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = cli(none, "validate")
    assert done.returncode == 0, done.stdout
    assert "note     flags not checked against a llama-server binary: no llama-server found" in (
        done.stdout
    )


def test_a_line_of_the_env_file_it_cannot_read_is_said_when_the_settings_fail_too(
    subprocess_env: dict, tmp_path: Path
) -> None:
    """The line that could not be read is often why the settings fail after it (a quote
    left open takes the lines after it in): said with the error, not lost with it."""
    env_file = tmp_path / "service.env"
    env_file.write_text("LLAMACPP_PORT_OVERRIDE 1\nLLAMACPP_CTX_SIZE_OVERRIDE=big\n")
    done = cli({**subprocess_env, "ORION_LLAMACPP_ENV_FILE": str(env_file)}, "command")
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0] == f"note: {env_file}:1: not NAME=value, so nothing of that line is read"
    assert lines[-1].startswith("error: invalid environment: LLAMACPP_CTX_SIZE_OVERRIDE='big'")


def test_validate_fails_a_profile_run_would_refuse(subprocess_env: dict, tmp_path: Path) -> None:
    """validate ran the registry's type checks only: a profile whose command line cannot
    be built (a knob set twice, by its key and in extra_args; a file name outside
    model_root) passed, and a CI gate on validate let it through to `run`. A profile
    whose api_key_env is unset here is fine: that variable is the serving host's."""
    registry = tmp_path / "profiles.yaml"
    registry.write_text(
        "profiles:\n"
        "  twice:\n    llamacpp: {model_path: m.gguf, ctx_size: 2048, extra_args: [-c, '100']}\n"
        "  outside:\n    llamacpp: {hf_repo_id: o/r, hf_filename: ../../etc/x.gguf}\n"
        "  keyed:\n    llamacpp: {model_path: m.gguf, api_key_env: KEYED_API_KEY}\n"
        "  fine:\n    llamacpp: {model_path: m.gguf}\n"
    )
    done = cli({**subprocess_env, "LLM_PROFILES_CONFIG_PATH": str(registry)}, "validate")
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "ok       fine" in lines
    assert "ok       keyed (its api_key_env variable is unset here: not checked)" in lines
    errors = [line for line in lines if line.startswith("ERROR")]
    assert len(errors) == 2 and "profiles.twice:" in errors[0] and "-c" in errors[0]
    assert "profiles.outside:" in errors[1] and "outside model_root" in errors[1]
    assert lines[-1].startswith("2/4 llama.cpp profiles valid")
    # doctor counts them as validate does: it said "0 invalid" of the same registry.
    env = {**subprocess_env, "LLM_PROFILES_CONFIG_PATH": str(registry), "LLM_PROFILE_NAME": "fine"}
    config = cli(env, "doctor").stdout.splitlines()[1]
    assert "4 llama.cpp profiles, 0 of other backends, 2 invalid (twice, outside:" in config


def test_command_json_works_before_the_model_exists(subprocess_env: dict, tmp_path: Path) -> None:
    env = {
        **subprocess_env,
        "LLM_CACHE_DIR": str(tmp_path / "not-yet"),
        "LLAMACPP_CTX_SIZE_OVERRIDE": "1024",
    }
    done = cli(env, "command", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["argv"][1:3] == ["--model", str(tmp_path / "not-yet" / "tiny.gguf")]
    assert out["argv"][out["argv"].index("--ctx-size") + 1] == "1024"
    assert isinstance(out["env"], dict)
    human = cli(env, "command")
    assert "not downloaded yet" in human.stdout


def test_chat_on_the_stream_with_no_worker_says_where_to_look(subprocess_env: dict) -> None:
    """Over the stream, no subscriber count tells the caller at once that no worker
    serves the profile (as ``NoWorker`` does on pub/sub): the timeout's error now says
    where to look."""
    done = cli(subprocess_env, "chat", "hi", "--via", "stream", "--timeout", "1")
    assert done.returncode == 1, done.stderr
    said = "error: no answer from a worker serving profile 'tiny' within 1s (is one running"
    assert said in done.stderr and "orion-llamaccp ps" in done.stderr, done.stderr


def test_chat_on_the_stream_of_workers_serving_pub_sub_only_fails_at_once(
    spawn_worker: SpawnWorker, subprocess_env: dict
) -> None:
    """The worker serves pub/sub only (``ORION_LLAMACPP_TRANSPORTS=pubsub``), and says so
    in its announcement: ``chat --via stream`` waited its whole timeout (300 s by
    default) for an answer no worker would give. It fails at once, saying what to do."""
    spawn_worker(ORION_LLAMACPP_TRANSPORTS="pubsub")
    # The wait it used to do outlasts the command's own limit here (60 s).
    done = cli(subprocess_env, "chat", "hi", "--via", "stream", "--timeout", "600")
    assert done.returncode == 1, done.stderr
    said = (
        "error: no worker of profile 'tiny' reads the stream orion:stream:llamacpp:tiny:request "
        "(w1 serves pubsub only): ask with --via pubsub"
    )
    assert done.stderr.startswith(said), done.stderr
    asked = cli(subprocess_env, "chat", "hi", "--max-tokens", "2", "--timeout", "60")
    assert asked.returncode == 0, asked.stderr


def test_command_says_the_gpu_pin_replaces_the_environment_s_and_it_does(
    subprocess_env: dict,
) -> None:
    """``CUDA_VISIBLE_DEVICES=5`` (what a user sets to move a worker) beside a pin: the
    pin wins, in the command's environment as in llama-server's (``child_env``), and
    ``command`` says so, as ``run`` logs it (it said nothing)."""
    env = {**subprocess_env, "CUDA_VISIBLE_DEVICES": "5", "CUDA_VISIBLE_DEVICES_OVERRIDE": "1,2"}
    done = cli(env, "command")
    assert done.returncode == 0, done.stderr
    said = "# note: CUDA_VISIBLE_DEVICES=5 from the environment is replaced by 1,2"
    assert done.stdout.startswith(said), done.stdout
    assert "CUDA_VISIBLE_DEVICES=1,2 \\" in done.stdout


def test_command_keeps_a_negative_value_beside_its_flag(subprocess_env: dict) -> None:
    """``--threads -1`` (llama-server's "as many as the machine has") was shown as a flag
    of its own, on a line of its own."""
    done = cli({**subprocess_env, "LLAMACPP_THREADS_OVERRIDE": "-1"}, "command")
    assert done.returncode == 0, done.stderr
    assert "  --threads -1 \\\n" in done.stdout, done.stdout


def test_validate_profiles_and_show(subprocess_env: dict, tmp_path: Path) -> None:
    assert cli(subprocess_env, "validate").returncode == 0
    listing = cli(subprocess_env, "profiles")
    assert "tiny" in listing.stdout and "other-backend" in listing.stdout
    shown = cli(subprocess_env, "show")
    assert "model_id: tiny-random-llama" in shown.stdout
    broken = tmp_path / "broken.yaml"
    broken.write_text("profiles:\n  a:\n    backend: llamacpp\n    llamacpp: {ctx_sise: 1}\n")
    done = cli({**subprocess_env, "LLM_PROFILES_CONFIG_PATH": str(broken)}, "validate")
    assert done.returncode == 1
    assert "ERROR    profiles.a.llamacpp.ctx_sise: unknown key (did you mean 'ctx_size'?)" in (
        done.stdout
    )


def test_show_hides_secrets_in_extra_args_and_keys_of_other_tools(
    subprocess_env: dict, tmp_path: Path
) -> None:
    """``show`` printed ``extra_args`` as written, where ``command`` hides a key or token
    given there, and a secret under another tool's key beside ours."""
    shown = shown_profiles(
        subprocess_env,
        tmp_path / "secrets.yaml",
        "profiles:\n"
        "  tiny:\n"
        "    backend: llamacpp\n"
        "    api_key: sk-other-tool-secret\n"
        "    openaiApiKey: sk-camel-secret\n"
        "    description:\n"
        "    notes: {hf_token: hf_nested_secret, max_tokens: 512}\n"
        "    llamacpp:\n"
        "      model_path: tiny.gguf\n"
        "      api_key_env: MY_KEY\n"
        "      extra_args: ['--api-key', 'sk-SUPERSECRET123', '--hf-token=hf_abcSECRET']\n",
    )
    for secret in ("sk-other", "sk-camel", "hf_nested", "SUPERSECRET", "hf_abcSECRET"):
        assert secret not in shown, shown
    assert "- --hf-token=***" in shown and "api_key: '***'" in shown
    assert "api_key_env: MY_KEY" in shown and "max_tokens: 512" in shown


def test_user_errors_are_one_line_without_traceback(subprocess_env: dict) -> None:
    for env, expected in (
        ({"LLM_PROFILE_NAME": "tiyn"}, "error: LLM PROFILE 'tiyn' not found in registry"),
        (
            {"LLAMACPP_CTX_SIZE_OVERRIDE": "big"},
            "error: invalid environment: LLAMACPP_CTX_SIZE_OVERRIDE='big'",
        ),
        ({"LLM_PROFILES_CONFIG_PATH": "/no/such.yaml"}, "error: llm_profiles.yaml not found"),
    ):
        done = cli({**subprocess_env, **env}, "run", timeout=30)
        assert done.returncode == 1
        assert done.stderr.startswith(expected), done.stderr
        assert "Traceback" not in done.stderr


def test_a_run_that_cannot_start_with_redis_gone_too_exits_with_its_error(
    subprocess_env: dict,
) -> None:
    """No Redis either: the failed start's report on the bus fails within its bounds and
    says so in one line; the start-up error is what the command ends with, exit status 1."""
    env = {
        **subprocess_env,
        "LLM_PROFILE_NAME": "tiyn",
        "ORION_BUS_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    done = cli(env, "run", timeout=60)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    assert any("could not tell the fleet of the failed start" in line for line in lines), lines
    assert lines[-1].startswith("error: LLM PROFILE 'tiyn' not found in registry"), lines
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("password", ["wrong-one", None], ids=["wrong", "none"])
def test_a_run_whose_redis_refuses_its_credentials_exits_saying_so(
    subprocess_env: dict, tmp_path: Path, password: str | None
) -> None:
    """A wrong or missing password was taken for a lost connection: the worker retried
    for good, its log saying "pub/sub connection lost", nothing naming ORION_BUS_URL."""
    server = RedisServer(tmp_path / "redis", extra_args=("--requirepass", "right-one")).start()
    try:
        auth = f":{password}@" if password else ""
        env = {**subprocess_env, "ORION_BUS_URL": f"redis://{auth}127.0.0.1:{server.port}/0"}
        done = cli(env, "run", timeout=60)
        doctor = cli(env, "doctor", timeout=60)
    finally:
        server.stop()
    assert done.returncode == 1, done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith(f"error: Redis at redis://{':***@' if password else ''}127.0.0.1:")
    assert "refused the credentials" in last and "ORION_BUS_URL" in last, last
    assert "wrong-one" not in done.stderr and "Traceback" not in done.stderr
    line = next(line for line in doctor.stdout.splitlines() if line.split()[1] == "redis")
    assert line.startswith("FAIL") and "fix the user name or password in ORION_BUS_URL" in line


SLOW_HELP = """#!/usr/bin/env bash
# llama-server whose --help takes 30 s (CUDA initialised on a host with many GPUs)
case " $* " in *" --help "*) sleep 30 ;; esac
exec "$REAL_LLAMA_SERVER" "$@"
"""


@pytest.mark.parametrize("signal_to", ["the_worker", "the_process_group"])
def test_a_stop_while_the_binary_is_probed_ends_the_start_and_the_probe_with_a_fake_slow_binary(
    subprocess_env: dict, tmp_path: Path, llama_server_bin: Path, signal_to: str
) -> None:
    """A SIGTERM while the worker reads llama-server's --help (before the worker is built)
    waited the probe out (up to 90 s: docs say a stop before the engine is ready ends the
    start at once). Ctrl-C reaches the whole process group, the probe included, which
    died of it: the stop was reported on the bus as a failed start, exit status 1. The
    probe's thread is not waited for, and its child was left running after the worker
    had gone (a minute where --help initialises CUDA): killed now, its own children
    too. A script stands in for a slow GPU host's llama-server, which cannot run here."""
    binary = tmp_path / "bin" / "llama-server"
    binary.parent.mkdir()
    binary.write_text(SLOW_HELP)
    binary.chmod(0o755)
    env = {**subprocess_env, "LLAMA_SERVER_BIN": str(binary)}
    env["REAL_LLAMA_SERVER"] = str(llama_server_bin)
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orion_llamaccp", "run"],
            env=env,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    probe: list[psutil.Process] = []
    try:

        def probing() -> bool:  # the script, and the sleep it runs
            probe[:] = psutil.Process(proc.pid).children(recursive=True)
            lines = [child.cmdline() for child in probe]
            return any("--help" in line for line in lines) and ["sleep", "30"] in lines

        wait_until(probing, timeout=30, what="the worker reading --help")
        if signal_to == "the_worker":
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(10) == 0, log.read_text()[-2000:]  # bounds the wait only
        assert "stopped before the worker was built" in log.read_text()
        assert "failed" not in log.read_text().lower(), log.read_text()[-2000:]
        # Bounds the wait only: killed before the worker's exit, reaped by whoever adopted
        # them since.
        wait_until(
            lambda: not any(pid_alive(child.pid) for child in probe),
            timeout=10,
            what="the probe's processes gone",
        )
    finally:
        for child in probe:  # left to run out, where the stop missed them
            with contextlib.suppress(psutil.Error):
                child.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_a_stop_while_redis_is_down_at_start_is_not_held_by_the_wait_to_subscribe(
    subprocess_env: dict, tmp_path: Path
) -> None:
    """Redis down as the worker starts: a SIGTERM during its wait for the subscription (up
    to 5 s, so that a request sent while the model is checked is heard) ends it at once,
    exit status 0. The wait used to run its course first."""
    log = tmp_path / "run.log"
    env = {**subprocess_env, "ORION_BUS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orion_llamaccp", "run"], env=env, stdout=out, stderr=out
        )
    try:
        wait_until(  # the worker is built: its wait for the subscription begins
            lambda: "engine stopped -> starting" in log.read_text(),
            timeout=30,
            what="the worker waiting for its subscription",
        )
        # Said as what it is, naming the setting: it said "pub/sub connection lost" for
        # ever, of a connection that never was.
        said = f"cannot reach Redis at {env['ORION_BUS_URL']} ("
        wait_until(lambda: said in log.read_text(), timeout=10, what="Redis said unreachable")
        assert "check ORION_BUS_URL" in log.read_text()
        assert "connection lost" not in log.read_text()
        proc.send_signal(signal.SIGTERM)
        # Bounds the wait only: the old wait for the subscription alone lasted 5 s.
        assert proc.wait(4) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_health_says_unhealthy_for_a_heartbeat_it_cannot_read(
    subprocess_env: dict, redis_url: str
) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        client.set("orion:llamacpp:alive:orion-llamaccp:w9", b"not json", ex=60)
        done = cli({**subprocess_env, "INSTANCE_ID": "w9"}, "health", timeout=30)
    finally:
        client.close()
    assert done.returncode == 1, done.stderr
    assert done.stdout.startswith("unhealthy: the heartbeat of orion-llamaccp w9 cannot be read")
    assert "Traceback" not in done.stderr


def test_run_reaches_health_and_stops_cleanly(
    subprocess_env: dict, tmp_path: Path, redis_url: str
) -> None:
    port = free_port()
    worker = WorkerProc(
        {**subprocess_env, "LLAMACPP_PORT_OVERRIDE": str(port)},
        name="cli",
        log_dir=tmp_path,
        redis_url=redis_url,
    ).start()
    try:
        worker.wait_ready()
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
        engine = worker.engine_pid()
        assert worker.terminate() == 0
        assert not pid_alive(engine)
        assert "engine draining -> stopped" in worker.log()
    finally:
        worker.close()


def test_sigkill_of_the_wrapper_leaves_no_llama_server(
    subprocess_env: dict, tmp_path: Path, redis_url: str
) -> None:
    env = {**subprocess_env, "LLAMACPP_PORT_OVERRIDE": str(free_port())}  # close() knows it
    worker = WorkerProc(env, name="doomed", log_dir=tmp_path, redis_url=redis_url).start()
    try:
        worker.wait_ready()
        engine = worker.engine_pid()
        worker.signal(signal.SIGKILL)
        wait_until(
            lambda: not pid_alive(engine), timeout=10, what="llama-server to die with its parent"
        )
    finally:
        worker.close()


def test_engine_only_run(subprocess_env: dict) -> None:
    port = free_port()
    env = {**subprocess_env, "LLAMACPP_PORT_OVERRIDE": str(port)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "orion_llamaccp", "run", "--engine-only"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"llama-server ready at http://127.0.0.1:{port}" in line
        pid = int(line.rsplit("pid ", 1)[1].rstrip(")\n"))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert not pid_alive(pid)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_engine_only_run_stops_at_a_signal_while_loading(
    subprocess_env: dict, llama_server_bin: Path
) -> None:
    """A Ctrl-C while llama-server loads (a minute of loading here, imitated) stops it
    and the command at once. It used to be heard only once the model was loaded."""
    env = {
        **subprocess_env,
        "LLAMA_SERVER_BIN": str(PRELUDE),
        "REAL_LLAMA_SERVER": str(llama_server_bin),
        "PRELUDE_LINES": "600",
        "PRELUDE_DELAY": "0.1",
        "PRELUDE_HELP_AT_ONCE": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "orion_llamaccp", "run", "--engine-only"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def serving() -> list[psutil.Process]:  # not the ``--help`` that the plan reads
            found = []
            for child in psutil.Process(proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):  # one that just ended (``--help``)
                    if "--port" in child.cmdline():
                        found.append(child)
            return found

        loading = wait_until(serving, timeout=30, what="llama-server loading")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        assert not any(pid_alive(child.pid) for child in loading)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_engine_only_run_exits_with_the_error_once_the_engine_failed(
    subprocess_env: dict, tmp_path: Path
) -> None:
    """With a crash limit of one, llama-server killed once fails the engine: the command
    ends with its error, so that whatever runs it (a container) can restart it. It used
    to wait for a signal with the engine dead."""
    env = {**subprocess_env, "ORION_LLAMACPP_CRASH_LIMIT": "1"}
    log = tmp_path / "stderr.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orion_llamaccp", "run", "--engine-only"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "llama-server ready at" in line, line
        os.kill(int(line.rsplit("pid ", 1)[1].rstrip(")\n")), signal.SIGKILL)
        assert proc.wait(30) == 1
        last = log.read_text().strip().splitlines()[-1]
        assert last.startswith("error: crash loop: 1 failures"), last
        assert "llama-server was killed by SIGKILL (not by us" in last, last
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bus_failures_are_one_line_without_traceback_or_password(subprocess_env: dict) -> None:
    secret = "s3cret-pass"
    bus = subprocess_env["ORION_BUS_URL"]  # a real Redis without a password; no worker
    wrong_password = bus.replace("redis://", f"redis://:{secret}@", 1)
    down = f"redis://:{secret}@127.0.0.1:{free_port()}/0"
    masked_down = down.replace(secret, "***")
    no_such_db = bus.rsplit("/", 1)[0] + "/99"
    for url, args, expected in (
        (bus, ("chat", "hi"), "error: no worker heard the request on orion:exec:request:"),
        (no_such_db, ("ps",), f"error: Redis at {no_such_db} refused a command: "),
        (no_such_db, ("chat", "hi"), f"error: Redis at {no_such_db} refused a command: "),
        (
            f"http://:{secret}@127.0.0.1:6379/0",
            ("ps",),
            "error: invalid environment: ORION_BUS_URL='<hidden>': Value error, must be a "
            "redis://, rediss:// or unix:// URL",
        ),
        (down, ("chat", "hi"), f"error: cannot reach Redis at {masked_down}: "),
        (down, ("ps",), f"error: cannot reach Redis at {masked_down}: "),
        (down, ("watch",), f"error: cannot reach Redis at {masked_down}: "),
        # Found out before the model loads, where ``demo`` used to wait without end.
        (down, ("demo",), f"error: cannot reach Redis at {masked_down}: "),
        (wrong_password, ("demo",), "error: Redis at redis://:***@"),
        (wrong_password, ("ps",), "error: Redis at redis://:***@"),
        (wrong_password, ("chat", "hi"), "error: Redis at redis://:***@"),
    ):
        done = cli({**subprocess_env, "ORION_BUS_URL": url}, *args, timeout=30)
        assert done.returncode == 1, (args, done.stderr)
        assert done.stderr.startswith(expected), (args, done.stderr)
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
        assert secret not in done.stdout + done.stderr


def test_profile_names_that_look_like_markup_are_listed_as_written(
    subprocess_env: dict, tmp_path: Path
) -> None:
    """A name like ``p[/x]`` was read as a closing tag: ``profiles`` ended in a traceback."""
    registry = tmp_path / "marked.yaml"
    registry.write_text(
        "profiles:\n"
        '  "p[/x]":\n    backend: llamacpp\n    model_id: "m[bold]"\n'
        "    llamacpp:\n      model_path: /tmp/x.gguf\n"
        '  "o[/y]":\n    backend: "v[/llm]"\n'
    )
    env = {**subprocess_env, "LLM_PROFILES_CONFIG_PATH": str(registry), "LLM_PROFILE_NAME": "p[/x]"}
    done = cli(env, "profiles", timeout=30)
    assert done.returncode == 0, done.stderr
    for text in ("p[/x] *", "m[bold]", "o[/y]", "v[/llm]"):
        assert text in done.stdout, done.stdout


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("watch", "--refresh", "0"), "--refresh: must be above 0"),
        (("chat", "hi", "--timeout", "-1"), "--timeout: must be above 0"),
        (("chat", "hi", "--max-tokens", "0"), "--max-tokens: must be above 0"),
        (("demo", "--max-tokens", "many"), "--max-tokens: not a number"),
    ],
)
def test_numbers_on_the_command_line_are_checked(
    subprocess_env: dict, args: tuple[str, ...], said: str
) -> None:
    """``watch --refresh 0`` redrew in a busy loop (a core at 100 %), ``chat --timeout -1``
    gave up at once, ``--max-tokens 0`` was taken for "unset"."""
    done = cli(subprocess_env, *args, timeout=30)
    assert done.returncode == 2 and said in done.stderr, done.stderr


def test_chat_exits_1_when_the_worker_answers_an_error_json_or_not(
    spawn_worker: SpawnWorker, subprocess_env: dict
) -> None:
    """A prompt longer than the worker's context is answered ``context_exceeded``: a
    script that runs ``chat`` (``--json`` or not) must see it fail by its exit status,
    not read exit status 0 as an answer."""
    spawn_worker(ctx=512, parallel=1)
    long = "word " * 2000
    plain = cli(subprocess_env, "chat", long, "--timeout", "30")
    assert plain.returncode == 1, plain.stderr
    assert "error: context_exceeded" in plain.stderr, plain.stderr
    as_json = cli(subprocess_env, "chat", long, "--timeout", "30", "--json")
    assert as_json.returncode == 1, as_json.stderr
    assert json.loads(as_json.stdout)["error"] == "context_exceeded", as_json.stdout


def test_show_hides_secrets_in_lists_and_under_a_key_named_password(
    subprocess_env: dict, tmp_path: Path
) -> None:
    """Another tool's settings beside ours may hold a list of entries, each with its own
    credentials (``tools: [{password: ...}]``): a secret one level down a list, or under
    a plain ``password`` key, was printed by ``show`` as written."""
    shown = shown_profiles(
        subprocess_env,
        tmp_path / "listed.yaml",
        "profiles:\n"
        "  tiny:\n"
        "    backend: llamacpp\n"
        "    tools:\n"
        "      - {name: search, apiKey: sk-listed-secret}\n"
        "      - {name: db, password: hunter2-listed}\n"
        "    llamacpp:\n"
        "      model_path: tiny.gguf\n",
    )
    assert "sk-listed" not in shown and "hunter2" not in shown, shown
    assert "name: search" in shown and "name: db" in shown, shown


def test_command_masks_the_api_key_in_its_json_and_its_shell_form(
    subprocess_env: dict, tmp_path: Path
) -> None:
    """``command`` is what an operator pastes into a ticket: the API key llama-server is
    given (through its environment) and a token in ``extra_args`` are shown masked, in
    ``--json`` as in the shell form."""
    registry = write_tiny_registry(
        tmp_path / "keyed.yaml",
        port=free_port(),
        extra="      api_key_env: MY_LLAMA_KEY\n      extra_args: ['--hf-token', 'hf_argSECRET']",
    )
    env = {
        **subprocess_env,
        "LLM_PROFILES_CONFIG_PATH": str(registry),
        "MY_LLAMA_KEY": "sk-envSECRET-123",
    }
    as_json = cli(env, "command", "--json")
    human = cli(env, "command")
    for done in (as_json, human):
        assert done.returncode == 0, done.stderr
        assert "sk-envSECRET" not in done.stdout and "hf_argSECRET" not in done.stdout
    out = json.loads(as_json.stdout)
    assert "LLAMA_API_KEY" in out["env"] and "--hf-token" in out["argv"], out


def test_show_hides_the_bus_password_written_out_in_another_tool_s_settings(
    subprocess_env: dict, tmp_path: Path
) -> None:
    """Another tool's settings beside ours may spell out the bus URL under a key named
    like no secret (``redis_url``): ``show`` printed the bus password in it."""
    secret = "pw-bus-SECRET9"
    shown = shown_profiles(
        {**subprocess_env, "ORION_BUS_URL": f"redis://:{secret}@127.0.0.1:{free_port()}/0"},
        tmp_path / "bus.yaml",
        "profiles:\n"
        "  tiny:\n"
        "    backend: llamacpp\n"
        f"    queue: {{redis_url: 'redis://:{secret}@redis:6379/0'}}\n"
        "    llamacpp:\n"
        "      model_path: tiny.gguf\n",
    )
    assert secret not in shown and "redis://:***@redis:6379/0" in shown


def test_a_folder_given_as_the_model_path_is_said_to_be_one(
    subprocess_env: dict, tmp_path: Path
) -> None:
    """``LLAMACPP_MODEL_PATH_OVERRIDE=/models``, the folder the GGUF is in: doctor said it
    was "missing" (and to copy the GGUF "to /models"), ``run`` and ``fetch`` to remove
    it. It is a folder; the variable names the file itself, and what the folder holds
    says which."""
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "tiny.gguf").touch()
    env = {**subprocess_env, "LLAMACPP_MODEL_PATH_OVERRIDE": str(folder)}
    doctor = cli(env, "doctor")
    line = next(line for line in doctor.stdout.splitlines() if line.split()[1] == "model")
    said = f"{folder} is a folder, not a GGUF file (it holds tiny.gguf): "
    assert line.startswith("FAIL") and said in line, line
    assert "LLAMACPP_MODEL_PATH_OVERRIDE names the model file itself" in line, line
    assert "missing" not in line and doctor.returncode == 1, line
    shown = cli(env, "command")
    assert "(a folder, not a GGUF file (it holds tiny.gguf)" in shown.stdout, shown.stdout
    fetched = cli(env, "fetch")
    assert fetched.returncode == 1, fetched.stderr
    last = fetched.stderr.splitlines()[-1]
    assert last.startswith(f"error: model {said}") and "remove it" not in last, last


def test_the_model_path_override_expands_home_and_variables_as_model_root_does(
    subprocess_env: dict, tmp_path: Path, tiny_model: Path
) -> None:
    """``~`` was expanded in ``LLAMACPP_MODEL_PATH_OVERRIDE``, ``${HOME}`` was not: from
    a file no shell reads (``.env``, compose's env_file) the worker looked for a file
    named ``${HOME}/...`` under model_root. Both are expanded, as in a profile's
    model_root; ``$HOME`` is refused there and here alike, saying how to write it."""
    home = tmp_path / "home"
    (home / "m").mkdir(parents=True)
    shutil.copy(tiny_model, home / "m" / "tiny.gguf")
    env = {**subprocess_env, "HOME": str(home), "MODELS": str(home / "m")}
    for written in ("~/m/tiny.gguf", "${HOME}/m/tiny.gguf", "${MODELS}/tiny.gguf"):
        done = cli({**env, "LLAMACPP_MODEL_PATH_OVERRIDE": written}, "command", "--json")
        assert done.returncode == 0, done.stderr
        argv = json.loads(done.stdout)["argv"]
        assert argv[1:3] == ["--model", str(home / "m" / "tiny.gguf")], (written, argv)
    env_file = tmp_path / "service.env"
    env_file.write_text("LLAMACPP_MODEL_PATH_OVERRIDE=$HOME/m/tiny.gguf\n")
    done = cli({**env, "ORION_LLAMACPP_ENV_FILE": str(env_file)}, "command")
    assert done.returncode == 1, done.stdout
    assert done.stderr.startswith(
        f"error: LLAMACPP_MODEL_PATH_OVERRIDE (set in {env_file}): '$HOME/m/tiny.gguf' has "
        "'$HOME', which is not expanded: write ${HOME}"
    ), done.stderr


def test_json_commands_fail_in_json_on_stdout(
    subprocess_env: dict, tmp_path: Path, tiny_model: Path
) -> None:
    """``verify --json`` printed its rows as JSON, and its errors as an ``error:`` line on
    stderr, nothing on stdout: a script parsing stdout choked on an empty document. An
    error with ``--json`` is JSON on stdout now (a failed chat result's shape: an
    ``error`` code and ``details.message``), with exit status 1; without it, text still."""
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_model.read_bytes()[:4096])
    ok = cli(subprocess_env, "verify", str(tiny_model), "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)[0]["path"] == str(tiny_model)
    down = {**subprocess_env, "ORION_BUS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    for env, args, code, said in (
        (subprocess_env, ("verify", str(cut)), "model_corrupt", f"{cut} is not a usable GGUF"),
        (subprocess_env, ("verify", "tiyn"), "profile_not_found", "LLM PROFILE 'tiyn'"),
        (
            {**subprocess_env, "LLAMACPP_CTX_SIZE_OVERRIDE": "big"},
            ("verify",),
            "config_error",
            "invalid environment: LLAMACPP_CTX_SIZE_OVERRIDE='big'",
        ),
        (down, ("ps",), "redis_unreachable", "cannot reach Redis at redis://127.0.0.1:"),
    ):
        done = cli(env, *args, "--json", timeout=30)
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        out = json.loads(done.stdout)
        assert out["error"] == code and said in out["details"]["message"], (args, out)
        assert done.stderr == "", (args, done.stderr)
        plain = cli(env, *args, timeout=30)
        assert plain.returncode == 1 and plain.stdout == "", (args, plain.stdout)
        assert plain.stderr.startswith("error: ") and said in plain.stderr, plain.stderr


def test_a_redis_that_quotes_the_password_back_has_it_hidden_in_the_error(
    subprocess_env: dict, tmp_path: Path
) -> None:
    """A real Redis with AUTH renamed away (hardening) answers our AUTH "unknown command
    'AUTH', with args beginning with: '<password>'": the bus password inside the error
    text itself, not only in the URL the line names. ``run_bus`` prints that text, and
    only its redaction keeps the password (as written and percent-decoded) out of it."""
    server = RedisServer(tmp_path / "redis", extra_args=("--rename-command", "AUTH", "")).start()
    try:
        url = f"redis://:s3cret%3Bpass@127.0.0.1:{server.port}/0"
        env = {**subprocess_env, "ORION_BUS_URL": url}
        runs = [cli(env, *args, timeout=30) for args in (("ps",), ("chat", "hi"), ("watch",))]
    finally:
        server.stop()
    for done in runs:
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith("error: Redis at redis://:***@127.0.0.1:"), done.stderr
        assert "unknown command 'AUTH', with args beginning with: '***'" in done.stderr
        said = done.stdout + done.stderr
        assert "s3cret" not in said and "Traceback" not in said, said


def test_sigusr1_logs_the_asyncio_tasks_and_sigusr2_writes_every_thread_s_stack(
    spawn_worker: SpawnWorker,
) -> None:
    """What an operator has to look inside a worker that seems stuck, without stopping it:
    SIGUSR1 logs every asyncio task and where it waits (the event loop runs that dump);
    SIGUSR2 has the interpreter write every thread's stack from its own signal handler,
    which comes where the loop itself is stuck. (SIGUSR2's default is to end the process:
    a worker that had not registered it died of it.)"""
    worker = spawn_worker()
    worker.signal(signal.SIGUSR1)
    wait_until(lambda: "asyncio tasks:" in worker.log(), timeout=30, what="the task dump")
    assert "--- " in worker.log().split("asyncio tasks:", 1)[1]
    worker.signal(signal.SIGUSR2)
    wait_until(lambda: "most recent call first" in worker.log(), timeout=30, what="the stacks")
    stacks = worker.log().split("most recent call first", 1)[1]
    assert "orion_llamaccp" in stacks, stacks[:2000]  # the main thread, in the worker's loop
    assert worker.proc is not None and worker.proc.poll() is None
    assert worker.wait_ready()["state"] == "ready"


async def test_the_stop_signals_are_installed_where_stderr_has_no_file_descriptor(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """In the same process as something that replaced ``sys.stderr`` (here pytest's
    capture: an object without a file descriptor) SIGUSR2's stack dump cannot be
    registered; that must not fail the start: the stop signals are installed anyway."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    install_stop_signals(stop)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), 10)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
