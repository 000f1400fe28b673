"""The Hugging Face Hub, through huggingface_hub's own client: file metadata and byte ranges.

Why not ``hf_hub_download``: in huggingface_hub 2.x it streams into a process-unique temp
file that it deletes on failure, so an interrupted 40 GB download starts over from zero, and
it checks only the size. We keep the library's client and protocol (``hf_hub_url``,
``get_hf_file_metadata`` for the HEAD with its ETag / X-Repo-Commit / X-Linked-* headers
and redirects, ``get_session`` and ``build_hf_headers`` for the GET, ``hf_raise_for_status``
for the Hub's error codes) and own what matters here: a GET from any byte offset, with a
read timeout so a stalled transfer fails fast and is resumed by the caller.

Errors leave this module as the package's own: ``Transient`` (worth another attempt) or a
``ModelError`` whose message says what to do. The token is never part of a message.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import get_hf_file_metadata, get_session, hf_hub_url
from huggingface_hub.errors import (
    FileMetadataError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

from orion_llamaccp.errors import DownloadError, ModelError, ModelNotFound
from orion_llamaccp.redaction import mask_url, url_passwords
from orion_llamaccp.redaction import redact as redact_secrets

# huggingface_hub's own default. We always pass an endpoint: left to itself, the library
# uses HF_ENDPOINT as read at import, and a blank one (compose's default) makes every URL
# relative.
DEFAULT_ENDPOINT = "https://huggingface.co"

SHA256 = re.compile(r"[0-9a-f]{64}")
CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")
URL_QUERY = re.compile(r"(https?://[^\s'\"?#]+)\?[^\s'\"#]*")
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
# A signed CDN link can expire between attempts: a fresh HEAD gives a new one.
RETRY_STATUS_CDN = RETRY_STATUS | {403, 410}


class Transient(Exception):
    """A failure another attempt may fix: network, timeout, stall, 5xx, 429."""


class Unreachable(Transient):
    """No connection to the Hub at all (a name that does not resolve, a refused connection,
    no route): the network may come back, or this host never reaches the Hub."""


class Refused(Transient):
    """The file's server refused a link the Hub had just given (403, 410): an expired
    signature once, which the next attempt's fresh link fixes; every time, something in
    the way of that server (a proxy, a firewall), which no attempt fixes."""


class RangeNotSatisfiable(Exception):
    """The server refused the resume offset: the partial file is longer than the file."""


@dataclass(frozen=True)
class HubFile:
    """A file of a Hub repo: where a profile says to get one of its files from."""

    repo_id: str
    filename: str
    revision: str | None = None

    @property
    def label(self) -> str:
        at = f"@{self.revision}" if self.revision else ""
        return f"{self.repo_id}{at}/{self.filename}"


@dataclass(frozen=True)
class RemoteFile:
    """What the Hub's HEAD said about a file, and where to GET its bytes."""

    source: HubFile
    url: str
    keep_auth: bool
    size: int | None
    etag: str
    commit: str

    @property
    def sha256(self) -> str | None:
        """An LFS file's ETag is its sha256; a small git file's is a sha1 (no use here).
        A mirror may write the digest in capitals."""
        etag = self.etag.lower()
        return etag if SHA256.fullmatch(etag) else None


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


