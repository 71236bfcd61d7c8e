"""One order-monitor instance: a standby until it holds the leader lock, then the engine.

What this module does around the engine (``engine.assembly``): the leader
lock and standby, the checks of the table and the install at start, the
HTTP session and the providers, reloads (SIGHUP), systemd's READY, STATUS and
watchdog, and housekeeping. Stopping (SIGTERM/SIGINT) sets the event the
engine's run waits for; exit 0 once it has drained and written.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
import psycopg

from order_monitor import __version__
from order_monitor.config import Settings, reloaded
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
from order_monitor.db.checks import check_decoding, check_index
from order_monitor.decoding.capture import Capture
from order_monitor.engine.assembly import DeliveryParts, Engine, provider_lookup
from order_monitor.engine.checker import Checker
from order_monitor.engine.decisions import Decision
from order_monitor.engine.handoff import Handoff, HandoffTiming, LeaderSession
from order_monitor.engine.inbox import Confirmer
from order_monitor.engine.listener import Listener
from order_monitor.engine.policy import describe
from order_monitor.engine.scheduler import Scheduler
from order_monitor.engine.sweep import Sweeper
from order_monitor.engine.writer import Writer
from order_monitor.logs import get_logger
from order_monitor.metrics import Metrics
from order_monitor.ops.housekeeping import housekeeping
from order_monitor.ops.http import HttpServer, serve_http
from order_monitor.ops.installed import InstallHealth
from order_monitor.ops.leader import LeaderLock, lock_key
from order_monitor.ops.sdnotify import Notifier
from order_monitor.page.server import OperatorPage
from order_monitor.providers.base import Provider
from order_monitor.providers.registry import ProviderFactory, build_providers, validate_providers

if TYPE_CHECKING:
    from order_monitor.delivery.relay import RelayTiming

log = get_logger()

HOUSEKEEPING_INTERVAL = 5.0
#: How long a start may wait for the database before READY=1 says so.
READY_GRACE = 10.0


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
        relay_timing: RelayTiming | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.scheduler = Scheduler()
        self.notifier = notifier or Notifier.from_environ()
        self._provider_factory = provider_factory
        self._clock = clock
        self._on_ready = on_ready
        self._handoff_timing = handoff_timing
        self._relay_timing = relay_timing
        self._ready_sent = False
        self._stop = asyncio.Event()
        self._lock = LeaderLock(
            settings.dsn.reveal(),
            lock_key(settings.layout.schema, settings.layout.table),
            poll=lock_poll,
            check_interval=lock_check_interval,
            on_progress=self._standby_progress,
        )
        #: The engine while this instance leads, else None.
        self._engine: Engine | None = None
        self._reader: ManagedConnection | None = None
        self._session: aiohttp.ClientSession | None = None
        self._session_limit = asyncio.Semaphore(settings.concurrency)
        self._database_seen_at: float | None = None
        #: Objects of the install found gone while running (uninstall): /readyz's "schema".
        self.install_health = InstallHealth()
        #: True while the engine runs (listener, sweeper, checker, writer).
        #: The /healthz, /readyz, /metrics server while running (None when off).
        self.http_server: HttpServer | None = None
        #: For the operator page: when this process started, and which term as leader it
        #: is in (each new term reads the table again for what it did not see).
        self.started_at = dt.datetime.now(dt.UTC)
        self.term = 0
        #: The providers by provider id, while leading.
        self._providers: Mapping[str, Provider] | None = None
        #: The operator page, served with the probes (None when ORDER_MONITOR_HTTP_LISTEN is off).
        self.page = (
            OperatorPage(
                self,
                listen=settings.http_listen,
                metrics=self.metrics,
                readiness=self._readiness_checks,
            )
            if settings.http_listen is not None
            else None
        )
        self.metrics.track(self.metrics.pending, lambda: float(len(self.scheduler)))
        self.metrics.track(self.metrics.lag, lambda: self.scheduler.lag(self._clock()))
        self.metrics.track(self.metrics.unwritten_age, self.unwritten_age)
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
        applied, restart_needed = reloaded(self.settings, new)
        if restart_needed:
            log.warning(
                "config.restart_needed",
                settings=restart_needed,
                note="these keep their old values until a restart",
            )
        self.settings = applied
        engine = self._engine
        if self._session is None or engine is None:
            log.info("config.reloaded", running=False)
            return
        providers = self._provider_factory(new, self._session, self._session_limit, self.metrics)
        self._providers = providers
        engine.reconfigure(provider_lookup(providers), new)
        log.info(
            "config.reloaded",
            providers=sorted({p.name for p in providers.values()}),
            sweep_interval_s=new.sweep_interval,
        )
        # Orders of a newly configured provider are found by this sweep.
        engine.sweeper.request()

    # --- the engine's pieces, while leading (None otherwise) ------------------------

    @property
    def listener(self) -> Listener | None:
        return self._engine.listener if self._engine else None

    @property
    def handoff(self) -> Handoff | None:
        return self._engine.handoff if self._engine else None

    @property
    def capture(self) -> Capture | None:
        return self._engine.capture if self._engine else None

    @property
    def confirmer(self) -> Confirmer | None:
        return self._engine.confirmer if self._engine else None

    @property
    def checker(self) -> Checker | None:
        return self._engine.checker if self._engine else None

    @property
    def writer(self) -> Writer | None:
        return self._engine.writer if self._engine else None

    @property
    def sweeper(self) -> Sweeper | None:
        return self._engine.sweeper if self._engine else None

    @property
    def providers(self) -> Mapping[str, Provider] | None:
        return self._providers if self._engine else None

    @property
    def leading(self) -> bool:
        """True while the engine runs."""
        return self._engine is not None

    def monotonic(self) -> float:
        """The engine's clock (the schedule's due times are on it)."""
        return self._clock()

    async def _readiness_checks(self) -> tuple[dict[str, dict[str, Any]], list[str]]:
        server = self.http_server
        if server is None:
            return {}, []
        return await server.readiness_checks()

    # --- Readiness (for /readyz) ----------------------------------------------------

    @property
    def role(self) -> str:
        return self._lock.role

    @property
    def database_unreachable(self) -> bool:
        return self._lock.last_error is not None

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

    def unwritten_age(self) -> float:
        """Seconds the oldest result not yet written has waited (0: none, or not leading)."""
        writer = self.writer
        return writer.unwritten_age() if writer is not None else 0.0

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
                unwritten_age=self.unwritten_age,
                install_check=self.install_health.readiness,
                routes=self.page.routes() if self.page is not None else (),
            ) as self.http_server:
                idle = asyncio.create_task(self._keep_systemd_informed(), name="idle-watchdog")
                helpers = {idle}
                if self.page is not None:
                    helpers.add(asyncio.create_task(self.page.run(), name="page"))
                try:
                    await self._lead_until_stopped()
                finally:
                    for task in helpers:
                        task.cancel()
                    await asyncio.wait(helpers)
                    if self.page is not None:
                        await self.page.close()
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
        await check_index(conn, settings.layout)
        if settings.capture == "decoding":
            await check_decoding(conn, settings.layout)
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
            if not term.done() and self._engine is None:
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
            self.term += 1
            settings = self.settings
            dsn = settings.dsn.reveal()
            self._reader = reader = ManagedConnection(dsn, "reader")
            writer_conn = ManagedConnection(dsn, "writer")
            # Its own session: a slow round of deliveries never holds up a write.
            delivery_conn = ManagedConnection(dsn, "delivery") if settings.actions else None
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
                    self._providers = providers
                    delivery = (
                        DeliveryParts(delivery_conn, session, self._relay_timing)
                        if delivery_conn is not None
                        else None
                    )
                    await self._serve(
                        reader, writer_conn, Queries(settings.layout), columns, providers, delivery
                    )
            finally:
                self._session = None
                self._providers = None
                await reader.close()
                await writer_conn.close()
                if delivery_conn is not None:
                    await delivery_conn.close()

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
        delivery: DeliveryParts | None,
    ) -> None:
        self._engine = engine = Engine.build(
            self.settings,
            reader=reader,
            writer_conn=writer_conn,
            queries=queries,
            columns=columns,
            providers=provider_lookup(providers),
            scheduler=self.scheduler,
            metrics=self.metrics,
            clock=self._clock,
            handoff_timing=self._handoff_timing,
            on_listener_connected=self._listener_connected,
            install_health=self.install_health,
            delivery=delivery,
        )
        engine.writer.on_finished = self._finished
        # The busy reads (or the slot's) are made on the leader lock's own
        # session: none outlives the lock (engine.handoff explains why).
        engine.announcer.use_session(LeaderSession(self._lock))
        try:
            await engine.run(
                stop=self._stop,
                lost=self._lock.lost,
                housekeeping=lambda: self._housekeeping(reader),
                # Read at the stop: a reload may have changed it since.
                drain_timeout=lambda: self.settings.drain_timeout,
                pending=lambda: len(self.scheduler),
            )
        finally:
            self._engine = None

    def _finished(self, decision: Decision) -> None:
        if decision.kind == "gave_up" and self.page is not None:
            self.page.gave_up(decision.row.id)

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
            if self._engine is None:
                status = self.status_line()
                self.notifier.status(status)
                self.notifier.watchdog()
                if time.monotonic() - started >= READY_GRACE:
                    self._ready(status)
            await asyncio.sleep(self._tick())

    async def _housekeeping(self, reader: ManagedConnection) -> None:
        def seen() -> None:
            self._database_seen_at = time.monotonic()

        await housekeeping(
            reader,
            metrics=self.metrics,
            notifier=self.notifier,
            status=self.status_line,
            interval=self._tick(),
            database_seen=seen,
        )

    def status_line(self) -> str:
        """The systemd STATUS= text: what `systemctl status` shows."""
        if self._lock.last_error is not None:
            return f"waiting for the database: {self._lock.last_error}"[:200]
        if not self._lock.is_leader:
            return f"{self._lock.role}: waiting for the leader lock"
        if self._engine is None:
            return "leader: connecting to the database"
        sweep_age = self.last_sweep_age()
        unwritten = self.unwritten_age()
        return (
            f"leader: {len(self.scheduler)} pending, {self.scheduler.in_flight} being checked, "
            f"lag {self.scheduler.lag(self._clock()):.1f}s, "
            # Only when there is one: results waiting to be written are the news.
            + (f"oldest unwritten result {unwritten:.0f}s, " if unwritten >= 1 else "")
            + f"listener {'up' if self.listener_connected else 'DOWN'}, "
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
