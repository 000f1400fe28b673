"""What a profile may say, value by value: each refusal one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from orion_llamaccp.errors import ConfigError
from orion_llamaccp.model.paths import main_model_path
from orion_llamaccp.profiles.models import expand_path
from orion_llamaccp.profiles.registry import load_registry, parse_profile


def problem(tmp_path: Path, profile: str) -> str:
    """The one-line problem of profile ``p``, written as ``profile`` (indented by 4)."""
    path = tmp_path / "llm_profiles.yaml"
    path.write_text(f"profiles:\n  p:\n    backend: llamacpp\n{profile}")
    said = load_registry(path).problems.get("p", "")
    assert said and "\n" not in said, said
    return said


def llamacpp(tmp_path: Path, knobs: str) -> str:
    return problem(tmp_path, f"    llamacpp: {{{knobs}}}\n")


@pytest.mark.parametrize(
    ("item", "kind"),
    [
        ("{--api-key: sk-LEAKED-123}", "a mapping"),
        ("null", "empty (null)"),
        ("yes", "a boolean"),
        ("[--api-key, sk-LEAKED-123]", "a list"),
    ],
)
def test_an_extra_args_item_that_is_not_a_string_or_number_is_refused_unrepeated(
    tmp_path: Path, item: str, kind: str
) -> None:
    """A mapping became its Python text ("{'--api-key': 'sk-...'}"), shown by ``show``,
    ``command`` and the announcement; null became the argument "None"."""
    said = llamacpp(tmp_path, f"extra_args: [--jinja, {item}]")
    assert said.startswith(f"profiles.p.llamacpp.extra_args: item 2 is {kind}"), said
    assert "LEAKED" not in said and "None" not in said, said


def test_extra_args_numbers_become_text(tmp_path: Path) -> None:
    path = tmp_path / "llm_profiles.yaml"
    path.write_text("profiles:\n  p:\n    llamacpp: {extra_args: [--cache-reuse, 256, 0.5]}\n")
    assert load_registry(path).select("p").llamacpp.extra_args == ("--cache-reuse", "256", "0.5")


@pytest.mark.parametrize(
    ("knob", "block"),
    [
        ("ctx_size: 99999", "llamacpp"),
        ("n_gpu_layers: 80", "llamacpp"),
        ("n_parallel: 2", "llamacpp"),
        ("ctx-size: 4096", "llamacpp"),
        ("device_ids: [0, 1]", "gpu"),
        ("num_gpus: 2", "gpu"),
    ],
)
def test_a_knob_written_beside_its_block_is_refused(tmp_path: Path, knob: str, block: str) -> None:
    """Profile-level keys of other tools (``notes``) are kept, but a knob of ours there
    was silently ignored: ``ctx_size: 99999`` beside ``llamacpp:`` did nothing."""
    said = problem(tmp_path, f"    notes: kept\n    {knob}\n    llamacpp: {{port: 8080}}\n")
    key = knob.split(":")[0]
    assert said == (
        f"profiles.p: '{key}' belongs under {block}:, not beside it, where it does nothing"
    )


@pytest.mark.parametrize("root", ["$LLM_CACHE_DIR/gguf", "${X:/fb}", "${X-fb}", "${X:-${Y}}"])
def test_a_dollar_that_is_not_a_braced_variable_is_refused(tmp_path: Path, root: str) -> None:
    """These were kept as written: a relative path, looked for (and downloaded into)
    wherever the worker was started."""
    said = llamacpp(tmp_path, f'model_root: "{root}"')
    assert said.startswith(f"profiles.p.llamacpp.model_root: {root!r} has '$"), said
    assert "which is not expanded: write ${" in said, said
    with pytest.raises(ConfigError, match="which is not expanded"):
        expand_path(root, {"LLM_CACHE_DIR": "/cache", "X": "/x", "Y": "/y"})


def test_a_variable_in_model_path_is_expanded_as_in_model_root(tmp_path: Path) -> None:
    """``model_path`` was taken as written: ``${LLM_CACHE_DIR}/m.gguf`` became a folder
    named ``${LLM_CACHE_DIR}`` under the working directory. A ``$`` that is not a braced
    variable is refused, as in ``model_root``."""
    env = {"LLM_CACHE_DIR": str(tmp_path), "SUB": "gguf"}
    profile = parse_profile(
        "p", {"llamacpp": {"model_root": "${LLM_CACHE_DIR}", "model_path": "${SUB}/m.gguf"}}
    )
    assert main_model_path(profile, None, env)[0] == tmp_path / "gguf" / "m.gguf"
    absolute = parse_profile(
        "p",
        {"llamacpp": {"model_root": "${LLM_CACHE_DIR}", "model_path": "${LLM_CACHE_DIR}/m.gguf"}},
    )
    assert main_model_path(absolute, None, env)[0] == tmp_path / "m.gguf"
    said = llamacpp(tmp_path, 'model_path: "$LLM_CACHE_DIR/m.gguf"')
    assert said.startswith("profiles.p.llamacpp.model_path: '$LLM_CACHE_DIR/m.gguf' has"), said


@pytest.mark.parametrize(
    ("block", "knob"),
    [
        ("llamacpp", "ctx_size: on"),
        ("llamacpp", "parallel: yes"),
        ("llamacpp", "n_gpu_layers: no"),
        ("llamacpp", "port: true"),
        ("llamacpp", "temperature: on"),
        ("gpu", "num_gpus: yes"),
    ],
)
def test_a_yaml_boolean_is_not_a_number(tmp_path: Path, block: str, knob: str) -> None:
    """YAML reads ``on`` as True and pydantic took it as 1: ``ctx_size: on`` was 1."""
    said = problem(tmp_path, f"    {block}: {{{knob}}}\n")
    key = knob.split(":")[0]
    assert said.startswith(f"profiles.p.{block}.{key}: is a YAML boolean"), said
    assert said.endswith("not a number: write a number"), said


def test_a_boolean_still_switches_flash_attn(tmp_path: Path) -> None:
    path = tmp_path / "llm_profiles.yaml"
    path.write_text("profiles:\n  p:\n    llamacpp: {flash_attn: on, ctx_size: 2048}\n")
    assert load_registry(path).select("p").llamacpp.flash_attn == "on"


def test_off_written_bare_switches_off(tmp_path: Path) -> None:
    """YAML reads a bare ``off`` or ``no`` as false: a feature turned off must stay off,
    not come back as llama-server's ``on``."""
    path = tmp_path / "llm_profiles.yaml"
    path.write_text("profiles:\n  p:\n    llamacpp: {flash_attn: off, reasoning: no}\n")
    knobs = load_registry(path).select("p").llamacpp
    assert (knobs.flash_attn, knobs.reasoning) == ("off", "off")


