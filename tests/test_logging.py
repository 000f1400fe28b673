"""The worker's log format (``cli.SafeFormatter``): text from the bus or from llama-server
cannot forge an entry nor repaint a terminal, and a multi-line text stays readable."""

from __future__ import annotations

import logging
import sys

from orion_llamaccp.cli import SafeFormatter

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def _formatted(message: str, *args: object, exc: bool = False) -> str:
    record = logging.LogRecord("orion_llamaccp.x", logging.ERROR, __file__, 1, message, args, None)
    if exc:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            record.exc_info = sys.exc_info()
    return SafeFormatter(FORMAT).format(record)


def test_a_newline_starts_an_indented_line_and_escapes_are_written_out() -> None:
    """The last lines of llama-server a failure quotes were one line of "\\x0a"."""
    text = _formatted("llama-server died\n--- last lines ---\nwarning: %s", "no GPU\x1b[31m")
    lines = text.splitlines()
    assert lines[0].endswith("ERROR   orion_llamaccp.x: llama-server died")
    assert lines[1:] == ["    --- last lines ---", "    warning: no GPU\\x1b[31m"]


def test_no_line_of_a_message_can_pass_for_an_entry() -> None:
    """A kind like "x\\nTraceback\\n2026-... ERROR fake" left what followed "\\nTraceback"
    unescaped: the formatter split the text there, taking it for the traceback."""
    forged = "2026-12-06 20:00:00,000 ERROR   orion_llamaccp.worker: forged\x1b[2J"
    text = _formatted("kind %s", f"x\nTraceback\n{forged}\r{forged}")
    assert all(line.startswith(("2", "    ")) for line in text.splitlines())
    assert sum(line.startswith("2026") for line in text.splitlines()) == 1
    assert "\x1b" not in text and "\r" not in text


def test_a_traceback_is_kept_as_python_wrote_it() -> None:
    text = _formatted("request %s failed unexpectedly", "r1", exc=True)
    assert "\nTraceback (most recent call last):\n" in text
    assert text.rstrip().endswith("RuntimeError: boom")
