"""Every Redis key and default channel name the service uses, in one place."""

from __future__ import annotations

PREFIX = "orion:llamacpp"
SERVICE_CLASS = "LlamaCppHost"


def intake_channel(profile: str) -> str:
    return f"orion:exec:request:{SERVICE_CLASS}:{profile}"


def intake_stream(profile: str) -> str:
    return f"orion:stream:llamacpp:{profile}:request"


def stream_group(profile: str) -> str:
    return f"llamacpp:{profile}"


def dlq_stream(stream: str) -> str:
    return f"{stream}:dlq"


def dead_lettered(stream: str, entry_id: str) -> str:
    """Set when a stream entry's dead letter is written: it is written once."""
    return f"{PREFIX}:dead:{stream}:{entry_id}"


def chunk_channel(reply_to: str) -> str:
    return f"{reply_to}:chunks"


def claim(message_key: str) -> str:
    """Pub/sub: the one replica that may serve a message (SET NX)."""
    return f"{PREFIX}:claim:{message_key}"


def dedup(profile: str, key: str) -> str:
    """A request's idempotency record: running marker, then the stored result."""
    return f"{PREFIX}:dedup:{profile}:{key}"


def answered(request_id: str) -> str:
    """Set when the one final result of a request has been published."""
    return f"{PREFIX}:answered:{request_id}"


def attempts(request_id: str) -> str:
    """The highest attempt number given to a request's retries and redeliveries."""
    return f"{PREFIX}:attempts:{request_id}"


def deaths(request_id: str) -> str:
    """How many llama-servers died with a request in them, counted by every worker that
    tried it: an entry that moves to another worker keeps its count."""
    return f"{PREFIX}:deaths:{request_id}"


def chunk_seq(request_id: str, attempt: int) -> str:
    """The last chunk ``seq`` published for one attempt of a request."""
    return f"{PREFIX}:seq:{request_id}:{attempt}"


def liveness(service: str, instance: str) -> str:
    return f"{PREFIX}:alive:{service}:{instance}"


LIVENESS_PATTERN = f"{PREFIX}:alive:*"

# Every liveness and registry key a worker writes is also a member here, so that ``ps``
# and ``watch`` read the fleet without a SCAN of the whole keyspace (with a day of
# per-request guards under load, seconds per look). Readers drop members whose key is gone.
HOSTS_INDEX = f"{PREFIX}:hosts"
HOSTS_INDEX_TTL_SEC = 86_400  # renewed by every beat: a fleet long gone leaves nothing


def registry(profile: str, instance: str) -> str:
    """The latest profile announcement of one instance (a hash, with expiry)."""
    return f"orion:llm:profile:registry:{profile}:{instance}"


REGISTRY_PATTERN = "orion:llm:profile:registry:*"
