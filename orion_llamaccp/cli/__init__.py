"""The ``orion-llamaccp`` command line: the only place that configures logging.

Each group of subcommands lives in its own module with a ``register(subparsers)`` function;
every handler takes ``(args, settings)`` and returns an exit code. A package error is
printed as one line, ``error: ...``, with exit status 1: no traceback for a user mistake.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

import orjson

from orion_llamaccp import __version__
from orion_llamaccp.errors import OrionLlamaError
from orion_llamaccp.settings import env_file_unparsed, load_settings, unread_variables

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    from orion_llamaccp.cli import bus_cmds, config_cmds, model_cmds, serve_cmds

    parser = argparse.ArgumentParser(
        prog="orion-llamaccp",
        description="Serve a GGUF model with llama-server on the Orion bus.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (config_cmds, model_cmds, serve_cmds, bus_cmds):
        module.register(sub)
    return parser


def positive(kind: type[int] | type[float]) -> Any:
    """An argparse type: a number above 0. ``watch --refresh 0`` redrew in a busy loop,
    ``chat --timeout -1`` gave up before the answer could come, ``--max-tokens 0`` was
    taken for "unset"."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
        return value

    return parse


class SafeFormatter(logging.Formatter):
    """Escapes control characters, so text from the bus cannot forge log lines.

    A request's kind or a llama-server line may hold a newline or a terminal escape;
    logged as is, it could fake an entry or repaint an operator's terminal. A newline
    starts an indented line, which no entry does (the last lines of llama-server that a
    failure quotes were one line of "\\x0a" to read); the rest are written as ``\\xNN``.
    """

    _TABLE = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F) if c not in (0x09, 0x0A)}
    _TABLE[0x0A] = "\n    "

    def formatMessage(self, record: logging.LogRecord) -> str:
        # The record's line alone: a traceback is added after it as it stands (a message
        # holding "\nTraceback" left what followed it unescaped, where it was split there).
        return super().formatMessage(record).translate(self._TABLE)


def setup_logging(level: str, verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.getLevelName(level),
        handlers=[handler],
    )
    for noisy in ("httpx", "httpcore", "filelock", "huggingface_hub", "httpx2", "httpcore2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_async(coro: Coroutine[Any, Any, int]) -> int:
    """Run the one event loop of the process (uvloop when installed)."""
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def error_code(exc: BaseException) -> str:
    """A short code for an error, as the bus's own failures carry one: ``ModelCorrupt``
    is ``model_corrupt``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


def fail(message: str, code: str, *, as_json: bool = False) -> int:
    """Say a command's failure; exit status 1. With ``--json``, as JSON on stdout, shaped
    as a failed chat's result (``{"error": code, "details": {"message": ...}}``): a script
    that reads the command's JSON got text on stderr and nothing on stdout to parse."""
    if as_json:
        said = {"error": code, "details": {"message": message}}
        sys.stdout.write(orjson.dumps(said, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(f"error: {message}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # A line of .env it cannot parse: said by unread_variables, with the file's name.
    logging.getLogger("dotenv.main").setLevel(logging.ERROR)
    settings = None
    try:
        settings = load_settings()
        setup_logging(settings.log_level, args.verbose)
        for unread in unread_variables():
            log.warning("%s", unread)
        return int(args.handler(args, settings) or 0)
    except OrionLlamaError as exc:
        if settings is None:  # a line of .env it could not read may be why
            for said in env_file_unparsed():
                print(f"note: {said}", file=sys.stderr)
        return fail(str(exc), error_code(exc), as_json=getattr(args, "json", False))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # ``... | head``: the reader is gone; exit 1, no traceback
        # Python would try to flush stdout at exit, and complain of the pipe again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
