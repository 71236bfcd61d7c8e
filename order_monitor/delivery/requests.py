"""The requests that deliver outbox entries: built from an action's templates, pure.

No I/O and no clock of its own (*now* is a parameter), so the same entries
and the same *now* always make the same requests.

An ``http`` action batches: orders share a request only when every
per-request placeholder its templates use (``{outcome}``, ``{message}``,
``{column:NAME}``) has the same value for all of them, so a request never
mixes tenants; each such group is cut into requests of at most
``batch_size`` orders, and an order never stands twice in one request (a
second entry for it goes in a later request of its group). ``{request_id}``
is a stable id for the set of deliveries a request carries: a retry of the
same set sends the same one, so it can be the application's idempotency key.

A ``webhook`` action sends one Standard Webhooks event per entry, signed with
the action's ``signing_secret``; its ``webhook-id`` is the delivery id, the
same on every retry, for the receiver to deduplicate on.
"""

from __future__ import annotations

import binascii
import math
import types
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final
from urllib.parse import urlsplit

from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook

from order_monitor.config import ActionConfig
from order_monitor.config.settings import WEBHOOK_SECRET
from order_monitor.delivery.model import Entry
from order_monitor.delivery.templates import (
    PER_REQUEST,
    Placeholder,
    Values,
    clean_json,
    clean_json_text,
    dump_json,
    group_key,
    placeholders_of,
    render_body,
    render_header,
    render_url,
    template_texts,
)
from order_monitor.errors import ConfigError

#: The namespace of request ids (uuid5 over the sorted delivery ids): fixed,
#: so an id computed by another instance after a takeover is the same.
REQUEST_NAMESPACE: Final = uuid.UUID("0fce6297-31d1-4a72-9068-024dabb7d995")
JSON: Final = "application/json"


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request to the application and the deliveries it carries."""

    action: str
    method: str
    url: str
    #: Carries the secrets: never logged (see :meth:`describe`).
    headers: Mapping[str, str]
    body: bytes
    deliveries: tuple[Entry, ...]
    request_id: str

    def describe(self) -> str:
        """The request for a log line: no query, userinfo or header (they may hold secrets)."""
        try:
            parts = urlsplit(self.url)
            host = parts.hostname or ""
            port = parts.port
        except ValueError:
            return f"{self.method} <unparsable URL> ({self._carries()})"
        if ":" in host:
            host = f"[{host}]"
        where = f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")
        return f"{self.method} {where}{parts.path} ({self._carries()})"

    def _carries(self) -> str:
        count = len(self.deliveries)
        return f"{count} order{'' if count == 1 else 's'}, request {self.request_id}"


def build_requests(
    action: ActionConfig, entries: Sequence[Entry], *, now: datetime
) -> list[Request]:
    """The requests that deliver *entries* for *action* (every entry in exactly one)."""
    ordered = sorted(entries, key=lambda e: (e.recorded_at, e.delivery_id))
    if action.kind == "webhook":
        return _webhooks(action, ordered, now)
    return _batches(action, ordered)


def request_id(deliveries: Sequence[Entry]) -> str:
    """A stable id for a set of deliveries (order does not matter)."""
    ids = sorted(str(entry.delivery_id) for entry in deliveries)
    return str(uuid.uuid5(REQUEST_NAMESPACE, ",".join(ids)))


# --- http: batched ----------------------------------------------------------------------


def _batches(action: ActionConfig, ordered: Sequence[Entry]) -> list[Request]:
    used = _per_request(action)
    groups: dict[tuple[str, ...], list[Entry]] = {}
    for entry in ordered:
        groups.setdefault(_group_of(entry, used), []).append(entry)
    secrets = _revealed(action)
    return [
        _http_request(action, chunk, secrets)
        for group in groups.values()
        for chunk in _chunks(group, max(action.batch_size, 1))
    ]


def _per_request(action: ActionConfig) -> tuple[Placeholder, ...]:
    """The per-request placeholders the action's templates use, each once, in a fixed order."""
    found = placeholders_of(template_texts(action.url, action.headers, action.body))
    return tuple(sorted({p for p in found if p.kind in PER_REQUEST}, key=str))


def _group_of(entry: Entry, used: Sequence[Placeholder]) -> tuple[str, ...]:
    # group_key tells 1, "1" and true apart; a missing column reads as null.
    key: list[str] = []
    for placeholder in used:
        if placeholder.kind == "outcome":
            key.append(group_key(entry.outcome))
        elif placeholder.kind == "message":
            key.append(group_key(entry.message))
        else:
            key.append(group_key(entry.columns.get(placeholder.name or "")))
    return tuple(key)


