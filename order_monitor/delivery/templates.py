"""An action's templates: the placeholders of its URL, headers and body, parsed and rendered.

A template is text with placeholders in braces (``{ids}``, ``{column:tenantId}``);
``{{`` and ``}}`` stand for a literal brace. What each placeholder becomes
depends on where it stands:

* in the URL, a value is percent-encoded whole (a tenant ``a/b?c`` stays one
  path segment);
* in a header, a value never carries a line break, NUL or any other control
  character (nor a lone surrogate): each becomes U+FFFD, so a column or a
  message can neither add a header nor make the request unsendable;
* in the body, a JSON string that is exactly one placeholder becomes the value
  itself (``"{ids}"`` the list of order ids, ``"{column:X}"`` the recorded
  value with its JSON type, ``"{message}"`` the note or null); inside other
  text a value is written as text.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

#: Placeholders without an argument.
SIMPLE: Final = frozenset({"ids", "delivery_ids", "request_id", "outcome", "message"})
#: Placeholders with one (``{column:NAME}``, ``{secret:NAME}``).
NAMED: Final = frozenset({"column", "secret"})
#: Lists: only as a whole JSON string of the body.
LISTS: Final = frozenset({"ids", "delivery_ids"})
#: Placeholders whose value may differ between orders: orders share a request
#: only when all of these have the same values for them.
PER_REQUEST: Final = frozenset({"outcome", "message", "column"})

_TOKEN: Final = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
#: What a header value cannot carry: C0 and C1 controls, DEL, lone surrogates.
_HEADER_UNSAFE: Final = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
#: What a JSON body cannot usefully carry: NUL (no PostgreSQL text holds it)
#: and lone surrogates (not encodable as UTF-8).
_JSON_UNSAFE: Final = re.compile("[\x00\ud800-\udfff]")


class TemplateError(ValueError):
    """A template that cannot be parsed; the message says why (it quotes no value)."""


@dataclass(frozen=True, slots=True)
class Placeholder:
    kind: str
    #: The column's or secret's name; None for the others.
    name: str | None = None

    def __str__(self) -> str:
        return "{" + self.kind + ("" if self.name is None else ":" + self.name) + "}"


Part = str | Placeholder


@dataclass(frozen=True, slots=True)
class Template:
    parts: tuple[Part, ...]

    @property
    def placeholders(self) -> tuple[Placeholder, ...]:
        return tuple(p for p in self.parts if isinstance(p, Placeholder))

    @property
    def whole(self) -> Placeholder | None:
        """The placeholder the template is exactly, if it is one."""
        if len(self.parts) == 1 and isinstance(self.parts[0], Placeholder):
            return self.parts[0]
        return None

    @property
    def literal(self) -> str:
        """The template's literal text (braces unescaped), placeholders left out."""
        return "".join(p for p in self.parts if isinstance(p, str))


@functools.lru_cache(maxsize=1024)
def parse_template(text: str) -> Template:
    """*text* as literal parts and placeholders; raises TemplateError."""
    parts: list[Part] = []
    literal: list[str] = []
    position = 0
    for match in _TOKEN.finditer(text):
        literal.append(text[position : match.start()])
        position = match.end()
        token = match.group()
        if token in ("{{", "}}"):
            literal.append(token[0])
            continue
        if token in ("{", "}"):
            raise TemplateError(
                f"a lone {token!r}: write {token * 2!r} for a literal brace, "
                "or close the placeholder"
            )
        placeholder = _placeholder(match.group(1))
        if literal and "".join(literal):
            parts.append("".join(literal))
        literal = []
        parts.append(placeholder)
    literal.append(text[position:])
    if "".join(literal):
        parts.append("".join(literal))
    return Template(tuple(parts))


def _placeholder(content: str) -> Placeholder:
    kind, colon, name = content.partition(":")
    if not colon and kind in SIMPLE:
        return Placeholder(kind)
    if colon and kind in NAMED:
        if not name:
            raise TemplateError(f"{{{kind}:}} needs a name, e.g. {{{kind}:NAME}}")
        return Placeholder(kind, name)
    known = ", ".join([*(f"{{{k}}}" for k in sorted(SIMPLE)), "{column:NAME}", "{secret:NAME}"])
    shown = content if len(content) <= 40 else content[:40] + "…"
    raise TemplateError(f"unknown placeholder {{{shown}}}; known: {known}")


def template_texts(url: str, headers: Mapping[str, str], body: object) -> list[str]:
    """Every template text of an action: its URL, its headers' values, its body's strings."""
    return [url, *headers.values(), *body_strings(body)]


