"""Operator commands: ``doctor``, ``status`` and ``check``.

Each module keeps its queries (async, against a real connection) apart from
its formatting (pure functions of plain values), so the text a sysadmin
reads is tested without a database and the queries without parsing text.
The click commands in :mod:`order_monitor.cli` only load the settings, run
one coroutine with :func:`asyncio.run` and print.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any, TextIO

import psycopg
import structlog
from psycopg.conninfo import conninfo_to_dict

from order_monitor.redaction import scrub

__all__ = ["database_error", "logs_to_stderr"]


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


def database_error(exc: psycopg.Error, dsn: str) -> str:
    """A database error as one line, with the DSN's password removed if echoed."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    try:
        password = conninfo_to_dict(dsn).get("password")
    except psycopg.Error:
        password = None
    return scrub(text, [str(password)] if password else [])
