"""A small Hugging Face Hub for tests, speaking the download protocol of huggingface_hub 2.x.

- ``HEAD|GET /{org}/{repo}/resolve/{revision}/{path}``: for an LFS file, 302 to a "CDN"
  URL with ``X-Repo-Commit``, ``X-Linked-Etag`` (the sha256), ``X-Linked-Size`` and the
  pointer's ``ETag``; for a small git file, 200 with its git-sha1 ``ETag``. Errors carry the
  Hub's ``X-Error-Code`` (``RepoNotFound``, ``GatedRepo``, ``RevisionNotFound``,
  ``EntryNotFound``), which huggingface_hub turns into its typed errors.
- ``HEAD|GET /cdn/{sha256}``: the bytes, with ``Range`` (206, 416).

The CDN URL names the host ``localhost`` while the endpoint is ``127.0.0.1``: two origins,
as on the real Hub, so the client must not send the token to the CDN (and we can check).
No Xet headers are ever sent, so the plain HTTP path is used.

Faults are queued per stage (``resolve`` or ``cdn``) and consumed one per request: cut the
connection after N body bytes, stall after N bytes, hold after N bytes until released,
serve wrong bytes, answer a status code. Every request is recorded with its headers and
the bytes sent.
``ignore_range`` makes it a server (or mirror, or proxy) that answers every ``Range`` with
the whole file. ``advertised_size[sha256]`` makes the Hub announce another size than the
file's (a huge one runs the downloader's free-space check out of space, no disk faked).
``drop_headers`` leaves those headers out of every answer (a mirror that lacks them).
``late_range = N`` makes the next 206 answer start N bytes past the asked offset, saying so
in its ``Content-Range`` (a proxy that mangles ranges), once.
"""

from __future__ import annotations

import hashlib
import sys
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import unquote, urlsplit

Stage = Literal["resolve", "cdn"]
SIGNED_QUERY = "Expires=1796000000&Signature=CDN-SIGNATURE-SECRET&Key-Pair-Id=K2EXAMPLE"
Kind = Literal["cut", "stall", "hold", "corrupt", "status"]


@dataclass
class Fault:
    """One misbehaviour for one request; ``reached`` is set when it strikes."""

    kind: Kind
    after: int = 0
    status: int = 500
    release: threading.Event = field(default_factory=threading.Event)
    reached: threading.Event = field(default_factory=threading.Event)


@dataclass
class Request:
    """What one request asked for and got."""

    method: str
    path: str
    range: str | None
    authorization: str | None
    status: int = 0
    sent: int = 0
    # The request line's target as sent: http.server collapses a leading "//" in ``path``
    target: str = ""
    # Every header as sent, by its name in lower case
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Repo:
    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, tuple[bytes, bool]]] = field(default_factory=dict)
    token: str | None = None


