"""llama-server's request body: built from the raw JSON of a message (written before pydantic
has validated it) it must equal the one built from the validated request, or the worker
drops the early request and writes it again."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from orion_llamaccp.bus.envelope import ChatRequestPayload
from orion_llamaccp.errors import DecodeError
from orion_llamaccp.profiles.models import Profile
from orion_llamaccp.worker.llama_request import body_of, build_body, parse_options

PROFILE = Profile.model_validate(
    {
        "name": "p",
        "model_id": "m",
        "model_file": "m.gguf",
        "llamacpp": {"temperature": 0.7, "top_k": 40, "n_predict": 512},
    }
)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"temperature": 0, "seed": 42, "max_tokens": 256, "ignore_eos": True, "stream": True},
        {"top_p": 0.9, "stop": ["\n"], "stream_channel": "x", "timeout_sec": 5, "grammar": "g"},
        {"return_json": True, "unknown_knob": 1, "cache_prompt": False, "temperature": None},
        {"response_format": {"type": "text"}, "return_json": True},
    ],
)
def test_the_raw_body_equals_the_validated_one(options: dict[str, Any]) -> None:
    raw = orjson.loads(orjson.dumps({"messages": MESSAGES, "options": options}))
    chat = ChatRequestPayload.model_validate(raw)
    validated = build_body(chat, parse_options(chat), PROFILE)
    assert body_of(raw["messages"], raw["options"], PROFILE) == validated
    assert validated[0]["messages"] == MESSAGES


def test_the_profile_fills_what_the_request_leaves_out() -> None:
    body, ignored = body_of(MESSAGES, {"top_k": 5, "unknown_knob": 1, "stream": True}, PROFILE)
    assert (body["temperature"], body["top_k"], body["max_tokens"]) == (0.7, 5, 512)
    assert "stream" not in body and "unknown_knob" not in body
    assert ignored == ["unknown_knob"]


@pytest.mark.parametrize(
    "options",
    [
        {"seed": True},  # was seed 1
        {"temperature": True},  # was 1.0
        {"max_tokens": "64"},  # was 64
        {"stream": "yes"},  # was True: the caller's ``"no"`` streamed too
        {"top_k": 5.5},  # was 5
    ],
)
def test_an_option_of_the_wrong_type_is_refused_not_converted(options: dict[str, Any]) -> None:
    """A caller's typing slip is theirs to hear of, not a value made up for them."""
    chat = ChatRequestPayload.model_validate({"messages": MESSAGES, "options": options})
    with pytest.raises(DecodeError) as error:
        parse_options(chat)
    (key,) = options
    assert {e["loc"] for e in error.value.errors} == {f"payload.options.{key}"}


def test_a_whole_number_is_a_number_of_either_kind() -> None:
    """JSON has one kind of number: ``"temperature": 1`` is 1.0 and ``"max_tokens":
    512.0`` (``json.dumps(512.0)``) is 512, as they always were."""
    given = {"temperature": 1, "top_p": 1, "timeout_sec": 30, "max_tokens": 512.0, "seed": 7.0}
    options = parse_options(
        ChatRequestPayload.model_validate({"messages": MESSAGES, "options": given})
    )
    assert (options.temperature, options.top_p, options.timeout_sec) == (1.0, 1.0, 30.0)
    assert (options.max_tokens, options.seed) == (512, 7)
    assert isinstance(options.max_tokens, int)


@pytest.mark.parametrize(
    "options",
    [
        {"reasoning_format": "bogus"},  # llama-server: 500 "Unknown reasoning format"
        {"tools": "x"},  # llama-server: 500 "Failed to parse tools"
        {"tools": ["x"]},
    ],
)
def test_an_option_llama_server_throws_on_is_refused_before_it_is_sent(
    options: dict[str, Any],
) -> None:
    """llama-server's handler throws on these: a 500, which is retried as llama-server's
    own failure (five tries of a stream entry, then a retryable answer)."""
    chat = ChatRequestPayload.model_validate({"messages": MESSAGES, "options": options})
    with pytest.raises(DecodeError) as error:
        parse_options(chat)
    (key,) = options
    assert {
        e["loc"].rsplit(".", 1)[0] if "tools." in e["loc"] else e["loc"] for e in error.value.errors
    } == {f"payload.options.{key}"}


def test_the_options_llama_server_checks_itself_still_reach_it() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    given = {"tools": tools, "reasoning_format": "deepseek"}
    chat = ChatRequestPayload.model_validate({"messages": MESSAGES, "options": given})
    body, ignored = build_body(chat, parse_options(chat), Profile(name="p"))
    assert (body["tools"], body["reasoning_format"], ignored) == (tools, "deepseek", [])
