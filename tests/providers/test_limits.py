"""A provider's manners: LimitedProvider with a scripted adapter, on an injected clock.

The breaker and the bucket it uses, both pure, are tested in test_breaker.py.
These use a real Adapter implementation whose requests block on an Event the
test controls, so "how many at once" is counted, not hoped.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar
from uuid import UUID

import aiohttp
import pytest
from structlog.testing import capture_logs

from order_monitor.config import ProviderLimits
from order_monitor.errors import ProviderAuthError, ProviderError
from order_monitor.metrics import CIRCUIT_STATES, Metrics
from order_monitor.providers.base import OrderRef, Outcome, RateLimited, Status
from order_monitor.providers.breaker import BreakerState
from order_monitor.providers.limits import (
    CIRCUIT_OPEN,
    DEFAULT_RETRY_AFTER,
    MAX_RETRY_AFTER,
    MIN_RETRY_AFTER,
    LimitedProvider,
    client_timeout,
)
from order_monitor.redaction import Secret
from tests.providers import state_of

Respond = Callable[[Sequence[OrderRef]], Awaitable[Mapping[UUID, Outcome]]]


class ScriptedAdapter:
    """A real Adapter: answers through *respond*, counts calls and concurrency."""

    times_its_requests: ClassVar[bool] = False  # LimitedProvider bounds each request

    def __init__(self, max_batch: int = 50, respond: Respond | None = None) -> None:
        self.max_batch = max_batch
        self.respond = respond or all_done
        self.calls: list[list[OrderRef]] = []
        self.in_flight = 0
        self.peak = 0
        self.sessions: list[object] = []

    async def fetch(
        self, session: aiohttp.ClientSession, orders: Sequence[OrderRef]
    ) -> Mapping[UUID, Outcome]:
        self.calls.append(list(orders))
        self.sessions.append(session)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            return await self.respond(orders)
        finally:
            self.in_flight -= 1


async def all_done(orders: Sequence[OrderRef]) -> Mapping[UUID, Outcome]:
    return {o.order_id: Outcome.done(pin=f"P-{o.reference}") for o in orders}


def held(gate: asyncio.Event, then: Respond = all_done) -> Respond:
    async def respond(orders: Sequence[OrderRef]) -> Mapping[UUID, Outcome]:
        await gate.wait()
        return await then(orders)

    return respond


def failing(exc: BaseException) -> Respond:
    async def respond(orders: Sequence[OrderRef]) -> Mapping[UUID, Outcome]:
        raise exc

    return respond


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Sleeps:
    """An injected sleep: records what the rate limiter asked for, returns at once."""

    def __init__(self) -> None:
        self.asked: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.asked.append(seconds)


# A stand-in for the shared session: LimitedProvider only hands it to the adapter.
SESSION: Any = object()


def orders(n: int) -> list[OrderRef]:
    return [OrderRef(uuid.uuid4(), f"R{i}") for i in range(n)]


def limited(
    adapter: ScriptedAdapter,
    *,
    name: str = "p1",
    metrics: Metrics | None = None,
    session_limit: asyncio.Semaphore | None = None,
    clock: Clock | None = None,
    sleep: Sleeps | None = None,
    secrets: Sequence[Secret] = (),
    **limits: Any,
) -> LimitedProvider:
    return LimitedProvider(
        name,
        adapter,
        ProviderLimits(**limits),
        session=SESSION,
        session_limit=session_limit or asyncio.Semaphore(100),
        metrics=metrics or Metrics(),
        secrets=secrets,
        clock=clock or Clock(),
        sleep=sleep or Sleeps(),
    )


async def settle() -> None:
    """Let every runnable task run until it blocks (event-loop turns, not time)."""
    for _ in range(50):
        await asyncio.sleep(0)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_orders_are_split_into_chunks_of_max_batch_and_each_asked_once() -> None:
    adapter = ScriptedAdapter(max_batch=3)
    provider = limited(adapter)
    given_orders = orders(7)
    result = await provider.check([*given_orders, given_orders[0]])  # a duplicate too
    assert sorted(len(c) for c in adapter.calls) == [1, 3, 3]
    asked = [o.order_id for call in adapter.calls for o in call]
    assert sorted(asked) == sorted(o.order_id for o in given_orders)
    assert set(result) == {o.order_id for o in given_orders}
    assert all(outcome.status is Status.DONE for outcome in result.values())
    assert adapter.sessions == [SESSION] * 3


async def test_no_orders_no_request() -> None:
    adapter = ScriptedAdapter()
    assert await limited(adapter).check([]) == {}
    assert adapter.calls == []


async def test_orders_the_adapter_did_not_mention_are_unknown_and_strangers_are_dropped() -> None:
    mine = orders(3)
    stranger = uuid.uuid4()

    async def partial(batch: Sequence[OrderRef]) -> Mapping[UUID, Outcome]:
        return {batch[0].order_id: Outcome.failed("no"), stranger: Outcome.done("X")}

    result = await limited(ScriptedAdapter(respond=partial)).check(mine)
    assert set(result) == {o.order_id for o in mine}
    assert result[mine[0].order_id].status is Status.FAILED
    assert result[mine[1].order_id] == Outcome.unknown()
    assert result[mine[2].order_id] == Outcome.unknown()


async def test_per_provider_concurrency_is_reached_and_never_exceeded() -> None:
    gate = asyncio.Event()
    adapter = ScriptedAdapter(max_batch=1, respond=held(gate))
    provider = limited(adapter, concurrency=3, session_limit=asyncio.Semaphore(10))
    task = asyncio.create_task(provider.check(orders(12)))
    await settle()
    assert adapter.in_flight == 3
    gate.set()
    result = await task
    assert len(result) == 12
    assert adapter.peak == 3
    assert len(adapter.calls) == 12


async def test_many_chunks_wait_as_a_queue_not_as_a_task_each() -> None:
    # 200 one-order chunks, 3 at a time: 3 tasks take the chunks in turn, in
    # the order given, rather than 200 tasks queueing on the semaphores.
    gate = asyncio.Event()
    adapter = ScriptedAdapter(max_batch=1, respond=held(gate))
    provider = limited(adapter, concurrency=3, session_limit=asyncio.Semaphore(10))
    given = orders(200)
    before = len(asyncio.all_tasks())
    task = asyncio.create_task(provider.check(given))
    await settle()
    assert len(asyncio.all_tasks()) - before == 1 + 3  # the check and its three workers
    gate.set()
    result = await task
    assert set(result) == {o.order_id for o in given}
    assert [call[0] for call in adapter.calls] == given
    assert adapter.peak == 3


async def test_the_global_limit_binds_all_providers_together() -> None:
    gate = asyncio.Event()
    shared = asyncio.Semaphore(5)
    a = ScriptedAdapter(max_batch=1, respond=held(gate))
    b = ScriptedAdapter(max_batch=1, respond=held(gate))
    pa = limited(a, name="a", concurrency=4, session_limit=shared)
    pb = limited(b, name="b", concurrency=4, session_limit=shared)
    tasks = [asyncio.create_task(pa.check(orders(10))), asyncio.create_task(pb.check(orders(10)))]
    await settle()
    assert a.in_flight + b.in_flight == 5
    assert a.in_flight <= 4
    assert b.in_flight <= 4
    gate.set()
    results = await asyncio.gather(*tasks)
    assert [len(r) for r in results] == [10, 10]
    assert max(a.peak, b.peak) <= 4


async def test_a_slow_provider_does_not_hold_back_another() -> None:
    stuck = asyncio.Event()
    shared = asyncio.Semaphore(4)
    slow = ScriptedAdapter(max_batch=1, respond=held(stuck))
    fast = ScriptedAdapter(max_batch=1)
    slow_provider = limited(slow, name="slow", concurrency=2, session_limit=shared)
    fast_provider = limited(fast, name="fast", concurrency=2, session_limit=shared)
    slow_task = asyncio.create_task(slow_provider.check(orders(20)))
    await settle()
    assert slow.in_flight == 2  # it holds only its own share of the global slots
    async with asyncio.timeout(5):  # a guard against a hang, not a timing assertion
        result = await fast_provider.check(orders(10))
    assert len(result) == 10
    assert all(o.status is Status.DONE for o in result.values())
    assert not slow_task.done()
    stuck.set()
    assert len(await slow_task) == 20


async def test_rate_limit_spaces_requests_through_the_injected_sleep() -> None:
    sleeps = Sleeps()
    adapter = ScriptedAdapter(max_batch=1)
    provider = limited(adapter, rate=2.0, burst=1, sleep=sleeps)
    await provider.check(orders(4))
    assert sorted(sleeps.asked) == pytest.approx([0.5, 1.0, 1.5])
    assert len(adapter.calls) == 4


async def test_no_rate_means_no_waiting() -> None:
    sleeps = Sleeps()
    await limited(ScriptedAdapter(max_batch=1), sleep=sleeps).check(orders(5))
    assert sleeps.asked == []


async def test_retry_after_pauses_the_provider_without_requests() -> None:
    clock = Clock()
    responses: list[Respond] = [failing(RateLimited("429 Too Many Requests", 10.0))]

    async def respond(batch: Sequence[OrderRef]) -> Mapping[UUID, Outcome]:
        return await (responses.pop(0) if responses else all_done)(batch)

    adapter = ScriptedAdapter(respond=respond)
    provider = limited(adapter, clock=clock)
    with capture_logs() as logs:
        first = await provider.check(orders(2))
    assert {o.status for o in first.values()} == {Status.ERROR}
    assert {o.retry_after for o in first.values()} == {10.0}
    assert [e for e in logs if e["event"] == "provider.rate_limited"] == [
        {
            "event": "provider.rate_limited",
            "provider": "p1",
            "retry_after_s": 10.0,
            "log_level": "warning",
        }
    ]

    clock.now += 3
    during = await provider.check(orders(2))
    assert len(adapter.calls) == 1
    assert [o.retry_after for o in during.values()] == pytest.approx([7.0, 7.0])
    assert {o.status for o in during.values()} == {Status.ERROR}

    clock.now += 7.5
    after = await provider.check(orders(2))
    assert len(adapter.calls) == 2
    assert {o.status for o in after.values()} == {Status.DONE}
    assert state_of(provider) is BreakerState.CLOSED  # a Retry-After is not a failure


@pytest.mark.parametrize(
    ("asked", "paused"),
    [(0.0, MIN_RETRY_AFTER), (-5.0, MIN_RETRY_AFTER), (99_999_999.0, MAX_RETRY_AFTER)],
)
async def test_retry_after_is_kept_within_bounds(asked: float, paused: float) -> None:
    """0 (or a date already past) would be a hot loop of deferrals; years would park
    the provider's orders for good."""
    clock = Clock()
    adapter = ScriptedAdapter(respond=failing(RateLimited("429", asked)))
    provider = limited(adapter, clock=clock)
    result = await provider.check(orders(1))
    assert [o.retry_after for o in result.values()] == [paused]
    again = await provider.check(orders(1))
    assert len(adapter.calls) == 1  # paused: not asked again at once
    assert [o.status for o in again.values()] == [Status.ERROR]