@pytest.mark.parametrize("written", ['"3,1"', '"3/1"', '"3 1"', "[3, 1]"])
def test_tensor_split_is_read_in_each_form_llama_cpp_takes(tmp_path: Path, written: str) -> None:
    path = tmp_path / "llm_profiles.yaml"
    path.write_text(f"profiles:\n  p:\n    llamacpp: {{tensor_split: {written}}}\n")
    assert load_registry(path).select("p").llamacpp.tensor_split == (3.0, 1.0)


def test_a_negative_gpu_id_is_refused(tmp_path: Path) -> None:
    """``device_ids: [-1]`` became CUDA_VISIBLE_DEVICES=-1, which hides every GPU: the GPU
    profile served on the CPU, many times slower, without a word."""
    said = problem(tmp_path, "    gpu: {device_ids: [-1]}\n")
    assert said.startswith("profiles.p.gpu.device_ids"), said


def test_a_sampling_value_out_of_its_range_is_refused(tmp_path: Path) -> None:
    said = llamacpp(tmp_path, "top_p: 1.5")
    assert said.startswith("profiles.p.llamacpp.top_p"), said


def test_parallel_and_its_alias_n_parallel_together_are_refused_clearly(
    tmp_path: Path,
) -> None:
    """It said "n_parallel: unknown key (did you mean 'n_parallel'?)"."""
    said = llamacpp(tmp_path, "parallel: 4, n_parallel: 1")
    assert said == (
        "profiles.p.llamacpp: parallel and n_parallel are one setting (n_parallel is "
        "another name for parallel): keep only one of them"
    )


