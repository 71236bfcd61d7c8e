"""What every provider adapter speaks, and the outcomes it produces.

An *adapter* knows one provider protocol (URLs, auth, parsing). It is wrapped
by a :class:`~order_monitor.providers.limits.LimitedProvider`, which applies
that provider's manners (concurrency, rate, circuit breaker, Retry-After) and
turns every failure into an ``ERROR`` outcome, so the checker never sees an
exception from a provider.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol
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


def clean_pin(value: object) -> str | None:
    """A real PIN or None; never '-', ' - ' or an empty string."""
    if value is None:
        return None
    text = str(value).strip()
    return None if text.lower() in _NO_PIN else text


def clean_text(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


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

    @classmethod
    def pending(cls, raw_status: str | None = None, message: str | None = None) -> Outcome:
        return cls(Status.PENDING, raw_status=raw_status, message=clean_text(message))

    @classmethod
    def done(
        cls, pin: object = None, message: object = None, raw_status: str | None = None
    ) -> Outcome:
        return cls(
            Status.DONE, pin=clean_pin(pin), message=clean_text(message), raw_status=raw_status
        )

    @classmethod
    def failed(cls, message: object = None, raw_status: str | None = None) -> Outcome:
        return cls(Status.FAILED, message=clean_text(message), raw_status=raw_status)

    @classmethod
    def unknown(cls, message: str | None = None) -> Outcome:
        return cls(Status.UNKNOWN, message=message)

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

    async def check(self, orders: Sequence[OrderRef]) -> dict[UUID, Outcome]:
        """An outcome for every order given; never raises for provider trouble."""
        ...