def _commit_id(repo_id: str, revision: str) -> str:
    return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class LocalHub:
    """The server and its repos; use as a context manager."""

    def __init__(self, *, chunk_size: int = 8192) -> None:
        self.chunk_size = chunk_size
        self.ignore_range = False
        self.advertised_size: dict[str, int] = {}
        self.drop_headers: set[str] = set()  # left out of every answer: a Hub that lacks them
        self.late_range = 0  # the next 206 starts this many bytes past the asked offset
        self.repos: dict[str, _Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[Request] = []
        self.faults: dict[Stage, deque[Fault]] = {"resolve": deque(), "cdn": deque()}
        self._issued: list[Fault] = []
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), daemon=True
        )

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LocalHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for fault in self._issued:
            fault.release.set()
        self._server.shutdown()
        self._server.server_close()

    # ----------------------------------------------------------------- set-up

    def add(
        self, repo_id: str, filename: str, data: bytes, *, revision: str = "main", lfs: bool = True
    ) -> str:
        """Publish ``data`` as ``filename`` at ``revision``; returns its sha256."""
        repo = self.repos.setdefault(repo_id, _Repo())
        commit = repo.refs.setdefault(revision, _commit_id(repo_id, revision))
        repo.commits.setdefault(commit, {})[filename] = (data, lfs)
        sha = hashlib.sha256(data).hexdigest()
        self.blobs[sha] = data
        return sha

    def push(self, repo_id: str, files: dict[str, bytes], *, revision: str = "main") -> str:
        """A new commit on ``revision``: its files as before, ``files`` added or replaced (a
        re-upload). Returns the new commit's id; the old one stays resolvable by its id."""
        repo = self.repos.setdefault(repo_id, _Repo())
        before = repo.commits.get(repo.refs.get(revision, ""), {})
        commit = _commit_id(repo_id, f"{revision}#{len(repo.commits)}")
        repo.commits[commit] = {**before, **{name: (data, True) for name, data in files.items()}}
        repo.refs[revision] = commit
        for data in files.values():
            self.blobs[hashlib.sha256(data).hexdigest()] = data
        return commit

    def gate(self, repo_id: str, token: str) -> None:
        """Make the repo gated: only ``Bearer <token>`` may resolve its files."""
        self.repos.setdefault(repo_id, _Repo()).token = token

    def fault(self, stage: Stage, fault: Fault, times: int = 1) -> Fault:
        self._issued.append(fault)
        for _ in range(times):
            self.faults[stage].append(fault)
        return fault

    def clear_faults(self) -> None:
        for queue in self.faults.values():
            queue.clear()

    # ----------------------------------------------------------------- counters

    def record(self, request: Request) -> Request:
        with self._lock:
            self.requests.append(request)
        return request

    def cdn_gets(self, sha256: str) -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and r.path == f"/cdn/{sha256}"]

    def resolves(self, filename: str) -> list[Request]:
        return [r for r in self.requests if "/resolve/" in r.path and r.path.endswith(filename)]

    def bytes_sent(self, sha256: str) -> int:
        return sum(r.sent for r in self.cdn_gets(sha256))

    def take_fault(self, stage: Stage) -> Fault | None:
        with self._lock:
            return self.faults[stage].popleft() if self.faults[stage] else None

    def mark(self) -> int:
        """A position in the request log, for "requests since" checks."""
        return len(self.requests)


class _QuietServer(ThreadingHTTPServer):
    """Clients that hang up mid-answer are the point of these tests, not errors."""

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


