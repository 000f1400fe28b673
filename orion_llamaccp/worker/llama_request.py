"""From an Orion chat request to llama-server's ``/v1/chat/completions`` body.

``options`` carries the per-request switches. Known sampling knobs are type-checked here
(a bad value is a ``validation_failed`` answer, not a llama-server 400); the profile's
sampling defaults fill what the request leaves out; our own switches (``stream``,
``stream_channel``, ``timeout_sec``) never reach llama-server.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from orion_llamaccp.bus.envelope import ChatRequestPayload
from orion_llamaccp.errors import DecodeError
from orion_llamaccp.profiles.models import Profile, ReasoningFormat

# Passed to llama-server as they are (it validates them itself).
PASSTHROUGH = frozenset(
    {
        "typical_p",
        "repeat_penalty",
        "repeat_last_n",
        "logit_bias",
        "n_probs",
        "tool_choice",
        "parallel_tool_calls",
        "grammar",
        "json_schema",
        "mirostat",
        "mirostat_tau",
        "mirostat_eta",
        "dry_multiplier",
        "dry_base",
        "dry_allowed_length",
        "dry_penalty_last_n",
        "xtc_probability",
        "xtc_threshold",
        "top_n_sigma",
        "cache_prompt",
        "n_keep",
        "logprobs",
        "top_logprobs",
        "samplers",
        "ignore_eos",
    }
)


def _whole(value: Any) -> Any:
    """``512.0`` is 512 (JSON has one kind of number; ``json.dumps(512.0)`` writes it so);
    ``512.5``, a bool or a string is left to the strict check, which refuses it."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Whole = Annotated[int, BeforeValidator(_whole)]


class ChatOptions(BaseModel):
    """``ChatRequestPayload.options``: typed where we act on a value, open otherwise.

    Strict: ``"seed": true`` or ``"max_tokens": "64"`` is the caller's slip, refused
    (lax pydantic made them 1 and 64); a whole number is a number of either kind."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    stream: bool = False
    stream_channel: str | None = None
    timeout_sec: float | None = Field(None, gt=0)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: Whole | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    max_tokens: Whole | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: Whole | None = None
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_json: bool = False
    # Passed through, but checked: llama-server's handler throws on a bad one, a 500 that
    # is retried as llama-server's own failure (five tries of a stream entry, then a
    # retryable answer) where no try can ever succeed.
    tools: list[dict[str, Any]] | None = None
    reasoning_format: ReasoningFormat | None = None


_OURS = {"stream", "stream_channel", "timeout_sec", "return_json"}
_TYPED = frozenset(ChatOptions.model_fields)


def parse_options(chat: ChatRequestPayload) -> ChatOptions:
    try:
        return ChatOptions.model_validate(chat.options)
    except ValidationError as exc:
        errors = [
            {
                "loc": "payload.options." + ".".join(str(p) for p in e["loc"]),
                "msg": e["msg"],
                "type": e["type"],
            }
            for e in exc.errors()
        ]
        raise DecodeError("invalid options", errors=errors) from None


def build_body(
    chat: ChatRequestPayload, options: ChatOptions, profile: Profile
) -> tuple[dict[str, Any], list[str]]:
    """The JSON body for llama-server, and the option keys we did not forward."""
    messages = [{"role": m.role, "content": m.content} for m in chat.messages]
    return body_of(messages, options.model_dump(), profile)


def body_of(
    messages: list[Any], options: dict[str, Any], profile: Profile
) -> tuple[dict[str, Any], list[str]]:
    """``build_body`` from plain values: the validated request's, or, when the request is
    written before pydantic has seen it (``Generator.ahead``), a message's raw JSON."""
    cfg = profile.llamacpp
    body: dict[str, Any] = {
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
    }
    defaults = {
        "temperature": cfg.temperature,
        "top_k": cfg.top_k,
        "top_p": cfg.top_p,
        "min_p": cfg.min_p,
        "presence_penalty": cfg.presence_penalty,
        "max_tokens": cfg.n_predict if cfg.n_predict and cfg.n_predict > 0 else None,
    }
    for key, value in defaults.items():
        if value is not None:
            body[key] = value
    ignored = []
    for key, value in options.items():
        if key in _TYPED:
            if value is not None and key not in _OURS:
                body[key] = value
        elif key in PASSTHROUGH:
            body[key] = value
        else:
            ignored.append(key)
    if options.get("return_json") and "response_format" not in body:
        body["response_format"] = {"type": "json_object"}
    return body, sorted(ignored)
