"""What a generation's result says about its tokens."""

from __future__ import annotations

from orion_llamaccp.worker.generation import Generation


def test_usage_is_llama_server_s_or_the_tokens_relayed_when_it_was_lost() -> None:
    """An answer cut after its finish reason may lose the usage event (it comes after):
    the result then counts the tokens relayed, and no prompt tokens it cannot know of."""
    told = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    assert Generation(usage=told, tokens=6).usage_counts() == told
    assert Generation(tokens=6).usage_counts() == {
        "prompt_tokens": 0,
        "completion_tokens": 6,
        "total_tokens": 6,
    }
