"""znet: a plain-text dealer panel with its credentials in the query string.

``GET {base_url}/servis/pin_kontrol.php?kod=…&sifre=…&tahsilat_api_islem_id=REF``
answers ``OK|DURUM|PIN|ACIKLAMA`` (DURUM 1 processing, 2 completed, 3 failed)
or ``CODE|MESSAGE`` when the request itself failed. One order per request.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Final
from urllib.parse import quote_plus, urlencode
from uuid import UUID

import aiohttp
from yarl import URL

from order_monitor.config import ProviderConfig
from order_monitor.errors import ConfigError, ProviderAuthError, ProviderError
from order_monitor.providers.base import Adapter, OrderRef, Outcome, bounded, clean_str
from order_monitor.providers.http import BadAnswer, ErrorAnswer, Transport
from order_monitor.providers.options import check_keys, option_str, transport, where
from order_monitor.redaction import Secret

DEFAULT_PATH: Final = "/servis/pin_kontrol.php"
OPTIONS: Final = frozenset({"path", "auth_codes"})
SECRET_PARAMS: Final = ("kod", "sifre")
# Keys under which proxies in front of znet have been seen to put its text.
WRAPPER_KEYS: Final = ("result", "data", "response", "body", "text", "message")
_ERROR_CODE: Final = re.compile(r"^[0-9]{1,4}$", re.ASCII)
# The public docs say a refused dealer code, inactive API access or an IP off
# the whitelist gets an *empty* body, so say so where an operator will read it.
EMPTY_HINT: Final = (
    "empty body (znet answers so when the dealer code, API access or caller IP is refused)"
)


class ZnetError(ErrorAnswer):
    """``CODE|MESSAGE``: znet refused the request itself."""

    def __init__(self, code: str, message: str, body: str) -> None:
        super().__init__(f"znet error {code}: {message}", body)
        self.code = code
        self.message = message


# --- parsing (pure) ----------------------------------------------------------------


def unwrap(text: str) -> str:
    """The znet text, also when a proxy wrapped it in JSON."""
    body = text.strip().lstrip("\ufeff").strip()
    if not body.startswith(('"', "{")):
        return body
    try:
        document = json.loads(body)
    except ValueError:
        raise BadAnswer("JSON-looking body that is not JSON", text) from None
    if isinstance(document, str):
        return document.strip()
    if isinstance(document, dict):
        for key in WRAPPER_KEYS:
            value = document.get(key)
            if isinstance(value, str) and value.strip():
                return value.strip()
    raise BadAnswer("JSON body without znet text in it", text)


def parse_answer(text: str) -> Outcome:
    """The outcome a pin_kontrol answer states; BadAnswer or ZnetError otherwise."""
    body = unwrap(text)
    if not body:
        raise BadAnswer(EMPTY_HINT, text)
    if body.startswith("<"):
        raise BadAnswer("HTML page instead of a znet answer", text)
    # ACIKLAMA is free text and may itself contain "|".
    head, *rest = body.split("|", 3)
    if head.strip().upper() == "OK" and rest:
        return _outcome(rest, text)
    if _ERROR_CODE.match(head.strip()) and rest:
        raise ZnetError(head.strip(), clean_str(body.split("|", 1)[1]).strip(), text)
    raise BadAnswer("not a znet answer", text)


def _outcome(fields: list[str], text: str) -> Outcome:
    # Each field is cleaned by the Outcome it goes into (clean_pin refuses an
    # unclean PIN rather than cleaning it into a different code).
    durum = clean_str(fields[0]).strip()
    pin = fields[1] if len(fields) > 1 else None
    message = fields[2] if len(fields) > 2 else None
    if durum == "1":
        return Outcome.pending(raw_status=durum, message=message)
    if durum == "2":
        return Outcome.done(pin=pin, message=message, raw_status=durum)
    if durum == "3":
        return Outcome.failed(message=message, raw_status=durum)
    # A status we do not know must not end an order either way.
    raise BadAnswer(f"unknown DURUM {bounded(durum, 40)!r}", text)


# --- the adapter ---------------------------------------------------------------------


# Not frozen: the Adapter Protocol declares max_batch as a settable attribute.
@dataclass(slots=True)
class ZnetAdapter:
    base_url: str
    path: str
    kod: Secret
    sifre: Secret
    #: Error codes this deployment uses for refused credentials or IPs.
    auth_codes: frozenset[str]
    http: Transport
    max_batch: int = 1
    times_its_requests: ClassVar[bool] = True  # through self.http

    #: Everything of the URL but the reference, encoded once rather than for
    #: every request (it showed in the daemon's profile). Not in repr.
    _head: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # yarl encodes the operator's base URL (an IDN host, a space in the
        # path) once; the query is ours, percent-encoded by urlencode.
        where_to = str(URL(f"{self.base_url}{self.path}"))
        credentials = urlencode([("kod", self.kod.reveal()), ("sifre", self.sifre.reveal())])
        self._head = f"{where_to}?{credentials}&tahsilat_api_islem_id="

    def url(self, reference: str) -> URL:
        """The request's URL, already encoded: aiohttp sends it as it is.

        Handing aiohttp a string would have yarl parse and re-quote it for
        every request (7.6 µs a URL against 3.9 µs this way, timed over
        distinct references); quote_plus leaves nothing in the reference for
        it to do.
        """
        return URL(self._head + quote_plus(reference), encoded=True)

    async def fetch(
        self, session: aiohttp.ClientSession, orders: Sequence[OrderRef]
    ) -> Mapping[UUID, Outcome]:
        if len(orders) > 1:
            raise ValueError(f"{len(orders)} orders given; znet checks one per request")
        if not orders:
            return {}
        (order,) = orders
        reply = await self.http.request(session, "GET", self.url(order.reference.strip()))
        try:
            outcome = parse_answer(reply.text)
        except ZnetError as exc:
            raise self._error_answer(exc, reply.status) from None
        except BadAnswer as exc:
            raise self.http.bad_answer(exc, reply.status) from None
        return {order.order_id: self.http.safe_outcome(outcome)}

    def _error_answer(self, exc: ZnetError, status: int) -> ProviderError:
        # Which codes mean "credentials or IP refused" is not documented (the
        # docs only show 3 and 4 as generic errors), so every CODE|MESSAGE is a
        # ProviderError carrying both, unless the operator names the
        # deployment's auth codes in options.auth_codes.
        error = self.http.bad_answer(exc, status)
        if exc.code not in self.auth_codes:
            return error
        self.http.log(
            "error",
            "provider.auth_failed",
            provider=self.http.provider,
            status=status,
            code=exc.code,
        )
        return ProviderAuthError(f"{error} (options.auth_codes: credentials or IP refused)")


def build(config: ProviderConfig) -> Adapter:
    check_keys(config, OPTIONS, required_secrets=SECRET_PARAMS)
    path = option_str(config, "path", DEFAULT_PATH)
    return ZnetAdapter(
        base_url=config.base_url.rstrip("/"),
        path="/" + path.lstrip("/"),
        kod=config.secrets["kod"],
        sifre=config.secrets["sifre"],
        auth_codes=_auth_codes(config),
        http=transport(config, secret_params=SECRET_PARAMS),
    )


def _auth_codes(config: ProviderConfig) -> frozenset[str]:
    codes = config.options.get("auth_codes", [])
    if not isinstance(codes, list) or not all(
        isinstance(c, str | int) and not isinstance(c, bool) and _ERROR_CODE.match(str(c))
        for c in codes
    ):
        raise ConfigError(
            f"{where(config)}.options.auth_codes = {codes!r}: expected a list of numeric codes"
        )
    return frozenset(str(c) for c in codes)