def placeholders_of(texts: Sequence[str]) -> list[Placeholder]:
    """Every placeholder of *texts*, in order, repeats included (TemplateError if one is bad)."""
    return [p for text in texts for p in parse_template(text).placeholders]


def body_strings(value: object) -> list[str]:
    """Every string of a body template (values, not keys), in order."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [s for v in value.values() for s in body_strings(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in body_strings(v)]
    return []


def body_keys(value: object) -> list[str]:
    """Every key of a body template's tables, at any depth."""
    if isinstance(value, Mapping):
        return [str(k) for k in value] + [k for v in value.values() for k in body_keys(v)]
    if isinstance(value, list | tuple):
        return [k for v in value for k in body_keys(v)]
    return []


# --- rendering ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Values:
    """What the placeholders of one request stand for."""

    outcome: str
    message: str | None
    #: The recorded row values (of the first order: every order of a request
    #: has the same values for the columns the templates use).
    columns: Mapping[str, Any]
    request_id: str
    order_ids: Sequence[str] = ()
    delivery_ids: Sequence[str] = ()
    secrets: Mapping[str, str] | None = None


def as_text(value: object) -> str:
    """A recorded value as text: strings as they are, null as nothing, the rest as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def group_key(value: object) -> str:
    """*value* in a form that tells apart every two different JSON values (1, "1", true)."""
    return json.dumps(value, ensure_ascii=True, sort_keys=True, separators=(",", ":"))


def _text_value(placeholder: Placeholder, values: Values) -> str:
    if placeholder.kind == "outcome":
        return values.outcome
    if placeholder.kind == "message":
        return values.message or ""
    if placeholder.kind == "request_id":
        return values.request_id
    if placeholder.kind == "column":
        return as_text(values.columns.get(placeholder.name or ""))
    # Lists and secrets never reach here: the action's checks keep them out
    # of the places that render text.
    raise TemplateError(f"{placeholder} cannot stand here")


def _render(template: Template, values: Values, encode: Callable[[str], str]) -> str:
    out: list[str] = []
    for part in template.parts:
        if isinstance(part, str):
            out.append(part)
        elif part.kind == "secret":
            secret = None if values.secrets is None else values.secrets.get(part.name or "")
            if secret is None:
                raise TemplateError(f"{part} has no value")
            out.append(secret)
        else:
            out.append(encode(_text_value(part, values)))
    return "".join(out)


def url_encode(text: str) -> str:
    """A value made one opaque piece of a URL (every reserved character encoded)."""
    return quote(clean_json_text(text), safe="")


def header_safe(text: str) -> str:
    """A value that cannot break a header: control characters and lone surrogates -> U+FFFD."""
    return _HEADER_UNSAFE.sub("\ufffd", text)


def clean_json_text(text: str) -> str:
    """A string a JSON body can carry as UTF-8: NUL and lone surrogates -> U+FFFD."""
    return _JSON_UNSAFE.sub("\ufffd", text)


def render_url(text: str, values: Values) -> str:
    return _render(parse_template(text), values, url_encode)


def render_header(text: str, values: Values) -> str:
    # The whole value once more: a secret or the template's own text with a
    # line break would otherwise add a header (or make aiohttp refuse it).
    return header_safe(_render(parse_template(text), values, header_safe))


def render_body(template: object, values: Values) -> object:
    """The body template with every placeholder replaced (a JSON-able value)."""
    if isinstance(template, str):
        return _render_string(template, values)
    if isinstance(template, Mapping):
        return {clean_json_text(str(k)): render_body(v, values) for k, v in template.items()}
    if isinstance(template, list | tuple):
        return [render_body(v, values) for v in template]
    return template


def _render_string(text: str, values: Values) -> object:
    parsed = parse_template(text)
    whole = parsed.whole
    if whole is not None:
        if whole.kind == "ids":
            return list(values.order_ids)
        if whole.kind == "delivery_ids":
            return list(values.delivery_ids)
        if whole.kind == "column":
            return clean_json(values.columns.get(whole.name or ""))
        if whole.kind == "message":
            return None if values.message is None else clean_json_text(values.message)
    return clean_json_text(_render(parsed, values, lambda s: s))


def clean_json(value: object) -> object:
    """*value* with every string (keys too) through :func:`clean_json_text`."""
    if isinstance(value, str):
        return clean_json_text(value)
    if isinstance(value, Mapping):
        return {clean_json_text(str(k)): clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    return value


def dump_json(value: object) -> bytes:
    """The bytes sent: compact UTF-8 JSON (strings already cleaned)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
