"""One exception tree for the whole package.

Every error a user can see is an ``OrionLlamaError`` whose message says what failed and
what to do about it. Third-party errors (pydantic, yaml, httpx, redis, huggingface_hub)
are translated where they enter the package, with ``raise ... from exc``::

    OrionLlamaError
    ├── ConfigError            settings, environment variables, the profile registry
    │   └── ProfileNotFound    LLM_PROFILE_NAME names no profile
    ├── ModelError             the GGUF on disk: missing, unsafe path, corrupt, download failed
    │   ├── ModelNotFound
    │   ├── UnsafeModelPath
    │   ├── ModelCorrupt
    │   └── DownloadError
    ├── EngineError            llama-server: binary, flags, start, crash, HTTP
    │   ├── BinaryNotFound
    │   ├── UnsupportedKnob
    │   ├── EngineStartError   carries a diagnosis of llama-server's output
    │   ├── EngineUnavailable  not ready (loading, restarting, failed)
    │   └── UpstreamError      a request to llama-server failed or broke off
    │       └── ContextExceeded
    └── BusError               Redis and the wire format
        ├── DecodeError
        └── NoWorker           a pub/sub request that no subscriber heard
"""

from __future__ import annotations


class OrionLlamaError(Exception):
    """Base of every error this package raises on purpose."""


def describe(exc: BaseException) -> str:
    """``exc`` for a log line or an error message: its type, then its text where it has
    one. A ``TimeoutError`` (Redis frozen, a bound run out) has none, and "failed: " with
    nothing after it said nothing."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ConfigError(OrionLlamaError):
    """The environment, the settings or the profile registry are wrong."""


class ProfileNotFound(ConfigError):
    """The selected profile name is not in the registry."""


class SecretUnset(ConfigError):
    """A variable the profile takes a secret from (``api_key_env``) is empty or unset:
    wrong where the profile is served, expected where it is only checked."""


class ModelError(OrionLlamaError):
    """The model file cannot be resolved, fetched or trusted."""


class ModelNotFound(ModelError):
    """The model file is not on disk and cannot be downloaded."""


class UnsafeModelPath(ModelError):
    """A configured file name would resolve outside ``model_root``."""


class ModelCorrupt(ModelError):
    """The file on disk is not a usable GGUF (bad magic, truncated, wrong checksum)."""


class DownloadError(ModelError):
    """Fetching from the Hugging Face Hub failed for good."""


class EngineError(OrionLlamaError):
    """llama-server could not be found, started or talked to."""


class BinaryNotFound(EngineError):
    """No llama-server binary was found."""


class UnsupportedKnob(EngineError):
    """The profile sets a knob whose flag this llama-server build does not accept."""


class EngineStartError(EngineError):
    """llama-server exited or hung while starting; ``diagnosis`` says why when known."""

    def __init__(self, message: str, *, diagnosis: str | None = None, tail: str = "") -> None:
        super().__init__(message)
        self.diagnosis = diagnosis
        self.tail = tail


class EngineUnavailable(EngineError):
    """llama-server is not ready to serve (loading, restarting, draining or failed), or
    went away. ``reached``: the request had been written to it, so it may have been in
    llama-server when that died (and may be why)."""

    def __init__(self, message: str, *, reached: bool = False) -> None:
        super().__init__(message)
        self.reached = reached


class UpstreamError(EngineError):
    """A request to llama-server failed, or its stream broke off without a finish reason."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retryable: bool = True,
        broken: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.broken = broken  # the connection broke off: llama-server may have died


class ContextExceeded(UpstreamError):
    """The prompt (plus the requested tokens) does not fit the context window."""


class BusError(OrionLlamaError):
    """Redis or the Orion wire format misbehaved."""


class NoWorker(BusError):
    """A pub/sub request reached no subscriber: no worker serves that profile (or its
    intake channel is another)."""


class DecodeError(BusError):
    """A message off the bus could not be decoded; ``errors`` lists what was wrong."""

    def __init__(self, message: str, *, errors: list[dict] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []
