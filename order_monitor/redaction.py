"""Keeping provider tokens and database passwords out of logs and errors.

Two tools, for two kinds of text:

* :func:`redact_dsn` and :func:`redact_url` take text of a known shape (a
  DSN, a URL we built) and hide the secret *by position* (the userinfo
  password, the value of a named parameter), whatever the secret is.
* :func:`scrub` takes free text nobody shaped for us (a provider's answer, an
  exception's text) and hides given secret *values* wherever they occur, in
  any encoding a client or a provider may have put them in. It compares
  decoded text, not encoded forms: the text is read once as it is, once
  percent-decoded (with and without ``+`` as a space, so every "safe" set
  ``quote`` or yarl may have used is covered), once with backslash escapes
  (JSON, Python repr) decoded and once with HTML character references
  decoded, and combinations of two of those; a match in any reading hides the
  original characters it came from.

Short secrets (fewer than :data:`MIN_FREE_TEXT` characters) are hidden only
where they stand as a whole *value*: after ``=``, as a quoted JSON value, as a
URL's userinfo password. Replacing every ``a`` of a message for a one-letter
secret would not only wreck the message, the pattern of holes would *tell* a
reader the secret ("requ***st f***il***d"). A value position shows nothing
but that a value was there. Credentials that short are no credentials; the
rule exists so that even they never show where we ourselves put them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Final, NamedTuple
from urllib.parse import unquote

REDACTED: Final = "***"
#: Secrets at least this long are hidden wherever they occur in free text.
MIN_FREE_TEXT: Final = 3


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


# --- text of a known shape ---------------------------------------------------------------


def redact_dsn(dsn: str) -> str:
    """Return *dsn* with any password replaced, in the form it was given.

    Everything but the passwords is kept character for character (a
    ``%20`` in ``options=`` stays ``%20``: libpq reads no ``+`` as a space,
    so re-encoding would show a different DSN). Multi-host URIs
    (``postgresql://u:pw@h1:5432,h2:5433/db``) keep their host list; a
    password holding an unencoded ``@`` is hidden up to the last ``@`` of the
    authority. Never raises.
    """
    if not dsn:
        return dsn
    if "://" in dsn:
        return _redact_uri(dsn, _is_password_key)
    return _CONNINFO_PASSWORD.sub(r"\1" + REDACTED, dsn)


def redact_url(url: str, secret_keys: set[str]) -> str:
    """Redact userinfo passwords and the named query parameters (lower case) of *url*."""
    keys = {k.lower() for k in secret_keys}
    return _redact_uri(url, keys.__contains__)


def redact_query(query: str, secret_keys: set[str] | Callable[[str], bool]) -> str:
    """Redact the values of *secret_keys* (names, or a test on the name) in a query string.

    Keys compare percent-decoded and lower-cased; every other character is
    kept as given.
    """
    if not query:
        return query
    is_secret = secret_keys if callable(secret_keys) else secret_keys.__contains__
    pairs = []
    for pair in query.split("&"):
        key, eq, _ = pair.partition("=")
        if eq and is_secret(unquote(key.replace("+", " ")).strip().lower()):
            pair = f"{key}={REDACTED}"
        pairs.append(pair)
    return "&".join(pairs)


def _redact_uri(uri: str, is_secret: Callable[[str], bool]) -> str:
    scheme, _, rest = uri.partition("://")
    rest, hash_, fragment = rest.partition("#")
    rest, question, query = rest.partition("?")
    # The userinfo ends at the last "@" before the path: a password with an
    # unencoded "@" (or "/") then stays hidden whole.
    at = rest.rfind("@")
    if at >= 0:
        userinfo = rest[:at]
        user, colon, _ = userinfo.partition(":")
        if colon:
            rest = f"{user}:{REDACTED}{rest[at:]}"
    query = redact_query(query, is_secret)
    return f"{scheme}://{rest}{question}{query}{hash_}{fragment}"


def _is_password_key(key: str) -> bool:
    # password, sslpassword: every libpq parameter that carries a secret.
    return key.endswith("password")


# A conninfo value: single-quoted with backslash escapes (an unterminated
# quote runs to the end), or unquoted, where a backslash escapes the next
# character, a space included (libpq's conninfo_parse).
_CONNINFO_VALUE: Final = r"(?:'(?:[^'\\]|\\.)*(?:'|\\?$)|(?:\\.|[^\s\\'])(?:\\.|\\$|[^\s\\])*)"
_CONNINFO_PASSWORD: Final = re.compile(
    r"(\b\w*password\s*=\s*)" + _CONNINFO_VALUE, re.IGNORECASE | re.DOTALL
)
# scheme://user:PASSWORD@host in free text: up to the last "@" before a space or "/".
_URI_PASSWORD: Final = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s/:@]*:)[^\s/]*(?=@)", re.IGNORECASE)


# --- free text ---------------------------------------------------------------------------


class _Unit(NamedTuple):
    """One character of a reading of the text, and the span of the original it came from."""

    char: str
    start: int
    end: int


_Reading = Sequence[_Unit]
_Decoder = Callable[[_Reading], _Reading]
_HEX: Final = frozenset("0123456789abcdefABCDEF")


def _percent(units: _Reading, *, plus: bool) -> _Reading:
    out: list[_Unit] = []
    i, n = 0, len(units)
    while i < n:
        unit = units[i]
        if unit.char == "+" and plus:
            out.append(_Unit(" ", unit.start, unit.end))
            i += 1
            continue
        if unit.char != "%":
            out.append(unit)
            i += 1
            continue
        # A run of %XX escapes: bytes, decoded as UTF-8 one character at a time
        # so that each character keeps the span of the escapes it came from.
        run: list[tuple[int, int, int]] = []
        j = i
        while (
            j + 2 < n
            and units[j].char == "%"
            and units[j + 1].char in _HEX
            and units[j + 2].char in _HEX
        ):
            run.append(
                (int(units[j + 1].char + units[j + 2].char, 16), units[j].start, units[j + 2].end)
            )
            j += 3
        if not run:
            out.append(unit)
            i += 1
            continue
        k = 0
        while k < len(run):
            for size in (1, 2, 3, 4):
                chunk = bytes(b for b, _, _ in run[k : k + size])
                try:
                    char = chunk.decode("utf-8")
                except UnicodeDecodeError:
                    continue
                break
            else:
                size, char = 1, "\ufffd"
            out.append(_Unit(char, run[k][1], run[k + size - 1][2]))
            k += size
        i = j
    return out


def _percent_raw(units: _Reading) -> _Reading:
    return _percent(units, plus=False)


def _percent_plus(units: _Reading) -> _Reading:
    return _percent(units, plus=True)


_SIMPLE_ESCAPES: Final = {
    "n": "\n",
    "t": "\t",
    "r": "\r",
    "b": "\b",
    "f": "\f",
    "0": "\0",
    "/": "/",
    "\\": "\\",
    '"': '"',
    "'": "'",
}
_ESCAPE_DIGITS: Final = {"x": 2, "u": 4, "U": 8}


def _backslash(units: _Reading) -> _Reading:
    """JSON and Python escapes: \\n, \\", \\/, \\xNN, \\uNNNN (surrogate pairs too), \\UNNNNNNNN."""
    out: list[_Unit] = []
    i, n = 0, len(units)
    while i < n:
        unit = units[i]
        if unit.char != "\\" or i + 1 >= n:
            out.append(unit)
            i += 1
            continue
        kind = units[i + 1].char
        if kind in _SIMPLE_ESCAPES:
            out.append(_Unit(_SIMPLE_ESCAPES[kind], unit.start, units[i + 1].end))
            i += 2
            continue
        digits = _ESCAPE_DIGITS.get(kind)
        text = "".join(u.char for u in units[i + 2 : i + 2 + digits]) if digits else ""
        if digits is None or len(text) != digits or not set(text) <= _HEX:
            out.append(unit)
            i += 1
            continue
        code, end = int(text, 16), i + 2 + digits
        if 0xD800 <= code < 0xDC00 and kind == "u":
            low = "".join(u.char for u in units[end : end + 6])
            if len(low) == 6 and low[:2] == "\\u" and set(low[2:]) <= _HEX:
                low_code = int(low[2:], 16)
                if 0xDC00 <= low_code < 0xE000:
                    code = 0x10000 + ((code - 0xD800) << 10) + (low_code - 0xDC00)
                    end += 6
        char = chr(code) if code <= 0x10FFFF else "\ufffd"
        out.append(_Unit(char, unit.start, units[end - 1].end))
        i = end
    return out


_NAMED_REFS: Final = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'", "nbsp": "\xa0"}
_HTML_REF: Final = re.compile(r"&(?:#([0-9]{1,7})|#[xX]([0-9a-fA-F]{1,6})|([a-zA-Z]{2,6}));")


def _html(units: _Reading) -> _Reading:
    """Character references of an HTML error page: &amp;, &#43;, &#x2B;."""
    text = "".join(u.char for u in units)
    out: list[_Unit] = []
    last = 0
    for match in _HTML_REF.finditer(text):
        decimal, hexa, name = match.groups()
        if name is not None:
            char = _NAMED_REFS.get(name)
        else:
            code = int(decimal, 10) if decimal is not None else int(hexa, 16)
            char = chr(code) if code <= 0x10FFFF else None
        if char is None:
            continue
        out.extend(units[last : match.start()])
        out.append(_Unit(char, units[match.start()].start, units[match.end() - 1].end))
        last = match.end()
    out.extend(units[last:])
    return out


#: The characters a decoder in :func:`_readings` acts on.
_DECODABLE: Final = re.compile(r"[%+\\&]")


def _readings(text: str) -> list[_Reading]:
    """The text as it is, and as each plausible decoding (or two in a row) reads it."""
    plain = [_Unit(c, i, i + 1) for i, c in enumerate(text)]
    decoders: list[_Decoder] = []
    if "%" in text or "+" in text:
        decoders += [_percent_raw, _percent_plus]
    if "\\" in text:
        decoders.append(_backslash)
    if "&" in text:
        decoders.append(_html)
    readings: list[_Reading] = [plain]
    for first in decoders:
        once = first(plain)
        readings.append(once)
        for second in decoders:
            if second is not first:
                readings.append(second(once))
    return readings


# A short secret counts only as a whole value: what may follow it.
_VALUE_END: Final = frozenset("&;,|#'\"<>)]}") | frozenset(" \t\r\n\f\v")


def _spans(reading: _Reading, secret: str) -> list[tuple[int, int]]:
    """Spans of the original text where *secret* shows in this reading."""
    chars = "".join(u.char for u in reading)
    size = len(secret)
    found: list[tuple[int, int]] = []
    start = chars.find(secret)
    while start >= 0:
        end = start + size
        if size >= MIN_FREE_TEXT or _is_value(chars, start, end):
            found.append((reading[start].start, reading[end - 1].end))
        start = chars.find(secret, start + 1)
    return found


def _is_value(chars: str, start: int, end: int) -> bool:
    """Whether chars[start:end] stands as a whole value (the short-secret rule)."""
    followed = chars[end] if end < len(chars) else ""
    if followed and followed not in _VALUE_END and followed != "@":
        return False
    previous = chars[start - 1] if start else ""
    if previous == "=":
        return followed != "@"
    # Only a bounded look back: this runs for every occurrence of the secret.
    before = chars[max(0, start - 256) : start]
    if previous == ":":
        # scheme://user:SECRET@host
        return followed == "@" and _USERINFO_HEAD.search(before) is not None
    # "key": "SECRET" in a JSON body.
    return previous == '"' and followed == '"' and _JSON_KEY_HEAD.search(before) is not None


_USERINFO_HEAD: Final = re.compile(r"//[^\s/:@]*:\Z")
_JSON_KEY_HEAD: Final = re.compile(r":\s*\"\Z")


def scrub(text: str, secrets: Iterable[str]) -> str:
    """*text* with every occurrence of the given secret values hidden, in any encoding.

    The last line of defence for text we do not compose ourselves (provider
    answers, exception texts); see the module docstring for what "any
    encoding" covers and for the rule on secrets shorter than
    :data:`MIN_FREE_TEXT`. Also hides ``password=`` values and URI userinfo
    passwords whatever they are. Never raises.
    """
    return scrub_prepared(text, prepare_secrets(secrets))


def prepare_secrets(secrets: Iterable[str]) -> tuple[str, ...]:
    """*secrets* as :func:`scrub_prepared` takes them: non-empty, unique, longest first."""
    return tuple(sorted({s for s in secrets if s}, key=len, reverse=True))


def scrub_prepared(text: str, values: tuple[str, ...]) -> str:
    """:func:`scrub`, with the secrets already through :func:`prepare_secrets`.

    For text scrubbed again and again with the same secrets (every string of
    every provider answer): the sorting is done once, not per string.
    """
    # The common case (a provider's status word, a Turkish message): no
    # decoder applies, so the only reading is the text itself, and no secret
    # is in it. Skips building the readings, a cost paid for every answer.
    if _DECODABLE.search(text) or any(v in text for v in values):
        text = _hide(text, values)
    # Both patterns need their anchor ("://", an "="): most text has neither.
    if "://" in text:
        text = _URI_PASSWORD.sub(r"\1" + REDACTED, text)
    if "=" in text:
        text = _CONNINFO_PASSWORD.sub(r"\1" + REDACTED, text)
    return text


#: Rounds of finding and replacing before :func:`_hide` gives up on keeping
#: any of the text. Two are enough for every text but a contrived one.
_MAX_ROUNDS: Final = 4


def _hide(text: str, values: tuple[str, ...]) -> str:
    """*text* with every reading's occurrence of *values* (longest first) replaced."""
    # Replacing can make a new occurrence out of the marker and its
    # neighbours ("x**" in "xx**" -> "x***"), so the text is searched again
    # after each round. A secret that starts or ends with "*" can chain that
    # through the whole text ("aaaa**" for "a**" loses one "a" a round), and
    # a round per character made scrubbing quadratic: a 4 KB answer blocked
    # the event loop for seconds. So the rounds are bounded, and text that
    # still shows a secret after them is hidden whole: linear in every case,
    # and such a chain is no message worth keeping.
    for _ in range(_MAX_ROUNDS):
        spans = _find(text, values)
        if not spans:
            return text
        replaced = _replace(text, spans)
        if replaced == text:
            return text
        text = replaced
    return REDACTED if _find(text, values) else text


def _find(text: str, values: tuple[str, ...]) -> list[tuple[int, int]]:
    return [span for reading in _readings(text) for v in values for span in _spans(reading, v)]


def _replace(text: str, spans: list[tuple[int, int]]) -> str:
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    parts: list[str] = []
    last = 0
    for start, end in merged:
        parts += [text[last:start], REDACTED]
        last = end
    parts.append(text[last:])
    return "".join(parts)
