"""What the page shows, built from plain values: the daemon's facts and a reading.

Pure code, so what an operator sees is tested without a server, a database
or a clock. The templates (``page.render``) only lay these out.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from order_monitor.config import ProviderConfig
from order_monitor.delivery.store import OutboxSummary
from order_monitor.operator.status import GaveUpOrder
from order_monitor.page.activity import HourCounts
from order_monitor.page.reading import DeadLetter, InFlightGroup, OrderRow


@dataclass(frozen=True, slots=True)
class DaemonFacts:
    """The daemon as its own state says, read at each request (no query)."""

    version: str
    #: leader, standby, or what it is doing while neither.
    role: str
    database_unreachable: bool
    #: The LISTEN connection; None when not leading (a standby listens to nothing).
    listener_up: bool | None
    #: ORDER_MONITOR_CAPTURE: trigger or decoding.
    capture: str
    #: How new orders are found now: "notify", "reading changes", "scan" or "slot".
    handoff: str | None
    last_sweep_s: float | None
    sweep_interval_s: float
    queue_lag_s: float
    scheduled: int
    being_checked: int
    unwritten_s: float
    started_at: dt.datetime
    uptime_s: float
    #: /readyz's verdict, and why not when it is not.
    ready: bool = True
    not_ready: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ProviderState:
    """A provider's limits as they stand (providers.limits.LimitedProvider)."""

    #: closed, half_open or open.
    circuit: str
    #: Seconds left of a Retry-After pause; None when not paused.
    paused_for_s: float | None = None


@dataclass(frozen=True, slots=True)
class ProviderLine:
    name: str
    kind: str
    provider_ids: tuple[str, ...]
    in_flight: int
    oldest_s: float | None
    hour: HourCounts
    #: None while not leading (nothing is asked).
    circuit: str | None
    paused_for_s: float | None
    paused_until: dt.datetime | None

    @property
    def trouble(self) -> bool:
        """Worth a look: the circuit is not closed, a pause runs, or most checks fail."""
        ratio = self.hour.error_ratio
        return (
            (self.circuit is not None and self.circuit != "closed")
            or self.paused_for_s is not None
            or (ratio is not None and ratio >= 0.5)
        )


@dataclass(frozen=True, slots=True)
class GaveUpLine:
    row: GaveUpOrder
    #: The configured provider serving its provider id, if any.
    provider: str | None


@dataclass(frozen=True, slots=True)
class Deliveries:
    summary: OutboxSummary
    dead_letters: list[DeadLetter]
    #: outcome -> action name.
    actions: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Overview:
    """The main page."""

    daemon: DaemonFacts
    #: When the database was read (its clock), and how long ago; None: never yet.
    read_at: dt.datetime | None
    read_age_s: float | None
    #: Why the latest reading failed (the previous one is shown, if any).
    read_problem: str | None
    providers: list[ProviderLine]
    #: Provider ids with orders in flight that no configured provider serves.
    unserved: list[InFlightGroup]
    in_flight_total: int
    #: The latest that gave up, newest first (page.reading.GAVE_UP_LISTED at most).
    gave_up: list[GaveUpLine]
    #: All that gave up in the window and still need a human, listed or not.
    gave_up_count: int
    #: Orders given up before this term and not listed (the scan failed); None: all listed.
    gave_up_note: str | None
    deliveries: Deliveries | None
    refresh_s: float
    hour_window_s: float = 3600.0

    @property
    def attention(self) -> bool:
        """Something here wants a look (the title says so, for a tab in the background)."""
        return (
            not self.daemon.ready
            or bool(self.gave_up)
            or any(p.trouble for p in self.providers)
            or bool(self.unserved)
        )


def provider_lines(
    providers: Sequence[ProviderConfig],
    in_flight: Sequence[InFlightGroup],
    hour: Mapping[str, HourCounts],
    states: Mapping[str, ProviderState] | None,
    now: dt.datetime,
) -> tuple[list[ProviderLine], list[InFlightGroup]]:
    """One line per configured provider (its ids' orders summed), and the unserved ids."""
    by_id = {group.provider_id: group for group in in_flight}
    served: set[str | None] = set()
    lines = []
    for config in providers:
        groups = [by_id[pid] for pid in config.provider_ids if pid in by_id]
        served.update(config.provider_ids)
        ages = [g.oldest_s for g in groups if g.oldest_s is not None]
        state = None if states is None else states.get(config.name)
        paused = state.paused_for_s if state is not None else None
        lines.append(
            ProviderLine(
                name=config.name,
                kind=config.kind,
                provider_ids=tuple(config.provider_ids),
                in_flight=sum(g.orders for g in groups),
                oldest_s=max(ages) if ages else None,
                hour=hour.get(config.name, HourCounts()),
                circuit=state.circuit if state is not None else None,
                paused_for_s=paused,
                paused_until=None if paused is None else now + dt.timedelta(seconds=paused),
            )
        )
    unserved = [g for g in in_flight if g.provider_id not in served]
    return lines, unserved


def gave_up_lines(
    rows: Sequence[GaveUpOrder], providers: Sequence[ProviderConfig]
) -> list[GaveUpLine]:
    names = {pid: config.name for config in providers for pid in config.provider_ids}
    return [GaveUpLine(row, names.get(row.provider_id or "")) for row in rows]


@dataclass(frozen=True, slots=True)
class NextCheck:
    """Where the order stands in this daemon's schedule."""

    #: "scheduled", "being checked", "not scheduled" or "not leading".
    state: str
    #: For "scheduled": seconds until it is due (negative: overdue).
    due_in_s: float | None = None
    due_at: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class OrderView:
    """One order, as `order-monitor check --dry-run` shows it, without asking the provider."""

    id: uuid.UUID
    row: OrderRow | None
    #: The configured provider serving its provider id (name, kind), if any.
    provider: tuple[str, str] | None
    #: Why the daemon leaves it alone, when it is not in flight.
    not_in_flight: str | None
    next_check: NextCheck
    #: Why the row could not be read (its error's class and first line).
    problem: str | None = None
    #: What is wrong with its dispatch time, when it cannot be used (db.dispatch).
    dispatch_issue_text: str | None = None
    #: False for an order finished done: its last message is the provider's
    #: completion text, which may quote the PIN.
    message_shown: bool = True
