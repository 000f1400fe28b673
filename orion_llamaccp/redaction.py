"""Secrets kept out of what the service says: logs, announcements, errors, CLI output.

What is said passes through ``redact`` with the secrets it may hold: ``Settings.redact``
with those the settings know (``Settings.secrets``: the Hugging Face token and the
passwords of the bus URL, the Hub endpoint and the advertised URL, found by
``url_passwords``; values under 4 characters are left, as they would star out common
text), the Hub client with its own. A
secret is also replaced in the forms it takes once a library quotes it back (the escapes
of a ``repr``, percent-encoding). ``mask_url`` writes a URL for display with its password
starred. (llama-server's API key is masked where its command line is shown:
``LaunchSpec.masked_argv`` in engine/command.py.)
"""

from __future__ import annotations

import functools
import re
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit


def url_passwords(url: str) -> list[str]:
    """Every password a client reads from ``url``: userinfo (as written and decoded) and
    redis-py's ``?password=``."""
    parts = urlsplit(url)
    found = [parts.password, unquote(parts.password)] if parts.password else []
    for pair in parts.query.split("&"):
        key, _, value = pair.partition("=")
        if unquote(key) == "password":
            found += [value, unquote(value.replace("+", " "))]
    return [value for value in found if value]


def mask_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        parts = parts._replace(netloc=netloc)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(key == "password" for key, _ in query):
        masked = [(key, "***" if key == "password" else value) for key, value in query]
        parts = parts._replace(query=urlencode(masked, safe="*", quote_via=quote))
    return urlunsplit(parts)


def redact(text: str, secrets: list[str]) -> str:
    """``text`` without ``secrets``, also in the escaped form a repr of str or bytes gives
    them (an HTTP library quotes a bad header value as ``b'...'``), and percent-encoded,
    wholly or in part, as a URL quoted back in an error holds a password (httpx writes
    ``p;ss^`` in a URL's userinfo as ``p%3Bss%5E``)."""
    for secret in secrets:
        for form in sorted(_forms(secret), key=len, reverse=True):
            text = text.replace(form, "***")
        if "%" in text:
            text = _percent_encoded(secret).sub("***", text)
    return text


@functools.lru_cache(maxsize=64)
def _percent_encoded(secret: str) -> re.Pattern[str]:
    """``secret`` with any of its characters written as ``%XX`` (UTF-8, either case)."""
    return re.compile("".join(_char_forms(char) for char in secret))


def _char_forms(char: str) -> str:
    encoded = "".join(
        f"%[{h[0]}{h[0].lower()}][{h[1]}{h[1].lower()}]"
        for h in (f"{b:02X}" for b in char.encode())
    )
    return f"(?:{re.escape(char)}|{encoded})"


def _forms(secret: str) -> set[str]:
    encoded = repr(secret.encode("utf-8", "backslashreplace"))[2:-1]
    return {secret, repr(secret)[1:-1], ascii(secret)[1:-1], encoded} - {""}