async def test_a_bare_503_pauses_for_a_default_and_counts_as_a_failure() -> None:
    clock = Clock()
    adapter = ScriptedAdapter(respond=failing(RateLimited("503", None)))
    provider = limited(adapter, clock=clock, breaker_failures=2)
    result = await provider.check(orders(1))
    assert [o.retry_after for o in result.values()] == [DEFAULT_RETRY_AFTER]
    assert provider.breaker.failures == 1


async def test_breaker_opens_defers_without_asking_probes_once_and_closes() -> None:
    clock = Clock()
    metrics = Metrics()
    gate = asyncio.Event()
    verdicts: list[Respond] = [failing(ProviderError("HTTP 502"))] * 3 + [held(gate)]

    async def respond(batch: Sequence[OrderRef]) -> Mapping[UUID, Outcome]:
        return await verdicts.pop(0)(batch)

    adapter = ScriptedAdapter(max_batch=1, respond=respond)
    provider = limited(
        adapter, clock=clock, metrics=metrics, breaker_failures=3, breaker_cooldown=30.0
    )

    def gauge() -> float:
        return sample(metrics, "order_monitor_provider_circuit_state", provider="p1")

    assert gauge() == CIRCUIT_STATES["closed"]
    with capture_logs() as logs:
        for _ in range(3):
            await provider.check(orders(1))
            clock.now += 1
    assert len(adapter.calls) == 3
    assert state_of(provider) is BreakerState.OPEN
    assert gauge() == CIRCUIT_STATES["open"]
    opened = [e for e in logs if e["event"].startswith("provider.circuit")]
    assert opened == [
        {
            "event": "provider.circuit_opened",
            "provider": "p1",
            "failures": 3,
            "cooldown_s": 30.0,
            "log_level": "warning",
        }
    ]

    # Open: every order comes back at once, deferred, and the adapter is not asked.
    deferred = await provider.check(orders(5))
    assert len(deferred) == 5
    assert len(adapter.calls) == 3
    for outcome in deferred.values():
        assert outcome.status is Status.ERROR
        assert outcome.error == CIRCUIT_OPEN
        assert outcome.retry_after == pytest.approx(30 - 1)

    # Cool-down over: of three chunks only one (the probe) reaches the adapter.
    clock.now += 30
    with capture_logs() as logs:
        task = asyncio.create_task(provider.check(orders(3)))
        await settle()
        assert len(adapter.calls) == 4
        assert state_of(provider) is BreakerState.HALF_OPEN
        assert gauge() == CIRCUIT_STATES["half_open"]
        gate.set()
        result = await task
    statuses = sorted(o.status.value for o in result.values())
    assert statuses == ["done", "error", "error"]
    assert state_of(provider) is BreakerState.CLOSED
    assert gauge() == CIRCUIT_STATES["closed"]
    assert [e["event"] for e in logs if e["event"].startswith("provider.circuit")] == [
        "provider.circuit_half_open",
        "provider.circuit_closed",
    ]


