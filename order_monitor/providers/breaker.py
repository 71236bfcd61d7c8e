"""A circuit breaker and a token bucket: pure state machines, the clock passed in.

Neither reads a clock nor sleeps, so their timing is tested with plain
numbers; :class:`~order_monitor.providers.limits.LimitedProvider` does the
waiting and the logging.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class BreakerState(enum.Enum):
    # Values are the keys of metrics.CIRCUIT_STATES.
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"


@dataclass(frozen=True, slots=True)
class Admission:
    """May a request go now?"""

    #: False: defer the orders, ask again in ``retry_after`` seconds.
    allowed: bool
    #: True for the single request that tests a half-open circuit.
    probe: bool = False
    retry_after: float = 0.0


class CircuitBreaker:
    """Opens after *threshold* consecutive failures; one probe after *cooldown*.

    CLOSED: every request goes; a success resets the count. OPEN: nothing goes
    until *cooldown* seconds after opening. Then HALF_OPEN: the next
    :meth:`admit` is the probe and everything else waits; the probe's success
    closes the circuit, its failure opens it again for another cooldown.

    Results of requests admitted before the circuit opened (they were already
    in flight) change nothing while it is open or half-open: only the probe
    decides, so a late straggler cannot close a circuit nobody tested.
    """

    def __init__(self, threshold: int, cooldown: float, *, probe_wait: float | None = None) -> None:
        if threshold < 1:
            raise ValueError(f"threshold must be >= 1, got {threshold}")
        if cooldown <= 0:
            raise ValueError(f"cooldown must be > 0, got {cooldown}")
        self.threshold = threshold
        self.cooldown = cooldown
        #: Deferral while a probe is out: about as long as the probe may take.
        self.probe_wait = cooldown if probe_wait is None else probe_wait
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_out = False

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def failures(self) -> int:
        """Consecutive failures counted so far (the one that opened it included)."""
        return self._failures

    def blocked_for(self, now: float) -> float | None:
        """Seconds to defer a request, or None when :meth:`admit` may let it go.

        No side effect: for a quick answer before queueing for a rate token or
        a semaphore.
        """
        if self._state is BreakerState.OPEN:
            remaining = self._opened_at + self.cooldown - now
            return remaining if remaining > 0 else None
        if self._state is BreakerState.HALF_OPEN and self._probe_out:
            return self.probe_wait
        return None

    def admit(self, now: float) -> Admission:
        """Decide for one request about to be sent; may claim the probe."""
        if self._state is BreakerState.CLOSED:
            return Admission(allowed=True)
        blocked = self.blocked_for(now)
        if blocked is not None:
            return Admission(allowed=False, retry_after=blocked)
        self._state = BreakerState.HALF_OPEN
        self._probe_out = True
        return Admission(allowed=True, probe=True)

    def record_success(self, admission: Admission) -> None:
        if self._state is BreakerState.CLOSED:
            self._failures = 0
        elif admission.probe and self._state is BreakerState.HALF_OPEN:
            self._state = BreakerState.CLOSED
            self._failures = 0
            self._probe_out = False

    def record_failure(self, admission: Admission, now: float) -> None:
        if self._state is BreakerState.CLOSED:
            self._failures += 1
            if self._failures >= self.threshold:
                self._open(now)
        elif admission.probe and self._state is BreakerState.HALF_OPEN:
            self._failures += 1
            self._open(now)

    def release(self, admission: Admission) -> None:
        """The probe ended without a verdict (cancelled, or told to wait).

        The circuit stays half-open and the next request becomes the probe;
        without this a cancelled probe would block the provider for good.
        """
        if admission.probe and self._state is BreakerState.HALF_OPEN:
            self._probe_out = False

    def _open(self, now: float) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = now
        self._probe_out = False


class TokenBucket:
    """*rate* tokens a second, at most *burst* saved up.

    :meth:`reserve` takes a token whether or not one is there yet and says
    how long to wait for it; the balance may go negative, so callers queue
    in the order they reserved, each one ``1/rate`` after the previous.
    """

    def __init__(self, rate: float, burst: int, now: float) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._updated = now

    def reserve(self, now: float) -> float:
        """Take one token; return the seconds to wait before using it (0 when ready)."""
        if now > self._updated:
            self._tokens = min(float(self.burst), self._tokens + (now - self._updated) * self.rate)
            self._updated = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate
