"""Structured logging: one JSON object a line in production, readable text on a terminal.

Event names are stable identifiers (``order.checked``, ``listener.reconnected``);
the fields carry the variables. Under systemd (``JOURNAL_STREAM`` set) each
line starts with its syslog priority (``<3>`` …), which journald strips and
stores, so ``journalctl -p err -u order-monitor`` works.
"""

from __future__ import annotations

import json
import logging
import os
import re
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


# Lone surrogates (cannot be encoded), and control characters but tab and
# newline (NUL, a terminal's ESC, CR that would forge a line).
_UNPRINTABLE: Final = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def safe_text(text: str) -> str:
    """*text* with every character a log line must not hold written as an escape.

    ``"AB\ud800\x00"`` becomes ``"AB\\ud800\\x00"``: readable, encodable
    as strict UTF-8 and harmless on a terminal.
    """
    # isprintable() is a C loop and true for nearly every log string (it is
    # false for tab and newline too, which the pattern then lets through).
    if text.isprintable() or not _UNPRINTABLE.search(text):
        return text
    return _UNPRINTABLE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _safe_value(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return safe_text(value)
    if depth > 8:
        return safe_text(repr(value))
    if isinstance(value, dict):
        return {_safe_value(k, depth + 1): _safe_value(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_safe_value(v, depth + 1) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((_safe_value(v, depth + 1) for v in value), key=repr)
    return value


def _safe_strings(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Make every string of the event (keys, values, nested ones) safe to render.

    Provider text is cleaned where it is read; this is the guarantee that no
    odd string anywhere (an exception's text, a field nobody cleaned) can
    make the renderer raise and take the daemon down with it.
    """
    # Nearly every event is flat, with printable strings: checked in one pass,
    # and handed on as it is, rather than rebuilt (this runs for every line).
    for key, value in event_dict.items():
        if not (
            type(key) is str
            and key.isprintable()
            and (type(value) in _PLAIN or (type(value) is str and value.isprintable()))
        ):
            return {_safe_value(k): _safe_value(v) for k, v in event_dict.items()}
    return event_dict


#: Values that render safely as they are (bool is an int to isinstance, not to type).
_PLAIN: Final = frozenset({int, float, bool, type(None)})


def _json_default(value: object) -> str:
    # Objects json does not know (UUID, datetime, Decimal...): their str, or
    # repr when str itself fails; never an exception out of the renderer.
    try:
        return safe_text(str(value))
    except Exception:
        return safe_text(object.__repr__(value))


#: One encoder for every line: json.dumps with any option builds a new one per call.
_ENCODER: Final = json.JSONEncoder(ensure_ascii=False, default=_json_default)


def _dumps(value: Any, **_: Any) -> str:
    # structlog passes its own fallback (repr) and options; ours also survives
    # a failing str(), and the options are the encoder's.
    return _ENCODER.encode(value)


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
        renderer = [_safe_strings, structlog.dev.ConsoleRenderer(colors=out.isatty())]
    else:
        renderer = [
            structlog.processors.format_exc_info,
            _safe_strings,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ]
        if os.environ.get("JOURNAL_STREAM"):
            # A processor that runs after the renderer sees the rendered string.
            renderer.append(_syslog_prefix)  # type: ignore[arg-type]
    structlog.configure(
        processors=[*shared, *renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=_SharedWriter(out),
        cache_logger_on_first_use=False,
    )


class _SharedWriter:
    """A logger factory that hands out one WriteLogger for the stream.

    structlog's lazy proxies bind anew at every call (they must: a cached
    logger would miss the next configure(), at SIGHUP or in capture_logs),
    and WriteLoggerFactory builds a new WriteLogger each time: a tenth of
    the cost of a log line. The writer holds nothing but the stream (and
    its lock), so one serves every logger.
    """

    __slots__ = ("_writer",)

    def __init__(self, stream: TextIO) -> None:
        self._writer = structlog.WriteLogger(stream)

    def __call__(self, *_: Any) -> structlog.WriteLogger:
        return self._writer


def get_logger(**initial: Any) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(**initial)
    return logger