async def test_a_failed_probe_reopens_the_circuit() -> None:
    clock = Clock()
    adapter = ScriptedAdapter(respond=failing(ProviderError("HTTP 500")))
    provider = limited(adapter, clock=clock, breaker_failures=1, breaker_cooldown=10.0)
    await provider.check(orders(1))
    clock.now += 10
    with capture_logs() as logs:
        await provider.check(orders(1))
    assert len(adapter.calls) == 2
    assert state_of(provider) is BreakerState.OPEN
    assert [e["event"] for e in logs if e["event"].startswith("provider.circuit")] == [
        "provider.circuit_half_open",
        "provider.circuit_opened",
    ]
    clock.now += 5
    again = await provider.check(orders(1))
    assert [o.retry_after for o in again.values()] == [pytest.approx(5)]
    assert len(adapter.calls) == 2


async def test_a_cancelled_probe_does_not_block_the_provider_for_good() -> None:
    clock = Clock()
    never = asyncio.Event()
    verdicts: list[Respond] = [failing(ProviderError("down")), held(never), all_done]

    async def respond(batch: Sequence[OrderRef]) -> Mapping[UUID, Outcome]:
        return await verdicts.pop(0)(batch)

    adapter = ScriptedAdapter(respond=respond)
    provider = limited(adapter, clock=clock, breaker_failures=1, breaker_cooldown=10.0)
    await provider.check(orders(1))
    clock.now += 10
    probe = asyncio.create_task(provider.check(orders(1)))
    await settle()
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    result = await provider.check(orders(1))
    assert [o.status for o in result.values()] == [Status.DONE]
    assert state_of(provider) is BreakerState.CLOSED