def _chunks(group: Sequence[Entry], size: int) -> list[list[Entry]]:
    """*group* in chunks of at most *size*, no order twice in a chunk, in the group's order.

    First fit: each entry goes into the first chunk with room after the last
    one that holds its order (so never into one that holds it).
    """
    chunks: list[list[Entry]] = []
    after: dict[uuid.UUID, int] = {}
    first_open = 0
    for entry in group:
        while first_open < len(chunks) and len(chunks[first_open]) >= size:
            first_open += 1
        index = max(first_open, after.get(entry.order_id, 0))
        while index < len(chunks) and len(chunks[index]) >= size:
            index += 1
        if index == len(chunks):
            chunks.append([])
        chunks[index].append(entry)
        after[entry.order_id] = index + 1
    return chunks


def _http_request(
    action: ActionConfig, chunk: Sequence[Entry], secrets: Mapping[str, str]
) -> Request:
    first = chunk[0]
    rid = request_id(chunk)
    values = Values(
        outcome=first.outcome,
        message=first.message,
        columns=first.columns,
        request_id=rid,
        order_ids=[str(entry.order_id) for entry in chunk],
        delivery_ids=[str(entry.delivery_id) for entry in chunk],
        secrets=secrets,
    )
    headers = _headers(action, values)
    if action.body is None:
        body = b""
    else:
        body = dump_json(render_body(action.body, values))
        _set_default(headers, "Content-Type", JSON)
    return Request(
        action=action.name,
        method=action.method,
        url=render_url(action.url, values),
        headers=types.MappingProxyType(headers),
        body=body,
        deliveries=tuple(chunk),
        request_id=rid,
    )


# --- webhook: one signed event per entry ------------------------------------------------


def _webhooks(action: ActionConfig, ordered: Sequence[Entry], now: datetime) -> list[Request]:
    if not ordered:
        return []
    signer = _signer(action)
    secrets = _revealed(action)
    return [_webhook(action, entry, now, signer, secrets) for entry in ordered]


def _signer(action: ActionConfig) -> Webhook:
    secret = action.secrets.get(WEBHOOK_SECRET)
    if secret is None:
        raise ConfigError(
            f"[actions.{action.name}] is a webhook action without the secret "
            f"{WEBHOOK_SECRET!r} (its Standard Webhooks 'whsec_...' signing key)"
        )
    try:
        return Webhook(secret.reveal())
    except (binascii.Error, ValueError, EmptyWebhookSecretError, RuntimeError):
        raise ConfigError(
            f"[actions.{action.name}] secret {WEBHOOK_SECRET!r} is not a Standard Webhooks "
            "key: expected 'whsec_' followed by base64 (the receiver's library makes one)"
        ) from None


def _webhook(
    action: ActionConfig,
    entry: Entry,
    now: datetime,
    signer: Webhook,
    secrets: Mapping[str, str],
) -> Request:
    rid = request_id([entry])
    event: dict[str, Any] = {
        "type": clean_json_text(f"order.{entry.outcome}"),
        "timestamp": now.isoformat(),
        "data": {
            "order_id": str(entry.order_id),
            "delivery_id": str(entry.delivery_id),
            "outcome": clean_json_text(entry.outcome),
            "message": None if entry.message is None else clean_json_text(entry.message),
            "recorded_at": entry.recorded_at.isoformat(),
            "columns": {
                clean_json_text(name): clean_json(entry.columns.get(name))
                for name in action.columns
            },
        },
    }
    body = dump_json(event)
    values = Values(
        outcome=entry.outcome,
        message=entry.message,
        columns=entry.columns,
        request_id=rid,
        order_ids=[str(entry.order_id)],
        delivery_ids=[str(entry.delivery_id)],
        secrets=secrets,
    )
    headers = _headers(action, values)
    msg_id = str(entry.delivery_id)
    # The event's shape and its signature are ours: an action header of the
    # same name (any case) gives way rather than sending two.
    ours = {
        "Content-Type": JSON,
        "webhook-id": msg_id,
        "webhook-timestamp": str(math.floor(now.timestamp())),
        "webhook-signature": signer.sign(msg_id, now, body),
    }
    for name in ours:
        _drop(headers, name)
    headers.update(ours)
    return Request(
        action=action.name,
        method=action.method,
        url=render_url(action.url, values),
        headers=types.MappingProxyType(headers),
        body=body,
        deliveries=(entry,),
        request_id=rid,
    )


# --- shared -----------------------------------------------------------------------------


def _revealed(action: ActionConfig) -> dict[str, str]:
    return {name: secret.reveal() for name, secret in action.secrets.items()}


def _headers(action: ActionConfig, values: Values) -> dict[str, str]:
    return {name: render_header(text, values) for name, text in action.headers.items()}


def _set_default(headers: dict[str, str], name: str, value: str) -> None:
    if not any(key.lower() == name.lower() for key in headers):
        headers[name] = value


def _drop(headers: dict[str, str], name: str) -> None:
    for key in [key for key in headers if key.lower() == name.lower()]:
        del headers[key]
