"""One action's manners toward the application: concurrency, rate, breaker, Retry-After.

The same gates as a provider's (``providers.limits``), from the same parts
(``providers.breaker``), for the requests the relay sends: a semaphore
(``limits.concurrency``), a token bucket (``limits.rate``/``burst``), a
circuit breaker (``breaker_failures``/``breaker_cooldown``) that opens on
requests that got no usable answer (no answer, a 5xx), and a pause when the
application says Retry-After. The timeouts are the action's
(``connect_timeout``, ``read_timeout``), the body read is capped at
``max_body``, redirects are not followed (the Authorization header would go
with them), and no header is ever logged: they carry the secrets.

:meth:`ActionSender.send` never raises but for cancellation: what came back
(or why nothing did) is a :class:`Sent`, which ``delivery.answers.interpret``
turns into verdicts, or a :class:`Deferred` when no request went out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

import aiohttp
from multidict import CIMultiDict

from order_monitor.config import ActionConfig
from order_monitor.logs import get_logger
from order_monitor.providers.breaker import Admission, BreakerState, CircuitBreaker, TokenBucket
from order_monitor.providers.http import describe_failure, parse_retry_after
from order_monitor.providers.limits import (
    DEFAULT_RETRY_AFTER,
    MAX_RETRY_AFTER,
    MIN_RETRY_AFTER,
    client_timeout,
    request_budget,
)

log = get_logger()

CIRCUIT_OPEN: Final = "circuit open: the application failed too many requests in a row"
PAUSED: Final = "the application asked us to wait (Retry-After)"

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class Outgoing(Protocol):
    """What the sender needs of a ``delivery.requests.Request``."""

    @property
    def method(self) -> str: ...
    @property
    def url(self) -> str: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def body(self) -> bytes: ...
    def describe(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Sent:
    """A request that went out: the answer, or why there was none."""

    #: None when nothing came back (refused, reset, timed out, too large).
    status: int | None
    body: bytes | None
    headers: Mapping[str, str] | None
    #: Why there is no answer (safe to log: no URL, no header), else None.
    failure: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Deferred:
    """No request went out: the circuit is open or the application asked us to wait."""

    reason: str
    #: Seconds until a request may go again.
    retry_after: float


class ActionSender:
    """The gates and the HTTP call for one action (see the module's docstring)."""

    def __init__(
        self,
        action: ActionConfig,
        session: aiohttp.ClientSession,
        *,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.action = action
        limits = action.limits
        self._session = session
        self._clock = clock
        self._wall = wall
        self._sleep = sleep
        self._semaphore = asyncio.Semaphore(limits.concurrency)
        self._bucket = (
            TokenBucket(limits.rate, limits.burst, clock()) if limits.rate is not None else None
        )
        self.breaker = CircuitBreaker(
            limits.breaker_failures, limits.breaker_cooldown, probe_wait=request_budget(limits)
        )
        self._timeout = client_timeout(limits)
        self._paused_until = float("-inf")
        self._log = log.bind(action=action.name)

    def blocked_for(self) -> float | None:
        """Seconds before a request may go (paused, or circuit open), or None."""
        now = self._clock()
        paused = self._paused_until - now
        if paused > 0:
            return paused
        return self.breaker.blocked_for(now)

    async def send(self, request: Outgoing) -> Sent | Deferred:
        """Send *request* through the gates; raises only CancelledError."""
        deferred = self._deferral()
        if deferred is not None:
            return deferred
        if self._bucket is not None:
            wait = self._bucket.reserve(self._clock())
            if wait > 0:
                await self._sleep(wait)
        async with self._semaphore:
            # Either may have changed while this request waited for its turn.
            deferred = self._deferral()
            if deferred is not None:
                return deferred
            admission = self._step(lambda: self.breaker.admit(self._clock()))
            if not admission.allowed:
                return Deferred(CIRCUIT_OPEN, admission.retry_after)
            verdict_given = False
            try:
                sent = await self._request(request)
                verdict_given = self._record(sent, admission)
                return sent
            finally:
                if not verdict_given:
                    # Cancelled, or told to wait: the next request becomes the probe.
                    self.breaker.release(admission)

    def _deferral(self) -> Deferred | None:
        now = self._clock()
        paused = self._paused_until - now
        if paused > 0:
            return Deferred(PAUSED, paused)
        blocked = self.breaker.blocked_for(now)
        if blocked is not None:
            return Deferred(CIRCUIT_OPEN, blocked)
        return None

    def _record(self, sent: Sent, admission: Admission) -> bool:
        """Tell the breaker (and the pause) what the answer says; False: no verdict."""
        status = sent.status
        retry_after = None
        if sent.headers is not None and status in (429, 503):
            value = sent.headers.get("Retry-After")
            if value is not None:
                retry_after = parse_retry_after(value, self._wall())
        if status == 429 or retry_after is not None:
            wait = retry_after if retry_after is not None else DEFAULT_RETRY_AFTER
            # Between the bounds: neither a hot loop nor a pause for good.
            wait = min(max(wait, MIN_RETRY_AFTER), MAX_RETRY_AFTER)
            until = self._clock() + wait
            if until > self._paused_until:
                self._paused_until = until
                self._log.warning("delivery.rate_limited", status=status, retry_after_s=wait)
            return False
        if status is None or status >= 500:
            self._step(lambda: self.breaker.record_failure(admission, self._clock()))
        else:
            # A 4xx is an answer: the application is up (and says what is wrong).
            self._step(lambda: self.breaker.record_success(admission))
        return True

    async def _request(self, request: Outgoing) -> Sent:
        started = self._clock()
        max_body = self.action.limits.max_body
        try:
            async with self._session.request(
                request.method,
                request.url,
                headers=dict(request.headers),
                data=request.body,
                allow_redirects=False,
                timeout=self._timeout,
            ) as response:
                declared = response.content_length
                if declared is not None and declared > max_body:
                    return self._too_large(response.status, started)
                chunks: list[bytes] = []
                size = 0
                while chunk := await response.content.read(max_body + 1 - size):
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > max_body:
                        return self._too_large(response.status, started)
                body = b"".join(chunks)
                return Sent(
                    response.status,
                    body,
                    # Case-insensitive, as HTTP header names are: a proxy
                    # may well send "retry-after".
                    CIMultiDict(response.headers),
                    seconds=self._clock() - started,
                )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # Never str(exc): aiohttp's texts may carry the URL (and a
            # template may have put a value there). Its kind, host and port.
            failure = describe_failure(exc, request.url)
            if isinstance(exc, TimeoutError) and not isinstance(
                exc, aiohttp.ConnectionTimeoutError
            ):
                text = f"timed out after {request_budget(self.action.limits):g} s"
            else:
                text = str(failure)
            self._log.warning("delivery.request_failed", request=request.describe(), error=text)
            return Sent(None, None, None, failure=text, seconds=self._clock() - started)

    def _too_large(self, status: int, started: float) -> Sent:
        limit = self.action.limits.max_body
        self._log.warning("delivery.body_too_large", status=status, limit=limit)
        return Sent(
            None,
            None,
            None,
            failure=f"HTTP {status} with a body larger than {limit} bytes (limits.max_body)",
            seconds=self._clock() - started,
        )

    def _step(self, step: Callable[[], Admission | None]) -> Admission:
        """Run one breaker step; log a change of state once."""
        before = self.breaker.state
        result = step()
        after = self.breaker.state
        if after is not before:
            event = {
                BreakerState.OPEN: "delivery.circuit_opened",
                BreakerState.HALF_OPEN: "delivery.circuit_half_open",
                BreakerState.CLOSED: "delivery.circuit_closed",
            }[after]
            (self._log.warning if after is BreakerState.OPEN else self._log.info)(
                event, failures=self.breaker.failures, cooldown_s=self.breaker.cooldown
            )
        return result if result is not None else Admission(allowed=True)


def build_senders(
    actions: tuple[ActionConfig, ...],
    session: aiohttp.ClientSession,
    *,
    clock: Clock = time.monotonic,
    wall: Clock = time.time,
    sleep: Sleep = asyncio.sleep,
) -> dict[str, ActionSender]:
    """A sender per action, by name."""
    return {
        action.name: ActionSender(action, session, clock=clock, wall=wall, sleep=sleep)
        for action in actions
    }
