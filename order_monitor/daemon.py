"""Wiring: listener, sweeper, checker and writer in one asyncio.TaskGroup.

The pieces are supervised together: if one dies of an unexpected error the
group cancels the others and the process exits non-zero, so the service
manager restarts a whole daemon, never a half one. Expected trouble (a
database restart, a provider outage) is handled inside each piece and never
reaches here.

Stopping (SIGTERM/SIGINT): stop taking due orders, let checks under way
finish for up to drain_timeout, write what finished, abandon the rest (the
next start's sweep picks them up where the policy says), close, exit 0.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Final

import aiohttp
import psycopg

from order_monitor import __version__
from order_monitor.config import Settings
from order_monitor.db import (
    AsyncConn,
    ColumnLimits,
    ManagedConnection,
    Queries,
    check_write_function,
    column_limits,
    connect,
    retry_forever,
)
from order_monitor.engine.checker import Checker, CheckerLimits
from order_monitor.engine.handoff import Handoff, HandoffTiming
from order_monitor.engine.inbox import Confirmer, Inbox
from order_monitor.engine.listener import Listener
from order_monitor.engine.policy import describe
from order_monitor.engine.scheduler import Scheduler
from order_monitor.engine.sweep import Sweeper
from order_monitor.engine.writer import Writer
from order_monitor.logs import get_logger
from order_monitor.metrics import Metrics
from order_monitor.ops.http import HttpServer, serve_http
from order_monitor.ops.leader import LeaderLock, lock_key
from order_monitor.ops.sdnotify import Notifier
from order_monitor.providers.base import Provider
from order_monitor.providers.registry import build_adapter, build_provider

log = get_logger()

HOUSEKEEPING_INTERVAL = 5.0
#: Settings a reload cannot change (field, and how an operator knows it).
RESTART_ONLY: Final = (
    ("dsn", "ORDER_MONITOR_DSN"),
    ("layout", "table layout / channels"),
    ("writes", "ORDER_MONITOR_*_STATUS (outcome writes)"),
    ("concurrency", "ORDER_MONITOR_CONCURRENCY"),
    ("batch_size", "ORDER_MONITOR_BATCH_SIZE"),
    ("listener_health_interval", "ORDER_MONITOR_LISTENER_HEALTH_INTERVAL"),
    ("http_listen", "ORDER_MONITOR_HTTP_LISTEN"),
)
#: How long a start may wait for the database before READY=1 says so.
READY_GRACE = 10.0

ProviderFactory = Callable[
    [Settings, aiohttp.ClientSession, asyncio.Semaphore, Metrics], Mapping[str, Provider]
]


def build_providers(
    settings: Settings,
    session: aiohttp.ClientSession,
    session_limit: asyncio.Semaphore,
    metrics: Metrics,
) -> dict[str, Provider]:
    """Every configured provider, keyed by each provider id it serves."""
    by_id: dict[str, Provider] = {}
    for config in settings.providers:
        provider = build_provider(
            config, session=session, session_limit=session_limit, metrics=metrics
        )
        for provider_id in config.provider_ids:
            by_id[provider_id] = provider
    return by_id


def validate_providers(settings: Settings) -> None:
    """Build every configured adapter once: a bad option is a ConfigError now."""
    for config in settings.providers:
        build_adapter(config)


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


class Daemon:
    """One order-monitor instance: standby until it holds the leader lock, then the engine.

    Implements the :class:`~order_monitor.ops.http.Readiness` protocol that
    /readyz asks.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        provider_factory: ProviderFactory = build_providers,
        clock: Callable[[], float] = time.monotonic,
        notifier: Notifier | None = None,
        on_ready: Callable[[], None] | None = None,
        lock_poll: float = 1.5,
        lock_check_interval: float = 5.0,
        handoff_timing: HandoffTiming | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.scheduler = Scheduler()
        self.notifier = notifier or Notifier.from_environ()
        self._provider_factory = provider_factory
        self._clock = clock
        self._on_ready = on_ready
        self._handoff_timing = handoff_timing
        self._ready_sent = False
        self._stop = asyncio.Event()
        self._lock = LeaderLock(
            settings.dsn.reveal(),
            lock_key(settings.layout.schema, settings.layout.table),
            poll=lock_poll,
            check_interval=lock_check_interval,
            on_progress=self._standby_progress,
        )
        self.listener: Listener | None = None
        self.confirmer: Confirmer | None = None
        self.handoff: Handoff | None = None
        self.sweeper: Sweeper | None = None
        self.checker: Checker | None = None
        self.writer: Writer | None = None
        self._reader: ManagedConnection | None = None
        self._session: aiohttp.ClientSession | None = None
        self._session_limit = asyncio.Semaphore(settings.concurrency)
        self._database_seen_at: float | None = None
        #: True while the engine runs (listener, sweeper, checker, writer).
        self._serving = False
        #: The /healthz, /readyz, /metrics server while running (None when off).
        self.http_server: HttpServer | None = None
        self.metrics.track(self.metrics.pending, lambda: float(len(self.scheduler)))
        self.metrics.track(self.metrics.lag, lambda: self.scheduler.lag(self._clock()))
        self.metrics.track(self.metrics.leader, lambda: 1.0 if self._lock.is_leader else 0.0)

    # --- control ------------------------------------------------------------------

    def request_stop(self) -> None:
        self.notifier.stopping()
        self._stop.set()

    def reload(self, new: Settings) -> None:
        """Apply settings that can change live (providers, timings, limits).

        Connection, table layout and channels need a restart: a change to
        them is reported, not applied.
        """
        self.notifier.reloading()
        try:
            self._reload(new)
        finally:
            self.notifier.ready()

    def _reload(self, new: Settings) -> None:
        # Every adapter is built (options checked) even on a standby, so a bad
        # providers file is rejected now, not at a takeover months later.
        validate_providers(new)
        old = self.settings
        restart_needed = [
            label
            for field_name, label in RESTART_ONLY
            if getattr(new, field_name) != getattr(old, field_name)
        ]
        if restart_needed:
            log.warning(
                "config.restart_needed",
                settings=restart_needed,
                note="these keep their old values until a restart",
            )
        # Everything else is applied live: providers, the backoff policy, the
        # sweep interval, the drain timeout (and, in the runner, the log level).
        self.settings = replace(new, **{name: getattr(old, name) for name, _ in RESTART_ONLY})
        if self._session is None or self.checker is None or self.sweeper is None:
            log.info("config.reloaded", running=False)
            return
        providers = self._provider_factory(new, self._session, self._session_limit, self.metrics)
        self.checker.reconfigure(_lookup(providers), new.policy)
        if self.writer is not None:
            self.writer.policy = new.policy
        self.sweeper.policy = new.policy
        if self.confirmer is not None:
            self.confirmer.policy = new.policy
        self.sweeper.interval = new.sweep_interval
        log.info(
            "config.reloaded",
            providers=sorted({p.name for p in providers.values()}),
            sweep_interval_s=new.sweep_interval,
        )
        # Orders of a newly configured provider are found by this sweep.
        self.sweeper.request()

    # --- Readiness (for /readyz) ----------------------------------------------------

    @property
    def role(self) -> str:
        return self._lock.role

    @property
    def listener_connected(self) -> bool:
        return self.listener is not None and self.listener.connected

    async def database_ok(self) -> bool:
        """True when housekeeping reached the database recently (no query per probe)."""
        seen = self._database_seen_at
        return seen is not None and time.monotonic() - seen < 3 * HOUSEKEEPING_INTERVAL

    def last_sweep_age(self) -> float | None:
        if self.sweeper is None or self.sweeper.last_completed is None:
            return None
        return time.monotonic() - self.sweeper.last_completed

    # --- running ------------------------------------------------------------------

    async def run(self) -> None:
        settings = self.settings
        validate_providers(settings)
        log.info(
            "daemon.starting",
            version=__version__,
            database=settings.safe_dsn,
            table=f"{settings.layout.schema}.{settings.layout.table}",
            channel=settings.layout.channel,
            providers=[p.name for p in settings.providers],
            schedule=describe(settings.policy).splitlines()[-1],
        )
        await self._check_schema_at_start()
        try:
            async with serve_http(
                settings.http_listen,
                metrics=self.metrics,
                readiness=self,
                max_sweep_age=settings.sweep_interval * 3,
            ) as self.http_server:
                idle = asyncio.create_task(self._keep_systemd_informed(), name="idle-watchdog")
                try:
                    await self._lead_until_stopped()
                finally:
                    idle.cancel()
                    await asyncio.wait({idle})
        finally:
            self.notifier.close()
            log.info("daemon.stopped", pending=len(self.scheduler))

    async def _check_schema_at_start(self) -> None:
        """Refuse to start (exit 78) on a table or install that cannot work.

        At start, not at a takeover months later: a standby with a typo in
        its settings must fail now, where its operator is looking. A database
        that cannot be reached yet is no verdict; leading checks again.
        """
        try:
            conn = await connect(self.settings.dsn.reveal(), "start-up check", connect_timeout=5)
        except (psycopg.OperationalError, OSError) as exc:
            log.warning(
                "database.unreachable",
                error=str(exc).strip() or type(exc).__name__,
                note="the table and the install are checked once it answers",
            )
            return
        async with conn:
            await self._check_schema(conn)

    async def _check_schema(self, conn: AsyncConn) -> ColumnLimits:
        settings = self.settings
        limits = await column_limits(conn, settings.layout, settings.writes)
        await check_write_function(conn, settings.layout, settings.writes)
        return limits

    async def _lead_until_stopped(self) -> None:
        """Standby, lead, and after a lost lock stand by again, until asked to stop.

        Losing the lock (the database restarted, the network cut the lock
        session) stops the engine at once, since another instance may take
        over, and this one goes back to waiting: it recovers by itself, with
        no restart by the service manager.
        """
        while not self._stop.is_set():
            term = asyncio.create_task(self._lead(), name="leadership")
            stop = asyncio.create_task(self._stop.wait())
            await asyncio.wait({term, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not term.done() and not self._serving:
                # Waiting for the lock or the database: nothing to drain.
                term.cancel()
            await asyncio.wait({term})
            if not term.cancelled() and term.exception() is not None:
                raise term.exception()  # type: ignore[misc]
            if self._lock.lost.is_set() and not self._stop.is_set():
                log.warning("daemon.standing_by_again", reason=self._lock.lost_reason)
                self.scheduler = Scheduler()

    async def _lead(self) -> None:
        async with self._lock.held():
            settings = self.settings
            dsn = settings.dsn.reveal()
            self._reader = reader = ManagedConnection(dsn, "reader")
            writer_conn = ManagedConnection(dsn, "writer")
            try:
                columns = await self._wait_for_database(reader)
                if columns is None:
                    return
                connector = aiohttp.TCPConnector(limit=settings.concurrency, ttl_dns_cache=300)
                async with aiohttp.ClientSession(
                    connector=connector,
                    headers={"User-Agent": f"order-monitor/{__version__}"},
                ) as session:
                    self._session = session
                    providers = self._provider_factory(
                        settings, session, self._session_limit, self.metrics
                    )
                    await self._serve(
                        reader, writer_conn, Queries(settings.layout), columns, providers
                    )
            finally:
                self._session = None
                await reader.close()
                await writer_conn.close()

    async def _wait_for_database(self, reader: ManagedConnection) -> ColumnLimits | None:
        """Connect and check the table, retrying while the database is unreachable.

        A database that is still starting is waited for; a table or column that
        does not exist is a configuration error and stops the daemon.
        """
        retrying = retry_forever("database.unreachable", psycopg.OperationalError, first_wait=0.5)
        async for attempt in retrying:
            with attempt:
                if self._stop.is_set() or self._lock.lost.is_set():
                    return None
                try:
                    return await self._check_schema(await reader.get())
                except psycopg.OperationalError:
                    await reader.reset()
                    raise
        return None  # pragma: no cover - stop_never

    async def _serve(
        self,
        reader: ManagedConnection,
        writer_conn: ManagedConnection,
        queries: Queries,
        columns: ColumnLimits,
        providers: Mapping[str, Provider],
    ) -> None:
        settings = self.settings
        self.writer = writer = Writer(
            writer_conn,
            queries,
            self.scheduler,
            self.metrics,
            self._clock,
            settings.batch_size,
            policy=settings.policy,
            writes=settings.writes,
            columns=columns,
        )
        self.checker = checker = Checker(
            conn=reader,
            queries=queries,
            providers=_lookup(providers),
            scheduler=self.scheduler,
            writer=writer,
            policy=settings.policy,
            writes=settings.writes,
            columns=columns,
            limits=checker_limits(settings),
            metrics=self.metrics,
            clock=self._clock,
        )
        writer.on_rescheduled = checker.wake
        self.sweeper = sweeper = Sweeper(
            reader,
            queries,
            self.scheduler,
            policy=settings.policy,
            interval=settings.sweep_interval,
            page_size=settings.batch_size,
            metrics=self.metrics,
            clock=self._clock,
            on_scheduled=checker.wake,
            group_for=checker.group_for,
        )
        self.confirmer = confirmer = Confirmer(
            Inbox(inbox_capacity(settings)),
            reader,
            queries,
            self.scheduler,
            policy=settings.policy,
            batch_size=settings.batch_size,
            metrics=self.metrics,
            clock=self._clock,
            on_scheduled=checker.wake,
            on_lost=sweeper.request,
            group_for=checker.group_for,
        )
        self.handoff = handoff = Handoff(
            settings.dsn.reveal(),
            queries,
            on_orders=confirmer.taken,
            room=confirmer.room,
            listening=lambda: listener.connected,
            metrics=self.metrics,
            clock=self._clock,
            timing=self._handoff_timing,
            batch_size=settings.batch_size,
        )

        def notified(order: uuid.UUID) -> None:
            confirmer.notified(order)
            handoff.notified()

        self.listener = listener = Listener(
            settings.dsn.reveal(),
            settings.layout.channel,
            on_order=notified,
            on_connected=self._listener_connected,
            metrics=self.metrics,
            health_interval=settings.listener_health_interval,
        )
        lost = self._lock.lost

        self._serving = True
        try:
            await self._run_engine(
                listener, confirmer, handoff, sweeper, checker, writer, reader, lost
            )
        finally:
            self._serving = False
            self.listener = None
            self.handoff = None
            self.confirmer = None
            self.sweeper = None
            self.checker = None
            self.writer = None

    async def _run_engine(
        self,
        listener: Listener,
        confirmer: Confirmer,
        handoff: Handoff,
        sweeper: Sweeper,
        checker: Checker,
        writer: Writer,
        reader: ManagedConnection,
        lost: asyncio.Event,
    ) -> None:
        async with asyncio.TaskGroup() as tg:
            background = [
                tg.create_task(listener.run(), name="listener"),
                tg.create_task(confirmer.run(), name="confirmer"),
                tg.create_task(handoff.run(), name="handoff"),
                tg.create_task(sweeper.run(), name="sweeper"),
                tg.create_task(self._housekeeping(reader), name="housekeeping"),
            ]
            writer_task = tg.create_task(writer.run(), name="writer")
            checker_task = tg.create_task(checker.run(), name="checker")
            stop_wait = tg.create_task(self._stop.wait())
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
                log.warning("daemon.leadership_lost", checks_abandoned=abandoned)
            else:
                log.info(
                    "daemon.stopping", under_way=checker.under_way, pending=len(self.scheduler)
                )
                # Read now: a reload may have changed it since the engine started.
                drain_timeout = self.settings.drain_timeout
                abandoned = await checker.drain(drain_timeout)
                await writer.close()
                try:
                    await asyncio.wait_for(writer_task, drain_timeout)
                except TimeoutError:
                    log.error("daemon.write_abandoned", backlog=writer.backlog)
                if abandoned:
                    log.warning(
                        "daemon.checks_abandoned",
                        orders=abandoned,
                        note="checked again after restart, where the schedule stands",
                    )
            for task in background:
                task.cancel()

    def _tick(self) -> float:
        """Seconds between STATUS=/WATCHDOG=1 updates: at most half of WatchdogSec."""
        return min(
            HOUSEKEEPING_INTERVAL, self.notifier.watchdog_interval() or HOUSEKEEPING_INTERVAL
        )

    async def _keep_systemd_informed(self) -> None:
        """While the engine is not running (standby, or waiting for the database).

        Nothing can wedge but the event loop itself then, and this loop turning
        proves it does not: so it feeds the watchdog, keeps STATUS= current,
        and, should the database stay unreachable, sends READY=1 after a grace
        period, so that a database down at boot is "waiting for the database"
        in `systemctl status` instead of a start timeout and a restart loop.
        """
        started = time.monotonic()
        while True:
            if not self._serving:
                status = self.status_line()
                self.notifier.status(status)
                self.notifier.watchdog()
                if time.monotonic() - started >= READY_GRACE:
                    self._ready(status)
            await asyncio.sleep(self._tick())

    async def _housekeeping(self, reader: ManagedConnection) -> None:
        """While the engine runs: database round trip, metrics, STATUS=, the watchdog.

        WATCHDOG=1 is sent when this loop completes an iteration: a frozen event
        loop, or this coroutine hanging, stops it and systemd restarts us. (A
        hung checker or writer shows in the queue-lag metric, not here.) The
        database query is bounded by a timeout, so a database outage, which the
        engine rides out by itself, does not stop the pings.
        """
        interval = self._tick()
        while True:
            try:
                async with asyncio.timeout(interval):
                    cursor = await (await reader.get()).execute(
                        "SELECT pg_notification_queue_usage()"
                    )
                    row = await cursor.fetchone()
                if row is not None:
                    self.metrics.notification_queue.set(float(row[0]))
                    self._database_seen_at = time.monotonic()
                    if row[0] > 0.5:
                        log.warning(
                            "database.notification_queue_filling",
                            usage=round(float(row[0]), 3),
                            note="when full, the application's COMMITs that NOTIFY fail",
                        )
            except TimeoutError:
                # Slow, or queued behind a sweep page on the shared connection:
                # not a reason to cut that connection under the others.
                log.warning("database.slow", waited_s=interval)
            except (psycopg.Error, OSError) as exc:
                await reader.reset()
                log.warning("database.unreachable", error=str(exc).strip() or type(exc).__name__)
            self.notifier.status(self.status_line())
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    def status_line(self) -> str:
        """The systemd STATUS= text: what `systemctl status` shows."""
        if self._lock.last_error is not None:
            return f"waiting for the database: {self._lock.last_error}"[:200]
        if not self._lock.is_leader:
            return f"{self._lock.role}: waiting for the leader lock"
        if not self._serving:
            return "leader: connecting to the database"
        sweep_age = self.last_sweep_age()
        return (
            f"leader: {len(self.scheduler)} pending, {self.scheduler.in_flight} being checked, "
            f"lag {self.scheduler.lag(self._clock()):.1f}s, "
            f"listener {'up' if self.listener_connected else 'DOWN'}, "
            + (f"last sweep {sweep_age:.0f}s ago" if sweep_age is not None else "no sweep yet")
        )

    def _listener_connected(self) -> None:
        if self.sweeper is not None:
            self.sweeper.request()
        self._ready("leader: listening")

    def _standby_progress(self) -> None:
        self._ready("standby: waiting for the leader lock")

    def _ready(self, status: str) -> None:
        if self._ready_sent:
            return
        self._ready_sent = True
        self.notifier.ready(status)
        if self._on_ready is not None:
            self._on_ready()


def _lookup(providers: Mapping[str, Provider]) -> Callable[[str | None], Provider | None]:
    def lookup(provider_id: str | None) -> Provider | None:
        return providers.get(provider_id) if provider_id is not None else None

    return lookup
