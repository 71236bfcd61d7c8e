"""The engine's pieces built for one term as leader, and run together.

The pieces are supervised together: if one dies of an unexpected error the
group cancels the others and the process exits non-zero, so the service
manager restarts a whole daemon, never a half one. Expected trouble (a
database restart, a provider outage) is handled inside each piece and never
reaches here.

Stopping: stop taking due orders, let checks under way finish for up to
drain_timeout, write what finished, abandon the rest (the next start's sweep
picks them up where the policy says). Leadership lost: stop at once and write
nothing, since another instance may be working already.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

from order_monitor.config import Settings
from order_monitor.db import ColumnLimits, ManagedConnection, Queries
from order_monitor.decoding.capture import Capture
from order_monitor.engine.anchors import DispatchAnchors
from order_monitor.engine.checker import Checker, CheckerLimits
from order_monitor.engine.handoff import Handoff, HandoffTiming, OwnSession
from order_monitor.engine.inbox import Confirmer, Inbox
from order_monitor.engine.listener import Listener
from order_monitor.engine.scheduler import Scheduler
from order_monitor.engine.sweep import Sweeper
from order_monitor.engine.writer import Writer
from order_monitor.logs import get_logger
from order_monitor.metrics import Metrics
from order_monitor.ops.installed import InstallHealth
from order_monitor.providers.base import Provider

if TYPE_CHECKING:
    from order_monitor.delivery.relay import Relay, RelayTiming

log = get_logger()

ProviderLookup = Callable[[str | None], Provider | None]


def inbox_capacity(settings: Settings) -> int:
    """Notified ids waiting for confirmation at most (about 100 bytes each)."""
    return max(10_000, settings.batch_size * 20)


def checker_limits(settings: Settings) -> CheckerLimits:
    """How many orders may be under way: enough to keep every request slot busy,
    and one provider never more than half, so a stuck provider leaves room for
    the others."""
    max_in_flight = max(settings.batch_size * 4, settings.concurrency * 50)
    return CheckerLimits(
        batch_size=settings.batch_size,
        max_in_flight=max_in_flight,
        max_in_flight_per_provider=max(settings.batch_size, max_in_flight // 2),
    )


def provider_lookup(providers: Mapping[str, Provider]) -> ProviderLookup:
    """The provider serving an order's provider id, or None."""

    def lookup(provider_id: str | None) -> Provider | None:
        return providers.get(provider_id) if provider_id is not None else None

    return lookup


@dataclass(frozen=True, slots=True)
class DeliveryParts:
    """What the relay needs from the daemon: its own connection and the shared HTTP session."""

    conn: ManagedConnection
    session: aiohttp.ClientSession
    timing: RelayTiming | None = None


def build_relay(
    settings: Settings,
    parts: DeliveryParts,
    *,
    metrics: Metrics,
    install_health: InstallHealth | None,
) -> Relay:
    """The relay for *settings*' actions (imported here: a daemon without actions never
    loads the delivery package)."""
    from order_monitor.delivery.relay import Relay
    from order_monitor.delivery.sender import build_senders
    from order_monitor.delivery.store import OutboxStore

    return Relay(
        parts.conn,
        OutboxStore(settings.layout),
        settings.actions,
        build_senders(settings.actions, parts.session),
        metrics=metrics,
        timing=parts.timing,
        health=install_health,
    )