async def test_cancellation_propagates_out_of_check() -> None:
    never = asyncio.Event()
    adapter = ScriptedAdapter(max_batch=1, respond=held(never))
    provider = limited(adapter)
    task = asyncio.create_task(provider.check(orders(3)))
    await settle()
    assert adapter.in_flight == 3
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert adapter.in_flight == 0


async def test_a_failed_chunk_is_errors_and_the_other_chunks_keep_their_answers() -> None:
    async def second_fails(batch: Sequence[OrderRef]) -> Mapping[UUID, Outcome]:
        if batch[0].reference == "R2":
            raise ProviderError("HTTP 502 from provider")
        return await all_done(batch)

    given_orders = orders(4)
    with capture_logs() as logs:
        result = await limited(ScriptedAdapter(max_batch=2, respond=second_fails)).check(
            given_orders
        )
    assert [result[o.order_id].status for o in given_orders] == [
        Status.DONE,
        Status.DONE,
        Status.ERROR,
        Status.ERROR,
    ]
    assert result[given_orders[2].order_id].error == "HTTP 502 from provider"
    assert [e for e in logs if e["event"] == "provider.request_failed"] == [
        {
            "event": "provider.request_failed",
            "provider": "p1",
            "error": "HTTP 502 from provider",
            "orders": 2,
            "log_level": "warning",
        }
    ]


