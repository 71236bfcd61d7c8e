"""json_http: a JSON-over-HTTP provider described by configuration alone.

Example (the "internal" shop of reference/providers.md)::

    [providers.internal]
    kind = "json_http"
    base_url = "https://shop.example"
    [providers.internal.secrets]
    token = { env = "INTERNAL_TOKEN" }
    [providers.internal.options]
    url = "/client/api/check?orders={refs}"    # or "...{ref}": one order a request
    batch_size = 50
    auth = { header = "api-token" }            # or { query = "token" }
    items_path = ""                            # the body itself is the list
    id_path = "orderId"
    status_path = "status"
    pin_path = "pin"                           # or a list: the first non-empty wins
    message_path = ["note", "message"]
    status_map = { done = ["approved"], failed = ["rejected"], pending = ["pending", "sent"] }

Paths are dot-separated keys, with list indexes allowed (``data.0.status``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Literal
from urllib.parse import quote, urlencode
from uuid import UUID

import aiohttp

from order_monitor.config import ProviderConfig
from order_monitor.errors import ConfigError
from order_monitor.providers.answers import first_text, match_items, scalar_text
from order_monitor.providers.base import Adapter, OrderRef, Outcome, UnusablePin, first_pin
from order_monitor.providers.http import BadAnswer, ErrorAnswer, Transport
from order_monitor.providers.options import check_keys, option_int, option_str, transport, where
from order_monitor.redaction import Secret

OPTIONS: Final = frozenset(
    {
        "method",
        "url",
        "ref_separator",
        "batch_size",
        "id_source",
        "auth",
        "items_path",
        "id_path",
        "status_path",
        "pin_path",
        "message_path",
        "status_map",
        "unmapped",
        "success_path",
        "success_values",
    }
)
DEFAULT_BATCH_SIZE: Final = 50
Path = tuple[str, ...]
Kind = Literal["done", "failed", "pending", "unknown"]
_SEGMENT: Final = re.compile(r"^[^.\s]+$")


# --- reading answers (pure) ----------------------------------------------------------


def parse_path(text: str) -> Path:
    """``"data.0.status"`` -> ``("data", "0", "status")``; ``""`` is the root."""
    if text == "":
        return ()
    segments = tuple(text.split("."))
    if not all(_SEGMENT.match(s) for s in segments):
        raise ValueError(text)
    return segments


def get_path(document: object, path: Path) -> object:
    """The value at *path*, or None when any step is missing."""
    node = document
    for segment in path:
        if isinstance(node, dict):
            node = node.get(segment)
        elif isinstance(node, list) and segment.isdigit() and int(segment) < len(node):
            node = node[int(segment)]
        else:
            return None
    return node


@dataclass(frozen=True, slots=True)
class AnswerSpec:
    """Where the facts sit in an answer, and what the status words mean."""

    status_path: Path
    status_map: Mapping[str, Kind]
    unmapped: Kind = "pending"
    #: None: the whole body is one item (one order per request only).
    items_path: Path | None = None
    id_path: Path | None = None
    pin_paths: tuple[Path, ...] = ()
    message_paths: tuple[Path, ...] = ()
    success_path: Path | None = None
    success_values: frozenset[str] = frozenset()

    def outcome(self, item: object) -> Outcome | None:
        """What one item says about its order; None when it has no status."""
        raw = scalar_text(get_path(item, self.status_path))
        if raw is None:
            return None
        kind = self.status_map.get(raw.lower(), self.unmapped)
        message = self._message(item)
        if kind == "done":
            try:
                pin = first_pin(get_path(item, path) for path in self.pin_paths)
            except UnusablePin as exc:
                return Outcome.unusable_pin(str(exc), message=message, raw_status=raw)
            return Outcome.done(pin=pin, message=message, raw_status=raw)
        if kind == "failed":
            return Outcome.failed(message=message, raw_status=raw)
        if kind == "unknown":
            return Outcome.unknown(message)
        return Outcome.pending(raw_status=raw, message=message)

    def _message(self, item: object) -> str | None:
        for path in self.message_paths:
            # A list value (e.g. barakat's replay_api) gives its first non-empty string.
            text = first_text(get_path(item, path))
            if text is not None:
                return text
        return None


def parse_document(text: str) -> object:
    body = text.strip().lstrip("\ufeff")
    if not body:
        raise BadAnswer("empty body", text)
    try:
        return json.loads(body)
    except ValueError:
        reason = "HTML page instead of JSON" if body.startswith("<") else "body is not JSON"
        raise BadAnswer(reason, text) from None


def items_of(document: object, spec: AnswerSpec, text: str) -> list[Any]:
    """The per-order items of an answer; BadAnswer/ErrorAnswer when it is not one."""
    if spec.success_path is not None:
        said = scalar_text(get_path(document, spec.success_path))
        if said is None or said.lower() not in spec.success_values:
            raise ErrorAnswer(f"answer status {said!r}, not one of options.success_values", text)
    if spec.items_path is None:
        return [document]
    items = get_path(document, spec.items_path)
    if not isinstance(items, list):
        raise BadAnswer("no list at options.items_path", text)
    return items


def parse_single(text: str, spec: AnswerSpec) -> Outcome | None:
    """One order's answer (no id_path): its outcome, or None when it is absent."""
    items = items_of(parse_document(text), spec, text)
    if not items:
        return None
    if len(items) > 1:
        raise BadAnswer(f"{len(items)} items for one order and no options.id_path", text)
    outcome = spec.outcome(items[0])
    if outcome is None:
        raise BadAnswer("no status at options.status_path", text)
    return outcome


