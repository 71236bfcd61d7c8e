"""Keeping provider tokens and database passwords out of logs and errors."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED: Final = "***"


class Secret:
    """A string that never shows itself in repr(), str() or a log line.

    Call :meth:`reveal` at the one place the value is really needed (a request
    header, a connection attempt).
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({REDACTED!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


def redact_dsn(dsn: str) -> str:
    """Return *dsn* with any password replaced, in the form it was given."""
    if not dsn:
        return dsn
    if "://" in dsn:
        parts = urlsplit(dsn)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostinfo = netloc.rpartition("@")
            if ":" in userinfo:
                userinfo = userinfo.split(":", 1)[0] + ":" + REDACTED
            netloc = f"{userinfo}@{hostinfo}"
        query = redact_query(parts.query, _is_password_key)
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    return _CONNINFO_PASSWORD.sub(r"\1" + REDACTED, dsn)


def redact_query(query: str, secret_keys: set[str] | Callable[[str], bool]) -> str:
    """Redact the values of *secret_keys* (names, or a test on the name) in a query string."""
    if not query:
        return query
    is_secret = secret_keys if callable(secret_keys) else secret_keys.__contains__
    pairs = parse_qsl(query, keep_blank_values=True)
    return urlencode(
        [(key, REDACTED if is_secret(key.lower()) else value) for key, value in pairs],
        safe="*[],",
    )


def _is_password_key(key: str) -> bool:
    # password, sslpassword: every libpq parameter that carries a secret.
    return key.endswith("password")


def redact_url(url: str, secret_keys: set[str]) -> str:
    """Redact userinfo passwords and the named query parameters of *url*."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        netloc = f"{userinfo.split(':', 1)[0]}:{REDACTED}@{hostinfo}"
    return urlunsplit(
        (parts.scheme, netloc, parts.path, redact_query(parts.query, secret_keys), parts.fragment)
    )


def scrub(text: str, secrets: list[str]) -> str:
    """Remove every occurrence of the given secret values from free text.

    The last line of defence for messages we do not compose ourselves
    (exception texts from libraries that may echo a URL).
    """
    for value in secrets:
        if len(value) >= 3:
            text = text.replace(value, REDACTED)
    return _PASSWORD_IN_TEXT.sub(r"\1" + REDACTED, text)


_PASSWORD_IN_TEXT: Final = re.compile(r"(\w*password=)\S+", re.IGNORECASE)
# key=value conninfo; a value may be single-quoted with backslash escapes.
_CONNINFO_PASSWORD: Final = re.compile(r"(\b\w*password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")
