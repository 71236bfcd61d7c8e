"""ORDER_MONITOR_* values: from the process environment and the .env file.

:class:`Env` gives typed access, with errors that name the variable, show
the value and say what is expected.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import unicodedata
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Final

from dotenv import dotenv_values

from order_monitor.config.settings import UnknownVariable
from order_monitor.engine.policy import format_seconds
from order_monitor.errors import ConfigError

PREFIX: Final = "ORDER_MONITOR_"

# Postgres truncates identifiers longer than this silently; we refuse them.
_MAX_IDENTIFIER: Final = 63
_CHANNEL_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
# Line and paragraph breaks, NUL, tabs and invisible format characters. Any of
# them in a name or a word ends the `--` comment that `sql print` puts it in,
# and whatever follows runs when a DBA applies the file.
_CONTROL_CATEGORIES: Final = frozenset({"Cc", "Cf", "Zl", "Zp"})
#: The longest any interval, delay or age may be. Beyond a month a setting is a
#: mistake, and unbounded ones reach float('inf') ("9" * 400 parses).
_LONGEST: Final = 30 * 86400.0
#: ORDER_MONITOR_* names read outside load_settings, so Env never sees them
#: asked for: the env file is found before there is an Env, and the test suite
#: reads its own database (tests/conftest.py).
ENV_FILE_VARIABLE: Final = PREFIX + "ENV_FILE"
#: Where the unit and the package keep the configuration (env, dsn, providers.toml):
#: an operator's ``order-monitor doctor`` on that host reads it as the service does.
SYSTEM_CONFIG_DIR: Final = Path("/etc/order-monitor")
TEST_DSN_VARIABLE: Final = PREFIX + "TEST_DSN"
READ_ELSEWHERE: Final = frozenset({ENV_FILE_VARIABLE, TEST_DSN_VARIABLE})
#: The test suite's own switches (the TEST_DSN above, TEST_SKIP_…): never
#: a setting of the daemon, so never reported as an unknown one.
TEST_PREFIX: Final = PREFIX + "TEST_"


def unknown_variables(names: Iterable[str], known: Collection[str]) -> tuple[UnknownVariable, ...]:
    """The ORDER_MONITOR_* names among *names* that are not *known*, with a suggestion each.

    Environment names are case-sensitive: ``order_monitor_dsn`` is not read,
    so it is reported too (suggesting ``ORDER_MONITOR_DSN``).
    """
    # Compared without the prefix every name shares, which would make any two
    # names look alike.
    by_suffix = {k.removeprefix(PREFIX): k for k in known}
    found = []
    for name in sorted(names):
        if not name.upper().startswith(PREFIX) or name in known or name.startswith(TEST_PREFIX):
            continue
        close = difflib.get_close_matches(name.upper().removeprefix(PREFIX), by_suffix, n=1)
        found.append(UnknownVariable(name, by_suffix[close[0]] if close else None))
    return tuple(found)


def has_control_characters(text: str) -> bool:
    return any(unicodedata.category(ch) in _CONTROL_CATEGORIES for ch in text)


class Env:
    """Typed access to ORDER_MONITOR_* values with errors that name the variable."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = values
        #: Every name asked for, set or not (with the prefix). After
        #: load_settings this is the list of settings, kept by the code that
        #: reads them rather than by hand.
        self.asked: set[str] = set()

    def raw(self, name: str) -> str | None:
        self.asked.add(PREFIX + name)
        value = self._values.get(PREFIX + name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def string(self, name: str, default: str) -> str:
        return self.raw(name) or default

    def optional(self, name: str) -> str | None:
        return self.raw(name)

    def integer(
        self, name: str, default: int, *, minimum: int = 1, maximum: int | None = None
    ) -> int:
        raw = self.raw(name)
        if raw is None:
            return default
        expected = f"a whole number >= {minimum}" + (
            "" if maximum is None else f" and <= {maximum}"
        )
        try:
            value = int(raw.replace("_", ""))
        except ValueError:
            raise self._error(name, raw, expected) from None
        if value < minimum or (maximum is not None and value > maximum):
            raise self._error(name, raw, expected)
        return value

    def number(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        raw = self.raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise self._error(name, raw, f"a number >= {minimum}") from None
        if not math.isfinite(value) or value < minimum:
            raise self._error(name, raw, f"a number >= {minimum}")
        return value

    def duration(
        self, name: str, default: float, *, minimum: float = 0.0, maximum: float = _LONGEST
    ) -> float:
        """Seconds; *minimum* keeps an interval from turning into a busy loop."""
        raw = self.raw(name)
        if raw is None:
            return default
        try:
            value = parse_duration(raw)
        except ValueError:
            raise self._error(
                name, raw, "a duration such as 30, 30s, 1.5m, 2h or 1h30m (no sign)"
            ) from None
        if not minimum <= value <= maximum:
            raise self._error(
                name,
                raw,
                f"a duration of at least {format_seconds(minimum)} "
                f"and at most {format_seconds(maximum)}",
            )
        return value

    def boolean(self, name: str, default: bool) -> bool:
        raw = self.raw(name)
        if raw is None:
            return default
        lowered = raw.lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise self._error(name, raw, "one of true/false, yes/no, on/off, 1/0")

    def status_word(self, name: str, default: str) -> str:
        """A value of the status columns, written as given and compared with lower()."""
        return self._check_status_word(name, self.string(name, default))

    def optional_status_word(self, name: str) -> str | None:
        value = self.optional(name)
        return None if value is None else self._check_status_word(name, value)

    def status_words(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        """A comma-separated list of status words, lower-cased."""
        raw = self.raw(name)
        if raw is None:
            return default
        self._check_status_word(name, raw)
        words = tuple(w.strip().lower() for w in raw.split(",") if w.strip())
        if not words:
            raise self._error(name, raw, "a comma-separated list with at least one value")
        return words

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        raw = self.raw(name)
        if raw is None:
            return default
        if raw.lower() not in choices:
            raise self._error(name, raw, "one of " + ", ".join(choices))
        return raw.lower()

    def identifier(self, name: str, default: str) -> str:
        value = self.string(name, default)
        if len(value.encode()) > _MAX_IDENTIFIER or has_control_characters(value):
            raise self._error(
                name,
                value,
                f"a PostgreSQL name of at most {_MAX_IDENTIFIER} bytes, without line breaks, "
                "tabs or other control characters",
            )
        return self._check_no_percent(name, value, "a PostgreSQL name")

    def channel(self, name: str, default: str) -> str:
        value = self.string(name, default)
        if not _CHANNEL_RE.match(value):
            raise self._error(name, value, "a channel name: letters, digits and _, at most 63")
        return value

    def _check_status_word(self, name: str, value: str) -> str:
        if has_control_characters(value):
            raise self._error(
                name, value, "words without line breaks, tabs or other control characters"
            )
        if not value.isascii():
            # Python's 'İ'.lower() is two code points, PostgreSQL's lower()
            # depends on the collation: the daemon's comparison and the index's
            # would disagree, and the order would never match.
            raise self._error(
                name,
                value,
                "ASCII words: Python and PostgreSQL lower-case other letters differently, "
                "so a non-ASCII status would never match",
            )
        return self._check_no_percent(name, value, "words")

    def _check_no_percent(self, name: str, value: str, what: str) -> str:
        # psycopg reads every "%" of a query run with parameters as a
        # placeholder, those inside the quoted names and literals it composed
        # too (it does not escape them): such a name passed validation and
        # install, then failed every query of the daemon. Doubling them would
        # break the same SQL run without parameters (install.sql), so: refuse.
        if "%" in value:
            raise self._error(
                name,
                value,
                f"{what} without '%': the database driver would read it as a query "
                "placeholder and every query naming it would fail",
            )
        return value

    @staticmethod
    def _error(name: str, raw: str, expected: str) -> ConfigError:
        return ConfigError(f"{PREFIX}{name}={raw!r} is invalid: expected {expected}")


_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?", re.IGNORECASE)
_UNIT_SECONDS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """Seconds in '90', '90s', '1.5m', '2h', '1h30m', '250ms'."""
    text = text.strip().lower()
    total = 0.0
    position = 0
    while position < len(text):
        match = _DURATION_PART.match(text, position)
        if match is None or match.end() == position:
            raise ValueError(text)
        unit = match.group(2)
        if unit is None and match.end() != len(text):
            raise ValueError(text)
        total += float(match.group(1)) * _UNIT_SECONDS[unit]
        position = match.end()
        while position < len(text) and text[position] == " ":
            position += 1
    if not text:
        raise ValueError(text)
    return total


def system_config_file(name: str) -> Path | None:
    """``/etc/order-monitor/<name>`` if it is a file this user may read, else None."""
    path = SYSTEM_CONFIG_DIR / name
    return path if path.is_file() and os.access(path, os.R_OK) else None


def load_environment(env_file: Path | None = None) -> dict[str, str]:
    """The process environment over the .env file (the environment wins)."""
    path = env_file
    if path is None:
        configured = os.environ.get(ENV_FILE_VARIABLE)
        path = Path(configured) if configured else Path(".env")
        if not configured and not path.exists():
            # The service's own file (EnvironmentFile= in the unit), when this
            # user may read it: `order-monitor doctor` then checks what runs.
            path = system_config_file("env")
            if path is None:
                return dict(os.environ)
    if path.is_dir():
        raise ConfigError(f"env file {str(path)!r} is a directory: name the file in it")
    if not path.is_file():
        raise ConfigError(f"env file {str(path)!r} does not exist or is not a file")
    try:
        file_values = dotenv_values(path)
    except OSError as exc:
        raise ConfigError(f"env file {str(path)!r} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        # The decoder's message quotes a byte of the file, which may hold the DSN.
        raise ConfigError(f"env file {str(path)!r} is not UTF-8 text") from None
    merged = {k: v for k, v in file_values.items() if v is not None}
    merged.update(os.environ)
    return merged
