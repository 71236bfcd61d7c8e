"""Junk notifications: counted, and one warning per interval, on an injected clock."""

from __future__ import annotations

import uuid

from structlog.testing import capture_logs

from order_monitor.engine.bad_payloads import LOGGED_PAYLOAD, BadPayloads, shown
from order_monitor.engine.listener import Listener
from order_monitor.metrics import Metrics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def listener(clock: Clock, metrics: Metrics, orders: list[uuid.UUID]) -> Listener:
    return Listener(
        "postgresql://unused",
        "order_monitor",
        on_order=orders.append,
        on_connected=lambda: None,
        metrics=metrics,
        clock=clock,
    )


def test_a_flood_of_junk_notifications_is_a_line_per_interval_not_a_line_each() -> None:
    # 20,000 junk NOTIFYs wrote 20,000 warnings; past journald's rate limit the
    # daemon's own errors were the lines dropped.
    clock, metrics = Clock(), Metrics()
    orders: list[uuid.UUID] = []
    subject = listener(clock, metrics, orders)
    with capture_logs() as logs:
        for n in range(20_000):
            subject._handle(f"junk {n}")
            clock.now += 0.0001  # 20,000 in two seconds
        real = uuid.uuid4()
        subject._handle(str(real))
        clock.now += 10.0
        subject._bad_payloads.flush()  # what the listener does between notifications
    bad = [e for e in logs if e["event"] == "listener.bad_payload"]
    # The first at once, so a broken trigger shows without delay; the rest in one line.
    assert [(e["count"], e["example"]) for e in bad] == [(1, "junk 0"), (19_999, "junk 1")]
    assert metrics.notifications.labels("rejected")._value.get() == 20_000
    assert orders == [real]


def test_nothing_is_logged_between_intervals_when_nothing_came() -> None:
    clock = Clock()
    reports = BadPayloads("order_monitor", interval=10.0, clock=clock)
    with capture_logs() as logs:
        reports.note("x")
        for _ in range(5):
            clock.now += 10.0
            reports.flush()
        reports.note("y")
    assert [(e["count"], e["example"]) for e in logs] == [(1, "x"), (1, "y")]


def test_the_example_is_cut_short_and_escaped() -> None:
    clock = Clock()
    reports = BadPayloads("order_monitor", clock=clock)
    payload = 'x\n{"event": "forged"}\x1b[31m\u0130' + "y" * 7000
    with capture_logs() as logs:
        reports.note(payload)
    (event,) = logs
    assert event["example"] == shown(payload)
    assert "\n" not in event["example"]
    assert "\x1b" not in event["example"]
    assert event["example"].isascii()
    assert event["example"].startswith("x\\n")
    assert event["example_length"] == len(payload)
    assert len(event["example"]) < 4 * LOGGED_PAYLOAD