@pytest.mark.parametrize(
    ("repo", "file"),
    [("mmproj_repo_id", "mmproj_filename"), ("hf_draft_repo_id", "hf_draft_filename")],
)
def test_a_repo_for_the_mmproj_or_the_draft_without_its_file_is_refused(
    tmp_path: Path, repo: str, file: str
) -> None:
    """Nothing was planned, downloaded or passed to llama-server for it, without a word."""
    said = llamacpp(tmp_path, f"hf_repo_id: org/m, hf_filename: m.gguf, {repo}: org/x")
    assert said == (
        f"profiles.p.llamacpp: {repo} names the repo to take a file from, but {file} is "
        f"not set, so nothing is taken from it: set {file} (the file's name in that repo), "
        f"or remove {repo}"
    )


@pytest.mark.parametrize("host", ['""', '"  "', '" 0.0.0.0"', '"my host"'])
def test_an_empty_host_or_one_with_spaces_is_refused(tmp_path: Path, host: str) -> None:
    """``host: ""`` made ``--host ",/tmp/....sock"``; ``my host`` passed as it stood."""
    said = llamacpp(tmp_path, f"host: {host}")
    assert said.startswith("profiles.p.llamacpp.host: is empty or has spaces in it"), said


@pytest.mark.parametrize("host", ['"127.0.0.1:8080"', '"http://0.0.0.0"'])
def test_a_host_with_a_port_or_a_scheme_is_refused(tmp_path: Path, host: str) -> None:
    """``host: "127.0.0.1:8080"`` was valid; `run` then ended in a traceback (httpx's
    "Invalid IPv6 address: '[127.0.0.1:8080]'")."""
    said = llamacpp(tmp_path, f"host: {host}")
    assert said.startswith("profiles.p.llamacpp.host: "), said
    assert "the port goes in llamacpp.port" in said, said


@pytest.mark.parametrize("host", ['"::1"', '"0.0.0.0"', '"llama.internal"'])
def test_a_host_of_an_ipv6_address_or_a_name_is_taken(tmp_path: Path, host: str) -> None:
    path = tmp_path / "llm_profiles.yaml"
    path.write_text(f"profiles:\n  p:\n    llamacpp: {{host: {host}}}\n")
    assert load_registry(path).select("p").llamacpp.host == host.strip('"')


def test_a_gpu_listed_twice_is_refused(tmp_path: Path) -> None:
    """``device_ids: [0, 0]`` made CUDA_VISIBLE_DEVICES=0,0."""
    said = problem(tmp_path, "    gpu: {device_ids: [1, 0, 1]}\n")
    assert said == "profiles.p.gpu.device_ids: GPU 1 is listed more than once: list each GPU once"


@pytest.mark.parametrize("pasted", ["123456789012", "[sk-live-4f9a77]"])
def test_a_key_pasted_as_a_number_or_a_list_is_refused_unrepeated(
    tmp_path: Path, pasted: str
) -> None:
    """``api_key_env`` given the key itself, which YAML read as a number or a list: the
    type error quoted it, in every log of every worker sharing the registry."""
    said = llamacpp(tmp_path, f"api_key_env: {pasted}")
    assert said.startswith("profiles.p.llamacpp.api_key_env"), said
    assert "not repeated" in said
    assert "123456789012" not in said and "4f9a77" not in said