# --- the adapter ---------------------------------------------------------------------


# Not frozen: the Adapter Protocol declares max_batch as a settable attribute.
@dataclass(slots=True)
class JsonHttpAdapter:
    base_url: str
    method: str
    url_template: str
    batched: bool
    separator: str
    id_source: Literal["reference", "order_id"]
    spec: AnswerSpec
    max_batch: int
    times_its_requests: ClassVar[bool] = True  # through self.http
    http: Transport
    token: Secret | None = None
    auth_header: str | None = None
    auth_query: str | None = None

    def key(self, order: OrderRef) -> str:
        return str(order.order_id) if self.id_source == "order_id" else order.reference.strip()

    def url(self, ids: Sequence[str]) -> str:
        encoded = self.separator.join(quote(i, safe="") for i in ids)
        url = self.base_url + self.url_template.replace(
            "{refs}" if self.batched else "{ref}", encoded
        )
        if self.token is not None and self.auth_query is not None:
            url += ("&" if "?" in url else "?") + urlencode({self.auth_query: self.token.reveal()})
        return url

    def headers(self) -> dict[str, str]:
        if self.token is not None and self.auth_header is not None:
            return {self.auth_header: self.token.reveal()}
        return {}

    async def fetch(
        self, session: aiohttp.ClientSession, orders: Sequence[OrderRef]
    ) -> Mapping[UUID, Outcome]:
        if len(orders) > self.max_batch:
            raise ValueError(f"{len(orders)} orders given; max_batch is {self.max_batch}")
        if not orders:
            return {}
        asked: dict[str, list[UUID]] = {}
        for order in orders:
            asked.setdefault(self.key(order), []).append(order.order_id)
        reply = await self.http.request(session, self.method, self.url(list(asked)), self.headers())
        try:
            outcomes = self._outcomes(reply.text, asked)
        except BadAnswer as exc:
            raise self.http.bad_answer(exc, reply.status) from None
        return self.http.safe_outcomes(outcomes)

    def _outcomes(self, text: str, asked: Mapping[str, list[UUID]]) -> dict[UUID, Outcome]:
        spec = self.spec
        if spec.id_path is None:
            outcome = parse_single(text, spec)
            (order_ids,) = asked.values()
            return {} if outcome is None else dict.fromkeys(order_ids, outcome)
        id_path = spec.id_path
        matched = match_items(
            items_of(parse_document(text), spec, text),
            asked,
            fold=self.id_source == "order_id",
            id_of=lambda item: get_path(item, id_path),
            outcome_of=spec.outcome,
        )
        matched.report(self.http)
        return matched.outcomes


# --- building ------------------------------------------------------------------------


def build(config: ProviderConfig) -> Adapter:
    check_keys(config, OPTIONS, required_secrets=(), optional_secrets=("token",))
    auth_header, auth_query = _auth(config)
    if (auth_header or auth_query) and not config.secrets.get("token"):
        raise ConfigError(f"{where(config)}.secrets.token is required (options.auth sends it)")
    template = option_str(config, "url")
    batched = _url_mode(config, template)
    spec = _spec(config, batched)
    method = option_str(config, "method", "GET").upper()
    if method not in ("GET", "POST"):
        raise ConfigError(f"{where(config)}.options.method = {method!r}: expected GET or POST")
    id_source = option_str(config, "id_source", "reference")
    if id_source not in ("reference", "order_id"):
        raise ConfigError(
            f"{where(config)}.options.id_source = {id_source!r}: expected reference or order_id"
        )
    return JsonHttpAdapter(
        base_url=config.base_url.rstrip("/"),
        method=method,
        url_template=template,
        batched=batched,
        separator=option_str(config, "ref_separator", ","),
        id_source="order_id" if id_source == "order_id" else "reference",
        spec=spec,
        max_batch=option_int(config, "batch_size", DEFAULT_BATCH_SIZE) if batched else 1,
        http=transport(config, secret_params=(auth_query,) if auth_query else ()),
        token=config.secrets.get("token"),
        auth_header=auth_header,
        auth_query=auth_query,
    )


