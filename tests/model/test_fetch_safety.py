"""Offline mode, gated repos and the token, and file names that try to leave model_root."""

from __future__ import annotations

import json
import logging
import os
import re
import socketserver
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants as hf_constants

from orion_llamaccp.errors import DownloadError, ModelCorrupt, ModelNotFound, UnsafeModelPath
from orion_llamaccp.model import ensure_model, plan_files
from orion_llamaccp.model.hub import HubClient, HubFile
from orion_llamaccp.settings import ENV_PREFIXES, Settings
from tests.model.conftest import FILENAME, REPO_ID, make_profile
from tests.model.hub_server import Fault, LocalHub

SettingsFactory = Callable[..., Settings]
Bytes = Callable[[int], bytes]
REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_SECRETtoken4242abcdef"
WRONG_TOKEN = "hf_WRONGtoken9999zyxwvu"


# ----------------------------------------------------------------------------- offline


def test_offline_missing_file_names_the_path_to_copy_to(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    hub.add(REPO_ID, FILENAME, gguf_bytes(0))

    with pytest.raises(ModelNotFound) as err:
        ensure_model(make_profile(), make_settings(hf_hub_offline=True))

    message = str(err.value)
    assert "HF_HUB_OFFLINE=1" in message
    assert f"to {cache_dir / FILENAME}" in message
    assert f"https://huggingface.co/{REPO_ID}" in message
    assert hub.requests == []


def test_offline_uses_a_file_already_there(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    (cache_dir / FILENAME).write_bytes(gguf_bytes(0))

    resolved = ensure_model(make_profile(), make_settings(hf_hub_offline=True))

    assert resolved.files.model == cache_dir / FILENAME
    assert hub.requests == []


def test_offline_corrupt_file_is_reported_not_moved(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, cache_dir: Path
) -> None:
    (cache_dir / FILENAME).write_bytes(b"GGUF" + b"\x00" * 100)

    with pytest.raises(ModelCorrupt, match="HF_HUB_OFFLINE=1 forbids downloading it"):
        ensure_model(make_profile(), make_settings(hf_hub_offline=True))

    assert (cache_dir / FILENAME).exists()
    assert hub.requests == []


# ----------------------------------------------------------------------------- gated repos


@pytest.fixture
def gated(hub: LocalHub, gguf_bytes: Bytes) -> str:
    sha = hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    hub.gate(REPO_ID, TOKEN)
    return sha


def test_gated_repo_without_token_says_to_set_hf_token(
    hub: LocalHub, gated: str, make_settings: SettingsFactory
) -> None:
    with pytest.raises(DownloadError, match="is gated: set HF_TOKEN") as err:
        ensure_model(make_profile(), make_settings())

    assert f"https://huggingface.co/{REPO_ID}" in str(err.value)
    assert [r.authorization for r in hub.requests] == [None]  # no implicit token either
    assert hub.cdn_gets(gated) == []


def test_rejected_token_is_never_printed_or_logged(
    hub: LocalHub,
    gated: str,
    make_settings: SettingsFactory,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)

    with pytest.raises(DownloadError, match="HF_TOKEN has no access") as err:
        ensure_model(make_profile(), make_settings(hf_token=WRONG_TOKEN))

    assert hub.requests[0].authorization == f"Bearer {WRONG_TOKEN}"  # it was really sent
    captured = capsys.readouterr()
    for text in (str(err.value), repr(err.value), caplog.text, captured.out, captured.err):
        assert WRONG_TOKEN not in text


def test_valid_token_downloads_and_stays_off_the_cdn(
    hub: LocalHub,
    gated: str,
    make_settings: SettingsFactory,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)

    resolved = ensure_model(make_profile(), make_settings(hf_token=TOKEN))

    assert resolved.sha256 == gated
    assert {r.authorization for r in hub.resolves(FILENAME)} == {f"Bearer {TOKEN}"}
    assert [r.authorization for r in hub.cdn_gets(gated)] == [None]
    captured = capsys.readouterr()
    assert TOKEN not in caplog.text + captured.out + captured.err


def test_a_login_token_stored_under_hf_home_is_never_sent_without_hf_token(
    hub: LocalHub,
    make_settings: SettingsFactory,
    gguf_bytes: Bytes,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no HF_TOKEN configured, huggingface_hub falls back to the token of a
    `hf auth login` stored under HF_HOME, and sent it to the Hub or to whatever mirror
    HF_ENDPOINT names. huggingface_hub reads HF_HOME / HF_TOKEN_PATH once, at import, into
    ``constants.HF_TOKEN_PATH``: the module constant is set too, not only the variables."""
    home = tmp_path / "hf_home"
    home.mkdir()
    (home / "token").write_text("hf_STOREDlogin1234567890abcd\n")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    sha = hub.add(REPO_ID, FILENAME, gguf_bytes(0))

    assert ensure_model(make_profile(), make_settings()).sha256 == sha

    assert {r.authorization for r in hub.requests} == {None}


@pytest.mark.parametrize(
    ("status", "hint"),
    [(401, "not found or not accessible: check hf_repo_id; if it is private, set HF_TOKEN"),
     (403, "the Hub forbids orion-test/tiny-llama/tiny-llama-f32.gguf (HTTP 403): check HF_TOKEN")],
    ids=["401", "403"],
)  # fmt: skip
def test_a_plain_401_or_403_from_the_hub_says_to_check_hf_token(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes, status: int, hint: str
) -> None:
    """A mirror or proxy answers 401/403 without the Hub's X-Error-Code, which
    huggingface_hub turns into no typed error: the message was a bare "refused with HTTP
    401", with nothing said of the token that is the usual cause."""
    hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    hub.fault("resolve", Fault("status", status=status))

    with pytest.raises(DownloadError, match=re.escape(hint)):
        ensure_model(make_profile(), make_settings())

    assert [r.status for r in hub.resolves(FILENAME)] == [status]  # final: not retried


def test_a_hub_answer_without_x_repo_commit_says_hf_endpoint_is_no_hub(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes
) -> None:
    """A plain file server or a mirror that drops the Hub's headers: without the commit
    the file came from, the record cannot say its source (nor pin a split model's parts
    to one commit), and the download went on as if from a Hub."""
    sha = hub.add(REPO_ID, FILENAME, gguf_bytes(0))
    hub.drop_headers.add("X-Repo-Commit")

    with pytest.raises(DownloadError, match="has no ETag or X-Repo-Commit: check that HF_ENDPOINT"):
        ensure_model(make_profile(), make_settings())

    assert hub.cdn_gets(sha) == []


def test_unknown_repo_is_a_clear_error(make_settings: SettingsFactory) -> None:
    with pytest.raises(DownloadError, match="repo orion-test/nope not found"):
        ensure_model(make_profile(hf_repo_id="orion-test/nope"), make_settings())


def test_unknown_revision_is_a_clear_error(
    hub: LocalHub, make_settings: SettingsFactory, gguf_bytes: Bytes
) -> None:
    hub.add(REPO_ID, FILENAME, gguf_bytes(0))

    with pytest.raises(DownloadError, match=r"revision 'v9' not found.*check hf_revision"):
        ensure_model(make_profile(hf_revision="v9"), make_settings())


# ----------------------------------------------------------------------------- path safety


@pytest.mark.parametrize(
    "block",
    [
        {"hf_filename": "../escape.gguf"},
        {"hf_filename": "sub/../../escape.gguf"},
        {"hf_filename": "/etc/passwd"},
        {"hf_filename": "..\\escape.gguf"},
        {"hf_filename": "~/escape.gguf"},
        {"hf_filename": "ok.gguf\x00.txt"},
        {"mmproj_filename": "../../mmproj.gguf"},
        {"hf_draft_filename": "/tmp/draft.gguf"},
        {"hf_filename": None, "model_path": "../../../etc/shadow"},
        {"hf_filename": None, "model_path": "/etc/passwd"},
    ],
)
def test_names_that_leave_model_root_are_refused(
    hub: LocalHub, make_settings: SettingsFactory, block: dict[str, str | None]
) -> None:
    with pytest.raises(UnsafeModelPath):
        ensure_model(make_profile(**block), make_settings())

    assert hub.requests == []


def test_a_symlink_out_of_model_root_is_refused(
    hub: LocalHub, make_settings: SettingsFactory, cache_dir: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (cache_dir / "link").symlink_to(outside)

    with pytest.raises(UnsafeModelPath, match="symbolic link"):
        ensure_model(make_profile(hf_filename="link/model.gguf"), make_settings())

    assert list(outside.iterdir()) == []
    assert hub.requests == []


def test_the_operator_override_may_point_anywhere(
    make_settings: SettingsFactory, gguf_bytes: Bytes, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere.gguf"
    elsewhere.write_bytes(gguf_bytes(0))

    files = plan_files(make_profile(), str(elsewhere), make_settings().environ())

    assert files.model == elsewhere
    assert files.source == "LLAMACPP_MODEL_PATH_OVERRIDE"


def test_token_read_from_a_file_with_its_newline_works_and_stays_hidden(
    hub: LocalHub,
    gated: str,
    make_settings: SettingsFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)

    resolved = ensure_model(make_profile(), make_settings(hf_token=f"{TOKEN}\n"))

    assert resolved.sha256 == gated
    assert {r.authorization for r in hub.resolves(FILENAME)} == {f"Bearer {TOKEN}"}
    assert TOKEN not in caplog.text


def test_a_token_that_is_no_valid_header_fails_at_once_without_showing_it(
    hub: LocalHub, gated: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = HubClient(endpoint=hub.endpoint, token=f"{TOKEN}\n", timeout=3.0)

    with pytest.raises(DownloadError, match="not valid HTTP") as err:
        client.describe(HubFile(REPO_ID, FILENAME))

    assert hub.requests == []  # nothing was sent, and nothing is retried
    assert TOKEN not in str(err.value) + caplog.text


# ----------------------------------------------------------------------------- endpoint


class _Proxy(socketserver.ThreadingTCPServer):
    """An HTTP proxy that notes each request line and refuses it: where would we connect?"""

    daemon_threads = True

    def __init__(self) -> None:
        self.lines: list[str] = []
        super().__init__(("127.0.0.1", 0), _ProxyHandler)


class _ProxyHandler(socketserver.StreamRequestHandler):
    server: _Proxy

    def handle(self) -> None:
        self.server.lines.append(self.rfile.readline().decode("latin-1").strip())
        self.wfile.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")


@pytest.fixture
def proxy() -> Iterator[_Proxy]:
    with _Proxy() as server:
        thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
        thread.start()
        yield server
        server.shutdown()


def test_blank_hf_endpoint_downloads_from_huggingface_co(proxy: _Proxy, cache_dir: Path) -> None:
    """Compose passes HF_ENDPOINT="" when unset; huggingface_hub reads it at import."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIXES)}
    env = {k: v for k, v in env.items() if "proxy" not in k.lower()}
    port = proxy.server_address[1]
    env |= {"HF_ENDPOINT": "", "HTTPS_PROXY": f"http://127.0.0.1:{port}"}
    env["ORION_LLAMACPP_DOWNLOAD_DEADLINE_SEC"] = "1"
    spec = {
        "settings": {"cache_dir": str(cache_dir)},
        "llamacpp": {"model_root": "${LLM_CACHE_DIR}", "hf_repo_id": REPO_ID,
                     "hf_filename": FILENAME},
    }  # fmt: skip

    worker = subprocess.run(
        [sys.executable, "-m", "tests.model.fetch_worker", json.dumps(spec)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert worker.returncode != 0  # the proxy refuses: no internet is needed or used
    assert proxy.lines, worker.stderr
    assert set(proxy.lines) == {"CONNECT huggingface.co:443 HTTP/1.1"}


@pytest.mark.parametrize("failure", ["unknown repo", "server errors", "not found"])
def test_a_mirror_s_user_and_password_never_show(
    hub: LocalHub,
    gguf_bytes: Bytes,
    make_settings: SettingsFactory,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    failure: str,
) -> None:
    """``HF_ENDPOINT`` may name a mirror with a user and password in it: they are as
    secret as the token. They were in the retries' log lines and the final error ("HTTP
    503 from bot:...@127.0.0.1:..."). A password with characters a URL encodes was in the
    error of a plain 404 as httpx quoted the URL back ("bot:p%3Bss...@").
    """
    caplog.set_level(logging.DEBUG)
    password = "p;ss^x|w0rd" if failure == "not found" else "m1rr0rPassw0rd"
    endpoint = hub.endpoint.replace("://", f"://bot:{password}@")
    settings = make_settings(hf_endpoint=endpoint)
    profile = make_profile(hf_repo_id="orion-test/nope")
    if failure != "unknown repo":
        hub.add(REPO_ID, FILENAME, gguf_bytes(4096))
        profile = make_profile()
    if failure == "server errors":
        hub.fault("cdn", Fault("status", status=503), times=1000)
    if failure == "not found":  # a plain 404, without the Hub's X-Error-Code
        hub.fault("resolve", Fault("status", status=404))
    with pytest.raises(DownloadError) as err:
        ensure_model(profile, settings)
    captured = capsys.readouterr()
    # What the worker logs: its own lines, and warnings of any library (it holds httpx's
    # request lines, which name the URL, below WARNING: cli.setup_logging).
    logged = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("orion_llamaccp") or r.levelno >= logging.WARNING
    ]
    for text in (str(err.value), *logged, captured.out, captured.err):
        assert "w0rd" not in text, text  # the password's tail: in any encoding of it
    assert password in settings.secrets()
