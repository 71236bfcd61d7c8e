"""A provider's manners: concurrency, rate, timeouts, Retry-After, circuit breaker.

:class:`LimitedProvider` wraps one :class:`~order_monitor.providers.base.Adapter`
and is what the checker calls. Whatever the provider does, ``check`` returns
an outcome for every order it was given; provider trouble becomes ERROR
outcomes (never an answer about an order), and only cancellation escapes.

Timeouts: the adapter's signature carries no timeout and the shared
``aiohttp.ClientSession`` serves every provider, so the session cannot hold
one provider's timeouts. Every request may take ``connect_timeout +
read_timeout`` in all, of which connecting at most ``connect_timeout``,
counted from the moment it is sent (waiting for a rate token or a semaphore
is not part of it). Our adapters' requests carry :func:`client_timeout`
(``times_its_requests``); for any other adapter the bound is set here, with
``asyncio.timeout``. One timer per request, not two: each showed in the
daemon's profile.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Final, TypeVar
from uuid import UUID

import aiohttp

from order_monitor.config import ProviderLimits
from order_monitor.errors import ProviderAuthError, ProviderError
from order_monitor.logs import get_logger
from order_monitor.metrics import CIRCUIT_STATES, Metrics
from order_monitor.providers.base import (
    Adapter,
    OrderRef,
    Outcome,
    RateLimited,
    bounded,
    clean_str,
)
from order_monitor.providers.breaker import Admission, BreakerState, CircuitBreaker, TokenBucket
from order_monitor.redaction import Secret, scrub

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "LimitedProvider",
    "TokenBucket",
    "client_timeout",
    "request_budget",
]

CIRCUIT_OPEN: Final = "circuit open"
PAUSED: Final = "provider asked us to wait (Retry-After)"
# 429/503 without a usable Retry-After: wait this long rather than hammer.
DEFAULT_RETRY_AFTER: Final = 30.0
#: Bounds on a provider's Retry-After: above zero, and at most an hour.
MIN_RETRY_AFTER: Final = 1.0
MAX_RETRY_AFTER: Final = 3600.0
# Error texts end up in "lastMessage" (varchar 250) and in log lines.
_MAX_ERROR: Final = 200

_CIRCUIT_EVENTS: Final = {
    BreakerState.OPEN: "provider.circuit_opened",
    BreakerState.HALF_OPEN: "provider.circuit_half_open",
    BreakerState.CLOSED: "provider.circuit_closed",
}

T = TypeVar("T")
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


def request_budget(limits: ProviderLimits) -> float:
    """The longest one request may take, all phases together."""
    return limits.connect_timeout + limits.read_timeout


def client_timeout(limits: ProviderLimits) -> aiohttp.ClientTimeout:
    """The provider's timeouts for an adapter's ``session.get(..., timeout=...)``."""
    # No sock_read: aiohttp moves that timer at every chunk read, and the
    # total already bounds a provider that answers slowly or not at all.
    return aiohttp.ClientTimeout(total=request_budget(limits), sock_connect=limits.connect_timeout)


class LimitedProvider:
    """One adapter with its provider's limits applied; implements ``Provider``.

    Order of the gates for each chunk of ``adapter.max_batch`` orders:
    paused or circuit open → deferred at once, no request; then a rate token
    (waited for outside the semaphores, so a rate-limited provider holds no
    global slot while it waits); then this provider's semaphore, then the
    global one (so a provider at its own limit never holds global slots);
    then the pause and breaker again, since either may have changed during
    the wait; then the request.
    """

    def __init__(
        self,
        name: str,
        adapter: Adapter,
        limits: ProviderLimits,
        *,
        session: aiohttp.ClientSession,
        session_limit: asyncio.Semaphore,
        metrics: Metrics,
        secrets: Iterable[Secret] = (),
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if adapter.max_batch < 1:
            raise ValueError(f"provider {name!r}: adapter max_batch must be >= 1")
        self.name = name
        self.adapter = adapter
        self.limits = limits
        self._session = session
        self._global = session_limit
        self._local = asyncio.Semaphore(limits.concurrency)
        self._metrics = metrics
        self._secrets = [s.reveal() for s in secrets]
        self._clock = clock
        self._sleep = sleep
        self._bucket = (
            TokenBucket(limits.rate, limits.burst, clock()) if limits.rate is not None else None
        )
        self.breaker = CircuitBreaker(
            limits.breaker_failures, limits.breaker_cooldown, probe_wait=request_budget(limits)
        )
        self._paused_until = float("-inf")
        self._log = get_logger(provider=name)
        self._metrics.circuit.labels(name).set(CIRCUIT_STATES[BreakerState.CLOSED.value])
        # Looked up once: observed for every request.
        self._check_seconds = metrics.check_seconds.labels(name)

    @property
    def batch_size(self) -> int:
        return self.adapter.max_batch

    @property
    def state(self) -> BreakerState:
        return self.breaker.state

    def paused_for(self) -> float | None:
        """Seconds left of a Retry-After pause, or None."""
        remaining = self._paused_until - self._clock()
        return remaining if remaining > 0 else None

    async def check(self, orders: Sequence[OrderRef]) -> dict[UUID, Outcome]:
        """An outcome for every order given; raises only CancelledError."""
        unique = list({order.order_id: order for order in orders}.values())
        size = self.adapter.max_batch
        chunks = [unique[i : i + size] for i in range(0, len(unique), size)]
        results: dict[UUID, Outcome] = {}
        if len(chunks) == 1:
            results.update(await self._check_chunk(chunks[0]))
        elif chunks:
            # No more tasks than may send at once, each taking the next chunk
            # in turn: a task per chunk would mostly wait in the semaphores
            # (hundreds for one re-read batch of a one-order-a-request
            # provider), and each wait is a future and a wake-up.
            pending = iter(chunks)

            async def work() -> None:
                for chunk in pending:
                    results.update(await self._check_chunk(chunk))

            async with asyncio.TaskGroup() as group:
                for _ in range(min(len(chunks), self.limits.concurrency)):
                    group.create_task(work())
        # One increment per outcome kind, not per order: this runs for every check.
        for status, count in Counter(o.status.value for o in results.values()).items():
            self._metrics.checks.labels(self.name, status).inc(count)
        return results

    async def _check_chunk(self, chunk: Sequence[OrderRef]) -> dict[UUID, Outcome]:
        deferred = self._deferral()
        if deferred is not None:
            return _all(chunk, deferred)
        if self._bucket is not None:
            wait = self._bucket.reserve(self._clock())
            if wait > 0:
                await self._sleep(wait)
        async with self._local, self._global:
            deferred = self._deferral()
            if deferred is not None:
                return _all(chunk, deferred)
            admission = self._transition(lambda: self.breaker.admit(self._clock()))
            if not admission.allowed:
                return _all(chunk, Outcome.transport_error(CIRCUIT_OPEN, admission.retry_after))
            return await self._request(chunk, admission)

    async def _request(
        self, chunk: Sequence[OrderRef], admission: Admission
    ) -> dict[UUID, Outcome]:
        started = self._clock()
        verdict_given = False
        try:
            if self.adapter.times_its_requests:
                answered = await self.adapter.fetch(self._session, chunk)
            else:
                async with asyncio.timeout(request_budget(self.limits)):
                    answered = await self.adapter.fetch(self._session, chunk)
            outcomes = _fill(chunk, answered)
        except RateLimited as exc:
            outcomes = self._rate_limited(chunk, exc, admission)
            verdict_given = exc.retry_after is None
        except Exception as exc:  # provider trouble of any kind is an outcome
            outcomes = _all(chunk, Outcome.transport_error(self._failure(exc, len(chunk))))
            self._transition(lambda: self.breaker.record_failure(admission, self._clock()))
            verdict_given = True
        else:
            self._transition(lambda: self.breaker.record_success(admission))
            verdict_given = True
        finally:
            self._check_seconds.observe(max(0.0, self._clock() - started))
            if not verdict_given:
                # Cancelled, or told to wait: the next request becomes the probe.
                self.breaker.release(admission)
        return outcomes

    def _rate_limited(
        self, chunk: Sequence[OrderRef], exc: RateLimited, admission: Admission
    ) -> dict[UUID, Outcome]:
        if exc.retry_after is None:
            # No guidance (a bare 503): the provider may be down; let the breaker count it.
            self._transition(lambda: self.breaker.record_failure(admission, self._clock()))
        wait = exc.retry_after if exc.retry_after is not None else DEFAULT_RETRY_AFTER
        # "Retry-After: 0" or a date already past (clock skew) would make a hot
        # loop of deferred checks that use no slot; a date years ahead would
        # park the provider's orders for good. Keep it between the two bounds.
        wait = min(max(wait, MIN_RETRY_AFTER), MAX_RETRY_AFTER)
        until = self._clock() + wait
        if until > self._paused_until:
            self._paused_until = until
            self._log.warning("provider.rate_limited", retry_after_s=round(wait, 3))
        return _all(chunk, Outcome.transport_error(self._text(exc), retry_after=wait))

    def _failure(self, exc: Exception, count: int) -> str:
        if isinstance(exc, TimeoutError):
            text = f"timed out after {request_budget(self.limits):g} s"
        else:
            text = self._text(exc)
        if isinstance(exc, ProviderAuthError):
            self._log.error(
                "provider.auth_failed",
                error=text,
                orders=count,
                hint="credentials or IP whitelist: a configuration problem, not an order outcome",
            )
        elif isinstance(exc, ProviderError | TimeoutError | aiohttp.ClientError):
            self._log.warning("provider.request_failed", error=text, orders=count)
        else:
            # A bug in an adapter must not take the daemon down, but it must be seen.
            self._log.error(
                "provider.unexpected_error",
                error=text,
                error_type=type(exc).__name__,
                orders=count,
                traceback=scrub("".join(traceback.format_exception(exc)), self._secrets),
            )
        return text

    def _text(self, exc: BaseException) -> str:
        # Our own errors are scrubbed where they are made; an adapter's bug
        # may raise anything, so scrub (in every encoding) here as well.
        text = clean_str(str(exc)).strip() or type(exc).__name__
        return bounded(scrub(text, self._secrets), _MAX_ERROR)

    def _deferral(self) -> Outcome | None:
        now = self._clock()
        paused = self._paused_until - now
        if paused > 0:
            return Outcome.transport_error(PAUSED, retry_after=paused)
        blocked = self.breaker.blocked_for(now)
        if blocked is not None:
            return Outcome.transport_error(CIRCUIT_OPEN, retry_after=blocked)
        return None

    def _transition(self, step: Callable[[], T]) -> T:
        """Run one breaker step; log and export a change of state, once."""
        before = self.breaker.state
        result = step()
        after = self.breaker.state
        if after is not before:
            self._metrics.circuit.labels(self.name).set(CIRCUIT_STATES[after.value])
            log = self._log.warning if after is BreakerState.OPEN else self._log.info
            log(
                _CIRCUIT_EVENTS[after],
                failures=self.breaker.failures,
                cooldown_s=self.breaker.cooldown,
            )
        return result


def _all(chunk: Sequence[OrderRef], outcome: Outcome) -> dict[UUID, Outcome]:
    return {order.order_id: outcome for order in chunk}


def _fill(chunk: Sequence[OrderRef], answered: Mapping[UUID, Outcome]) -> dict[UUID, Outcome]:
    # Only the orders asked about: an adapter echoing a stranger must not leak it in.
    return {order.order_id: answered.get(order.order_id) or Outcome.unknown() for order in chunk}