@dataclass(slots=True)
class Engine:
    """Every piece of the engine, in the order an order meets them."""

    listener: Listener
    #: Announces orders while busy (reads of what changed) and switches to
    #: NOTIFY while quiet; None with ORDER_MONITOR_CAPTURE=decoding.
    handoff: Handoff | None
    confirmer: Confirmer
    checker: Checker
    writer: Writer
    sweeper: Sweeper
    #: Delivers the outbox to the application; None when no action is configured.
    relay: Relay | None = None
    #: Reads the logical replication slot instead (ORDER_MONITOR_CAPTURE=decoding).
    capture: Capture | None = None

    @property
    def announcer(self) -> Handoff | Capture:
        """Whichever finds the orders no NOTIFY announced: the handoff or the slot's reads."""
        if self.capture is not None:
            return self.capture
        assert self.handoff is not None
        return self.handoff

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        reader: ManagedConnection,
        writer_conn: ManagedConnection,
        queries: Queries,
        columns: ColumnLimits,
        providers: ProviderLookup,
        scheduler: Scheduler,
        metrics: Metrics,
        clock: Callable[[], float],
        handoff_timing: HandoffTiming | None,
        on_listener_connected: Callable[[], None],
        install_health: InstallHealth | None = None,
        delivery: DeliveryParts | None = None,
    ) -> Engine:
        """The pieces, wired: who wakes whom, who hands what to whom."""
        # One for every reader of rows, so an order keeps its anchor whichever meets it.
        anchors = DispatchAnchors(settings.layout, metrics)
        writer = Writer(
            writer_conn,
            queries,
            scheduler,
            metrics,
            clock,
            settings.batch_size,
            policy=settings.policy,
            writes=settings.writes,
            columns=columns,
            health=install_health,
        )
        checker = Checker(
            conn=reader,
            queries=queries,
            providers=providers,
            scheduler=scheduler,
            writer=writer,
            policy=settings.policy,
            writes=settings.writes,
            columns=columns,
            limits=checker_limits(settings),
            metrics=metrics,
            clock=clock,
            anchors=anchors,
        )
        writer.on_rescheduled = checker.wake
        sweeper = Sweeper(
            reader,
            queries,
            scheduler,
            policy=settings.policy,
            interval=settings.sweep_interval,
            page_size=settings.batch_size,
            metrics=metrics,
            clock=clock,
            on_scheduled=checker.wake,
            group_for=checker.group_for,
            anchors=anchors,
        )
        confirmer = Confirmer(
            Inbox(inbox_capacity(settings)),
            reader,
            queries,
            scheduler,
            policy=settings.policy,
            batch_size=settings.batch_size,
            metrics=metrics,
            clock=clock,
            on_scheduled=checker.wake,
            on_lost=sweeper.request,
            group_for=checker.group_for,
            anchors=anchors,
        )
        capture = None
        handoff = None
        if settings.capture == "decoding":
            capture = Capture(
                settings.layout,
                # Replaced by the leader lock's session (Daemon._lead).
                session=OwnSession(settings.dsn.reveal()),
                on_orders=confirmer.taken,
                known=lambda order: order.int in scheduler,
                settled=confirmer.settled,
                on_lost=sweeper.request,
                metrics=metrics,
                clock=clock,
                initial_delay=settings.policy.initial_delay,
                health=install_health,
            )
        else:
            handoff = Handoff(
                settings.dsn.reveal(),
                queries,
                on_orders=confirmer.taken,
                on_rows=confirmer.found,
                room=confirmer.room,
                known=lambda order: order.int in scheduler,
                initial_delay=settings.policy.initial_delay,
                listening=lambda: listener.connected,
                metrics=metrics,
                clock=clock,
                timing=handoff_timing,
                batch_size=settings.batch_size,
                use_notify=settings.handoff == "auto",
                health=install_health,
            )

        def notified(order: uuid.UUID) -> None:
            confirmer.notified(order)
            if handoff is not None:
                handoff.notified()

        listener = Listener(
            settings.dsn.reveal(),
            settings.layout.channel,
            on_order=notified,
            on_connected=on_listener_connected,
            metrics=metrics,
            health_interval=settings.listener_health_interval,
        )
        relay = None
        if settings.actions and delivery is not None:
            relay = build_relay(settings, delivery, metrics=metrics, install_health=install_health)
            writer.on_delivery = relay.wake
        return cls(listener, handoff, confirmer, checker, writer, sweeper, relay, capture)

    def reconfigure(self, providers: ProviderLookup, settings: Settings) -> None:
        """New providers, policy and sweep interval from the next batch on (SIGHUP)."""
        self.checker.reconfigure(providers, settings.policy)
        self.writer.policy = settings.policy
        self.sweeper.policy = settings.policy
        self.confirmer.policy = settings.policy
        self.announcer.initial_delay = settings.policy.initial_delay
        self.sweeper.interval = settings.sweep_interval

    async def run(
        self,
        *,
        stop: asyncio.Event,
        lost: asyncio.Event,
        housekeeping: Callable[[], Coroutine[Any, Any, None]],
        drain_timeout: Callable[[], float],
        pending: Callable[[], int],
    ) -> None:
        """Run every piece until *stop* (drain, then write) or *lost* (abandon at once)."""
        checker, writer, relay = self.checker, self.writer, self.relay
        async with asyncio.TaskGroup() as tg:
            background = [
                tg.create_task(self.listener.run(), name="listener"),
                tg.create_task(self.confirmer.run(), name="confirmer"),
                tg.create_task(self.announcer.run(), name="announcer"),
                tg.create_task(self.sweeper.run(), name="sweeper"),
                tg.create_task(housekeeping(), name="housekeeping"),
            ]
            writer_task = tg.create_task(writer.run(), name="writer")
            checker_task = tg.create_task(checker.run(), name="checker")
            # Only the leader delivers: the relay lives and dies with this term.
            relay_task = tg.create_task(relay.run(), name="relay") if relay else None
            stop_wait = tg.create_task(stop.wait())
            lost_wait = tg.create_task(lost.wait())
            await asyncio.wait({stop_wait, lost_wait}, return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            lost_wait.cancel()

            checker.stop()
            await checker_task
            if lost.is_set():
                # Another instance may be working already: stop at once, write nothing.
                abandoned = await checker.drain(0)
                writer_task.cancel()
                if relay_task is not None:
                    # Requests under way are abandoned: their entries are still
                    # in the outbox, and whoever leads next sends them again with
                    # the same delivery ids (at least once; the receiver dedups).
                    relay_task.cancel()
                log.warning("daemon.leadership_lost", checks_abandoned=abandoned)
            else:
                log.info("daemon.stopping", under_way=checker.under_way, pending=pending())
                # Read now: a reload may have changed it since the engine started.
                timeout = drain_timeout()
                abandoned = await checker.drain(timeout)
                await writer.close()
                try:
                    await asyncio.wait_for(writer_task, timeout)
                except TimeoutError:
                    log.error("daemon.write_abandoned", backlog=writer.backlog)
                if abandoned:
                    log.warning(
                        "daemon.checks_abandoned",
                        orders=abandoned,
                        note="checked again after restart, where the schedule stands",
                    )
                if relay is not None and relay_task is not None:
                    # After the writer: its last results are in the outbox and
                    # may go out in the round under way. A round cut off by the
                    # timeout is safe too (at least once: the entries stay).
                    relay.stop()
                    try:
                        await asyncio.wait_for(relay_task, timeout)
                    except TimeoutError:
                        log.warning(
                            "daemon.deliveries_abandoned",
                            note="requests under way were cut off; the entries stay in the "
                            "outbox and are sent again with the same ids",
                        )
            for task in background:
                task.cancel()
