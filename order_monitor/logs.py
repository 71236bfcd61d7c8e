"""Structured logging: one JSON object a line in production, readable text on a terminal.

Event names are stable identifiers (``order.checked``, ``listener.reconnected``);
the fields carry the variables. Under systemd (``JOURNAL_STREAM`` set) each
line starts with its syslog priority (``<3>`` …), which journald strips and
stores, so ``journalctl -p err -u order-monitor`` works.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Final, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_SYSLOG_PRIORITY: Final = {
    "critical": 2,
    "exception": 3,
    "error": 3,
    "warning": 4,
    "warn": 4,
    "info": 6,
    "debug": 7,
}


def _syslog_prefix(_: WrappedLogger, method: str, event: str) -> str:
    return f"<{_SYSLOG_PRIORITY.get(method, 6)}>{event}"


def _drop_color_message(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    event_dict.pop("color_message", None)
    return event_dict


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Set up structlog for the whole process. Safe to call again (SIGHUP)."""
    out = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_color_message,
    ]
    renderer: list[Processor]
    if fmt == "console":
        renderer = [structlog.dev.ConsoleRenderer(colors=out.isatty())]
    else:
        renderer = [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(ensure_ascii=False),
        ]
        if os.environ.get("JOURNAL_STREAM"):
            # A processor that runs after the renderer sees the rendered string.
            renderer.append(_syslog_prefix)  # type: ignore[arg-type]
    structlog.configure(
        processors=[*shared, *renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


def get_logger(**initial: Any) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(**initial)
    return logger
