"""Settings: blank means unset, a bad value names its variable, secrets stay hidden."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orion_llamaccp.errors import ConfigError
from orion_llamaccp.settings import ENV_FILE_VARIABLE, Settings, load_settings, unread_variables


@pytest.mark.parametrize("blank", ["", " ", "  \t"])
def test_blank_overrides_are_unset(monkeypatch: pytest.MonkeyPatch, blank: str) -> None:
    """Spaces count as blank too: ``CUDA_VISIBLE_DEVICES_OVERRIDE=" "`` hid every GPU
    (llama-server ran on the CPU), ``LLAMACPP_PORT_OVERRIDE=" "`` stopped start-up."""
    for name in (
        "LLAMACPP_CTX_SIZE_OVERRIDE",
        "LLAMACPP_N_GPU_LAYERS_OVERRIDE",
        "LLAMACPP_PORT_OVERRIDE",
        "LLAMACPP_HOST_OVERRIDE",
        "LLAMACPP_MODEL_PATH_OVERRIDE",
        "CUDA_VISIBLE_DEVICES_OVERRIDE",
        "LLM_PROFILE_NAME",
    ):
        monkeypatch.setenv(name, blank)
    settings = load_settings()
    assert settings.overrides.host is None and settings.overrides.model_path is None
    assert settings.overrides.ctx_size is None
    assert settings.overrides.n_gpu_layers is None
    assert settings.overrides.port is None
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


@pytest.mark.parametrize(
    ("url", "password", "display"),
    [
        ("redis://redis.internal:6379/0?password=s3cretpw", "s3cretpw",
         "redis://redis.internal:6379/0?password=***"),
        ("redis://default:p%40ssw0rd@redis.internal:6379/0", "p@ssw0rd",
         "redis://default:***@redis.internal:6379/0"),
        # As redis-py decodes a query's value: what it sends, and may quote, is "p@ss w0rd".
        ("redis://h:6379/0?password=p%40ss+w0rd", "p@ss w0rd", "redis://h:6379/0?password=***"),
        # Four characters, the shortest redacted (shorter would mask words at random):
        ("redis://:abcd@redis.internal:6379/0", "abcd", "redis://:***@redis.internal:6379/0"),
    ],
)  # fmt: skip
def test_bus_password_in_the_query_or_url_encoded_is_masked_and_redacted(
    monkeypatch: pytest.MonkeyPatch, url: str, password: str, display: str
) -> None:
    monkeypatch.setenv("ORION_BUS_URL", url)
    settings = load_settings()
    assert settings.bus_url_display == display
    assert password in settings.secrets()
    assert settings.redact(f"AUTH {password} failed") == "AUTH *** failed"


@pytest.mark.parametrize(
    "url", ["redis://:Zm9v/YmFy+cXV4==@127.0.0.1:6399/0", "redis://:pa#ss9876@h:1/0",
            "redis://user/x:pw9876@h:1/0"],
)  # fmt: skip
def test_a_bus_url_whose_password_cuts_it_short_is_refused_without_showing_it(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    """A raw ``/``, ``?`` or ``#`` in the password ends the URL's host part there: the
    password was neither masked nor redacted, and redis-py's error ("Port could not be
    cast to integer value as 'Zm9v'") printed it. It is refused, and neither the refusal
    nor its value shows it."""
    monkeypatch.setenv("ORION_BUS_URL", url)
    with pytest.raises(ConfigError) as refused:
        load_settings()
    message = str(refused.value)
    assert "ORION_BUS_URL" in message and "percent-encode" in message
    assert not any(part in message for part in ("Zm9v", "YmFy", "pa#ss", "9876"))


@pytest.mark.parametrize("cut", ["/", "?", "#"])
def test_a_bus_password_with_a_raw_at_sign_and_a_cut_is_refused_without_showing_it(
    monkeypatch: pytest.MonkeyPatch, cut: str
) -> None:
    """A raw ``@`` before the raw ``/``, ``?`` or ``#`` left a user part in the host part
    (``:p@ss``), so the URL was taken as readable: the password's first piece (``p``) was
    masked and the rest (``ss/word9876``) shown after the mask and in redis-py's error
    ("Error -2 connecting to ss:6379")."""
    monkeypatch.setenv("ORION_BUS_URL", f"redis://:p@ss{cut}word9876@127.0.0.1:6399/0")
    with pytest.raises(ConfigError) as refused:
        load_settings()
    message = str(refused.value)
    assert "ORION_BUS_URL" in message and "percent-encode" in message
    assert "word9876" not in message and "ss" + cut not in message


def test_a_bus_url_whose_port_is_not_a_number_is_told_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """It was told to percent-encode its password, which was fine."""
    monkeypatch.setenv("ORION_BUS_URL", "redis://:s3cret@127.0.0.1:abc/0")
    with pytest.raises(ConfigError) as refused:
        load_settings()
    message = str(refused.value)
    assert "its port is not a number" in message and "percent-encode" not in message
    assert "s3cret" not in message


def test_a_raw_at_sign_in_the_bus_password_is_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORION_BUS_URL", "redis://:p@ssw0rd@redis.internal:6379/0")
    settings = load_settings()
    assert settings.bus_url_display == "redis://:***@redis.internal:6379/0"
    assert settings.redact("AUTH p@ssw0rd") == "AUTH ***"


def test_secrets_are_stripped_and_redacted_in_their_escaped_form(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh\n")  # a secret mounted from a file
    monkeypatch.setenv("ORION_BUS_URL", "redis://:pässw\\rd@redis.internal:6379/0\n")
    settings = load_settings()
    assert settings.hf_token is not None
    assert settings.hf_token.get_secret_value() == "hf_abcdefgh"
    assert settings.bus_url.get_secret_value().endswith("/0")
    for text in (repr("pässw\\rd"), ascii("pässw\\rd"), repr("pässw\\rd".encode())):
        assert "ss" not in settings.redact(text)
    monkeypatch.setenv("HF_TOKEN", " \n")
    assert load_settings().hf_token is None


def test_overrides_are_read_from_the_dotenv_file_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text(
        "LLM_PROFILE_NAME=qwen\nLLAMACPP_PORT_OVERRIDE=9999\nLLAMACPP_CTX_SIZE_OVERRIDE=\n"
        "LLAMACPP_THREADS_OVERRIDE=\"  \"\nCUDA_VISIBLE_DEVICES_OVERRIDE=' '\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_FILE_VARIABLE)  # the tests' own setting: no .env at all
    settings = load_settings()
    assert settings.profile_name == "qwen"
    assert settings.overrides.port == 9999
    assert settings.overrides.ctx_size is None  # blank still means unset
    # ... and quoted spaces, as the README says of spaces (a number's were "unable to parse")
    assert (settings.overrides.threads, settings.overrides.cuda_visible_devices) == (None, None)
    monkeypatch.setenv("LLAMACPP_PORT_OVERRIDE", "8081")  # the environment wins
    assert load_settings().overrides.port == 8081
    # Blank in the environment, spaces as "": unset there, so .env's value applies (spaces
    # skipped .env for the built-in default profile and port).
    for blank in ("", "  "):
        monkeypatch.setenv("LLM_PROFILE_NAME", blank)
        monkeypatch.setenv("LLAMACPP_PORT_OVERRIDE", blank)
        settings = load_settings()
        assert (settings.profile_name, settings.overrides.port) == ("qwen", 9999), repr(blank)


def test_variables_the_registry_names_are_read_from_the_dotenv_file_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A profile's ``api_key_env`` (and a ``${VAR}`` in its model_root) set only in
    ``.env``, as the README says a host run may: it was "empty or unset"."""
    (tmp_path / ".env").write_text("MY_LLAMA_KEY=from-the-file\nMODELS=/srv/m\nBLANK=\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_FILE_VARIABLE)
    monkeypatch.setenv("MODELS", "/env/wins")

    environ = load_settings().environ()

    assert environ["MY_LLAMA_KEY"] == "from-the-file"
    assert environ["MODELS"] == "/env/wins"
    assert environ["BLANK"] == ""


def test_the_dotenv_file_can_be_named_or_left_out(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``ORION_LLAMACPP_ENV_FILE``: another file than ``./.env``, or none (empty). The
    tests leave it out: deployment.md has a ``.env`` made in the repo for compose, and
    with the tests run from the repo it gave every test and worker its bus URL and node
    name (``redis://redis:6379``: nothing answers there)."""
    (tmp_path / ".env").write_text("LLM_PROFILE_NAME=qwen\n")
    (tmp_path / "other.env").write_text("LLM_PROFILE_NAME=gemma\nLLAMACPP_PORT_OVERRIDE=9999\n")
    monkeypatch.chdir(tmp_path)
    default = Settings.model_fields["profile_name"].default
    assert load_settings().profile_name == default  # set empty by the tests' conftest
    monkeypatch.setenv(ENV_FILE_VARIABLE, str(tmp_path / "other.env"))
    settings = load_settings()
    assert (settings.profile_name, settings.overrides.port) == ("gemma", 9999)
    monkeypatch.setenv(ENV_FILE_VARIABLE, str(tmp_path / "missing.env"))
    with pytest.raises(ConfigError, match=r"missing\.env: not a file"):
        load_settings()
    monkeypatch.delenv(ENV_FILE_VARIABLE)
    assert load_settings().profile_name == "qwen"
    assert unread_variables({ENV_FILE_VARIABLE: ""}) == []


def test_a_request_may_not_cost_as_many_crashes_as_the_worker_survives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ORION_LLAMACPP_REQUEST_CRASH_LIMIT", "5")
    with pytest.raises(ConfigError, match="REQUEST_CRASH_LIMIT \\(5\\) must be below"):
        load_settings()
    monkeypatch.setenv("ORION_LLAMACPP_CRASH_LIMIT", "6")
    assert load_settings().request_crash_limit == 5
    monkeypatch.setenv("ORION_LLAMACPP_CRASH_LIMIT", "1")  # the first death fails it anyway
    assert load_settings().engine_crash_limit == 1


def test_spaces_around_an_override_are_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A quoted value in ``.env`` or compose: numbers were read through the spaces, text
    was not (a host of " 0.0.0.0 " went to llama-server, a model path of " /m.gguf "
    became a file under model_root, " all " GPU layers was refused)."""
    monkeypatch.setenv("LLAMACPP_HOST_OVERRIDE", " 0.0.0.0 ")
    monkeypatch.setenv("LLAMACPP_MODEL_PATH_OVERRIDE", " /models/m.gguf\t")
    monkeypatch.setenv("LLAMACPP_N_GPU_LAYERS_OVERRIDE", " all ")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES_OVERRIDE", " 0,1 ")
    monkeypatch.setenv("LLM_PROFILE_NAME", " tiny ")
    settings = load_settings()
    overrides = settings.overrides
    assert (overrides.host, overrides.model_path) == ("0.0.0.0", "/models/m.gguf")
    assert (overrides.n_gpu_layers, overrides.cuda_visible_devices) == ("all", "0,1")
    assert settings.profile_name == "tiny"


@pytest.mark.parametrize(
    ("endpoint", "shown"),
    [
        ("hf-mirror.example.com", "'hf-mirror.example.com'"),
        ("ftp://hf-mirror.example.com", "'ftp://hf-mirror.example.com'"),
        ("https:///mirror", "'https:///mirror'"),  # no host
        ("user:s3cretpw@hf-mirror.example.com", "'<hidden"),
    ],
)
def test_a_hub_endpoint_that_is_not_an_http_url_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, endpoint: str, shown: str
) -> None:
    """Without its scheme, every download request failed as a network error and was
    retried until the download deadline (10 minutes a file)."""
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    with pytest.raises(ConfigError) as err:
        load_settings()
    message = str(err.value)
    assert f"HF_ENDPOINT={shown}" in message and "http:// or https:// URL" in message
    assert "s3cretpw" not in message
    monkeypatch.setenv("HF_ENDPOINT", " https://hf-mirror.example.com ")
    assert load_settings().hf_endpoint == "https://hf-mirror.example.com"


@pytest.mark.parametrize("variable", ["HF_ENDPOINT", "ORION_LLAMACPP_ADVERTISE_URL"])
def test_a_hub_or_advertised_url_whose_password_cuts_it_short_is_refused_without_showing_it(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    """As the bus URL's: a raw ``/`` in a mirror's password ended the host part there, so
    the password was neither masked nor redacted, and the download failed on "Invalid
    port: 'se'", part of it, in the error sent to the bus."""
    monkeypatch.setenv(variable, "https://bot:se/cret9@hf-mirror.example.com")
    with pytest.raises(ConfigError) as refused:
        load_settings()
    message = str(refused.value)
    assert variable in message and "percent-encode" in message
    assert "se/" not in message and "cret9" not in message


def test_the_advertised_engine_url_must_be_a_url_and_its_password_is_a_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ORION_LLAMACPP_ADVERTISE_URL", "atlas:8080")
    with pytest.raises(ConfigError, match="other hosts reach llama-server at"):
        load_settings()
    monkeypatch.setenv("ORION_LLAMACPP_ADVERTISE_URL", " http://user:pa55word@atlas:8080/ ")
    settings = load_settings()
    assert settings.engine_advertise_url == "http://user:pa55word@atlas:8080"
    assert "pa55word" not in settings.redact(settings.engine_advertise_url)


@pytest.mark.parametrize("value", ["pubsub,strem", ",", "pubsub;stream"])
def test_a_transport_that_does_not_exist_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """A misspelt intake was dropped without a word (the worker served the other one, or
    none, and still announced its stream)."""
    monkeypatch.setenv("ORION_LLAMACPP_TRANSPORTS", value)
    with pytest.raises(ConfigError, match=r"ORION_LLAMACPP_TRANSPORTS.*one of pubsub, stream"):
        load_settings()


def test_transports_are_read_with_spaces_and_repeats_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ORION_LLAMACPP_TRANSPORTS", " stream , pubsub,stream ")
    assert load_settings().transports == "stream,pubsub"


@pytest.mark.parametrize("value", ["verbose", "BASIC_FORMAT"])
def test_a_log_level_logging_does_not_know_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """``verbose`` ran at INFO without a word; ``BASIC_FORMAT``, a constant of the logging
    module, crashed the command with a traceback."""
    monkeypatch.setenv("LOG_LEVEL", value)
    with pytest.raises(ConfigError, match=r"LOG_LEVEL=.*must be one of CRITICAL, .*DEBUG"):
        load_settings()
    for given, read in ((" debug ", "DEBUG"), ("warn", "WARNING"), ("FATAL", "CRITICAL")):
        monkeypatch.setenv("LOG_LEVEL", given)  # logging's own aliases, as it reads them
        assert load_settings().log_level == read


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CUDA_VISIBLE_DEVICES_OVERRIDE", "abc"),
        ("CUDA_VISIBLE_DEVICES_OVERRIDE", "0,,1"),
        ("CUDA_VISIBLE_DEVICES_OVERRIDE", "0;1"),
        ("CUDA_VISIBLE_DEVICES_OVERRIDE", "1x"),
        ("CUDA_VISIBLE_DEVICES_OVERRIDE", "-2"),
        ("LLAMACPP_HOST_OVERRIDE", "my host"),
    ],
)
def test_an_override_llama_server_or_cuda_cannot_use_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """``abc`` went to CUDA as it stood (which then hides every GPU: the model served on
    the CPU without a word); ``my host`` became ``--host 'my host,...'``."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=f"{name}="):
        assert load_settings().overrides is None  # never reached: reading them raises


@pytest.mark.parametrize("value", ["127.0.0.1:8080", "http://0.0.0.0", "localhost:8081"])
def test_a_host_override_with_a_port_or_a_scheme_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """``127.0.0.1:8080`` passed, `validate` said ok, `command` showed ``--host
    127.0.0.1:8080,...``, and `run` ended in a traceback (httpx.InvalidURL: Invalid IPv6
    address '[127.0.0.1:8080]'), before it said anything on the bus."""
    monkeypatch.setenv("LLAMACPP_HOST_OVERRIDE", value)
    with pytest.raises(ConfigError, match=r"LLAMACPP_HOST_OVERRIDE=.*LLAMACPP_PORT_OVERRIDE"):
        assert load_settings().overrides is None  # never reached: reading them raises


@pytest.mark.parametrize("value", ["::1", "[::1]", "0.0.0.0", "llama.internal", "::"])
def test_a_host_override_of_an_ipv6_address_or_a_name_is_taken(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("LLAMACPP_HOST_OVERRIDE", value)
    assert load_settings().overrides.host == value


def test_gpu_pins_are_read_as_cuda_reads_them(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, read in (("0, 1", "0,1"), ("GPU-1a2b-3c", "GPU-1a2b-3c"), ("-1", "-1")):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES_OVERRIDE", value)
        assert load_settings().overrides.cuda_visible_devices == read


def test_a_layer_count_that_is_no_number_nor_a_word_is_said_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two halves used to say why ``abc`` was neither an integer nor ``auto``/``all``."""
    monkeypatch.setenv("LLAMACPP_N_GPU_LAYERS_OVERRIDE", "abc")
    with pytest.raises(ConfigError) as refused:
        assert load_settings().overrides is None  # never reached: reading them raises
    message = str(refused.value)
    assert message.count("LLAMACPP_N_GPU_LAYERS_OVERRIDE") == 1, message
    assert "must be a number of layers, or auto, or all" in message
    monkeypatch.setenv("LLAMACPP_N_GPU_LAYERS_OVERRIDE", " ALL ")
    assert load_settings().overrides.n_gpu_layers == "all"


def test_a_mistyped_bus_url_or_hub_token_is_said_and_their_neighbours_are_not() -> None:
    """``ORION_BUS_URI`` or ``HF_TOKN`` changed nothing without a word: the worker talked
    to the default Redis, or to the Hub without the token. Other services read names of
    those prefixes (Orion's, huggingface_hub's ``HF_TOKEN_PATH``): only a near-twin of
    ours is said."""
    typos = {
        "ORION_BUS_URI": "ORION_BUS_URL",
        "HF_TOKN": "HF_TOKEN",
        "HF_HUB_OFFLIN": "HF_HUB_OFFLINE",
    }
    neighbours = [
        "HF_TOKEN_PATH",
        "HF_HOME",
        "HF_HUB_CACHE",
        "HF_HUB_DISABLE_TELEMETRY",
        "HF_DATASETS_OFFLINE",
        "ORION_BUS_ENABLED",
        "ORION_SERVICE_NAME",
        "ORION_REDIS_URL",
    ]
    said = unread_variables(dict.fromkeys([*typos, *neighbours], "x"))
    assert said == [
        f"{typo} is set but nothing reads it (did you mean {meant}?): it changes nothing"
        for typo, meant in sorted(typos.items())
    ]


def test_a_bad_value_from_the_dotenv_file_names_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A value that does not parse was said as the environment's: the operator looked for
    it in the shell, the unit, the compose file, not in the file that set it. One the
    environment set says no file (it wins over the file's)."""
    env_file = tmp_path / "service.env"
    env_file.write_text("LLAMACPP_CTX_SIZE_OVERRIDE=big\nORION_LLAMACPP_REQUEST_CRASH_LIMIT=9\n")
    monkeypatch.setenv(ENV_FILE_VARIABLE, str(env_file))
    said = f"LLAMACPP_CTX_SIZE_OVERRIDE='big' (set in {env_file}): "
    with pytest.raises(ConfigError, match=re.escape(said)):
        load_settings()
    monkeypatch.setenv("LLAMACPP_CTX_SIZE_OVERRIDE", "1024x")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "LLAMACPP_CTX_SIZE_OVERRIDE='1024x': " in str(err.value), err.value
    assert "set in" not in str(err.value), err.value
    monkeypatch.setenv("LLAMACPP_CTX_SIZE_OVERRIDE", "1024")
    # A check of two values together names the file of the one it set.
    said = f"ORION_LLAMACPP_REQUEST_CRASH_LIMIT (9) (set in {env_file}) must be below "
    with pytest.raises(ConfigError, match=re.escape(said + "ORION_LLAMACPP_CRASH_LIMIT (5):")):
        load_settings()
