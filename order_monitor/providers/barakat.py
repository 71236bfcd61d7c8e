"""barakat / apstore: JSON over HTTP, an ``api-token`` header, batched checks.

``GET {base_url}/client/api/check?orders=[ID1,ID2]`` (``&uuid=1`` when the ids
are the orders' own UUIDs) answers ``{"status": "OK", "data": [{"order_id",
"status", "pin", ...}]}``. The status words and the PIN / message keys are the
ones the application's own adapter reads (see reference/providers.md).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final
from urllib.parse import quote
from uuid import UUID

import aiohttp

from order_monitor.config import ProviderConfig
from order_monitor.providers.answers import Matched, first_text, match_items, scalar_text
from order_monitor.providers.base import Adapter, OrderRef, Outcome, UnusablePin, first_pin
from order_monitor.providers.http import BadAnswer, ErrorAnswer, Transport
from order_monitor.providers.options import check_keys, option_bool, option_int, transport
from order_monitor.redaction import Secret

DONE_WORDS: Final = frozenset({"success", "ok", "done", "complete", "completed", "accept"})
FAILED_WORDS: Final = frozenset(
    {"reject", "rejected", "failed", "fail", "error", "cancelled", "canceled"}
)
PENDING_WORDS: Final = frozenset({"wait", "pending", "processing", "inprogress", "queued", "queue"})
PIN_KEYS: Final = ("pin", "code", "voucher", "serial")
MESSAGE_KEYS: Final = ("note", "message", "desc", "text", "error")
DEFAULT_CHUNK_SIZE: Final = 50
OPTIONS: Final = frozenset({"use_order_uuid", "chunk_size"})
CHECK_PATH: Final = "/client/api/check"


# --- parsing (pure) ----------------------------------------------------------------


def parse_answer(text: str) -> list[Any]:
    """The ``data`` list of an answer; BadAnswer when the body is not one."""
    body = text.strip().lstrip("\ufeff")
    if not body:
        raise BadAnswer("empty body", text)
    try:
        document = json.loads(body)
    except ValueError:
        reason = "HTML page instead of JSON" if body.startswith("<") else "body is not JSON"
        raise BadAnswer(reason, text) from None
    if not isinstance(document, dict):
        raise BadAnswer("answer is not a JSON object", text)
    status = scalar_text(document.get("status"))
    if status is None or status.lower() != "ok":
        # The whole request failed (bad token, malformed ids...): no order's
        # state can be read from it.
        raise ErrorAnswer(f"answer status {status!r}, not OK", text)
    data = document.get("data")
    if not isinstance(data, list):
        raise BadAnswer("answer has no 'data' list", text)
    return data


def outcome_of(item: Mapping[str, Any]) -> Outcome:
    """What one ``data`` entry says about its order."""
    raw = scalar_text(item.get("status"))
    word = (raw or "").lower()
    message = message_of(item)
    if word in DONE_WORDS:
        try:
            pin = pin_of(item)
        except UnusablePin as exc:
            return Outcome.unusable_pin(str(exc), message=message, raw_status=raw)
        return Outcome.done(pin=pin, message=message, raw_status=raw)
    if word in FAILED_WORDS:
        return Outcome.failed(message=message, raw_status=raw)
    # PENDING_WORDS and anything else: the application keeps polling on an
    # unknown word, and so do we — it must never end an order.
    return Outcome.pending(raw_status=raw, message=message)


def pin_of(item: Mapping[str, Any]) -> str | None:
    """The item's PIN; raises UnusablePin for a float, list, object or unclean one."""
    return first_pin(item.get(key) for key in PIN_KEYS)


def message_of(item: Mapping[str, Any]) -> str | None:
    replay = first_text(item.get("replay_api"))
    if replay is not None:
        return replay
    for key in MESSAGE_KEYS:
        text = first_text(item.get(key))
        if text is not None:
            return text
    return None


def match(data: Sequence[Any], asked: Mapping[str, Sequence[UUID]], *, fold: bool) -> Matched:
    """Pair ``data`` entries with the orders asked about by their ``order_id``."""
    return match_items(
        data,
        asked,
        fold=fold,
        id_of=lambda item: item.get("order_id") if isinstance(item, dict) else None,
        outcome_of=outcome_of,
    )


# --- the adapter ---------------------------------------------------------------------


# Not frozen: the Adapter Protocol declares max_batch as a settable attribute.
@dataclass(slots=True)
class BarakatAdapter:
    base_url: str
    token: Secret
    use_order_uuid: bool
    max_batch: int
    times_its_requests: ClassVar[bool] = True  # through self.http
    http: Transport

    def url(self, ids: Sequence[str]) -> str:
        listed = quote("[" + ",".join(ids) + "]", safe="[],")
        url = f"{self.base_url}{CHECK_PATH}?orders={listed}"
        return url + "&uuid=1" if self.use_order_uuid else url

    def asked(self, orders: Sequence[OrderRef]) -> dict[str, list[UUID]]:
        asked: dict[str, list[UUID]] = {}
        for order in orders:
            key = str(order.order_id) if self.use_order_uuid else order.reference.strip()
            asked.setdefault(key, []).append(order.order_id)
        return asked

    async def fetch(
        self, session: aiohttp.ClientSession, orders: Sequence[OrderRef]
    ) -> Mapping[UUID, Outcome]:
        if len(orders) > self.max_batch:
            raise ValueError(f"{len(orders)} orders given; max_batch is {self.max_batch}")
        if not orders:
            return {}
        asked = self.asked(orders)
        reply = await self.http.request(
            session, "GET", self.url(list(asked)), {"api-token": self.token.reveal()}
        )
        try:
            data = parse_answer(reply.text)
        except BadAnswer as exc:
            raise self.http.bad_answer(exc, reply.status) from None
        matched = match(data, asked, fold=self.use_order_uuid)
        matched.report(self.http)
        return self.http.safe_outcomes(matched.outcomes)


def build(config: ProviderConfig) -> Adapter:
    check_keys(config, OPTIONS, required_secrets=("token",))
    return BarakatAdapter(
        base_url=config.base_url.rstrip("/"),
        token=config.secrets["token"],
        use_order_uuid=option_bool(config, "use_order_uuid", False),
        max_batch=option_int(config, "chunk_size", DEFAULT_CHUNK_SIZE),
        http=transport(config),
    )
