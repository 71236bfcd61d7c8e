"""What the page asks the running daemon: its state, read in memory at each request.

:class:`PageSource` is the part of :class:`~order_monitor.daemon.Daemon` the
page reads (the daemon implements it); the functions here turn it into the
plain values of ``page.view``. Nothing here queries the database.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from typing import Protocol

from order_monitor import __version__
from order_monitor.config import Settings
from order_monitor.decoding.capture import Capture
from order_monitor.engine.handoff import Handoff, Mode
from order_monitor.engine.scheduler import Scheduler
from order_monitor.ops.http import Readiness
from order_monitor.page.view import DaemonFacts, NextCheck, ProviderState
from order_monitor.providers.base import Provider
from order_monitor.providers.limits import LimitedProvider


class PageSource(Readiness, Protocol):
    """What /readyz asks (role, listener, last sweep...), and the rest the page shows."""

    settings: Settings
    scheduler: Scheduler
    #: Wall-clock start of the process, for "up since".
    started_at: dt.datetime
    #: Counts the terms as leader: a new term reads the gave-ups again.
    term: int

    @property
    def handoff(self) -> Handoff | None: ...

    @property
    def capture(self) -> Capture | None: ...

    @property
    def providers(self) -> Mapping[str, Provider] | None: ...

    @property
    def leading(self) -> bool: ...

    def monotonic(self) -> float: ...

    def unwritten_age(self) -> float: ...


def handoff_mode(source: PageSource) -> str | None:
    """How new orders are found right now (None while not leading)."""
    if not source.leading:
        return None
    if source.capture is not None:
        return "slot"
    handoff = source.handoff
    if handoff is None:
        return None
    if not handoff.use_notify:
        return "scan"
    return "notify" if handoff.mode is Mode.IDLE else "reading changes"


def daemon_facts(
    source: PageSource,
    *,
    now: dt.datetime,
    ready: bool = True,
    not_ready: tuple[str, ...] = (),
) -> DaemonFacts:
    leading = source.leading
    scheduler = source.scheduler
    return DaemonFacts(
        version=__version__,
        role=source.role,
        database_unreachable=source.database_unreachable,
        listener_up=source.listener_connected if leading else None,
        capture=source.settings.capture,
        handoff=handoff_mode(source),
        last_sweep_s=source.last_sweep_age(),
        sweep_interval_s=source.settings.sweep_interval,
        queue_lag_s=scheduler.lag(source.monotonic()) if leading else 0.0,
        scheduled=scheduler.scheduled if leading else 0,
        being_checked=scheduler.in_flight if leading else 0,
        unwritten_s=source.unwritten_age(),
        started_at=source.started_at,
        uptime_s=max(0.0, (now - source.started_at).total_seconds()),
        ready=ready,
        not_ready=not_ready,
    )


def provider_states(source: PageSource) -> dict[str, ProviderState] | None:
    """Each provider's circuit and pause by name; None while not leading."""
    providers = source.providers
    if providers is None:
        return None
    states: dict[str, ProviderState] = {}
    for provider in providers.values():
        if isinstance(provider, LimitedProvider):
            states[provider.name] = ProviderState(provider.state.value, provider.paused_for())
    return states


def next_check(
    source: PageSource, order: uuid.UUID, *, now: dt.datetime, in_flight: bool
) -> NextCheck:
    if not source.leading:
        return NextCheck("not leading")
    scheduler = source.scheduler
    due = scheduler.due_in(order.int)
    if due is not None:
        due_in = due - source.monotonic()
        return NextCheck("scheduled", due_in, now + dt.timedelta(seconds=due_in))
    if order.int in scheduler:
        return NextCheck("being checked")
    return NextCheck("not scheduled" if in_flight else "finished")


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
