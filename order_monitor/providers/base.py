"""What every provider adapter speaks, and the outcomes it produces.

An *adapter* knows one provider protocol (URLs, auth, parsing). It is wrapped
by a :class:`~order_monitor.providers.limits.LimitedProvider`, which applies
that provider's manners (concurrency, rate, circuit breaker, Retry-After) and
turns every failure into an ``ERROR`` outcome, so the checker never sees an
exception from a provider.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Final, Protocol
from uuid import UUID

import aiohttp

from order_monitor.errors import ProviderError


class Status(enum.Enum):
    #: The provider is still working on it: check again later.
    PENDING = "pending"
    #: Completed; a PIN may come with it.
    DONE = "done"
    #: The provider will not complete it; the message says why.
    FAILED = "failed"
    #: The provider does not know the reference (this round): check again later.
    UNKNOWN = "unknown"
    #: We could not get an answer (timeout, 5xx, garbage). Never an answer about
    #: the order: it is checked again later.
    ERROR = "error"


# PINs the providers send when they have none.
_NO_PIN = frozenset({"", "-", "--", "n/a", "null", "none"})

#: Longest message (and raw status, error) an Outcome carries. The columns
#: are far shorter (decisions.truncate fits them); this only keeps a 1 MB
#: "message" from being carried around, logged and compared.
MAX_MESSAGE: Final = 4096
#: Longest PIN an Outcome carries. A longer one is no PIN but an unusable
#: answer (never cut: a cut PIN is a wrong code).
MAX_PIN: Final = 1024

# Lone surrogates (JSON "\ud800" decodes to one; it cannot be encoded as
# UTF-8), NUL, every other C0 control but tab and newline, DEL and the C1
# controls (a terminal reads U+009B as CSI, like ESC [).
_UNSAFE: Final = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def _unsafe_char(match: re.Match[str]) -> str:
    # A carriage return is line-ending noise ("\r\n"): dropped. Anything
    # else is replaced, so that a reader sees something was there.
    return "" if match.group() == "\r" else "\ufffd"


def clean_str(text: str) -> str:
    """Provider text made safe to store, log and print.

    The result encodes as strict UTF-8 and holds no NUL or control character
    but tab and newline: lone surrogates and control characters (ESC of a
    terminal escape sequence included) become U+FFFD, carriage returns are
    dropped. Every string read from a provider passes through here, at the
    parse boundary, so that neither the writer (UnicodeEncodeError, "NUL
    not allowed") nor the JSON log renderer ever meets one.
    """
    # Every provider string passes here, some several times: isprintable() is
    # a C loop, true for nearly all of them, and implies nothing to replace.
    if text.isprintable():
        return text
    return _UNSAFE.sub(_unsafe_char, text)


def bounded(text: str, limit: int = MAX_MESSAGE) -> str:
    """*text* cut to *limit* characters, the cut marked with an ellipsis."""
    return text if len(text) <= limit else text[: max(limit - 1, 0)] + "…"


class UnusablePin(ProviderError):
    """A PIN that cannot be written as the code the customer paid for."""


def clean_pin(value: object) -> str | None:
    """A real PIN, or None when the provider sent none ('-', ' - ', '', null).

    Only strings and integers are PINs. A JSON float has already lost what
    the provider meant (``1.5e3`` reads as 1500.0, ``123456789012345678``
    as ...680), a bool, list or object is no code at all, and a PIN that
    needs :func:`clean_str` (control characters, a lone surrogate) or is
    longer than :data:`MAX_PIN` would be a different code once cleaned or
    cut: all of these raise :class:`UnusablePin`.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise UnusablePin(f"its PIN is a JSON {_json_type(value)}, not a string or an integer")
    text = str(value).strip()
    if text.lower() in _NO_PIN:
        return None
    if clean_str(text) != text:
        raise UnusablePin("its PIN holds control characters or invalid text")
    if len(text) > MAX_PIN:
        raise UnusablePin(f"its PIN has {len(text)} characters (more than {MAX_PIN})")
    return text


def first_pin(values: Iterable[object]) -> str | None:
    """The PIN among the values of a provider's PIN keys, taken in order.

    The first value that is not a "no PIN" placeholder decides: an unusable
    one raises :class:`UnusablePin` rather than letting a later key (some
    other code of the item) stand in for it.
    """
    for value in values:
        pin = clean_pin(value)
        if pin is not None:
            return pin
    return None


def _json_type(value: object) -> str:
    names = {bool: "boolean", float: "float", list: "array", dict: "object"}
    return next((n for t, n in names.items() if isinstance(value, t)), type(value).__name__)


def clean_text(value: object, limit: int = MAX_MESSAGE) -> str | None:
    """Provider text through :func:`clean_str`, stripped and bounded; None when empty."""
    if value is None:
        return None
    text = clean_str(str(value)).strip()
    return bounded(text, limit) if text else None


@dataclass(frozen=True, slots=True)
class OrderRef:
    """One order, as the checker hands it to a provider."""

    order_id: UUID
    #: The row's provider reference (provider_referans).
    reference: str
    external_order_id: str | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    status: Status
    pin: str | None = None
    message: str | None = None
    #: The provider's own status word, for logs and the operator's `check`.
    raw_status: str | None = None
    #: ERROR only: what went wrong, fit for a log line (no secrets).
    error: str | None = None
    #: ERROR only: seconds before this provider should be asked again
    #: (Retry-After, an open circuit breaker). None: the normal schedule.
    retry_after: float | None = None

    def __post_init__(self) -> None:
        # Whoever built it, an Outcome's text is clean and bounded: it goes
        # to the table, the log and the operator's terminal.
        for name in ("message", "raw_status", "error"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, bounded(clean_str(value)))
        if self.pin is not None and (clean_str(self.pin) != self.pin or len(self.pin) > MAX_PIN):
            raise ValueError("an Outcome's PIN must come through clean_pin (Outcome.done)")

    @classmethod
    def pending(cls, raw_status: str | None = None, message: object = None) -> Outcome:
        return cls(Status.PENDING, raw_status=raw_status, message=clean_text(message))

    @classmethod
    def done(
        cls, pin: object = None, message: object = None, raw_status: str | None = None
    ) -> Outcome:
        """Completed, with its PIN; or, when the PIN is unusable, an ERROR.

        A ``done`` without the code the customer paid for must not be
        written, and the order did not fail either: an unusable PIN
        (:func:`clean_pin`) gives an ERROR outcome for this order alone, so
        it stays pending, is asked again on the normal schedule and, if the
        provider never sends a usable PIN, is given up with this error as its
        last answer for a person to settle.
        """
        try:
            clean = clean_pin(pin)
        except UnusablePin as exc:
            return cls.unusable_pin(str(exc), message=message, raw_status=raw_status)
        return cls(Status.DONE, pin=clean, message=clean_text(message), raw_status=raw_status)

    @classmethod
    def unusable_pin(
        cls, reason: str, message: object = None, raw_status: str | None = None
    ) -> Outcome:
        """The ERROR for a ``done`` answer whose PIN cannot be written."""
        return cls(
            Status.ERROR,
            message=clean_text(message),
            raw_status=raw_status,
            error=f"the provider reports done, but {reason}; not written",
        )

    @classmethod
    def failed(cls, message: object = None, raw_status: str | None = None) -> Outcome:
        return cls(Status.FAILED, message=clean_text(message), raw_status=raw_status)

    @classmethod
    def unknown(cls, message: object = None) -> Outcome:
        return cls(Status.UNKNOWN, message=clean_text(message))

    @classmethod
    def transport_error(cls, error: str, retry_after: float | None = None) -> Outcome:
        return cls(Status.ERROR, error=error, retry_after=retry_after)


class RateLimited(ProviderError):
    """The provider said 429/503 with (or without) Retry-After."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Adapter(Protocol):
    """One provider protocol. Built from a ProviderConfig; holds no session of its own."""

    #: Most orders one request may carry (1 for providers without batching).
    max_batch: int
    #: True when every request fetch makes carries the provider's whole time
    #: budget itself (``limits.client_timeout``, as every Transport that
    #: ``options.transport`` builds does). The caller then sets no timer of its
    #: own on top: a timer per request showed in the daemon's profile.
    times_its_requests: ClassVar[bool]

    async def fetch(
        self, session: aiohttp.ClientSession, orders: Sequence[OrderRef]
    ) -> Mapping[UUID, Outcome]:
        """Ask about up to ``max_batch`` orders in one request.

        Returns an outcome for each order the provider answered about; an
        order it did not mention is filled in as UNKNOWN by the caller.
        Raises :class:`ProviderError` (or :class:`RateLimited`,
        :class:`~order_monitor.errors.ProviderAuthError`) when the request as
        a whole failed. Exception texts must not contain credentials.
        """
        ...


class Provider(Protocol):
    """What the checker calls: an adapter with its limits applied."""

    name: str

    @property
    def batch_size(self) -> int:
        """Most orders one request carries (1: each order is a request of its own)."""
        ...

    async def check(self, orders: Sequence[OrderRef]) -> dict[UUID, Outcome]:
        """An outcome for every order given; never raises for provider trouble."""
        ...