def _url_mode(config: ProviderConfig, template: str) -> bool:
    """True for a batched URL ({refs}), False for one order a request ({ref})."""
    at = f"{where(config)}.options"
    if template.startswith(("http://", "https://")):
        raise ConfigError(f"{at}.url = {template!r}: must be relative to base_url")
    has_ref, has_refs = "{ref}" in template, "{refs}" in template
    if has_ref == has_refs:
        raise ConfigError(f"{at}.url = {template!r}: must contain exactly one of {{ref}}, {{refs}}")
    if has_ref:
        for key in ("batch_size", "ref_separator"):
            if key in config.options:
                raise ConfigError(f"{at}.{key} needs {{refs}} in {at}.url (batched requests)")
    return has_refs


def _auth(config: ProviderConfig) -> tuple[str | None, str | None]:
    auth = config.options.get("auth")
    if auth is None:
        if "token" in config.secrets:
            raise ConfigError(
                f"{where(config)}.secrets.token is set but options.auth does not say where "
                'to send it: { header = "api-token" } or { query = "token" }'
            )
        return None, None
    if isinstance(auth, dict) and len(auth) == 1:
        ((place, name),) = auth.items()
        if place in ("header", "query") and isinstance(name, str) and name.strip():
            return (name.strip(), None) if place == "header" else (None, name.strip())
    raise ConfigError(
        f'{where(config)}.options.auth = {auth!r}: expected {{ header = "NAME" }} '
        'or { query = "NAME" }'
    )


def _spec(config: ProviderConfig, batched: bool) -> AnswerSpec:
    at = f"{where(config)}.options"
    items_path = _path(config, "items_path", "" if batched else None)
    id_path = _path(config, "id_path")
    if batched and id_path is None:
        raise ConfigError(f"{at}.id_path is required with {{refs}} in {at}.url")
    if id_path is not None and items_path is None:
        raise ConfigError(f"{at}.id_path needs {at}.items_path (where the list of items is)")
    status_path = _path(config, "status_path")
    if status_path is None:
        raise ConfigError(f"{at}.status_path is required")
    success_path = _path(config, "success_path")
    success_values = _words(config, "success_values", config.options.get("success_values"))
    if (success_path is None) != ("success_values" not in config.options):
        raise ConfigError(f"{at}.success_path and {at}.success_values go together")
    unmapped = option_str(config, "unmapped", "pending")
    if unmapped not in ("pending", "unknown"):
        # "failed" is refused on purpose: a word nobody mapped must never end
        # (and refund) an order.
        raise ConfigError(f"{at}.unmapped = {unmapped!r}: expected pending or unknown")
    return AnswerSpec(
        status_path=status_path,
        status_map=_status_map(config),
        unmapped="unknown" if unmapped == "unknown" else "pending",
        items_path=items_path,
        id_path=id_path,
        pin_paths=_paths(config, "pin_path"),
        message_paths=_paths(config, "message_path"),
        success_path=success_path,
        success_values=frozenset(success_values),
    )


def _path(config: ProviderConfig, key: str, default: str | None = None) -> Path | None:
    value = config.options.get(key, default)
    if value is None:
        return None
    try:
        if isinstance(value, str):
            return parse_path(value)
    except ValueError:
        pass
    raise ConfigError(
        f"{where(config)}.options.{key} = {value!r}: expected a dot-separated path "
        'such as "data.0.status" ("" for the body itself)'
    )


def _paths(config: ProviderConfig, key: str) -> tuple[Path, ...]:
    value = config.options.get(key, [])
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise ConfigError(
            f"{where(config)}.options.{key} = {value!r}: expected a path or a list of paths"
        )
    result = []
    for text in values:
        try:
            result.append(parse_path(text))
        except ValueError:
            raise ConfigError(
                f"{where(config)}.options.{key}: {text!r} is not a dot-separated path"
            ) from None
    return tuple(result)


def _words(config: ProviderConfig, key: str, value: object) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(w, str) and w.strip() for w in value):
        raise ConfigError(
            f"{where(config)}.options.{key} = {value!r}: expected a list of non-empty strings"
        )
    return [w.strip().lower() for w in value]


def _status_map(config: ProviderConfig) -> dict[str, Kind]:
    at = f"{where(config)}.options.status_map"
    table = config.options.get("status_map")
    if not isinstance(table, dict) or "done" not in table:
        raise ConfigError(
            f"{at} is required: a table such as "
            '{ done = ["success"], failed = ["rejected"], pending = ["wait"] }'
        )
    unknown = set(table) - {"done", "failed", "pending"}
    if unknown:
        raise ConfigError(f"{at}: unknown keys {sorted(unknown)}; allowed: done, failed, pending")
    result: dict[str, Kind] = {}
    for kind in ("done", "failed", "pending"):
        for word in _words(config, f"status_map.{kind}", table.get(kind)):
            if word in result and result[word] != kind:
                raise ConfigError(f"{at}: {word!r} is listed under both {result[word]} and {kind}")
            result[word] = kind
    return result
