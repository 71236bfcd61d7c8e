"""Operator commands: ``doctor``, ``status`` and ``check``.

Each module keeps its queries (async, against a real connection) apart from
its formatting (pure functions of plain values), so the text a sysadmin
reads is tested without a database and the queries without parsing text.
The click commands in :mod:`order_monitor.cli` only load the settings, run
one coroutine with :func:`asyncio.run` and print.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import unicodedata
from collections.abc import Iterator
from typing import Any, Final, TextIO

import psycopg
import structlog
from psycopg.conninfo import conninfo_to_dict

from order_monitor.redaction import scrub

__all__ = ["database_error", "dumps", "logs_to_stderr", "printable"]


class _StderrLoggerFactory:
    """A structlog logger factory that looks sys.stderr up at each call.

    Resolved late on purpose: a stream captured at configuration time could be
    closed by the time a log line comes (a test runner swapping streams).
    """

    def __call__(self, *args: Any) -> structlog.WriteLogger:
        stream: TextIO = sys.stderr
        return structlog.WriteLogger(stream)


@contextlib.contextmanager
def logs_to_stderr(level: int = logging.WARNING) -> Iterator[None]:
    """Send log lines to stderr, at *level* and above, while the block runs.

    The report goes to stdout alone (so ``--json`` stays parseable), and what
    the engine's modules log on the way (a provider's bad body) is still seen.
    The previous structlog configuration is restored afterwards.
    """
    was_configured = structlog.is_configured()
    saved = structlog.get_config()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_StderrLoggerFactory(),
        cache_logger_on_first_use=False,
    )
    try:
        yield
    finally:
        if was_configured:
            structlog.configure(**saved)
        else:
            structlog.reset_defaults()


# Controls (a line break too: a value must not start a line of its own),
# format characters (bidi overrides, zero-width ones, soft hyphens), lone
# surrogates and line/paragraph separators: what a provider's text could use
# to repaint an operator's terminal or disguise a line. By Unicode category,
# so no list of code points can fall behind.
_UNPRINTABLE_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _unprintable(char: str, keep: str) -> bool:
    return char not in keep and unicodedata.category(char) in _UNPRINTABLE_CATEGORIES


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: str) -> str:
    """*text* with every control and invisible format character shown as an escape.

    For one line of an operator command's output: the provider's words (and
    any text from the table) reach a terminal as text, never as a command
    to it. Tabs and every printable letter, Turkish and Arabic included, stay.
    """
    if text.isprintable():
        return text
    return "".join(_escape(c) if _unprintable(c, "\t") else c for c in text)


def dumps(document: Any) -> str:
    """*document* as indented JSON that is as safe in a terminal as :func:`printable` text.

    json escapes the C0 controls inside strings itself (so any line break left
    is the indentation's); the others are escaped here as \\uXXXX (a
    surrogate pair above U+FFFF), which is still the same JSON string for any
    parser.
    """
    text = json.dumps(document, ensure_ascii=False, indent=2)
    return "".join(_json_escape(c) if _unprintable(c, "\n") else c for c in text)


def _json_escape(char: str) -> str:
    code = ord(char)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def database_error(exc: psycopg.Error, dsn: str) -> str:
    """A database error as one line, with the DSN's password removed if echoed."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    try:
        password = conninfo_to_dict(dsn).get("password")
    except psycopg.Error:
        password = None
    return scrub(text, [str(password)] if password else [])