class HubClient:
    """Metadata and ranged GETs for one endpoint and token; ``timeout`` is the stall bound."""

    def __init__(self, *, endpoint: str | None, token: str | None, timeout: float) -> None:
        self._endpoint = (endpoint or DEFAULT_ENDPOINT).rstrip("/")
        self._token = token
        self._timeout = timeout
        # A mirror's URL may carry a user and password (https://bot:pw@mirror): as secret
        # as the token, in whatever the Hub's client or httpx says.
        self._secrets = [value for value in (token, *url_passwords(self._endpoint)) if value]

    def describe(self, hub: HubFile) -> RemoteFile:
        """HEAD the file: size, etag (sha256 for LFS), commit, and the URL of its bytes."""
        try:
            url = hf_hub_url(
                hub.repo_id, hub.filename, revision=hub.revision, endpoint=self._endpoint
            )
            meta = get_hf_file_metadata(
                url, token=self._token or False, timeout=self._timeout, endpoint=self._endpoint
            )
        except Exception as exc:
            raise self._translate(exc, hub) from None
        if not meta.etag or not meta.commit_hash:
            raise DownloadError(
                f"the Hub's answer for {hub.label} has no ETag or X-Repo-Commit: "
                f"check that HF_ENDPOINT ({mask_url(self._endpoint)}) points at a Hub"
            )
        return RemoteFile(
            source=hub,
            url=meta.location,
            keep_auth=_origin(meta.location) == _origin(url),
            size=meta.size,
            etag=meta.etag,
            commit=meta.commit_hash,
        )

    @contextmanager
    def stream(self, remote: RemoteFile, offset: int) -> Iterator[tuple[int, Iterator[bytes]]]:
        """GET the bytes from ``offset``; yields where they really start and the chunks."""
        headers = build_hf_headers(token=self._token or False)
        if not remote.keep_auth:
            headers.pop("authorization", None)  # signed CDN link: the token stays on the Hub
        headers["Accept-Encoding"] = "identity"
        if offset:
            headers["Range"] = f"bytes={offset}-"
        with ExitStack() as stack:
            try:
                response = stack.enter_context(
                    get_session().stream(
                        "GET",
                        remote.url,
                        headers=headers,
                        timeout=self._timeout,
                        follow_redirects=True,
                    )
                )
                start = self._start(response, offset, remote)
            except (Transient, RangeNotSatisfiable):
                raise
            except Exception as exc:
                raise self._translate(exc, remote.source) from None
            yield start, self._chunks(response, remote)

    def _start(self, response: httpx2.Response, offset: int, remote: RemoteFile) -> int:
        if response.status_code == 416 and offset:
            raise RangeNotSatisfiable(f"server refused bytes {offset}- of {remote.source.label}")
        if response.status_code in RETRY_STATUS_CDN - RETRY_STATUS:
            raise Refused(f"HTTP {response.status_code} from {_host(remote.url)}")
        if response.status_code in RETRY_STATUS_CDN:
            raise Transient(f"HTTP {response.status_code} from {_host(remote.url)}")
        hf_raise_for_status(response)
        if response.status_code != 206:
            return 0  # the server ignored Range: whole file from byte 0
        match = CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if not match:
            raise Transient(f"206 without a usable Content-Range from {_host(remote.url)}")
        start = int(match.group(1))
        if start > offset:
            raise Transient(f"asked for bytes from {offset}, got them from {start}")
        return start

    def _chunks(self, response: httpx2.Response, remote: RemoteFile) -> Iterator[bytes]:
        try:
            yield from response.iter_bytes()
        except httpx2.TimeoutException:
            raise Transient(
                f"no bytes for {self._timeout:g} s from {_host(remote.url)} (stalled)"
            ) from None
        except httpx2.TransportError as exc:
            raise Transient(f"connection to {_host(remote.url)} broke off: {exc}") from None

    def _redact(self, text: str) -> str:
        """Without our secrets, and without any URL's query: a CDN's signed link carries
        its signature there (``X-Amz-Signature``, ``Signature``), which huggingface_hub's
        errors quote with the URL."""
        return URL_QUERY.sub(r"\1?…", redact_secrets(text, self._secrets))

    def _translate(self, exc: Exception, hub: HubFile) -> Exception:
        """The package's error for anything huggingface_hub or httpx2 raised."""
        found = _final_error(exc, hub, has_token=bool(self._token))
        if found is not None:
            return type(found)(self._redact(str(found)))
        if isinstance(exc, httpx2.LocalProtocolError):
            # Our own request is malformed (a stray character in a header): no retry can
            # fix it. Its text quotes the header, token included, so it is not repeated.
            return DownloadError(
                f"cannot send the request for {hub.label}: a header is not valid HTTP; "
                f"check HF_TOKEN and HF_ENDPOINT for stray characters"
            )
        if isinstance(exc, HfHubHTTPError) and _status(exc) in RETRY_STATUS:
            return Transient(f"HTTP {_status(exc)} from the Hub for {hub.label}")
        if isinstance(exc, httpx2.TimeoutException):
            return Transient(f"no answer within {self._timeout:g} s for {hub.label}")
        if isinstance(exc, httpx2.ConnectError | httpx2.ProxyError):  # no connection at all
            return Unreachable(self._redact(f"cannot reach the Hub for {hub.label}: {exc}"))
        if isinstance(exc, httpx2.TransportError):
            return Transient(self._redact(f"cannot reach the Hub for {hub.label}: {exc}"))
        if isinstance(exc, HfHubHTTPError):
            return DownloadError(
                f"the Hub refused {hub.label} with HTTP {_status(exc)}: "
                + self._redact(_first_line(exc))
            )
        return DownloadError(
            f"downloading {hub.label} failed: {type(exc).__name__}: "
            + self._redact(_first_line(exc))
        )


def _final_error(exc: Exception, hub: HubFile, *, has_token: bool) -> ModelError | None:
    """Errors no retry can fix, each with what to do about it."""
    repo = hub.repo_id
    if isinstance(exc, GatedRepoError):
        if has_token:
            return DownloadError(
                f"{repo} is gated and HF_TOKEN has no access to it: accept the model's terms "
                f"at https://huggingface.co/{repo} with the token's account"
            )
        return DownloadError(
            f"{repo} is gated: set HF_TOKEN to a token of an account that accepted the "
            f"model's terms at https://huggingface.co/{repo}"
        )
    if isinstance(exc, RepositoryNotFoundError) or _status(exc) == 401:
        hint = (
            "HF_TOKEN was rejected or has no access to it"
            if has_token
            else "if it is private, set HF_TOKEN"
        )
        return DownloadError(f"repo {repo} not found or not accessible: check hf_repo_id; {hint}")
    if isinstance(exc, RevisionNotFoundError):
        return DownloadError(f"revision {hub.revision!r} not found in {repo}: check hf_revision")
    if isinstance(exc, RemoteEntryNotFoundError):
        return ModelNotFound(
            f"{hub.filename!r} is not in {repo} at revision {hub.revision or 'main'}: "
            f"check the file name in the profile against the repo's file list"
        )
    if isinstance(exc, OfflineModeIsEnabled):
        return DownloadError(
            "huggingface_hub is in offline mode (HF_HUB_OFFLINE was set when it was imported): "
            f"cannot fetch {hub.label}; copy the file by hand or unset HF_HUB_OFFLINE"
        )
    if isinstance(exc, HFValidationError):
        return DownloadError(f"{hub.label}: not a valid Hub repo id or file name ({exc})")
    if isinstance(exc, FileMetadataError):
        return DownloadError(f"{hub.label}: {_first_line(exc)}")
    if _status(exc) == 403:
        return DownloadError(f"the Hub forbids {hub.label} (HTTP 403): check HF_TOKEN's access")
    return None


def _status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _host(url: str) -> str:
    """Where ``url`` points, without the user and password it may carry."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