async def test_an_auth_failure_is_logged_loudly_as_configuration() -> None:
    adapter = ScriptedAdapter(respond=failing(ProviderAuthError("8|IP not whitelisted")))
    with capture_logs() as logs:
        result = await limited(adapter).check(orders(2))
    assert {o.status for o in result.values()} == {Status.ERROR}
    (event,) = [e for e in logs if e["event"] == "provider.auth_failed"]
    assert event["log_level"] == "error"
    assert event["provider"] == "p1"
    assert event["error"] == "8|IP not whitelisted"


async def test_a_bug_in_an_adapter_becomes_an_error_outcome_with_a_traceback_logged() -> None:
    adapter = ScriptedAdapter(respond=failing(KeyError("status")))
    with capture_logs() as logs:
        result = await limited(adapter).check(orders(1))
    assert [o.status for o in result.values()] == [Status.ERROR]
    (event,) = [e for e in logs if e["event"] == "provider.unexpected_error"]
    assert event["error_type"] == "KeyError"
    assert "KeyError" in event["traceback"]


async def test_a_request_longer_than_connect_plus_read_timeout_is_an_error() -> None:
    never = asyncio.Event()
    adapter = ScriptedAdapter(respond=held(never))
    provider = limited(adapter, connect_timeout=0.01, read_timeout=0.02)
    result = await provider.check(orders(2))
    assert {o.error for o in result.values()} == {"timed out after 0.03 s"}
    assert provider.breaker.failures == 1


async def test_secrets_never_reach_outcomes_or_logs() -> None:
    secret = "hunter2-sifre"
    adapter = ScriptedAdapter(
        respond=failing(ProviderError(f"GET https://x/pin?kod=1&sifre={secret} failed"))
    )
    with capture_logs() as logs:
        result = await limited(adapter, secrets=[Secret(secret)]).check(orders(1))
    (outcome,) = result.values()
    assert outcome.error is not None
    assert secret not in outcome.error
    assert "***" in outcome.error
    assert logs
    assert all(secret not in repr(event) for event in logs)


async def test_metrics_count_every_order_and_time_every_request() -> None:
    metrics = Metrics()
    clock = Clock()

    async def mixed(batch: Sequence[OrderRef]) -> Mapping[UUID, Outcome]:
        clock.now += 0.25
        return {batch[0].order_id: Outcome.done("PIN"), batch[1].order_id: Outcome.pending()}

    provider = limited(ScriptedAdapter(max_batch=3, respond=mixed), metrics=metrics, clock=clock)
    await provider.check(orders(6))

    def checks(outcome: str) -> float:
        return sample(metrics, "order_monitor_checks_total", provider="p1", outcome=outcome)

    assert (checks("done"), checks("pending"), checks("unknown")) == (2, 2, 2)
    assert sample(metrics, "order_monitor_check_seconds_count", provider="p1") == 2
    assert sample(metrics, "order_monitor_check_seconds_sum", provider="p1") > 0


def test_client_timeout_carries_the_providers_limits() -> None:
    timeout = client_timeout(ProviderLimits(connect_timeout=2, read_timeout=9))
    assert (timeout.sock_connect, timeout.sock_read, timeout.total) == (2, None, 11)


def test_an_adapter_without_a_usable_batch_size_is_refused() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        limited(ScriptedAdapter(max_batch=0))