def _handler(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubHandler):
        pass

    Handler.hub = hub
    return Handler


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: LocalHub

    def log_message(self, format: str, *args: object) -> None:
        return

    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def _route(self) -> None:
        path = urlsplit(self.path).path
        req = self.hub.record(
            Request(
                self.command,
                unquote(path),
                self.headers.get("Range"),
                self.headers.get("Authorization"),
                target=self.raw_requestline.split()[1].decode("latin-1"),
                headers={name.lower(): value for name, value in self.headers.items()},
            )
        )
        with suppress(BrokenPipeError, ConnectionResetError):
            if path.startswith("/cdn/"):
                self._cdn(req, path.removeprefix("/cdn/"))
            else:
                self._resolve(req, [unquote(part) for part in path.split("/")[1:]])

    # ----------------------------------------------------------------- /resolve

    def _resolve(self, req: Request, parts: list[str]) -> None:
        fault = self.hub.take_fault("resolve")
        if fault is not None and fault.kind == "status":
            fault.reached.set()
            return self._reply(req, fault.status)
        if len(parts) < 5 or parts[2] != "resolve":
            return self._reply(req, 404, error="EntryNotFound")
        repo_id, revision, filename = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._reply(req, 401, error="RepoNotFound")
        if repo.token is not None and req.authorization != f"Bearer {repo.token}":
            status = 401 if req.authorization is None else 403
            return self._reply(req, status, error="GatedRepo", message="Access is restricted")
        commit = repo.refs.get(revision, revision if revision in repo.commits else None)
        if commit is None:
            return self._reply(req, 404, error="RevisionNotFound")
        entry = repo.commits[commit].get(filename)
        headers = {"X-Repo-Commit": commit}
        if entry is None:
            return self._reply(req, 404, error="EntryNotFound", headers=headers)
        data, lfs = entry
        if not lfs:
            headers["ETag"] = f'"{_git_sha1(data)}"'
            return self._body(req, data, headers, fault=None)
        sha = hashlib.sha256(data).hexdigest()
        headers |= {
            "ETag": f'"{_git_sha1(b"pointer " + sha.encode())}"',
            "X-Linked-Etag": f'"{sha}"',
            "X-Linked-Size": str(self.hub.advertised_size.get(sha, len(data))),
            # Signed, as the Hub's CDN links are: a secret that errors must not quote.
            "Location": f"http://localhost:{self.hub.port}/cdn/{sha}?{SIGNED_QUERY}",
        }
        self._reply(req, 302, headers=headers)

    # ----------------------------------------------------------------- /cdn

    def _cdn(self, req: Request, sha: str) -> None:
        data = self.hub.blobs.get(sha)
        if data is None:
            return self._reply(req, 404)
        fault = self.hub.take_fault("cdn") if self.command == "GET" else None
        if fault is not None and fault.kind == "status":
            fault.reached.set()
            return self._reply(req, fault.status)
        self._body(req, data, {"ETag": f'"{sha}"'}, fault)

    def _body(
        self, req: Request, data: bytes, headers: dict[str, str], fault: Fault | None
    ) -> None:
        start = None if self.hub.ignore_range else _range_start(req.range)
        if start is not None and start >= len(data):
            headers["Content-Range"] = f"bytes */{len(data)}"
            return self._reply(req, 416, headers=headers)
        status = 200 if start is None else 206
        start = start or 0
        if status == 206 and self.hub.late_range:
            start, self.hub.late_range = start + self.hub.late_range, 0
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        headers |= {"Accept-Ranges": "bytes", "Content-Length": str(len(data) - start)}
        self._head(req, status, headers)
        if self.command == "GET":
            body = _damaged(data) if fault is not None and fault.kind == "corrupt" else data
            self._send(req, body[start:], fault)

    def _send(self, req: Request, body: bytes, fault: Fault | None) -> None:
        for chunk in _chunks(body, self.hub.chunk_size, fault.after if fault else None):
            if fault is not None and req.sent == fault.after and fault.kind != "corrupt":
                if self._strike(fault):
                    return
                fault = None
            self.wfile.write(chunk)
            self.wfile.flush()
            req.sent += len(chunk)

    def _strike(self, fault: Fault) -> bool:
        """Apply a mid-body fault; ``True`` when the connection is to be dropped."""
        fault.reached.set()
        if fault.kind == "hold":
            fault.release.wait(30)
            return False
        if fault.kind == "stall":
            fault.release.wait(30)
        self.close_connection = True
        return True

    # ----------------------------------------------------------------- helpers

    def _reply(
        self,
        req: Request,
        status: int,
        *,
        error: str | None = None,
        message: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        headers = dict(headers or {})
        if error:
            headers["X-Error-Code"] = error
            headers["X-Error-Message"] = message or error
        headers.setdefault("Content-Length", "0")
        self._head(req, status, headers)

    def _head(self, req: Request, status: int, headers: dict[str, str]) -> None:
        req.status = status
        self.send_response(status)
        for name, value in headers.items():
            if name not in self.hub.drop_headers:
                self.send_header(name, value)
        self.end_headers()


def _range_start(header: str | None) -> int | None:
    if not header or not header.startswith("bytes="):
        return None
    first = header.removeprefix("bytes=").split("-", 1)[0]
    return int(first) if first.isdigit() else None


def _damaged(data: bytes) -> bytes:
    """Same length, wrong bytes: flip a stretch past the header."""
    mid = len(data) // 2
    return data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 64]) + data[mid + 64 :]


def _chunks(body: bytes, size: int, split_at: int | None) -> Iterator[bytes]:
    """``body`` in pieces of ``size``, with a boundary exactly at ``split_at``."""
    pos = 0
    while pos < len(body):
        end = min(pos + size, len(body))
        if split_at is not None and pos < split_at < end:
            end = split_at
        yield body[pos:end]
        pos = end
